"""SmolVLA checkpoint folders in LeRobot's layout: round trip, key names, clear errors, inputs, Policy."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from smolvla_fixtures import (
    PAD_TOKEN,
    make_smolvla_checkpoint,
    model_inputs,
    robot_images,
    robot_state,
    write_smolvlm_tokenizer,
)
from tokenizers import Tokenizer

from quantvla_ros.models.common.checkpoint import CheckpointError
from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.policy import Observation, load_float_policy
from quantvla_ros.models.registry import family_for, load_model, read_checkpoint
from quantvla_ros.models.smolvla.checkpoint import SMOLVLA_FAMILY, save_smolvla
from quantvla_ros.models.smolvla.config import smolvla_tiny
from quantvla_ros.models.smolvla.model import SmolVLAModel
from quantvla_ros.models.smolvla.processor import SmolVLAProcessor

from conftest import ACTION_DIM, STATE_DIM, to_legacy_lerobot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_smolvla_checkpoint(tmp_path_factory.mktemp("smolvla"))


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def actions(model) -> torch.Tensor:
    return model.sample_actions(**model_inputs(model.cfg))


def test_checkpoint_reads_back_with_its_config_and_statistics(checkpoint):
    family, raw = family_for(checkpoint)
    assert family is SMOLVLA_FAMILY and raw["type"] == "smolvla"
    info = read_checkpoint(checkpoint)
    cfg = info.config
    assert info.layout == "lerobot"
    assert cfg.camera_names == ("camera1", "camera2")
    assert (cfg.action_horizon, cfg.action_dim, cfg.max_state_dim, cfg.num_vlm_layers) == (50, 8, 8, 4)
    assert (info.state_dim, info.action_dim) == (STATE_DIM, ACTION_DIM)
    assert info.state_norm == info.action_norm == "mean_std"
    assert info.norm_stats["state"].mean.shape == (STATE_DIM,)


def test_save_load_round_trip_gives_identical_actions(checkpoint, tmp_path):
    model, info, _ = load_model(checkpoint)
    again_path = save_smolvla(model, tmp_path / "again", info.norm_stats, tokenizer_dir=checkpoint)
    again, info2, _ = load_model(again_path)
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.testing.assert_close(actions(again), actions(model), rtol=0, atol=0)
    assert (info2.norm_stats["actions"].std == info.norm_stats["actions"].std).all()
    assert (again_path / "tokenizer.json").exists()


def test_sharded_checkpoint_loads_like_the_single_file(checkpoint, tmp_path):
    model, info, _ = load_model(checkpoint)
    sharded = save_smolvla(model, tmp_path / "sharded", info.norm_stats, checkpoint, max_shard_bytes=200_000)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    again, _, _ = load_model(sharded)
    torch.testing.assert_close(actions(again), actions(model), rtol=0, atol=0)


def test_files_use_lerobot_key_names(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    assert all(k.startswith("model.") for k in tensors)
    expected = {
        "model.vlm_with_expert.vlm.model.vision_model.embeddings.patch_embedding.weight": (16, 3, 8, 8),
        "model.vlm_with_expert.vlm.model.vision_model.encoder.layers.1.self_attn.out_proj.bias": (16,),
        "model.vlm_with_expert.vlm.model.vision_model.post_layernorm.weight": (16,),
        "model.vlm_with_expert.vlm.model.connector.modality_projection.proj.weight": (48, 64),
        "model.vlm_with_expert.vlm.model.text_model.layers.3.mlp.gate_proj.weight": (96, 48),
        "model.vlm_with_expert.lm_expert.layers.0.self_attn.k_proj.weight": (16, 36),
        "model.vlm_with_expert.lm_expert.layers.1.self_attn.k_proj.weight": (16, 16),  # cross: reads VLM K
        "model.vlm_with_expert.lm_expert.norm.weight": (36,),
        "model.state_proj.weight": (48, 8),
        "model.action_time_mlp_in.weight": (36, 72),
    }
    for key, shape in expected.items():
        assert tuple(tensors[key].shape) == shape, key
    assert not any(".text_model.norm." in k or "lm_head" in k or "lm_expert.embed_tokens" in k for k in tensors)


def test_keys_inference_never_reads_are_ignored(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    extra = {
        "model.vlm_with_expert.vlm.lm_head.weight": torch.zeros(8, 48),
        "model.vlm_with_expert.vlm.model.text_model.norm.weight": torch.ones(48),
        "model.vlm_with_expert.vlm.model.text_model.layers.4.mlp.up_proj.weight": torch.zeros(96, 48),
    }
    edit_weights(path, lambda t: t.update(extra))
    model, _, _ = load_model(path)
    reference, _, _ = load_model(checkpoint)
    torch.testing.assert_close(actions(model), actions(reference), rtol=0, atol=0)
    _, ignored = SMOLVLA_FAMILY.canonical_state_dict(load_file(path / "model.safetensors"), "lerobot")
    assert sorted(ignored) == sorted(k.removeprefix("model.") for k in extra)


def test_missing_and_unexpected_keys_are_named(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    layer = "model.vlm_with_expert.lm_expert.layers.1.self_attn."
    edit_weights(path, lambda t: t.update({layer + "w_proj.weight": t.pop(layer + "v_proj.weight")}))
    with pytest.raises(
        CheckpointError, match=r"missing 1 key\(s\): vlm_with_expert\.lm_expert\.layers\.1\.self_attn\.v"
    ):
        load_model(path)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): .*w_proj"):
        load_model(path)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    key = "model.action_out_proj.weight"
    edit_weights(path, lambda t: t.update({key: torch.zeros(7, 36)}))
    with pytest.raises(
        CheckpointError, match=r"action_out_proj\.weight has shape \(7, 36\) but config\.json implies \(8, 36\)"
    ):
        load_model(path)


def test_other_policy_type_is_refused_in_one_sentence(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    edit_config(path, type="act")
    with pytest.raises(CheckpointError, match=r"config\.json describes a 'act' policy; this package loads .*smolvla"):
        load_model(path)
    assert not SMOLVLA_FAMILY.claims({"type": "pi05"}, path)


def test_unknown_backbone_is_refused(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.pop("vlm_config", None)
    config["vlm_model_name"] = "someone/SmolVLM-9B"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: vlm_model_name 'someone/SmolVLM-9B' is not a backbone"):
        read_checkpoint(path)


def test_unsupported_settings_are_refused(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    edit_config(path, resize_imgs_with_padding=[256, 256])
    with pytest.raises(CheckpointError, match=r"resizes images to \[256, 256\] but the vision tower takes 32×32"):
        read_checkpoint(path)
    edit_config(path, resize_imgs_with_padding=[32, 32], num_expert_layers=2)
    with pytest.raises(CheckpointError, match=r"num_expert_layers=2"):
        read_checkpoint(path)


def test_missing_tokenizer_is_one_sentence(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"has no tokenizer\.json; copy tokenizer\.json and tokenizer_config\.json of"
    ):
        load_float_policy(path)


def test_missing_normalizer_file_is_one_sentence(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    (path / "policy_preprocessor_step_5_normalizer_processor.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lacks the normalizer file\(s\) its processor JSON names: policy_pre"):
        read_checkpoint(path)


def test_side_files_cover_every_non_weight_file(checkpoint):
    files = [p.name for p in checkpoint.iterdir() if not p.name.startswith("model")]
    assert files
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in SMOLVLA_FAMILY.side_files), name


# ---- inputs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor(checkpoint) -> SmolVLAProcessor:
    return SmolVLAProcessor.from_checkpoint(read_checkpoint(checkpoint))


def test_images_are_padded_on_the_top_and_left(processor):
    wide = np.full((8, 32, 3), 255, dtype=np.uint8)  # 32 px wide: scaled 1:1, 24 rows of padding
    tall = np.full((64, 16, 3), 255, dtype=np.uint8)  # halved to 32×8: 24 columns of padding
    images, masks = processor.images({"camera1": wide, "camera2": tall})
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.float32 and masks == [True, True]
    assert (images[0, :, :24] == -1).all() and (images[0, :, 24:] == 1).all()
    assert (images[1, :, :, :24] == -1).all() and (images[1, :, :, 24:] == 1).all()


def test_resize_is_bilinear_without_antialiasing(processor):
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    images, _ = processor.images({"camera1": image})
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    expected = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False) * 2 - 1
    np.testing.assert_allclose(images[0], expected[0].numpy(), rtol=0, atol=1e-6)


def test_missing_camera_is_a_masked_black_image(processor):
    images, masks = processor.images({"camera2": np.zeros((32, 32, 3), dtype=np.uint8)})
    assert masks == [False, True]
    assert (images[0] == -1).all()


def test_prompt_ends_with_a_newline_and_is_right_padded(processor, checkpoint):
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokens, mask = processor.prompt("pick up the red cup", np.zeros(STATE_DIM, dtype=np.float32))
    expected = tokenizer.encode("pick up the red cup\n").ids
    assert tokens.shape == mask.shape == (16,) and tokens.dtype == np.int64
    assert tokens[: len(expected)].tolist() == expected and mask.sum() == len(expected)
    assert (tokens[len(expected) :] == tokenizer.token_to_id(PAD_TOKEN)).all()
    assert tokenizer.token_to_id("<|im_start|>") not in expected  # SmolVLM2's tokenizer adds no BOS
    again, _ = processor.prompt("pick up the red cup\n", np.zeros(STATE_DIM, dtype=np.float32))
    assert (again == tokens).all()
    # The tokens depend on the instruction alone: the next inference with it does not tokenize.
    hits = type(processor)._tokens.cache_info().hits
    tokens[:] = -1  # and what a caller does with its copy does not reach the cache
    same, _ = processor.prompt("pick up the red cup", np.ones(STATE_DIM, dtype=np.float32))
    assert type(processor)._tokens.cache_info().hits == hits + 1 and (same == again).all()


def test_long_prompt_keeps_its_end(processor, checkpoint):
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    text = " ".join(["open the top drawer"] * 6)
    tokens, mask = processor.prompt(text, np.zeros(STATE_DIM, dtype=np.float32))
    assert mask.all()
    assert tokens.tolist() == tokenizer.encode(text + "\n").ids[-16:]  # tokenizer_config.json: truncation_side left


# ---- Policy ------------------------------------------------------------------------------
def test_policy_predicts_a_chunk_in_robot_units(checkpoint):
    policy = load_float_policy(checkpoint)
    assert policy.camera_names == ("camera1", "camera2")
    assert (policy.state_dim, policy.action_dim, policy.horizon) == (STATE_DIM, ACTION_DIM, 50)
    obs = Observation(images=robot_images(), instruction="pick up the red cup", state=robot_state())
    noise = np.random.default_rng(3).standard_normal((50, 8)).astype(np.float32)
    chunk = policy.predict(obs, noise=noise)
    assert chunk.actions.shape == (50, ACTION_DIM) and chunk.actions.dtype == np.float32
    assert np.isfinite(chunk.actions).all()
    # Un-normalized with the action statistics: far from the model's [-1, 1]-ish range.
    assert np.abs(chunk.actions).max() > 5
    np.testing.assert_array_equal(policy.predict(obs, noise=noise).actions, chunk.actions)
    other = policy.predict(
        Observation(images=robot_images(1), instruction="close the window", state=robot_state(1)), noise
    )
    assert np.abs(other.actions - chunk.actions).max() > 1e-4
    assert policy.input_signature()["image_padding"] == "top_left"


# ---- adapt_to_pi_aloha -------------------------------------------------------------------
def lerobot_decode_state(state: torch.Tensor) -> torch.Tensor:
    """LeRobot's SmolVLAPolicy._pi_aloha_decode_state, transcribed (torch, float32)."""
    state = state.clone()
    for i in [1, 2, 8, 9]:
        state[:, i] *= -1
    for i in [6, 13]:
        value = state[:, i] * (0.05800 - 0.01844) + 0.01844
        value = torch.arcsin(torch.clamp((0.022**2 + value**2 - 0.036**2) / (2 * 0.022 * value), -1.0, 1.0))
        state[:, i] = (value - 0.4) / (1.5 - 0.4)
    return state


