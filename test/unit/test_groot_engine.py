"""GR00TEngine against the plain sampler: same actions, precomputed schedule, reused static buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from groot_fixtures import observation, tiny_model, write_checkpoint
from test_groot_model import CFG, inputs

from quantvla_ros.engine.groot_engine import GR00TEngine
from quantvla_ros.loader import load_policy
from quantvla_ros.models.groot.model import DiT, GR00TN15Model
from quantvla_ros.quant.api import method_config, quantize_
from quantvla_ros.quant.linear import QuantLinear

pytestmark = pytest.mark.unit


def assert_same_actions(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.fixture
def model() -> GR00TN15Model:
    return tiny_model(CFG)


def test_engine_matches_plain_sampler_and_falls_back_to_eager_on_cpu(model):
    batch = inputs()
    engine = GR00TEngine(model, cuda_graphs=True)
    assert not engine.cuda_graphs
    assert_same_actions(engine.sample_actions(**batch), model.sample_actions(**batch))


def test_steps_run_no_time_layers_and_the_prompt_once(model):
    engine = GR00TEngine(model)
    calls = []

    def count(name: str) -> None:
        model.get_submodule(name).register_forward_hook(lambda *_: calls.append(name))

    time_layers = ["action_head.model.timestep_encoder", "action_head.model.proj_out_1"]
    time_layers += [f"action_head.model.transformer_blocks.{i}.norm1.linear" for i in range(CFG.dit.depth)]
    for name in time_layers:
        count(name)
    once = ["action_head.state_encoder", "action_head.vl_self_attention", "backbone.eagle_model.vision_model"]
    once += [f"action_head.model.transformer_blocks.{i}.attn1.to_k" for i in range(CFG.dit.depth) if DiT.is_cross(i)]
    for name in once:
        count(name)
    engine.sample_actions(**inputs())
    assert sorted(calls) == sorted(once)


def test_num_steps_override(model):
    batch = inputs()
    engine = GR00TEngine(model)
    three = engine.sample_actions(**batch, num_steps=3)
    assert_same_actions(three, model.sample_actions(**batch, num_steps=3))
    assert (three - engine.sample_actions(**batch)).abs().max() > 1e-4
    assert engine.schedule(3).num_steps == 3 and engine.schedule(3) is engine.schedule(3)


def test_buffers_are_reused_for_one_shape_and_reallocated_for_another(model):
    engine = GR00TEngine(model)
    first, second = inputs(seed=0), inputs(seed=1)
    a = engine.sample_actions(**first)
    buffers, kv_ptr = engine.buffers, engine.buffers.cross_kv.data_ptr()
    b = engine.sample_actions(**second)
    assert engine.buffers is buffers and engine.buffers.cross_kv.data_ptr() == kv_ptr
    # Results are copies: the next call does not overwrite what the previous one returned.
    assert_same_actions(a, model.sample_actions(**first))
    assert_same_actions(b, model.sample_actions(**second))

    three = inputs(batch=3, seed=2)
    assert_same_actions(engine.sample_actions(**three), model.sample_actions(**three))
    assert engine.buffers is not buffers and engine.buffers.cross_kv.shape[2] == 3
    longer = inputs(max_token_len=CFG.max_token_len + 7, seed=3)
    assert_same_actions(engine.sample_actions(**longer), model.sample_actions(**longer))
    assert engine.buffers.tokens.shape[1] == CFG.max_token_len + 7


def test_engine_matches_plain_quantized_model(model):
    quantize_(model, method_config("rtn", w_bits=4, a_bits=8), progress=False)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    batch = inputs()
    assert_same_actions(GR00TEngine(model).sample_actions(**batch), model.sample_actions(**batch))


def test_stage_misuse_gives_clear_errors(model):
    engine = GR00TEngine(model)
    batch = inputs()
    with pytest.raises(RuntimeError, match=r"denoise\(\) needs the prefix; call embed\(\)"):
        engine.denoise(batch["state"], batch["noise"])
    prompt = (batch["images"], batch["image_masks"], batch["tokens"], batch["token_masks"])
    engine.embed(*prompt)
    engine.prefix()
    with pytest.raises(ValueError, match=r"noise must be \[2, 6, 8\] for this batch, got shape \(2, 4, 8\)"):
        engine.denoise(batch["state"], batch["noise"][:, :4])
    with pytest.raises(ValueError, match="image_masks must be"):
        engine.embed(batch["images"], batch["image_masks"][:, :1], batch["tokens"], batch["token_masks"])
    tokens = batch["tokens"].clone()
    tokens[0, -1] = CFG.image_token_id
    with pytest.raises(ValueError, match=r"Each prompt needs 8 <IMG_CONTEXT> tokens for 2 image\(s\), got \[9, 8\]"):
        engine.embed(batch["images"], batch["image_masks"], tokens, batch["token_masks"])
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        engine.schedule(0)


def test_load_policy_with_the_engine_predicts_the_model_chunk(tmp_path):
    path = write_checkpoint(tmp_path, "nvidia")
    plain, fast = load_policy(path, engine="off"), load_policy(path, engine="on")
    assert plain.sampler is plain.model and type(fast.sampler) is GR00TEngine
    noise = torch.randn(plain.horizon, plain.model.cfg.action_dim, generator=torch.Generator().manual_seed(1))
    obs = observation(plain.model.cfg)
    want = plain.predict(obs, noise).actions
    np.testing.assert_allclose(fast.predict(obs, noise).actions, want, rtol=1e-4, atol=1e-4)
