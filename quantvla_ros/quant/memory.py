"""Weight memory of a quantization, before and after, computed on the meta device (nothing allocated).

`layout_memory` estimates what `quantize_` would write for a config: layer by layer as quantize_
builds them (a fusion group whose members are all selected is one layer, with one input
transform from their concatenated weight), each an empty QuantLinear with the input transform
`plan.make_transform` would give it (the same method presets and defaults as `quantvla
quantize`). Only the smoothing vector of a layer whose output inference never reads differs:
calibration never reaches it, so the artifact stores that layer without one (4 bytes per input
channel). `artifact_memory` reads the same report off an artifact's recorded layers. Both count
bytes as `QuantLinear.weight_bytes()` does, so the estimate, the artifact and its
quant_config.json agree.
"""

from __future__ import annotations

import torch
from torch import nn

from quantvla_ros.models.stages import StagedModel
from quantvla_ros.quant.config import QuantConfig
from quantvla_ros.quant.fused import concatenated, member_names
from quantvla_ros.quant.linear import QuantLinear
from quantvla_ros.quant.plan import layer_groups, make_transform


def layout_memory(model: StagedModel, config: QuantConfig) -> dict:
    """What `quantize_(model, config, ...)` would store (build the model on the meta device to allocate nothing)."""
    linear = config.linear
    layers = {}
    selected = config.layout.select_or_refuse(model)
    for name, members in layer_groups(model, selected, linear.fuse_projections).items():
        floats = [model.get_submodule(m) for m in members]
        float_layer = floats[0] if len(floats) == 1 else concatenated(floats)
        weight = float_layer.weight
        absmax = torch.ones(weight.shape[1], device=weight.device) if linear.needs_activation_stats else None
        transform = make_transform(linear, weight, absmax, config.seed)
        layers[name] = QuantLinear.empty(
            float_layer.in_features,
            float_layer.out_features,
            float_layer.bias is not None,
            linear.w_bits,
            linear.a_bits,
            linear.group_size,
            None if transform is None else transform.kind,
            (transform and transform.block_size) or linear.duquant_block,
            linear.static_activations,
            device="meta",
            asymmetric_activations=linear.asymmetric_activations,
            split_sizes=[f.out_features for f in floats] if len(floats) > 1 else None,
        )
    return memory_report(model, config.layout.name, layers)


def artifact_memory(model: nn.Module, quant_config: dict) -> dict:
    """The same report for an artifact's recorded layers, over the float model of its config."""
    layers = {name: QuantLinear.from_spec(spec, device="meta") for name, spec in quant_config["modules"].items()}
    return memory_report(model, quant_config["layout"]["name"], layers)


def memory_report(model: nn.Module, layout: str, layers: dict[str, QuantLinear]) -> dict:
    rows = [
        {
            "name": name,
            "linears": [name] if layer.split_sizes is None else member_names(name),
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bf16_bytes": 2 * layer.in_features * layer.out_features,
            "quantized_bytes": layer.weight_bytes(),
        }
        for name, layer in layers.items()
    ]
    model_bf16 = sum(2 * p.numel() for p in model.parameters())
    bf16_total = sum(r["bf16_bytes"] for r in rows)
    quant_total = sum(r["quantized_bytes"] for r in rows)
    return {
        "layout": layout,
        "linear_layers": sum(isinstance(m, nn.Linear) for m in model.modules()),
        "quantized_linears": sum(len(row["linears"]) for row in rows),
        "modules": rows,
        "bf16_bytes": bf16_total,
        "quantized_bytes": quant_total,
        "ratio": quant_total / bf16_total,
        "model_bf16_bytes": model_bf16,
        "model_quantized_bytes": model_bf16 - bf16_total + quant_total,
    }
