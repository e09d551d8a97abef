"""The inference engine against each family's own sampler: same actions, schedule once, static buffers.

The engine knows no family: these tests run it over π0, π0.5, GR00T N1.5 and SmolVLA alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from groot_fixtures import observation as groot_observation
from groot_fixtures import tiny_model as groot_model
from groot_fixtures import write_checkpoint as write_groot
from smolvla_fixtures import make_smolvla_checkpoint, model_inputs, robot_images, robot_state
from smolvla_fixtures import tiny_model as smolvla_model
from test_groot_model import CFG as GROOT_CFG
from test_groot_model import inputs as groot_inputs
from test_pi0_model import inputs as pi0_inputs

from quantvla_ros.engine.staged import StagedEngine
from quantvla_ros.loader import load_policy
from quantvla_ros.models.groot.model import DiT
from quantvla_ros.models.pi0.config import tiny
from quantvla_ros.models.pi0.model import PI0Model
from quantvla_ros.models.policy import Observation
from quantvla_ros.models.stages import StagedModel
from quantvla_ros.quant.api import quantize_
from quantvla_ros.quant.config import method_config
from quantvla_ros.quant.layout import Layout
from quantvla_ros.quant.linear import QuantLinear

pytestmark = pytest.mark.unit

_DIT = "action_head.model.transformer_blocks"
_SMOLVLA_EXPERT = "vlm_with_expert.lm_expert.layers"


@dataclass(frozen=True)
class Family:
    build: Callable[[], StagedModel]
    inputs: Callable[[StagedModel, int, int], dict[str, torch.Tensor]]  # model, batch, seed -> a batch
    # Modules whose work the schedule holds: they never run once the engine is built.
    time_layers: Callable[[StagedModel], list[str]]
    # Modules that run once per inference, not once per step.
    once_layers: Callable[[StagedModel], list[str]]


def _pi0(pi05: bool) -> Family:
    def build() -> PI0Model:
        torch.manual_seed(1)
        return PI0Model(tiny(pi05)).eval()

    def time_layers(model: StagedModel) -> list[str]:
        dense = [name for name, _ in model.named_modules() if name.endswith(".dense")]
        return ["time_mlp_in", "time_mlp_out", *dense] if pi05 else ["action_time_mlp_in"]

    def once_layers(model: StagedModel) -> list[str]:
        return ["paligemma_with_expert.paligemma.model.vision_tower"] + ([] if pi05 else ["state_proj"])

    return Family(build, lambda m, b, s: pi0_inputs(m.cfg, batch=b, seed=s), time_layers, once_layers)


FAMILIES = {
    "pi0": _pi0(pi05=False),
    "pi05": _pi0(pi05=True),
    "groot": Family(
        build=lambda: groot_model(GROOT_CFG),
        inputs=lambda m, b, s: groot_inputs(batch=b, seed=s),
        time_layers=lambda m: [
            "action_head.model.timestep_encoder",
            "action_head.model.proj_out_1",
            *[f"{_DIT}.{i}.norm1.linear" for i in range(m.cfg.dit.depth)],
        ],
        once_layers=lambda m: [
            "action_head.state_encoder",
            "action_head.vl_self_attention",
            "backbone.eagle_model.vision_model",
            *[f"{_DIT}.{i}.attn1.to_k" for i in range(m.cfg.dit.depth) if DiT.is_cross(i)],
        ],
    ),
    "smolvla": Family(
        build=lambda: smolvla_model(vocab_size=512, seed=1),
        inputs=lambda m, b, s: model_inputs(m.cfg, batch=b, seed=s),
        time_layers=lambda m: ["action_time_mlp_in"],
        once_layers=lambda m: [
            f"{_SMOLVLA_EXPERT}.{i}.self_attn.{proj}"
            for i in range(m.cfg.expert.depth)
            if m.cfg.is_cross_layer(i)
            for proj in ("k_proj", "v_proj")
        ],
    ),
}


def assert_same_actions(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.fixture(params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture
def model(family) -> StagedModel:
    return family.build()


def test_engine_matches_plain_sampler_and_falls_back_to_eager_on_cpu(family, model):
    batch = family.inputs(model, 2, 0)
    engine = StagedEngine(model, cuda_graphs=True)
    assert not engine.cuda_graphs
    assert_same_actions(engine.sample_actions(**batch), model.sample_actions(**batch))


def test_steps_run_no_time_layers_and_the_once_layers_once(family, model):
    engine = StagedEngine(model)
    time_layers, once = family.time_layers(model), family.once_layers(model)
    assert once and time_layers
    calls = []
    for name in time_layers + once:
        model.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.append(name))
    engine.sample_actions(**family.inputs(model, 2, 0))
    assert sorted(calls) == sorted(once)


def test_num_steps_override(family, model):
    batch = family.inputs(model, 2, 0)
    engine = StagedEngine(model)
    n = model.cfg.num_steps + 2
    other = engine.sample_actions(**batch, num_steps=n)
    assert_same_actions(other, model.sample_actions(**batch, num_steps=n))
    assert (other - engine.sample_actions(**batch)).abs().max() > 1e-4
    assert engine.schedule(n).num_steps == n and engine.schedule(n) is engine.schedule(n)


def test_buffers_are_reused_for_one_shape_and_reallocated_for_another(family, model):
    engine = StagedEngine(model)
    first, second = family.inputs(model, 2, 0), family.inputs(model, 2, 1)
    a = engine.sample_actions(**first)
    workspace, actions_ptr = engine.workspace, engine.workspace.actions.data_ptr()
    b = engine.sample_actions(**second)
    assert engine.workspace is workspace and engine.workspace.actions.data_ptr() == actions_ptr
    # Results are copies: the next call does not overwrite what the previous one returned.
    assert_same_actions(a, model.sample_actions(**first))
    assert_same_actions(b, model.sample_actions(**second))

    three = family.inputs(model, 3, 2)
    assert_same_actions(engine.sample_actions(**three), model.sample_actions(**three))
    assert engine.workspace is not workspace and engine.workspace.actions.shape[0] == 3


@pytest.mark.parametrize("a_bits", [16, 8], ids=["w4a16", "w4a8"])
def test_engine_matches_plain_quantized_model(family, model, a_bits):
    quantize_(model, method_config("rtn", w_bits=4, a_bits=a_bits), progress=False)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    batch = family.inputs(model, 2, 0)
    assert_same_actions(StagedEngine(model).sample_actions(**batch), model.sample_actions(**batch))


@pytest.mark.parametrize("name", ["pi0", "smolvla"])
def test_a_quantized_action_time_mlp_runs_whole_on_every_step(name):
    family = FAMILIES[name]
    model = family.build()
    layout = Layout("quantvla+time", ("llm", "expert_mlp"), include=("action_time_mlp_in",))
    quantize_(model, method_config("rtn", layout=layout, w_bits=4, a_bits=8), progress=False)
    assert isinstance(model.action_time_mlp_in, QuantLinear)
    batch = family.inputs(model, 2, 0)
    engine = StagedEngine(model)
    calls = []
    model.action_time_mlp_in.register_forward_hook(lambda *_: calls.append(1))
    assert_same_actions(engine.sample_actions(**batch), model.sample_actions(**batch))
    # Both paths ran the whole quantized layer once per step: its rows cannot be split exactly.
    assert len(calls) == 2 * model.cfg.num_steps


def test_stage_misuse_gives_clear_errors(family, model):
    engine = StagedEngine(model)
    batch = family.inputs(model, 2, 0)
    with pytest.raises(RuntimeError, match=r"denoise\(\) needs inputs; call load\(\)"):
        engine.denoise()
    b, horizon, dim = batch["noise"].shape
    short_noise = {**batch, "noise": batch["noise"][:, :4]}
    with pytest.raises(ValueError, match=rf"noise must be \[2, {horizon}, {dim}\] for this batch, got shape \(2, 4,"):
        engine.load(**short_noise)
    with pytest.raises(ValueError, match=r"state must be \[2, \d+\] for this batch, got shape \(2, 3\)"):
        engine.load(**{**batch, "state": batch["state"][:, :3]})
    with pytest.raises(ValueError, match="image_masks must be"):
        engine.load(**{**batch, "image_masks": batch["image_masks"][:, :1]})
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        engine.schedule(0)
    engine.load(**batch)
    engine.embed()
    engine.prefix()
    assert_same_actions(engine.denoise(), model.sample_actions(**batch))


def _groot_policy_case(tmp_path):
    path = write_groot(tmp_path, "nvidia")
    return path, lambda policy: groot_observation(policy.model.cfg)


def _smolvla_policy_case(tmp_path):
    path = make_smolvla_checkpoint(tmp_path)
    return path, lambda policy: Observation(robot_images(), "pick up the red cup", robot_state())


@pytest.mark.parametrize("case", [_groot_policy_case, _smolvla_policy_case], ids=["groot", "smolvla"])
def test_load_policy_with_the_engine_predicts_the_model_chunk(tmp_path, case):
    path, observation = case(tmp_path)
    plain, fast = load_policy(path, engine="off"), load_policy(path, engine="on")
    assert plain.sampler is plain.model and type(fast.sampler) is StagedEngine
    noise = torch.randn(plain.horizon, plain.model.cfg.action_dim, generator=torch.Generator().manual_seed(1))
    obs = observation(plain)
    want = plain.predict(obs, noise).actions
    np.testing.assert_allclose(fast.predict(obs, noise).actions, want, rtol=1e-4, atol=1e-4)
