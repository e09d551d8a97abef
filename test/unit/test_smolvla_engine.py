"""SmolVLAEngine against the plain sampler: same actions, precomputed schedule, reused static buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from smolvla_fixtures import make_smolvla_checkpoint, model_inputs, robot_images, robot_state, tiny_model

from quantvla_ros.engine.smolvla_engine import SmolVLAEngine
from quantvla_ros.loader import load_policy
from quantvla_ros.models.policy import Observation
from quantvla_ros.models.smolvla.model import SmolVLAModel
from quantvla_ros.quant.api import method_config, quantize_
from quantvla_ros.quant.layout import Layout
from quantvla_ros.quant.linear import QuantLinear

pytestmark = pytest.mark.unit

EXPERT = "vlm_with_expert.lm_expert.layers"


def assert_same_actions(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.fixture
def model() -> SmolVLAModel:
    return tiny_model(vocab_size=512, seed=1)


def test_engine_matches_plain_sampler_and_falls_back_to_eager_on_cpu(model):
    batch = model_inputs(model.cfg)
    engine = SmolVLAEngine(model, cuda_graphs=True)
    assert not engine.cuda_graphs
    assert_same_actions(engine.sample_actions(**batch), model.sample_actions(**batch))


def test_steps_run_no_time_half_and_cross_projections_once(model):
    engine = SmolVLAEngine(model)
    cross = [i for i in range(model.cfg.expert.depth) if model.cfg.is_cross_layer(i)]
    assert cross and len(cross) < model.cfg.expert.depth
    once = [f"{EXPERT}.{i}.self_attn.{proj}" for i in cross for proj in ("k_proj", "v_proj")]
    calls = []
    for name in ["action_time_mlp_in", *once]:
        model.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.append(name))
    engine.sample_actions(**model_inputs(model.cfg))
    # action_time_mlp_in runs as its action half only; the time half is in the schedule.
    assert sorted(calls) == sorted(once)


def test_num_steps_override(model):
    batch = model_inputs(model.cfg)
    engine = SmolVLAEngine(model)
    five = engine.sample_actions(**batch, num_steps=5)
    assert_same_actions(five, model.sample_actions(**batch, num_steps=5))
    assert (five - engine.sample_actions(**batch)).abs().max() > 1e-4
    assert engine.schedule(5).num_steps == 5 and engine.schedule(5) is engine.schedule(5)


def test_buffers_are_reused_for_one_shape_and_reallocated_for_another(model):
    engine = SmolVLAEngine(model)
    first, second = model_inputs(model.cfg, seed=0), model_inputs(model.cfg, seed=1)
    a = engine.sample_actions(**first)
    buffers = engine.buffers
    pointers = (buffers.self_kv.data_ptr(), buffers.cross_kv.data_ptr())
    b = engine.sample_actions(**second)
    assert engine.buffers is buffers
    assert (buffers.self_kv.data_ptr(), buffers.cross_kv.data_ptr()) == pointers
    # Results are copies: the next call does not overwrite what the previous one returned.
    assert_same_actions(a, model.sample_actions(**first))
    assert_same_actions(b, model.sample_actions(**second))

    three = model_inputs(model.cfg, batch=3, seed=2)
    assert_same_actions(engine.sample_actions(**three), model.sample_actions(**three))
    assert engine.buffers is not buffers and engine.buffers.self_kv.shape[2] == 3


def test_engine_matches_plain_w4a8_model(model):
    quantize_(model, method_config("rtn", w_bits=4, a_bits=8), progress=False)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    batch = model_inputs(model.cfg)
    got, want = SmolVLAEngine(model).sample_actions(**batch), model.sample_actions(**batch)
    # The float action_time_mlp_in split into halves rounds differently from the fused matmul, and
    # a last-bit difference can move one 8-bit activation across a rounding boundary: one quantization
    # step (~0.3% here), not float rounding.
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_quantized_action_time_mlp_runs_whole_and_matches_exactly(model):
    layout = Layout("quantvla+time", ("llm", "expert_mlp"), include=("action_time_mlp_in",))
    quantize_(model, method_config("rtn", layout=layout, w_bits=4, a_bits=8), progress=False)
    assert isinstance(model.action_time_mlp_in, QuantLinear)
    batch = model_inputs(model.cfg)
    engine = SmolVLAEngine(model)
    calls = []
    model.action_time_mlp_in.register_forward_hook(lambda *_: calls.append(1))
    assert_same_actions(engine.sample_actions(**batch), model.sample_actions(**batch))
    # Both paths ran the whole quantized layer once per step: its rows cannot be split exactly.
    assert len(calls) == 2 * model.cfg.num_steps


def test_stage_misuse_gives_clear_errors(model):
    engine = SmolVLAEngine(model)
    batch = model_inputs(model.cfg)
    with pytest.raises(RuntimeError, match=r"denoise\(\) needs the prefix; call embed\(\)"):
        engine.denoise(batch["noise"])
    prompt = (batch["images"], batch["image_masks"], batch["tokens"], batch["token_masks"])
    with pytest.raises(ValueError, match=r"state must be \[2, 8\] for this batch, got shape \(2, 6\)"):
        engine.embed(*prompt, batch["state"][:, :6])
    engine.embed(*prompt, batch["state"])
    engine.prefix()
    with pytest.raises(ValueError, match=r"noise must be \[2, 50, 8\] for this batch, got shape \(2, 4, 8\)"):
        engine.denoise(batch["noise"][:, :4])
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        engine.schedule(0)


def test_load_policy_with_the_engine_predicts_the_model_chunk(tmp_path):
    path = make_smolvla_checkpoint(tmp_path)
    plain, fast = load_policy(path, engine="off"), load_policy(path, engine="on")
    assert plain.sampler is plain.model and type(fast.sampler) is SmolVLAEngine
    noise = torch.randn(plain.horizon, plain.model.cfg.action_dim, generator=torch.Generator().manual_seed(1))
    obs = Observation(images=robot_images(), instruction="pick up the red cup", state=robot_state())
    want = plain.predict(obs, noise).actions
    np.testing.assert_allclose(fast.predict(obs, noise).actions, want, rtol=1e-4, atol=1e-4)