def lerobot_encode_actions(actions: torch.Tensor) -> torch.Tensor:
    """LeRobot's SmolVLAPolicy._pi_aloha_encode_actions, transcribed."""
    actions = actions.clone()
    for i in [1, 2, 8, 9]:
        actions[:, :, i] *= -1
    for i in [6, 13]:
        actions[:, :, i] = (actions[:, :, i] * (1.5 - 0.4) + 0.4 - -0.6213) / (1.4910 - -0.6213)
    return actions


@pytest.fixture(scope="module")
def aloha_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aloha")
    tokenizer = write_smolvlm_tokenizer(root / "tokenizer")
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    model = SmolVLAModel(dataclasses.replace(smolvla_tiny(vocab), max_state_dim=16, action_dim=16)).eval()
    rng = np.random.default_rng(5)
    stats = {k: NormStats(mean=rng.uniform(-0.2, 0.2, 14), std=rng.uniform(0.2, 0.5, 14)) for k in ("state", "actions")}
    current = save_smolvla(model, root / "current", stats, tokenizer)
    edit_config(current, adapt_to_pi_aloha=True)
    return {"current": current, "legacy": to_legacy_lerobot(current, root / "legacy")}


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_adapt_to_pi_aloha_converts_state_and_actions_where_lerobot_did(aloha_checkpoints, layout):
    policy = load_float_policy(aloha_checkpoints[layout])
    state = np.random.default_rng(1).uniform(0.1, 0.9, 14).astype(np.float32)  # grippers: Aloha's 0..1
    obs = Observation(images=robot_images(), instruction="pick up the red cup", state=state)
    stats = {k: policy.info.norm_stats[k] for k in ("state", "actions")}
    mean, std = (torch.tensor(np.asarray(getattr(stats["state"], n), np.float32)) for n in ("mean", "std"))
    raw = torch.from_numpy(state)[None]
    # LeRobot 0.4 on normalizes in its processor pipeline first; earlier releases converted robot units.
    if layout == "current":
        expected_state = lerobot_decode_state((raw - mean) / (std + 1e-8))
    else:
        expected_state = (lerobot_decode_state(raw) - mean) / (std + 1e-8)
    np.testing.assert_allclose(policy.prepare(obs).state[0, :14].numpy(), expected_state[0].numpy(), atol=1e-5)

    noise = np.random.default_rng(2).standard_normal((policy.horizon, 16)).astype(np.float32)
    model_actions = policy.sample(policy.prepare(obs), noise)[:, :, :14]
    a_mean, a_std = (torch.tensor(np.asarray(getattr(stats["actions"], n), np.float32)) for n in ("mean", "std"))
    if layout == "current":
        expected = lerobot_encode_actions(model_actions) * (a_std + 1e-8) + a_mean
    else:
        expected = lerobot_encode_actions(model_actions * (a_std + 1e-8) + a_mean)
    np.testing.assert_allclose(policy.predict(obs, noise).actions, expected[0].numpy(), atol=1e-4)
    assert policy.input_signature()["robot_adapter"] == "adapt_to_pi_aloha"


