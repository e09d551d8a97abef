"""Checkpoint folders in the openpi and LeRobot layouts: load, save, round trip, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantvla_ros.models.common.checkpoint import CheckpointError
from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.init_checkpoint import init_checkpoint
from quantvla_ros.models.pi0.checkpoint import EMBED_TOKENS, LM_HEAD, save_pi0
from quantvla_ros.models.pi0.config import tiny
from quantvla_ros.models.policy import load_float_policy
from quantvla_ros.models.registry import load_model, read_checkpoint

from conftest import ACTION_DIM, INSTRUCTIONS, STATE_DIM, make_checkpoint, observation, to_legacy_lerobot

pytestmark = pytest.mark.integration


def load_pi0(path: Path):
    model, info, family = load_model(path)
    assert family.name == "pi0"
    return model, info


LAYOUTS = [(pi05, layout) for pi05 in (False, True) for layout in ("openpi", "lerobot")]
IDS = [f"{'pi05' if p else 'pi0'}-{layout}" for p, layout in LAYOUTS]


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


@pytest.mark.parametrize(("pi05", "layout"), LAYOUTS, ids=IDS)
def test_checkpoint_reads_back_with_its_config_and_statistics(checkpoints, pi05, layout):
    info = read_checkpoint(checkpoints[(pi05, layout)])
    assert info.layout == layout
    assert info.config.pi05 == pi05
    assert info.config.llm == tiny(pi05).llm and info.config.vision == tiny(pi05).vision
    assert info.config.camera_names == tiny(pi05).camera_names
    assert (info.state_dim, info.action_dim) == (STATE_DIM, ACTION_DIM)
    assert info.state_norm == info.action_norm == ("quantiles" if pi05 else "mean_std")


@pytest.mark.parametrize(("pi05", "layout"), LAYOUTS, ids=IDS)
def test_save_load_round_trip_is_exact(checkpoints, tmp_path, pi05, layout):
    model, info = load_pi0(checkpoints[(pi05, layout)])
    out = save_pi0(model, tmp_path / "again", layout, info.norm_stats, tokenizer_dir=info.path)
    again, info2 = load_pi0(out)
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    for name in ("state", "actions"):
        assert (info2.norm_stats[name].mean == info.norm_stats[name].mean).all()
    assert (out / "tokenizer.model").exists()


@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
def test_files_use_the_real_key_names(checkpoints, layout):
    keys = set(load_file(checkpoints[(True, layout)] / "model.safetensors"))
    prefix = "model." if layout == "lerobot" else ""
    assert prefix + LM_HEAD in keys and prefix + EMBED_TOKENS not in keys
    expected = [
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight",
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.bias",
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight",
        "paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.gate_proj.weight",
        "paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight",
        "paligemma_with_expert.gemma_expert.model.norm.dense.bias",
        "time_mlp_in.weight",
        "action_out_proj.bias",
    ]
    for key in expected:
        assert prefix + key in keys, key


def test_sharded_checkpoint_loads_like_the_single_file(checkpoints, tmp_path):
    model, info = load_pi0(checkpoints[(True, "openpi")])
    out = save_pi0(model, tmp_path / "sharded", "openpi", info.norm_stats, info.path, max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    again, _ = load_pi0(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_embedding_stored_instead_of_lm_head_and_unused_heads_are_ignored(checkpoints, tmp_path):
    path = copy(checkpoints[(False, "openpi")], tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors[EMBED_TOKENS] = tensors.pop(LM_HEAD)
    tensors["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(7, 32)
    save_file(tensors, path / "model.safetensors")
    model, _ = load_pi0(path)
    assert torch.equal(model.llm.embed_tokens.weight, tensors[EMBED_TOKENS])


def test_legacy_transformers_key_names_load(checkpoints, tmp_path):
    path = copy(checkpoints[(False, "lerobot")], tmp_path)
    tensors = load_file(path / "model.safetensors")
    renamed = {
        k.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
        .replace("paligemma.model.vision_tower.", "paligemma.vision_tower.")
        .replace("paligemma.lm_head.", "paligemma.language_model.lm_head."): v
        for k, v in tensors.items()
    }
    assert renamed.keys() != tensors.keys()
    save_file(renamed, path / "model.safetensors")
    model, _ = load_pi0(path)
    reference, _ = load_pi0(checkpoints[(False, "lerobot")])
    assert torch.equal(model.llm.layers[0].mlp.up_proj.weight, reference.llm.layers[0].mlp.up_proj.weight)


def test_missing_key_is_named(checkpoints, tmp_path):
    path = copy(checkpoints[(True, "openpi")], tmp_path)
    tensors = load_file(path / "model.safetensors")
    gone = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.down_proj.weight"
    del tensors[gone]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): " + gone.replace(".", r"\.")):
        load_pi0(path)


def test_wrong_shape_is_named(checkpoints, tmp_path):
    path = copy(checkpoints[(True, "openpi")], tmp_path)
    tensors = load_file(path / "model.safetensors")
    key = "action_in_proj.weight"
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"action_in_proj\.weight has shape \(3, 3\)"):
        load_pi0(path)


def test_pi0_weights_under_a_pi05_config_fail_naming_the_differences(checkpoints, tmp_path):
    path = copy(checkpoints[(False, "openpi")], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["pi05"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_pi0(path)
    message = str(err.value)
    assert "π0.5 architecture" in message
    assert "time_mlp_in.weight" in message and "state_proj.weight" in message


def test_not_a_checkpoint_folder_is_one_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        read_checkpoint(tmp_path)


def test_lerobot_config_of_another_policy_type_is_refused(checkpoints, tmp_path):
    path = copy(checkpoints[(True, "lerobot")], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["type"] = "act"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="describes a 'act' policy"):
        read_checkpoint(path)


def test_several_openpi_assets_need_a_choice(checkpoints, tmp_path):
    path = copy(checkpoints[(True, "openpi")], tmp_path)
    shutil.copytree(path / "assets" / "robot", path / "assets" / "other_robot")
    with pytest.raises(CheckpointError, match="several robots"):
        read_checkpoint(path)
    assert read_checkpoint(path, asset_id="other_robot").asset_id == "other_robot"


def test_pi05_flag_is_inferred_from_weights_when_config_lacks_it(checkpoints, tmp_path):
    path = copy(checkpoints[(True, "openpi")], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["pi05"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert read_checkpoint(path).config.pi05


def test_same_seed_gives_identical_checkpoints(tmp_path):
    a = make_checkpoint(tmp_path / "a", True, "openpi")
    b = make_checkpoint(tmp_path / "b", True, "openpi")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_truncated_weights_are_reported_as_such(checkpoints, tmp_path):
    path = copy(checkpoints[(True, "openpi")], tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is (not a readable safetensors file|truncated)"):
        load_pi0(path)


def edit_config(path: Path, drop: tuple[str, ...] = (), **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key in drop:
        del cfg[key]
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("layout", "changes", "drop", "attribute", "expected"),
    [
        ("lerobot", {"chunk_size": 7}, (), "action_horizon", 7),
        ("lerobot", {"num_inference_steps": 4}, (), "num_steps", 4),
        ("lerobot", {"num_steps": 4}, ("num_inference_steps",), "num_steps", 4),  # LeRobot before 0.4
        ("lerobot", {"tokenizer_max_length": 20}, (), "max_token_len", 20),
        ("lerobot", {"empty_cameras": 1}, (), "camera_names", ("base_0_rgb", "left_wrist_0_rgb", "empty_camera_0")),
        ("lerobot", {"min_period": 0.01}, (), "min_period", 0.01),
        ("lerobot", {"max_period": 2.0}, (), "max_period", 2.0),
        ("openpi", {"action_horizon": 7}, (), "action_horizon", 7),
        ("openpi", {"num_steps": 4}, (), "num_steps", 4),
        ("openpi", {"max_token_len": 20}, (), "max_token_len", 20),
    ],
)
def test_config_fields_that_shape_inputs_and_outputs_are_read(
    checkpoints, tmp_path, layout, changes, drop, attribute, expected
):
    path = copy(checkpoints[(False, layout)], tmp_path)
    assert getattr(read_checkpoint(path).config, attribute) != expected
    edit_config(path, drop, **changes)
    assert getattr(read_checkpoint(path).config, attribute) == expected


def test_lerobot_time_embedding_periods_change_the_actions(checkpoints, tmp_path):
    path = copy(checkpoints[(False, "lerobot")], tmp_path)
    noise = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    before = load_float_policy(path).predict(observation(), noise).actions
    edit_config(path, min_period=0.05, max_period=2.0)
    after = load_float_policy(path).predict(observation(), noise).actions
    assert not np.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize(
    ("pi05", "changes", "words"),
    [
        (True, {"use_relative_actions": True}, "use_relative_actions=true (supported: false)"),
        (True, {"use_visual_memory": True}, "use_visual_memory=true (supported: false)"),
        (True, {"use_proprioceptive_memory": True}, "use_proprioceptive_memory=true (supported: false)"),
        (True, {"image_resolution": [224, 224]}, "image_resolution=[224, 224] (supported: [28, 28])"),
        (False, {"resize_imgs_with_padding": [56, 56]}, "resize_imgs_with_padding=[56, 56] (supported: [28, 28])"),
        (
            False,
            {"normalization_mapping": {"VISUAL": "MEAN_STD", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}},
            'normalization_mapping.VISUAL="MEAN_STD" (supported: "IDENTITY")',
        ),
        (False, {"max_state_dim": 16}, "max_state_dim=16 (supported: 8)"),
        (False, {"use_delta_joint_actions_aloha": True}, "use_delta_joint_actions_aloha, which LeRobot itself"),
        (False, {"adapt_to_pi_aloha": True}, "adapt_to_pi_aloha, which converts a 14-value Aloha state"),
    ],
)
def test_lerobot_settings_this_package_cannot_honour_are_refused(checkpoints, tmp_path, pi05, changes, words):
    path = copy(checkpoints[(pi05, "lerobot")], tmp_path)
    edit_config(path, **changes)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(str(path / "config.json"))


def test_pi05_state_width_is_not_projected_so_max_state_dim_is_free(checkpoints, tmp_path):
    path = copy(checkpoints[(True, "lerobot")], tmp_path)
    edit_config(path, max_state_dim=16)
    assert read_checkpoint(path).config.action_dim == 8


@pytest.mark.parametrize("release", ["current", "legacy"])
def test_lerobot_pi0_aloha_checkpoints_convert_where_their_release_did(tmp_path, release):
    rng = np.random.default_rng(5)
    stats = {k: NormStats(mean=rng.uniform(-0.2, 0.2, 14), std=rng.uniform(0.2, 0.5, 14)) for k in ("state", "actions")}
    path = init_checkpoint(tmp_path / "aloha", tiny(False).with_changes(action_dim=16), INSTRUCTIONS, "lerobot", stats)
    if release == "legacy":
        path = to_legacy_lerobot(path, tmp_path / "legacy")
    assert read_checkpoint(path).adapter is None
    edit_config(path, adapt_to_pi_aloha=True)
    adapter = read_checkpoint(path).adapter
    # The conversion itself is the one SmolVLA's tests check against LeRobot's code.
    assert adapter.name == "adapt_to_pi_aloha" and adapter.normalized == (release == "current")


def test_a_peft_adapter_folder_is_refused_before_its_weights_are_read(checkpoints, tmp_path):
    path = copy(checkpoints[(True, "lerobot")], tmp_path)
    (path / "model.safetensors").rename(path / "adapter_model.safetensors")
    edit_config(path, use_peft=True)
    with pytest.raises(CheckpointError, match=r"config\.json sets use_peft: the folder holds a LeRobot PEFT adapter"):
        read_checkpoint(path)
