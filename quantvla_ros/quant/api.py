"""`quantize_(model, config, buffer)`: the QuantVLA method and its baselines in one harness.

Methods (each a preset of `QuantConfig`; every field can still be overridden):

    quantvla     selective layout (LLM + expert MLPs), DuQuant-style input transform, ATM + OHB
    rtn          same layout, plain round-to-nearest, no ATM/OHB
    smoothquant  same layout, SmoothQuant migration (strength `smoothquant_alpha`), no ATM/OHB
    duquant      every LLM and expert linear with the DuQuant-style transform, no ATM/OHB —
                 the paper's failing "LLM+DiT" configuration

The paper's App. B puts the DuQuant reparameterization under QuantVLA, so `quantvla` uses it;
`transform="none"` gives the selective layout + ATM/OHB on plain RTN.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm import tqdm

from quantvla_ros.data.buffer import CalibrationBuffer
from quantvla_ros.models.stages import StagedModel
from quantvla_ros.quant.activations import percentile_channel_scales
from quantvla_ros.quant.calibration import ATMOHBResult, calibrate_atm_ohb, replay
from quantvla_ros.quant.layout import LAYOUTS, Layout
from quantvla_ros.quant.linear import QuantLinear
from quantvla_ros.quant.transforms import InputTransform, duquant, smoothquant

TRANSFORMS = ("none", "smoothquant", "duquant")


@dataclass(frozen=True)
class QuantConfig:
    method: str = "quantvla"
    layout: Layout = LAYOUTS["quantvla"]
    w_bits: int = 4
    a_bits: int = 8
    group_size: int | None = None
    transform: str = "duquant"
    smoothquant_alpha: float = 0.5  # migration strength of SmoothQuant and of DuQuant's smoothing step
    duquant_block: int = 64
    # Randomized Hadamard blocks (stored as signs) by default; "svd" is the authors' per-block
    # SVD basis, kept for comparison (worse on plain layers, 0.33x instead of 0.25x memory).
    duquant_rotation: str = "hadamard"
    # Dynamic per-token scales at run time (default), or static per-channel scales from the
    # calibration buffer's `act_percentile` of |x| (the authors' code; cheaper, less accurate).
    static_activations: bool = False
    act_percentile: float = 99.9
    # Smoothing before the DuQuant rotations (the paper's App. B; the authors' code has none).
    duquant_smoothing: bool = True
    atm: bool = True
    ohb: bool = True
    clamp_log: float = 0.3
    neutral_log: float = 0.03
    atm_clamp: str = "log"  # "linear": the authors' [0.7, 1.4] clamp (see calibration.py)
    stat_pooling: str = "pooled"  # "per_call": the authors' average of per-call statistics
    seed: int = 0

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"Unknown transform {self.transform!r}; choose one of {', '.join(TRANSFORMS)}.")
        if self.w_bits not in (4, 8):
            raise ValueError(f"Weight bits must be 4 or 8, got {self.w_bits}.")
        if self.a_bits not in (4, 8, 16):
            raise ValueError(f"Activation bits must be 4, 8 or 16 (float activations), got {self.a_bits}.")
        if self.atm_clamp not in ("log", "linear"):
            raise ValueError(f"Unknown ATM/OHB clamp {self.atm_clamp!r}; choose 'log' or 'linear'.")
        if self.stat_pooling not in ("pooled", "per_call"):
            raise ValueError(f"Unknown statistics pooling {self.stat_pooling!r}; choose 'pooled' or 'per_call'.")
        if self.static_activations and self.a_bits == 16:
            raise ValueError("Static activation scales need integer activations; use --a-bits 4 or 8.")

    @property
    def needs_activation_stats(self) -> bool:
        # Smoothing divides by calibrated input ranges; DuQuant's rotations alone come from the weights.
        return self.transform == "smoothquant" or (self.transform == "duquant" and self.duquant_smoothing)

    @property
    def needs_buffer(self) -> bool:
        return self.needs_activation_stats or self.static_activations or self.atm or self.ohb

    def to_json(self) -> dict:
        return {**asdict(self), "layout": self.layout.to_json()}


METHODS: dict[str, dict] = {
    "quantvla": dict(layout=LAYOUTS["quantvla"], transform="duquant", atm=True, ohb=True),
    "rtn": dict(layout=LAYOUTS["quantvla"], transform="none", atm=False, ohb=False),
    "smoothquant": dict(layout=LAYOUTS["quantvla"], transform="smoothquant", atm=False, ohb=False),
    "duquant": dict(layout=LAYOUTS["llm_and_expert_all"], transform="duquant", atm=False, ohb=False),
}


def method_config(method: str, **overrides) -> QuantConfig:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(QuantConfig(method=method, **METHODS[method]), **overrides)


@dataclass
class QuantRecord:
    """What quantize_ did, for the artifact's quant_config.json and the fidelity report."""

    config: QuantConfig
    modules: dict[str, dict] = field(default_factory=dict)
    atm_ohb: ATMOHBResult | None = None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def observe_inputs(
    model: StagedModel,
    names: list[str],
    buffer: CalibrationBuffer,
    on_input: Callable[[str, torch.Tensor], None],
    batch_size: int,
    seed: int,
    desc: str,
) -> None:
    """Run full inferences over the buffer, handing each named Linear's input [tokens, K] to `on_input`."""
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: on_input(n, args[0].flatten(0, -2)))
        for n in names
    ]
    try:
        replay(model, buffer, batch_size, seed, desc)
    finally:
        for h in hooks:
            h.remove()


