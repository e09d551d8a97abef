"""Phase 2 of quantize_: decide which layers the selected Linears become, and each one's input
transform and static activation scales.

The Linears of a fusion group (StagedModel.linear_fusions: q/k/v, gate/up) that are all selected
become one fused layer (quant/fused.py), planned from their concatenated weight and their shared
input; every other selected Linear becomes a layer of its own. Nothing is quantized here: a plan
is what `convert.convert_layers` needs to build each QuantLinear.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.policy import CalibrationSource
from quantvla_ros.models.stages import StagedModel
from quantvla_ros.quant.activations import percentile_channel_scales
from quantvla_ros.quant.config import LinearConfig
from quantvla_ros.quant.fused import fused_name
from quantvla_ros.quant.statistics import observe_inputs
from quantvla_ros.quant.transforms import InputTransform, duquant, smoothquant


@dataclass(frozen=True)
class LayerPlan:
    members: tuple[str, ...]  # the Linears it computes: one, or a fusion group in row order
    transform: InputTransform | None  # applied to the input at run time, folded into the weight
    input_scale: torch.Tensor | None  # static per-channel activation scales [K] of the transformed input


def layer_groups(model: StagedModel, names: list[str], fuse: bool = True) -> dict[str, tuple[str, ...]]:
    """Layer name -> the selected Linears it computes, in model order: a fused layer for each fusion
    group whose members are all selected (when fuse), a layer of its own for every other Linear."""
    selected = set(names)
    group_of = {}
    if fuse:
        for members in model.linear_fusions():
            if set(members) <= selected:
                group_of.update(dict.fromkeys(members, members))
    layers: dict[str, tuple[str, ...]] = {}
    for name in names:
        members = group_of.get(name, (name,))
        layers.setdefault(fused_name(members) if len(members) > 1 else name, members)
    return layers


def make_transform(
    config: LinearConfig, weight: torch.Tensor, absmax: torch.Tensor | None, seed: int = 0
) -> InputTransform | None:
    """The layer's input transform; `absmax` is None for a layer calibration never ran (one whose
    output inference never reads), which gets no smoothing."""
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
        seed=seed,
    )


def collect_static_scales(
    model: StagedModel,
    transforms: dict[str, InputTransform | None],
    source: CalibrationSource,
    config: LinearConfig,
    batch_size: int,
    seed: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Static per-channel activation scales of the transformed inputs of the named Linears (running max
    of the percentile)."""
    scales: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        transform = transforms[name]
        x = x.float() if transform is None else transform.apply(x.float())
        s = percentile_channel_scales([x], config.a_bits, config.act_percentile).cpu()
        scales[name] = s if name not in scales else torch.maximum(scales[name], s)

    desc = "static activation scales" if progress else None
    observe_inputs(model, list(transforms), source, record, batch_size, seed, desc)
    return scales


def plan_layers(
    model: StagedModel,
    names: list[str],
    config: LinearConfig,
    absmax: dict[str, torch.Tensor],
    source: CalibrationSource | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, LayerPlan]:
    """Each layer's plan (see layer_groups), from its weight and its calibrated input ranges
    (`absmax` per Linear, empty when the transform needs none). Static activation scales take one
    more pass over `source`."""
    layers = layer_groups(model, names, config.fuse_projections)
    transforms = {}
    for name, members in layers.items():
        linears = [model.get_submodule(m) for m in members]
        weight = torch.cat([linear.weight for linear in linears])
        # Members read one input; their ranges differ only if a model fed them different ones.
        ranges = [absmax[m] for m in members if m in absmax]
        transforms[name] = make_transform(
            config, weight, functools.reduce(torch.maximum, ranges) if ranges else None, seed
        )
    static = {}
    if config.static_activations:
        if source is None:
            raise QuantVLAError("Static activation scales are calibrated from data; pass a calibration buffer.")
        # A layer's input is its first member's.
        observed = collect_static_scales(
            model, {members[0]: transforms[name] for name, members in layers.items()}, source, config, batch_size, seed,
            progress,
        )  # fmt: skip
        static = {name: observed.get(members[0]) for name, members in layers.items()}
    return {name: LayerPlan(members, transforms[name], static.get(name)) for name, members in layers.items()}
