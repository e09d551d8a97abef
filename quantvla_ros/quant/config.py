"""What `quantize_` does, as data: a layout, a per-linear config and an ATM/OHB config.

Methods are presets (`METHODS`); `method_config(method, **overrides)` takes any field of the
three configs by name, as the CLI passes its flags:

    quantvla     selective layout (LLM + expert MLPs), DuQuant-style input transform, ATM + OHB
    rtn          same layout, plain round-to-nearest, no ATM/OHB
    smoothquant  same layout, SmoothQuant migration (strength `smoothquant_alpha`), no ATM/OHB
    duquant      every LLM and expert linear with the DuQuant-style transform, no ATM/OHB —
                 the paper's failing "LLM+DiT" configuration

The paper's App. B puts the DuQuant reparameterization under QuantVLA, so `quantvla` uses it;
`transform="none"` gives the selective layout + ATM/OHB on plain RTN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, replace

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.quant.layout import LAYOUTS, Layout
from quantvla_ros.quant.transforms import ROTATIONS

TRANSFORMS = ("none", "smoothquant", "duquant")
STAT_POOLINGS = ("pooled", "per_call", "per_row")  # which std ATM matches (calibration.py)
ATM_KEYS = ("all", "own")  # which keys enter ATM's logits (calibration.py)


@dataclass(frozen=True)
class LinearConfig:
    """How each Linear the layout selects becomes a QuantLinear."""

    w_bits: int = 4
    a_bits: int = 8  # 16: float activations (weight-only quantization)
    group_size: int | None = None  # per-group weight scales along K; None: per output channel
    transform: str = "duquant"
    smoothquant_alpha: float = 0.5  # migration strength of SmoothQuant and of DuQuant's smoothing step
    duquant_block: int = 64
    # Randomized Hadamard blocks (stored as signs) by default; "svd" is the authors' per-block
    # SVD basis, kept for comparison (worse on plain layers, 0.33x instead of 0.25x memory).
    duquant_rotation: str = "hadamard"
    # Smoothing before the DuQuant rotations (the paper's App. B; the authors' code has none).
    duquant_smoothing: bool = True
    # Dynamic per-token scales at run time (default), or static per-channel scales from the
    # calibration data's `act_percentile` of |x| (the authors' code; cheaper, less accurate).
    static_activations: bool = False
    act_percentile: float = 99.9
    # Per-token activations with a zero point (the paper's App. A), or symmetric (activations.py).
    asymmetric_activations: bool = False
    # Linears that read one input (q/k/v, gate/up) as one layer: one transform, one GEMM (fused.py).
    fuse_projections: bool = True

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise QuantVLAError(f"Unknown transform {self.transform!r}; choose one of {', '.join(TRANSFORMS)}.")
        if self.duquant_rotation not in ROTATIONS:
            raise QuantVLAError(
                f"Unknown DuQuant rotation {self.duquant_rotation!r}; choose one of {', '.join(ROTATIONS)}."
            )
        if self.w_bits not in (4, 8):
            raise QuantVLAError(f"Weight bits must be 4 or 8, got {self.w_bits}.")
        if self.a_bits not in (4, 8, 16):
            raise QuantVLAError(f"Activation bits must be 4, 8 or 16 (float activations), got {self.a_bits}.")
        if self.static_activations and self.a_bits == 16:
            raise QuantVLAError("Static activation scales need integer activations; use --a-bits 4 or 8.")
        if self.asymmetric_activations and (self.static_activations or self.a_bits == 16):
            raise QuantVLAError(
                "Asymmetric activations are per-token integer activations; drop --static-activations and use "
                "--a-bits 4 or 8."
            )

    @property
    def bits(self) -> str:
        """ "W4A8", "W8A16": weight and activation bits as the paper writes them."""
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def needs_activation_stats(self) -> bool:
        """Smoothing divides by calibrated input ranges; DuQuant's rotations alone come from the weights."""
        return self.transform == "smoothquant" or (self.transform == "duquant" and self.duquant_smoothing)


