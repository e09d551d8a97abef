"""Phase 3 of quantize_: swap each planned layer in, in place: a QuantLinear for a single Linear, or a
fused QuantLinear beside its members, which become views of its rows (quant/fused.py)."""

from __future__ import annotations

from torch import nn

from quantvla_ros.progress import Progress as tqdm
from quantvla_ros.quant.config import LinearConfig
from quantvla_ros.quant.fused import QuantLinearPart, concatenated
from quantvla_ros.quant.linear import QuantLinear
from quantvla_ros.quant.plan import LayerPlan


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def convert_layers(
    model: nn.Module, plans: dict[str, LayerPlan], config: LinearConfig, progress: bool = True
) -> dict[str, dict]:
    """Quantize every planned layer; returns each layer's spec (what an artifact records)."""
    specs = {}
    for name, plan in tqdm(plans.items(), desc=f"quantize {config.bits}", unit="layer", disable=not progress):
        linears = [model.get_submodule(m) for m in plan.members]
        fused = len(linears) > 1
        quantized = QuantLinear.from_float(
            concatenated(linears) if fused else linears[0],
            w_bits=config.w_bits,
            a_bits=config.a_bits,
            group_size=config.group_size,
            transform=plan.transform,
            input_scale=plan.input_scale,
            asymmetric=config.asymmetric_activations,
            split_sizes=[linear.out_features for linear in linears] if fused else None,
        )
        set_module(model, name, quantized)
        if fused:
            for index, member in enumerate(plan.members):
                set_module(model, member, QuantLinearPart(quantized, index))
        specs[name] = quantized.spec()
    return specs
