"""Calibration buffers: prepared exactly like live inputs, round trip, refuse other models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quantvla_ros.data.buffer import BufferError, build_buffer, load_buffer, save_buffer
from quantvla_ros.loader import load_policy

from conftest import INSTRUCTIONS, observation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def policy(checkpoints):
    return load_policy(checkpoints[(True, "openpi")])


def observations(n: int):
    out = [observation(seed=i, instruction=INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(n)]
    if n > 1:
        del out[1].images["left_wrist_0_rgb"]
    return out


def test_buffer_batches_equal_the_live_preparation(policy, tmp_path):
    obs = observations(5)
    buffer = build_buffer(policy, obs, sources=[{"bag": "demo.mcap", "sha256": "ab" * 32}])
    path = save_buffer(buffer, tmp_path / "calib.safetensors")
    loaded = load_buffer(path)
    assert len(loaded) == 5 and loaded.manifest["samples"] == 5
    assert loaded.manifest["sources"][0]["bag"] == "demo.mcap"
    assert set(loaded.manifest["instructions"]) == set(INSTRUCTIONS[:5])
    rows = [b for b in loaded.batches(batch_size=2)]
    assert [r.images.shape[0] for r in rows] == [2, 2, 1]
    for i, o in enumerate(obs):
        live = policy.prepare(o)
        batch = rows[i // 2]
        j = i % 2
        for name in ("images", "image_masks", "tokens", "token_masks", "state"):
            assert torch.equal(getattr(batch, name)[j], getattr(live, name)[0]), (i, name)
    loaded.check_matches(policy)


def test_buffer_for_another_model_is_refused(policy, checkpoints, tmp_path):
    buffer = build_buffer(policy, observations(2), sources=[])
    other = load_policy(checkpoints[(False, "openpi")])
    with pytest.raises(BufferError, match=r"built for another model \(different .*model"):
        buffer.check_matches(other, "calib.safetensors")


def test_unusable_buffer_files_are_one_sentence(policy, tmp_path):
    with pytest.raises(BufferError, match="does not exist"):
        load_buffer(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BufferError, match="not a readable safetensors file"):
        load_buffer(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BufferError, match="has no calibration manifest"):
        load_buffer(tmp_path / "plain.safetensors")
    buffer = build_buffer(policy, observations(1), sources=[])
    empty = {
        n: getattr(buffer, n)[:0].contiguous() for n in ("images", "image_masks", "tokens", "token_masks", "state")
    }
    save_file(empty, str(tmp_path / "empty.safetensors"), metadata={"manifest": json.dumps(buffer.manifest)})
    with pytest.raises(BufferError, match="holds no samples"):
        load_buffer(tmp_path / "empty.safetensors")
    with pytest.raises(BufferError, match="needs at least one sample"):
        build_buffer(policy, [], sources=[])
