"""PI0Engine against the plain sampler: same actions, precomputed schedule, reused static buffers."""

from __future__ import annotations

import pytest
import torch
from test_pi0_model import inputs

from quantvla_ros.engine.pi0_engine import PI0Engine
from quantvla_ros.models.pi0.config import tiny
from quantvla_ros.models.pi0.model import PI0Model
from quantvla_ros.quant.api import method_config, quantize_
from quantvla_ros.quant.layout import get_layout
from quantvla_ros.quant.linear import QuantLinear

pytestmark = pytest.mark.unit


def assert_same_actions(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def build(pi05: bool) -> PI0Model:
    torch.manual_seed(1)
    return PI0Model(tiny(pi05)).eval()


@pytest.fixture(params=[False, True], ids=["pi0", "pi05"])
def model(request) -> PI0Model:
    return build(request.param)


def test_engine_matches_plain_sampler_and_falls_back_to_eager_on_cpu(model):
    batch = inputs(model.cfg)
    engine = PI0Engine(model, cuda_graphs=True)
    assert not engine.cuda_graphs
    assert_same_actions(engine.sample_actions(**batch), model.sample_actions(**batch))


def test_steps_run_no_time_mlp_and_no_adarms_dense(model):
    engine = PI0Engine(model)
    # π0's action_time_mlp_in runs as its action half only; the time half is in the schedule.
    time_layers = ["time_mlp_in", "time_mlp_out"] if model.cfg.pi05 else ["action_time_mlp_in"]
    dense = [name for name, _ in model.named_modules() if name.endswith(".dense")]
    assert bool(dense) == model.cfg.pi05
    calls = []
    for name in time_layers + dense:
        model.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.append(name))
    engine.sample_actions(**inputs(model.cfg))
    assert calls == []


def test_num_steps_override(model):
    batch = inputs(model.cfg)
    engine = PI0Engine(model)
    five = engine.sample_actions(**batch, num_steps=5)
    assert_same_actions(five, model.sample_actions(**batch, num_steps=5))
    assert (five - engine.sample_actions(**batch)).abs().max() > 1e-4
    assert engine.schedule(5).num_steps == 5 and engine.schedule(5) is engine.schedule(5)


def test_buffers_are_reused_for_one_shape_and_reallocated_for_another(model):
    engine = PI0Engine(model)
    first = inputs(model.cfg, seed=0)
    a = engine.sample_actions(**first)
    buffers, kv_ptr = engine.buffers, engine.buffers.kv.data_ptr()
    second = inputs(model.cfg, seed=1)
    b = engine.sample_actions(**second)
    assert engine.buffers is buffers and engine.buffers.kv.data_ptr() == kv_ptr
    # Results are copies: the next call does not overwrite what the previous one returned.
    assert_same_actions(a, model.sample_actions(**first))
    assert_same_actions(b, model.sample_actions(**second))

    three = inputs(model.cfg, batch=3, seed=2)
    assert_same_actions(engine.sample_actions(**three), model.sample_actions(**three))
    assert engine.buffers is not buffers and engine.buffers.kv.shape[2] == 3


@pytest.mark.parametrize("a_bits", [16, 8], ids=["w4a16", "w4a8"])
def test_engine_matches_plain_quantized_model(model, a_bits):
    quantize_(model, method_config("rtn", w_bits=4, a_bits=a_bits), progress=False)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    batch = inputs(model.cfg)
    assert_same_actions(PI0Engine(model).sample_actions(**batch), model.sample_actions(**batch))


def test_pi0_with_quantized_action_time_mlp_keeps_the_fused_input():
    model = build(pi05=False)
    layout = get_layout("custom", include=["action_time_mlp_in"])
    quantize_(model, method_config("rtn", layout=layout, w_bits=8, a_bits=8), progress=False)
    engine = PI0Engine(model)
    batch = inputs(model.cfg)
    calls = []
    model.action_time_mlp_in.register_forward_hook(lambda *_: calls.append(1))
    assert_same_actions(engine.sample_actions(**batch), model.sample_actions(**batch))
    # Both paths ran the whole quantized layer once per step: its rows cannot be split exactly.
    assert len(calls) == 2 * model.cfg.num_steps


def test_stage_misuse_gives_clear_errors(model):
    engine = PI0Engine(model)
    batch = inputs(model.cfg)
    with pytest.raises(RuntimeError, match=r"denoise\(\) needs the prefix; call embed\(\)"):
        engine.denoise(batch["state"], batch["noise"])
    engine.embed(batch["images"], batch["image_masks"], batch["tokens"], batch["token_masks"])
    engine.prefix()
    with pytest.raises(ValueError, match=r"noise must be \[2, 5, 8\] for this batch, got shape \(2, 4, 8\)"):
        engine.denoise(batch["state"], batch["noise"][:, :4])
    with pytest.raises(ValueError, match="image_masks must be"):
        engine.embed(batch["images"], batch["image_masks"][:, :1], batch["tokens"], batch["token_masks"])
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        engine.schedule(0)
