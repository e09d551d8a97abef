"""GR00T N1.5 checkpoint folders (NVIDIA and LeRobot layouts): round trips, clear errors, inputs, Policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from groot_fixtures import (
    ACTION_KEYS,
    STATE_DIM,
    STATE_KEYS,
    TAG,
    norm_stats,
    observation,
    tiny_config,
    tiny_model,
    write_checkpoint,
    write_tokenizer,
)
from safetensors.torch import load_file, save_file

from quantvla_ros.models.common.checkpoint import CheckpointError
from quantvla_ros.models.common.normalizer import Normalizer, NormStats
from quantvla_ros.models.groot.checkpoint import EMBED_TOKENS, LM_HEAD
from quantvla_ros.models.groot.family import save_groot
from quantvla_ros.models.groot.nvidia import METADATA_FILE
from quantvla_ros.models.groot.processor import IMAGE_CONTEXT, EagleTokenizer, GR00TProcessor, crop_and_resize
from quantvla_ros.models.policy import load_float_policy
from quantvla_ros.models.registry import family_for, load_model, read_checkpoint

pytestmark = pytest.mark.integration

LAYOUTS = {"nvidia": {}, "nvidia_sharded": {"max_shard_bytes": 100_000}, "lerobot": {}}
LAYOUT_NAMES = ("nvidia", "lerobot")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("groot")
    return {
        name: write_checkpoint(root / name, name.removesuffix("_sharded"), **kwargs) for name, kwargs in LAYOUTS.items()
    }


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def model_inputs(path: Path) -> dict:
    """One observation through the checkpoint's own processor and statistics."""
    policy = load_float_policy(path)
    x = policy.prepare(observation(policy.model.cfg))
    noise = torch.randn(1, policy.horizon, policy.model.cfg.action_dim, generator=torch.Generator().manual_seed(1))
    return dict(vars(x), noise=noise)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_loads_the_saved_weights_and_gives_the_same_actions(checkpoints, name):
    model, info, family = load_model(checkpoints[name])
    assert family.name == "groot_n1_5"
    assert info.layout == name.removesuffix("_sharded")
    reference = tiny_model(model.cfg)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    x = model_inputs(checkpoints["nvidia"])
    torch.testing.assert_close(model.sample_actions(**x), reference.sample_actions(**x), rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_has_an_index_and_several_shards(checkpoints):
    index = json.loads((checkpoints["nvidia_sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "action_head.model.transformer_blocks.0.attn1.to_q.weight" in index["weight_map"]


def test_lerobot_layout_prefixes_keys_and_nvidia_does_not(checkpoints):
    nvidia = load_file(str(checkpoints["nvidia"] / "model.safetensors"))
    lerobot = load_file(str(checkpoints["lerobot"] / "model.safetensors"))
    assert "backbone.eagle_model.vision_model.vision_model.embeddings.patch_embedding.weight" in nvidia
    assert "backbone.eagle_model.mlp1.0.weight" in nvidia
    assert {"_groot_model." + k for k in nvidia} == set(lerobot)


@pytest.mark.parametrize("name", ["nvidia", "lerobot"])
def test_statistics_are_concatenated_in_modality_order(checkpoints, name):
    info = read_checkpoint(checkpoints[name])
    stats = norm_stats()
    assert info.asset_id == TAG and info.config.embodiment_id == 2
    assert info.state_norm == info.action_norm == "min_max"
    assert info.state_dim == STATE_DIM and info.action_dim == sum(ACTION_KEYS.values())
    assert info.config.camera_names == ("front", "wrist")
    for name_, keys, prefix in (("state", STATE_KEYS, "state"), ("actions", ACTION_KEYS, "action")):
        for stat in ("min", "max", "mean", "q99"):
            expected = np.concatenate([getattr(stats[f"{prefix}.{k}"], stat) for k in keys])
            np.testing.assert_array_equal(getattr(info.norm_stats[name_], stat), expected)


def test_nvidia_metadata_names_each_action_dimension(checkpoints):
    assert read_checkpoint(checkpoints["nvidia"]).action_names == ("arm[0]", "arm[1]", "arm[2]", "gripper")


def rewrite_weights(path: Path, change) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda t: t.pop("action_head.future_tokens.weight"), ["missing", "action_head.future_tokens.weight"]),
        (lambda t: t.update({"action_head.extra.weight": torch.zeros(2)}), ["unexpected", "action_head.extra.weight"]),
        (
            lambda t: t.update({"action_head.position_embedding.weight": torch.zeros(3, 3)}),
            ["action_head.position_embedding.weight", "(3, 3)"],
        ),
    ],
    ids=["missing", "unexpected", "misshapen"],
)
def test_key_mismatches_name_the_key(checkpoints, tmp_path, change, words):
    path = copy(checkpoints["nvidia"], tmp_path)
    rewrite_weights(path, change)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert all(w in str(err.value) for w in words)
    assert "\n" not in str(err.value)


def test_tied_lm_head_stands_in_for_the_embedding_and_unused_keys_are_ignored(checkpoints, tmp_path):
    path = copy(checkpoints["nvidia"], tmp_path)

    def change(tensors):
        tensors[LM_HEAD] = tensors.pop(EMBED_TOKENS)
        tensors["backbone.eagle_model.language_model.model.layers.12.mlp.up_proj.weight"] = torch.zeros(2, 2)
        tensors["backbone.eagle_model.vision_model.vision_model.head.probe"] = torch.zeros(1, 1, 32)

    rewrite_weights(path, change)
    model, _, _ = load_model(path)
    reference, _, _ = load_model(checkpoints["nvidia"])
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_missing_metadata_is_one_clear_sentence(checkpoints, tmp_path):
    path = copy(checkpoints["nvidia"], tmp_path)
    (path / METADATA_FILE).unlink()
    with pytest.raises(CheckpointError, match="metadata.json is missing") as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


def test_unknown_and_ambiguous_embodiment_tags_are_clear_errors(checkpoints, tmp_path):
    path = copy(checkpoints["nvidia"], tmp_path)
    metadata = json.loads((path / METADATA_FILE).read_text())
    (path / METADATA_FILE).write_text(json.dumps({"mars_rover": metadata[TAG]}))
    with pytest.raises(CheckpointError, match="'mars_rover'.*no projector index"):
        read_checkpoint(path)
    (path / METADATA_FILE).write_text(json.dumps({TAG: metadata[TAG], "gr1": metadata[TAG]}))
    with pytest.raises(CheckpointError, match="several embodiments"):
        read_checkpoint(path)
    assert read_checkpoint(path, asset_id=TAG).config.embodiment_id == 2
    with pytest.raises(CheckpointError, match="no embodiment 'oxe_droid'"):
        read_checkpoint(path, asset_id="oxe_droid")


@pytest.mark.parametrize("name", ["vocab.json", "chat_template.json"])
def test_missing_tokenizer_files_are_clear_errors(checkpoints, tmp_path, name):
    path = copy(checkpoints["lerobot"], tmp_path)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=name) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "words"),
    [
        ("diffusion_model_cfg", "positional_embeddings", "sinusoidal", 'positional_embeddings="sinusoidal"'),
        ("vl_self_attention_cfg", "positional_embeddings", "sinusoidal", 'positional_embeddings="sinusoidal"'),
        ("diffusion_model_cfg", "interleave_self_attention", False, "interleave_self_attention=false"),
        ("diffusion_model_cfg", "interleave_self_attention", None, "interleave_self_attention=false"),  # absent
        ("diffusion_model_cfg", "norm_type", "layer_norm", 'norm_type="layer_norm"'),
        ("diffusion_model_cfg", "activation_fn", "geglu", 'activation_fn="geglu"'),
        ("vl_self_attention_cfg", "norm_eps", 1e-6, "norm_eps=1e-06"),
        ("backbone_cfg", "reproject_vision", True, "reproject_vision=true"),
        ("backbone_cfg", "project_to_dim", 1536, "project_to_dim=1536"),
        ("action_head_cfg", "use_vlln", False, "use_vlln=false"),
    ],
)
def test_an_architecture_setting_n15_does_not_use_is_refused(checkpoints, tmp_path, section, key, value, words):
    path = copy(checkpoints["nvidia"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    head = config["action_head_cfg"]
    target = config[section] if section in config else head[section]
    if value is None:
        del target[key]
    else:
        target[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="GR00T N1.5 sets them so, and other values make another model") as err:
        read_checkpoint(path)
    assert f"{section}.{words} (supported: " in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("key", "value", "attribute"), [("num_inference_timesteps", 3, "num_steps")])
def test_action_head_settings_are_read(checkpoints, tmp_path, key, value, attribute):
    path = copy(checkpoints["nvidia"], tmp_path)
    assert getattr(read_checkpoint(path).config, attribute) != value
    config = json.loads((path / "config.json").read_text())
    config["action_head_cfg"][key] = value
    (path / "config.json").write_text(json.dumps(config))
    assert getattr(read_checkpoint(path).config, attribute) == value


def test_a_text_only_chat_template_is_refused_at_load(checkpoints, tmp_path):
    path = copy(checkpoints["lerobot"], tmp_path)
    # GR00T N1's Eagle 2 template concatenates message['content'] as a string.
    template = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>'}}{% endfor %}"
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(CheckpointError, match="cannot render GR00T's image and text turn"):
        read_checkpoint(path)


def test_saving_needs_per_key_statistics(tmp_path):
    model = tiny_model(tiny_config(write_tokenizer(tmp_path / "tok")))
    with pytest.raises(ValueError, match="state.<key>"):
        save_groot(model, tmp_path / "ck", norm_stats={"state": NormStats(min=[0.0], max=[1.0])})


def test_min_max_normalization_round_trip_and_flat_dims():
    stats = NormStats(min=[-2.0, 0.0, 5.0], max=[2.0, 10.0, 5.0])
    norm = Normalizer(stats, "min_max")
    np.testing.assert_allclose(norm.normalize(np.array([-2.0, 10.0, 5.0])), [-1.0, 1.0, 0.0])
    np.testing.assert_allclose(norm.normalize(np.array([0.0, 2.5, 7.0])), [0.0, -0.5, 0.0])
    x = np.array([[1.5, 3.0, 5.0, 0.3]], dtype=np.float32)  # the 4th dim has no statistics: unchanged
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(x)), x, rtol=1e-6)
    # A flat dim normalizes to 0 and comes back as its min, as Isaac-GR00T's transform does.
    np.testing.assert_allclose(norm.unnormalize(np.array([0.0, 0.0, 0.7])), [0.0, 5.0, 5.0])
    with pytest.raises(ValueError, match="min and max"):
        Normalizer(NormStats(mean=[0.0], std=[1.0]), "min_max")