def collect_input_absmax(
    model: StagedModel, names: list[str], buffer: CalibrationBuffer, batch_size: int, seed: int
) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each named Linear over full inference runs on the buffer."""
    absmax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        amax = x.detach().abs().amax(dim=0).float().cpu()
        absmax[name] = amax if name not in absmax else torch.maximum(absmax[name], amax)

    observe_inputs(model, names, buffer, record, batch_size, seed, "activation ranges")
    return absmax


def collect_static_scales(
    model: StagedModel,
    transforms: dict[str, InputTransform | None],
    buffer: CalibrationBuffer,
    config: QuantConfig,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Static per-channel activation scales of the transformed inputs (running max of the percentile)."""
    scales: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        transform = transforms[name]
        x = x.float() if transform is None else transform.apply(x.float())
        s = percentile_channel_scales([x], config.a_bits, config.act_percentile).cpu()
        scales[name] = s if name not in scales else torch.maximum(scales[name], s)

    observe_inputs(model, list(transforms), buffer, record, batch_size, config.seed, "static activation scales")
    return scales


def make_transform(config: QuantConfig, weight: torch.Tensor, absmax: torch.Tensor | None) -> InputTransform | None:
    """The layer's input transform; `absmax` is None for a layer calibration never ran (one whose
    output inference never reads, like SmolVLA's last LLM MLP), which gets no smoothing."""
    if config.transform == "none" or (config.transform == "smoothquant" and absmax is None):
        return None
    if config.transform == "smoothquant":
        return smoothquant(weight, absmax.to(weight.device), config.smoothquant_alpha)
    # Smoothing before the rotations is the paper's formulation (App. B); the authors' code
    # skips it, but rotations alone leave W4A8 activation outliers where plain RTN left them.
    smooth = config.duquant_smoothing and absmax is not None
    return duquant(
        weight,
        absmax.to(weight.device) if smooth else None,
        smooth_alpha=config.smoothquant_alpha if smooth else None,
        block_size=config.duquant_block,
        rotation=config.duquant_rotation,
        seed=config.seed,
    )


def quantize_(
    model: StagedModel,
    config: QuantConfig,
    buffer: CalibrationBuffer | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantRecord:
    """Replace the layout's Linears with QuantLinears in place, then calibrate ATM/OHB if asked."""
    if config.needs_buffer and (buffer is None or len(buffer) == 0):
        raise ValueError(
            f"Method {config.method!r} calibrates from data; pass a non-empty calibration buffer "
            "(or turn ATM/OHB off and use a transform that needs no activations)."
        )
    names = config.layout.select(model)
    if not names:
        raise ValueError(f"Layout {config.layout.name!r} selects no Linear layer of this model; check its patterns.")
    absmax = {}
    if config.needs_activation_stats:
        absmax = collect_input_absmax(model, names, buffer, batch_size, config.seed)
    transforms = {n: make_transform(config, model.get_submodule(n).weight, absmax.get(n)) for n in names}
    static = collect_static_scales(model, transforms, buffer, config, batch_size) if config.static_activations else {}
    teacher = copy.deepcopy(model) if (config.atm or config.ohb) else None
    record = QuantRecord(config)
    for name in tqdm(names, desc=f"quantize W{config.w_bits}A{config.a_bits}", unit="layer", disable=not progress):
        quantized = QuantLinear.from_float(
            model.get_submodule(name),
            w_bits=config.w_bits,
            a_bits=config.a_bits,
            group_size=config.group_size,
            transform=transforms[name],
            input_scale=static.get(name),
        )
        _set_module(model, name, quantized)
        record.modules[name] = quantized.spec()
    if teacher is not None:
        record.atm_ohb = calibrate_atm_ohb(
            teacher,
            model,
            buffer,
            atm=config.atm,
            ohb=config.ohb,
            clamp_log=config.clamp_log,
            neutral_log=config.neutral_log,
            clamp=config.atm_clamp,
            pooling=config.stat_pooling,
            batch_size=batch_size,
            seed=config.seed,
            progress=progress,
        )
    return record
