"""Weight memory of a layout, before and after, computed on the meta device (nothing allocated).

The quantized size is what `QuantLinear.weight_bytes()` reports for an empty layer of the same
shape and settings, so the plan and the artifact count bytes the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from quantvla_ros.quant.layout import Layout
from quantvla_ros.quant.linear import QuantLinear


def layout_memory(
    model: nn.Module, layout: Layout, w_bits: int, group_size: int | None = None, transform_kind: str | None = None
) -> dict:
    linear_layers = sum(isinstance(m, nn.Linear) for m in model.modules())
    model_bf16 = sum(2 * p.numel() for p in model.parameters())
    rows = []
    for name in layout.select_or_refuse(model):
        linear = model.get_submodule(name)
        with torch.device("meta"):
            empty = QuantLinear.empty(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                w_bits,
                16,
                group_size,
                transform_kind,
            )
        bf16 = 2 * linear.in_features * linear.out_features
        quantized = empty.weight_bytes()
        rows.append(
            {
                "name": name,
                "in_features": linear.in_features,
                "out_features": linear.out_features,
                "bf16_bytes": bf16,
                "quantized_bytes": quantized,
            }
        )
    bf16_total = sum(r["bf16_bytes"] for r in rows)
    quant_total = sum(r["quantized_bytes"] for r in rows)
    return {
        "layout": layout.name,
        "linear_layers": linear_layers,
        "modules": rows,
        "bf16_bytes": bf16_total,
        "quantized_bytes": quant_total,
        "ratio": quant_total / bf16_total if bf16_total else None,
        "model_bf16_bytes": model_bf16,
        "model_quantized_bytes": model_bf16 - bf16_total + quant_total,
    }
