"""`quantize_(model, config, source)`: the QuantVLA method and its baselines, as four phases.

    collect statistics   statistics.collect_input_absmax: calibrated input ranges (for smoothing)
    plan                 plan.plan_layers: each Linear's input transform and static activation scales
    convert layers       convert.convert_layers: Linears -> QuantLinears, in place
    calibrate ATM/OHB    calibration.calibrate_atm_ohb: α and β from teacher vs student, folded

Each phase can be called on its own; `quantize_` runs what the config needs, in that order.
The configs and the method presets are in config.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.policy import CalibrationSource
from quantvla_ros.models.stages import StagedModel
from quantvla_ros.quant.calibration import ATMOHBResult, calibrate_atm_ohb
from quantvla_ros.quant.config import QuantConfig
from quantvla_ros.quant.convert import convert_layers
from quantvla_ros.quant.plan import plan_layers
from quantvla_ros.quant.statistics import collect_input_absmax


@dataclass
class QuantRecord:
    """What quantize_ did, for the artifact's quant_config.json and the fidelity report."""

    config: QuantConfig
    modules: dict[str, dict] = field(default_factory=dict)
    atm_ohb: ATMOHBResult | None = None


def quantize_(
    model: StagedModel,
    config: QuantConfig,
    source: CalibrationSource | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantRecord:
    """Replace the layout's Linears with QuantLinears in place, then calibrate ATM/OHB if asked."""
    if config.needs_data and (source is None or len(source) == 0):
        raise QuantVLAError(
            f"Method {config.method!r} calibrates from data; pass a non-empty calibration buffer "
            "(or turn ATM/OHB off and use a transform that needs no activations)."
        )
    names = config.layout.select_or_refuse(model)
    linear, seed = config.linear, config.seed
    absmax = {}
    if linear.needs_activation_stats:
        absmax = collect_input_absmax(model, names, source, batch_size, seed, progress)
    plans = plan_layers(model, names, linear, absmax, source, batch_size, seed, progress)
    teacher = copy.deepcopy(model) if config.atm_ohb.enabled else None
    record = QuantRecord(config, convert_layers(model, plans, linear, progress))
    if teacher is not None:
        record.atm_ohb = calibrate_atm_ohb(teacher, model, source, config.atm_ohb, batch_size, seed, progress)
    return record