@dataclass(frozen=True)
class ATMOHBConfig:
    """Attention temperature matching and output head balancing (see calibration.py)."""

    atm: bool = True
    ohb: bool = True
    clamp_log: float = 0.3  # |log α|, |log β| at most this
    neutral_log: float = 0.03  # |log| below this sets α, β to exactly 1
    atm_clamp: str = "log"  # "linear": the authors' [0.7, 1.4] clamp
    stat_pooling: str = "pooled"  # which std ATM matches: "pooled", "per_call" (the authors'), "per_row"
    atm_keys: str = "all"  # "own": logits over the querying tokens' own keys only (calibration.py)
    # False: α and β both from one student run without either (the authors' code); True: β
    # measured on the student with α already folded.
    sequential: bool = False

    def __post_init__(self) -> None:
        if self.atm_clamp not in ("log", "linear"):
            raise QuantVLAError(f"Unknown ATM/OHB clamp {self.atm_clamp!r}; choose 'log' or 'linear'.")
        if self.stat_pooling not in STAT_POOLINGS:
            raise QuantVLAError(
                f"Unknown statistics pooling {self.stat_pooling!r}; choose one of {', '.join(STAT_POOLINGS)}."
            )
        if self.atm_keys not in ATM_KEYS:
            raise QuantVLAError(f"Unknown ATM keys {self.atm_keys!r}; choose one of {', '.join(ATM_KEYS)}.")

    @property
    def enabled(self) -> bool:
        return self.atm or self.ohb


NO_ATM_OHB = ATMOHBConfig(atm=False, ohb=False)


@dataclass(frozen=True)
class QuantConfig:
    method: str = "quantvla"
    layout: Layout = LAYOUTS["quantvla"]
    linear: LinearConfig = field(default_factory=LinearConfig)
    atm_ohb: ATMOHBConfig = field(default_factory=ATMOHBConfig)
    seed: int = 0  # the Hadamard signs and the noise calibration integrates from

    @property
    def needs_data(self) -> bool:
        linear = self.linear
        return linear.needs_activation_stats or linear.static_activations or self.atm_ohb.enabled

    def to_json(self) -> dict:
        """Flat, as quant_config.json records it: method, layout, then every field of both configs."""
        return {
            "method": self.method,
            "layout": self.layout.to_json(),
            **asdict(self.linear),
            **asdict(self.atm_ohb),
            "seed": self.seed,
        }


METHODS: dict[str, QuantConfig] = {
    "quantvla": QuantConfig("quantvla", LAYOUTS["quantvla"], LinearConfig(transform="duquant")),
    "rtn": QuantConfig("rtn", LAYOUTS["quantvla"], LinearConfig(transform="none"), NO_ATM_OHB),
    "smoothquant": QuantConfig("smoothquant", LAYOUTS["quantvla"], LinearConfig(transform="smoothquant"), NO_ATM_OHB),
    "duquant": QuantConfig("duquant", LAYOUTS["llm_and_expert_all"], LinearConfig(transform="duquant"), NO_ATM_OHB),
}

_LINEAR_FIELDS = {f.name for f in dataclasses.fields(LinearConfig)}
_ATM_OHB_FIELDS = {f.name for f in dataclasses.fields(ATMOHBConfig)}


def method_config(method: str, **overrides) -> QuantConfig:
    """A method's preset with any field of QuantConfig, LinearConfig or ATMOHBConfig overridden (None: keep)."""
    if method not in METHODS:
        raise QuantVLAError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - _LINEAR_FIELDS - _ATM_OHB_FIELDS - {"layout", "seed"})
    if unknown:
        raise QuantVLAError(f"Unknown quantization setting(s) {', '.join(unknown)}.")
    base = METHODS[method]
    return replace(
        base,
        linear=replace(base.linear, **{k: v for k, v in overrides.items() if k in _LINEAR_FIELDS}),
        atm_ohb=replace(base.atm_ohb, **{k: v for k, v in overrides.items() if k in _ATM_OHB_FIELDS}),
        **{k: v for k, v in overrides.items() if k in ("layout", "seed")},
    )