@pytest.fixture(scope="module")
def processor(checkpoints) -> GR00TProcessor:
    return GR00TProcessor.from_checkpoint(read_checkpoint(checkpoints["nvidia"]))


@pytest.fixture(scope="module")
def processors(checkpoints) -> dict[str, GR00TProcessor]:
    return {layout: GR00TProcessor.from_checkpoint(read_checkpoint(checkpoints[layout])) for layout in LAYOUT_NAMES}


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_images_are_center_cropped_resized_and_scaled(processors, layout):
    processor = processors[layout]
    cfg = processor.cfg
    # A 1-pixel bright frame around a dark 40x40 image lies outside the 95% centre crop (38x38 at 1, 1).
    framed = np.zeros((40, 40, 3), dtype=np.uint8)
    framed[[0, -1]] = framed[:, [0, -1]] = 255
    assert crop_and_resize(framed, cfg.image_size, truncate=layout == "nvidia").max() == 0
    flat = np.full((30, 50, 3), 51, dtype=np.uint8)
    images, masks = processor.images({"front": framed, "wrist": flat})
    assert images.shape == (2, 3, cfg.image_size, cfg.image_size) and images.dtype == np.float32
    assert masks == [True, True]
    np.testing.assert_allclose(images[0], -1.0)
    # Resizing a flat image in float can land a hair under 51, which NVIDIA's truncation makes 50.
    levels = {"nvidia": (50, 51), "lerobot": (51,)}[layout]
    assert np.isin(np.rint((images[1] + 1) / 2 * 255), levels).all()