def test_aloha_settings_that_cannot_be_honoured_are_refused(checkpoint, aloha_checkpoints, tmp_path):
    six_joints = copy(checkpoint, tmp_path)
    edit_config(six_joints, adapt_to_pi_aloha=True)
    with pytest.raises(CheckpointError, match=r"adapt_to_pi_aloha, which converts a 14-value Aloha state"):
        read_checkpoint(six_joints)
    delta = copy(aloha_checkpoints["current"], tmp_path)
    edit_config(delta, use_delta_joint_actions_aloha=True)
    with pytest.raises(CheckpointError, match="use_delta_joint_actions_aloha, which LeRobot itself never implemented"):
        read_checkpoint(delta)


@pytest.mark.parametrize(
    ("changes", "attribute", "expected"),
    [
        ({"chunk_size": 7}, "action_horizon", 7),
        ({"num_steps": 4}, "num_steps", 4),
        ({"tokenizer_max_length": 20}, "max_token_len", 20),
        ({"empty_cameras": 1}, "camera_names", ("camera1", "camera2", "empty_camera_0")),
        ({"attention_mode": "self_attn"}, "cross_attention", False),
        ({"self_attn_every_n_layers": 3}, "self_attn_every_n_layers", 3),
        ({"min_period": 0.01}, "min_period", 0.01),
        ({"max_period": 2.0}, "max_period", 2.0),
    ],
)
def test_config_fields_that_shape_inputs_and_outputs_are_read(checkpoint, tmp_path, changes, attribute, expected):
    path = copy(checkpoint, tmp_path)
    assert getattr(read_checkpoint(path).config, attribute) != expected
    edit_config(path, **changes)
    assert getattr(read_checkpoint(path).config, attribute) == expected


def test_normalized_images_are_refused(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    edit_config(path, normalization_mapping={"VISUAL": "MEAN_STD", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"})
    with pytest.raises(
        CheckpointError,
        match=r'config\.json sets normalization_mapping\.VISUAL="MEAN_STD" \(supported: "IDENTITY"\); '
        r"this package feeds SmolVLA unnormalized images\.$",
    ):
        read_checkpoint(path)
