"""Phase 3 of quantize_: swap each planned Linear for a QuantLinear, in place."""

from __future__ import annotations

from torch import nn

from quantvla_ros.progress import Progress as tqdm
from quantvla_ros.quant.config import LinearConfig
from quantvla_ros.quant.linear import QuantLinear
from quantvla_ros.quant.plan import LayerPlan


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def convert_layers(
    model: nn.Module, plans: dict[str, LayerPlan], config: LinearConfig, progress: bool = True
) -> dict[str, dict]:
    """Quantize every planned Linear into a QuantLinear; returns each layer's spec (what an artifact records)."""
    specs = {}
    for name, plan in tqdm(plans.items(), desc=f"quantize {config.bits}", unit="layer", disable=not progress):
        quantized = QuantLinear.from_float(
            model.get_submodule(name),
            w_bits=config.w_bits,
            a_bits=config.a_bits,
            group_size=config.group_size,
            transform=plan.transform,
            input_scale=plan.input_scale,
            asymmetric=config.asymmetric_activations,
        )
        set_module(model, name, quantized)
        specs[name] = quantized.spec()
    return specs
