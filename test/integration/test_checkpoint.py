"""Checkpoint folders in the openpi and LeRobot layouts: load, save, round trip, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantvla_ros.models.common.checkpoint import CheckpointError
from quantvla_ros.models.pi0.checkpoint import EMBED_TOKENS, LM_HEAD, save_pi0
from quantvla_ros.models.pi0.config import tiny
from quantvla_ros.models.registry import load_model, read_checkpoint

from conftest import ACTION_DIM, STATE_DIM, make_checkpoint

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
