"""The phases quantize_ composes, each on its own: statistics, plan, convert, ATM/OHB.

Calibration data comes from an in-memory source here: quantization needs only the
CalibrationSource protocol (a length and batches of ModelInputs), not the data layer's buffers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from quantvla_ros.models.common.projection import project
from quantvla_ros.models.pi0.config import tiny
from quantvla_ros.models.pi0.model import PI0Model
from quantvla_ros.models.policy import ModelInputs
from quantvla_ros.quant.api import quantize_
from quantvla_ros.quant.calibration import calibrate_atm_ohb, collect_expert_statistics, fold_atm
from quantvla_ros.quant.config import ATMOHBConfig, LinearConfig, method_config
from quantvla_ros.quant.convert import convert_layers
from quantvla_ros.quant.layout import LAYOUTS
from quantvla_ros.quant.linear import QuantLinear
from quantvla_ros.quant.plan import LayerPlan, layer_groups, plan_layers
from quantvla_ros.quant.statistics import collect_input_absmax, sample_noise

pytestmark = pytest.mark.unit

LLM = "paligemma_with_expert.paligemma.model.language_model.layers"
EXPERT = "paligemma_with_expert.gemma_expert.model.layers"


@dataclass
class InMemorySource:
    inputs: ModelInputs

    def __len__(self) -> int:
        return self.inputs.images.shape[0]

    def batches(self, batch_size: int, device: str | torch.device = "cpu") -> Iterator[ModelInputs]:
        for start in range(0, len(self), batch_size):
            yield ModelInputs(**{k: v[start : start + batch_size].to(device) for k, v in vars(self.inputs).items()})


def make_source(model: PI0Model, samples: int = 5) -> InMemorySource:
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    size, cams = cfg.image_size, len(cfg.camera_names)
    return InMemorySource(
        ModelInputs(
            images=torch.rand(samples, cams, 3, size, size, generator=g) * 2 - 1,
            image_masks=torch.ones(samples, cams, dtype=torch.bool),
            tokens=torch.randint(0, cfg.vocab_size, (samples, cfg.max_token_len), generator=g),
            token_masks=torch.ones(samples, cfg.max_token_len, dtype=torch.bool),
            state=torch.zeros(samples, cfg.max_state_dim),
        )
    )


@pytest.fixture
def model() -> PI0Model:
    torch.manual_seed(0)
    return PI0Model(tiny(True)).eval()


def test_collect_input_absmax_is_each_layers_channel_max_over_every_call(model):
    source = make_source(model)
    names = LAYOUTS["quantvla"].select(model)
    got = collect_input_absmax(model, names, source, batch_size=2, seed=4, progress=False)

    # The same inferences, watched by hand: one noise draw per sample, batches of 2.
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0]))
        for n in names
    ]
    noise = sample_noise(len(source), model.cfg.action_horizon, model.cfg.action_dim, seed=4)
    for i, batch in enumerate(source.batches(2)):
        model.sample_actions(*vars(batch).values(), noise[2 * i : 2 * i + batch.images.shape[0]])
    for h in hooks:
        h.remove()
    assert set(got) == set(seen)
    for name, inputs in seen.items():
        want = torch.stack([x.flatten(0, -2).abs().amax(dim=0) for x in inputs]).amax(dim=0)
        torch.testing.assert_close(got[name], want)
    # The last LLM layer's o_proj and MLP never run (the expert reads only its K/V): no entry.
    last = f"{LLM}.{model.cfg.llm.depth - 1}"
    assert {f"{last}.self_attn.o_proj", f"{last}.mlp.down_proj"} <= set(names) - set(got)
    # Expert MLPs run on every denoising step and are recorded.
    assert f"{EXPERT}.0.mlp.gate_proj" in got


def test_plan_picks_each_transform_from_the_config(model):
    names = [f"{LLM}.0.mlp.gate_proj", f"{EXPERT}.1.mlp.down_proj"]
    absmax = {n: torch.rand(model.get_submodule(n).in_features) + 0.5 for n in names}
    kinds = {
        transform: {
            n: p.transform and p.transform.kind
            for n, p in plan_layers(model, names, LinearConfig(transform=transform), absmax, progress=False).items()
        }
        for transform in ("none", "smoothquant", "duquant")
    }
    assert kinds["none"] == dict.fromkeys(names)
    assert kinds["smoothquant"] == dict.fromkeys(names, "smooth")
    assert set(kinds["duquant"].values()) == {"smooth+rotation1_signs+perm+rotation2_signs"}
    # Without calibrated ranges DuQuant is rotations only, and SmoothQuant leaves the layer as it is.
    rotations_only = plan_layers(model, names, LinearConfig(), {}, progress=False)
    assert {p.transform.kind for p in rotations_only.values()} == {"rotation1_signs+perm+rotation2_signs"}
    assert all(p.input_scale is None for p in rotations_only.values())


def test_plan_calibrates_static_scales_only_from_data(model):
    names = [f"{LLM}.0.mlp.gate_proj"]
    config = LinearConfig(transform="none", static_activations=True)
    with pytest.raises(ValueError, match="Static activation scales are calibrated from data"):
        plan_layers(model, names, config, {}, progress=False)
    plan = plan_layers(model, names, config, {}, make_source(model), batch_size=2, progress=False)[names[0]]
    k = model.get_submodule(names[0]).in_features
    assert plan.input_scale.shape == (k,) and bool((plan.input_scale > 0).all())


def test_layer_groups_fuse_a_group_only_when_every_member_is_selected(model):
    qkv = tuple(f"{LLM}.0.self_attn.{p}_proj" for p in "qkv")
    gate_up = (f"{LLM}.0.mlp.gate_proj", f"{LLM}.0.mlp.up_proj")
    down = f"{LLM}.0.mlp.down_proj"
    layers = layer_groups(model, [*qkv, f"{LLM}.0.self_attn.o_proj", *gate_up, down])
    assert layers == {
        f"{LLM}.0.self_attn.q_proj+k_proj+v_proj": qkv,
        f"{LLM}.0.self_attn.o_proj": (f"{LLM}.0.self_attn.o_proj",),
        f"{LLM}.0.mlp.gate_proj+up_proj": gate_up,
        down: (down,),
    }
    # Without up_proj, gate_proj stands alone; fuse=False keeps every Linear apart.
    assert layer_groups(model, [gate_up[0], down]) == {gate_up[0]: (gate_up[0],), down: (down,)}
    assert layer_groups(model, list(qkv), fuse=False) == {n: (n,) for n in qkv}


def test_a_fused_layer_computes_each_members_rows_as_that_member_quantized_alone(model):
    qkv = tuple(f"{LLM}.0.self_attn.{p}_proj" for p in "qkv")
    alone = {n: QuantLinear.from_float(model.get_submodule(n), w_bits=4, a_bits=8) for n in qkv}
    config = LinearConfig(w_bits=4, a_bits=8, transform="none")
    plans = plan_layers(model, list(qkv), config, {}, progress=False)
    specs = convert_layers(model, plans, config, progress=False)
    name = f"{LLM}.0.self_attn.q_proj+k_proj+v_proj"
    fused = model.get_submodule(name)
    assert list(specs) == [name] and specs[name]["split_sizes"] == [alone[n].out_features for n in qkv]
    x = torch.randn(5, model.cfg.llm.width)
    # Per-channel weight scales and per-token activation scales see the same rows and the same input.
    for n, part in zip(qkv, project(x, *(model.get_submodule(n) for n in qkv)), strict=True):
        assert torch.equal(part, alone[n](x)) and torch.equal(model.get_submodule(n)(x), part)
    calls = []
    fused.register_forward_hook(lambda *_: calls.append(1))
    model.paligemma_with_expert.paligemma.model.language_model.layers[0].self_attn.project(x[None])
    assert calls == [1]
    # ATM's α folds into the q rows only.
    before = fused(x)
    model.get_submodule(qkv[0]).scale_output_rows(torch.full((alone[qkv[0]].out_features,), 2.0))
    rows = alone[qkv[0]].out_features
    torch.testing.assert_close(fused(x)[:, :rows], 2 * before[:, :rows])
    assert torch.equal(fused(x)[:, rows:], before[:, rows:])


def test_convert_swaps_only_the_planned_layers_and_returns_their_specs(model):
    planned, untouched = f"{LLM}.0.mlp.up_proj", f"{LLM}.0.mlp.gate_proj"
    float_out = model.get_submodule(planned)(torch.randn(3, model.cfg.llm.width))
    plans = {planned: LayerPlan((planned,), None, None)}
    specs = convert_layers(model, plans, LinearConfig(w_bits=8, a_bits=16), progress=False)
    layer = model.get_submodule(planned)
    assert isinstance(layer, QuantLinear) and type(model.get_submodule(untouched)) is torch.nn.Linear
    assert specs == {planned: layer.spec()} and specs[planned]["w_bits"] == 8
    assert layer(torch.randn(3, model.cfg.llm.width)).shape == float_out.shape


def test_sequential_atm_ohb_measures_beta_on_the_student_with_alpha_folded(model):
    """A student whose expert queries are scaled: ATM undoes it; β then differs between the modes."""
    source = make_source(model)
    student = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(student.expert.layers):
            layer.self_attn.q_proj.weight.mul_(1.25 if i == 0 else 0.85)
    joint_student, sequential_student = copy.deepcopy(student), copy.deepcopy(student)
    config = ATMOHBConfig(neutral_log=0.0)
    joint = calibrate_atm_ohb(model, joint_student, source, config, batch_size=5, progress=False)
    sequential = calibrate_atm_ohb(
        model, sequential_student, source, ATMOHBConfig(neutral_log=0.0, sequential=True), batch_size=5, progress=False
    )
    torch.testing.assert_close(joint.alpha, sequential.alpha)
    assert float(joint.alpha[0].mean()) < 0.85 and float(joint.alpha[1].mean()) > 1.1
    # Sequential β comes from the α-folded student: the same statistics a fresh run of it gives.
    with_alpha = copy.deepcopy(student)
    fold_atm(with_alpha, joint.alpha)
    rms = collect_expert_statistics(with_alpha, source, batch_size=5).output_rms()
    torch.testing.assert_close(sequential.student.output_rms(), rms)
    assert not torch.allclose(joint.beta, sequential.beta)


def test_quantize_composes_the_phases_and_needs_data_only_when_its_config_does(model):
    with pytest.raises(ValueError, match="calibrates from data; pass a non-empty calibration buffer"):
        quantize_(model, method_config("quantvla"), None, progress=False)
    record = quantize_(model, method_config("rtn", w_bits=8, a_bits=8), None, progress=False)
    float_model = PI0Model(tiny(True))
    assert record.modules.keys() == layer_groups(float_model, LAYOUTS["quantvla"].select(float_model)).keys()
    assert record.atm_ohb is None
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in record.modules)


def test_method_config_routes_each_override_to_its_config():
    config = method_config("quantvla", w_bits=8, clamp_log=0.2, sequential=True, seed=3)
    assert (config.linear.w_bits, config.atm_ohb.clamp_log, config.atm_ohb.sequential, config.seed) == (8, 0.2, True, 3)
    assert config.linear.transform == "duquant" and method_config("rtn").atm_ohb.enabled is False
    with pytest.raises(ValueError, match="Unknown quantization setting"):
        method_config("quantvla", wbits=8)
    flat = config.to_json()
    assert flat["w_bits"] == 8 and flat["sequential"] is True and flat["layout"]["name"] == "quantvla"