def test_nvidia_pixels_are_resized_in_float_and_truncated_lerobot_ones_rounded(processors):
    image = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    size = processors["nvidia"].cfg.image_size
    crop = torch.from_numpy(image[2:47, 2:62].copy()).permute(2, 0, 1)[None].float() / 255  # 95%: 45 x 60 at (2, 2)
    resized = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
    exact = resized[0].permute(1, 2, 0).numpy() * 255
    truncated, rounded = crop_and_resize(image, size, truncate=True), crop_and_resize(image, size)
    np.testing.assert_array_equal(truncated, np.floor(exact).astype(np.uint8))  # Isaac-GR00T's (x*255).to(uint8)
    assert np.abs(rounded.astype(int) - np.rint(exact)).max() <= 1  # PIL's 8-bit resize rounds
    assert (rounded.astype(int) - truncated == 1).mean() > 0.2
    nvidia = processors["nvidia"].images({"front": image, "wrist": image})[0][0]
    np.testing.assert_array_equal(nvidia, (truncated.astype(np.float32) / 255 * 2 - 1).transpose(2, 0, 1))
    lerobot = processors["lerobot"].images({"front": image, "wrist": image})[0][0]
    np.testing.assert_array_equal(lerobot, (rounded.astype(np.float32) / 255 * 2 - 1).transpose(2, 0, 1))


