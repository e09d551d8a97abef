"""An artifact's quantization in a person's terms, read off its quant_config.json: what
`quantvla info ARTIFACT` shows and what `quantvla quantize` says when it is done.

ATM and OHB set α or β to exactly 1 inside their neutral band, so "moved" counts the heads and
layers whose scale is not 1: an artifact whose every α and β is 1 calibrated to no effect, and
says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from quantvla_ros.quant.fused import member_names


def group_of(groups: dict[str, str], name: str) -> str:
    """The Linear group (LINEAR_GROUPS) a module belongs to; `other` for one a custom pattern added.

    A fused layer ("...q_proj+k_proj+v_proj") belongs to its members' group."""
    if "+" in name:
        name = member_names(name)[0]
    return next((g for g, pattern in groups.items() if re.fullmatch(pattern, name)), "other")


def group_counts(groups: dict[str, str], names: Iterable[str]) -> dict[str, int]:
    """Quantized modules per Linear group of the family."""
    counts = dict.fromkeys([*groups, "other"], 0)
    for name in names:
        counts[group_of(groups, name)] += 1
    return {g: n for g, n in counts.items() if n}


def atm_ohb_summary(quant_config: dict) -> dict | None:
    """How many heads (α) and layers (β) calibration moved out of the neutral band, and their range."""
    atm_ohb = quant_config.get("atm_ohb")
    if not atm_ohb:
        return None
    summary = {}
    for method, key, unit in (("atm", "alpha", "heads"), ("ohb", "beta", "layers")):
        values = np.asarray(atm_ohb[key], dtype=np.float64)
        summary[method] = {
            "enabled": bool(quant_config.get(method, True)),
            unit: int(values.size),
            "moved": int((values != 1.0).sum()),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return summary


def atm_ohb_line(summary: dict | None) -> str:
    """ "ATM: 0 of 144 heads outside the neutral band (every α is 1); OHB: 3 of 18 layers (β 0.97 to 1.04)." """
    if summary is None:
        return "ATM/OHB: not run."
    parts = []
    for method, unit, symbol in (("atm", "heads", "α"), ("ohb", "layers", "β")):
        s = summary[method]
        if not s["enabled"]:
            parts.append(f"{method.upper()}: off")
            continue
        spread = f"{symbol} {s['min']:.3f} to {s['max']:.3f}" if s["moved"] else f"every {symbol} is 1"
        parts.append(f"{method.upper()}: {s['moved']} of {s[unit]} {unit} outside the neutral band ({spread})")
    return "; ".join(parts) + "."


def quantization_summary(quant_config: dict, groups: dict[str, str]) -> dict:
    """What `quantvla info ARTIFACT` reports under "quantization"."""
    calibration = quant_config.get("calibration") or {}
    weights = quant_config.get("weight_bytes") or {}
    return {
        "method": quant_config.get("method"),
        "bits": f"W{quant_config.get('w_bits')}A{quant_config.get('a_bits')}",
        "group_size": quant_config.get("group_size"),
        "layout": (quant_config.get("layout") or {}).get("name"),
        "transform": quant_config.get("transform"),
        "quantized_layers": len(quant_config.get("modules", {})),
        "per_group": group_counts(groups, quant_config.get("modules", {})),
        "atm_ohb": atm_ohb_summary(quant_config),
        "calibration": {
            "samples": calibration.get("samples"),
            "buffer": calibration.get("buffer"),
            "bags": [source.get("bag") for source in calibration.get("sources", [])],
        },
        "quantized_weight_bytes": weights.get("quantized"),
        "same_layers_bf16_bytes": weights.get("bf16"),
        "ratio": weights.get("ratio"),
        "created": quant_config.get("created"),
        "package_version": quant_config.get("package_version"),
        "format": quant_config.get("format"),
    }


def written_lines(path: str, quant_config: dict, groups: dict[str, str]) -> str:
    """What a command that wrote an artifact says: its quantization, then what ATM/OHB did."""
    s = quantization_summary(quant_config, groups)
    per_group = ", ".join(f"{g} {n}" for g, n in s["per_group"].items())
    ratio = "" if s["ratio"] is None else f", {s['ratio']:.3f}x of their bf16 bytes"
    return (
        f"Wrote {path}: {s['method']} {s['bits']}, {s['quantized_layers']} quantized layers ({per_group}){ratio}.\n"
        + atm_ohb_line(s["atm_ohb"])
    )
