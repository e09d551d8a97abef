"""Weight memory of a layout, before and after, computed on the meta device (nothing allocated).

The quantized size is what `QuantLinear.weight_bytes()` reports for an empty layer of the same
shape and settings, layer by layer as quantize_ builds them (a fusion group whose members are
all selected is one layer, with one input transform), so the plan and the artifact count bytes
the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from quantvla_ros.models.stages import StagedModel
from quantvla_ros.quant.layout import Layout
from quantvla_ros.quant.linear import QuantLinear
from quantvla_ros.quant.plan import layer_groups


def layout_memory(
    model: StagedModel,
    layout: Layout,
    w_bits: int,
    group_size: int | None = None,
    transform_kind: str | None = None,
    fuse: bool = True,
) -> dict:
    linear_layers = sum(isinstance(m, nn.Linear) for m in model.modules())
    model_bf16 = sum(2 * p.numel() for p in model.parameters())
    rows = []
    for name, members in layer_groups(model, layout.select(model), fuse).items():
        linears = [model.get_submodule(m) for m in members]
        in_features, out_features = linears[0].in_features, sum(linear.out_features for linear in linears)
        with torch.device("meta"):
            empty = QuantLinear.empty(
                in_features,
                out_features,
                any(linear.bias is not None for linear in linears),
                w_bits,
                16,
                group_size,
                transform_kind,
            )
        rows.append(
            {
                "name": name,
                "linears": list(members),
                "in_features": in_features,
                "out_features": out_features,
                "bf16_bytes": 2 * in_features * out_features,
                "quantized_bytes": empty.weight_bytes(),
            }
        )
    bf16_total = sum(r["bf16_bytes"] for r in rows)
    quant_total = sum(r["quantized_bytes"] for r in rows)
    return {
        "layout": layout.name,
        "linear_layers": linear_layers,
        "quantized_linears": sum(len(row["linears"]) for row in rows),
        "modules": rows,
        "bf16_bytes": bf16_total,
        "quantized_bytes": quant_total,
        "ratio": quant_total / bf16_total if bf16_total else None,
        "model_bf16_bytes": model_bf16,
        "model_quantized_bytes": model_bf16 - bf16_total + quant_total,
    }