def test_every_camera_is_required(processor):
    with pytest.raises(ValueError, match=r"lacks \['wrist'\]"):
        processor.images({"front": np.zeros((28, 28, 3), dtype=np.uint8)})


@pytest.mark.parametrize(
    ("layout", "text"), [("nvidia", "pick up the red cup"), ("lerobot", "['pick up the red cup']")]
)
def test_prompt_has_the_image_tokens_and_left_padding(processors, checkpoints, layout, text):
    processor = processors[layout]
    cfg = processor.cfg
    tokens, mask = processor.prompt("pick up the red cup", np.zeros(STATE_DIM, dtype=np.float32))
    tok = EagleTokenizer.from_dir(checkpoints[layout])
    assert tokens.shape == mask.shape == (cfg.max_token_len,) and tokens.dtype == np.int64
    assert (tokens == tok.tokenizer.token_to_id(IMAGE_CONTEXT)).sum() == len(cfg.camera_names) * cfg.tokens_per_image
    start = int(np.argmax(mask))
    assert start > 0 and mask[start:].all() and not mask[:start].any()
    assert (tokens[:start] == tok.pad_id).all()
    decoded = tok.tokenizer.decode(tokens[mask].tolist(), skip_special_tokens=False)
    assert decoded.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n<image 1><img><IMG_CONTEXT>" in decoded
    # NVIDIA's GR00TTransform writes the instruction itself, LeRobot's port str([instruction]).
    assert decoded.endswith(f"</img>{text}<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="max_token_len"):
        processor.prompt("pick up the red cup " * 20, np.zeros(STATE_DIM, dtype=np.float32))


def test_the_layouts_prepare_inputs_differently_so_their_buffers_differ(processors):
    signatures = [processors[layout].signature() for layout in LAYOUT_NAMES]
    assert signatures[0]["prompt"] != signatures[1]["prompt"]
    assert signatures[0]["image_transform"] != signatures[1]["image_transform"]


def test_signature_records_the_tokenizer(processor):
    sig = processor.signature()
    assert len(sig["tokenizer_sha256"]) == 64
    assert sig["tokens_per_image"] == processor.cfg.tokens_per_image
    assert sig["cameras"] == ["front", "wrist"]


@pytest.mark.parametrize("name", ["nvidia", "lerobot"])
def test_policy_predicts_robot_unit_action_chunks(checkpoints, name):
    family, _ = family_for(checkpoints[name])
    assert family.name == "groot_n1_5"
    policy = load_float_policy(checkpoints[name])
    obs = observation(policy.model.cfg)
    noise = np.random.default_rng(0).standard_normal((policy.horizon, policy.model.cfg.action_dim)).astype(np.float32)
    chunk = policy.predict(obs, noise=noise)
    assert chunk.actions.shape == (policy.model.cfg.action_horizon, sum(ACTION_KEYS.values()))
    assert np.isfinite(chunk.actions).all()
    np.testing.assert_array_equal(policy.predict(obs, noise=noise).actions, chunk.actions)
    normalized = policy.sample(policy.prepare(obs), noise)[0, :, : policy.action_dim].numpy()
    expected = Normalizer(policy.info.norm_stats["actions"], "min_max").unnormalize(normalized)
    np.testing.assert_allclose(chunk.actions, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="wrist"):
        policy.predict(observation(policy.model.cfg, images={"front": obs.images["front"]}))
