"""State and action normalization, in numpy: openpi's `transforms.Normalize/Unnormalize` (which
LeRobot and GR00T follow), and LeRobot's normalizer safetensors.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import safetensors.numpy

from quantvla_ros.atomic import write_bytes_atomic
from quantvla_ros.errors import QuantVLAError

NormMode = Literal["mean_std", "quantiles", "min_max"]

# The statistics openpi and LeRobot store per feature.
STAT_NAMES = ("mean", "std", "q01", "q99")
# openpi names the vectors "state"/"actions"; LeRobot uses its feature keys.
_LEROBOT_TO_OPENPI = {"observation.state": "state", "action": "actions"}
_OPENPI_TO_LEROBOT = {v: k for k, v in _LEROBOT_TO_OPENPI.items()}


def pad_to_dim(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis to `dim` (π0 models take 32-wide state/action vectors)."""
    n = x.shape[-1]
    if n > dim:
        raise ValueError(f"Cannot pad a vector of length {n} to {dim}; use a model whose dimension is at least {n}.")
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dim - n)])


@dataclass(frozen=True, eq=False)
class NormStats:
    """Per-dimension statistics of one vector feature; fields a checkpoint lacks are None."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    # GR00T's min_max mode; openpi and LeRobot π0 checkpoints leave these out.
    min: np.ndarray | None = None
    max: np.ndarray | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                # Read-only copies, so a shared NormStats cannot be changed behind a Normalizer's back.
                array = np.array(value, dtype=np.float32)
                array.flags.writeable = False
                object.__setattr__(self, f.name, array)


class Normalizer:
    """openpi's Normalize/Unnormalize for one feature, with exact inverses.

    mean_std:  (x - mean) / (std + eps)
    quantiles: (x - q01) / (q99 - q01 + eps) * 2 - 1
    min_max:   2 * (x - min) / (max - min) - 1, without eps: GR00T (Isaac-GR00T's
               transform/state_action.py) maps dims with max == min to 0 and back to min

    openpi uses eps=1e-6. LeRobot uses eps=1e-8 but adds it only to std, substitutes it for
    q99 - q01 only where that is zero, and un-normalizes mean_std without it; with eps=1e-8 these
    differences are below float32 resolution.

    Vectors longer than the stats (model outputs padded to 32 dims) keep their extra dims
    unchanged in both directions. openpi's Unnormalize does the same for quantiles but scales them
    by (1 + eps) for mean_std, which we skip so round trips are exact; its Normalize cannot take
    them at all (a shape mismatch), since it normalizes before padding. Stats longer than the
    vector are cut to its length, as openpi's Normalize does.
    """

    def __init__(self, stats: NormStats, mode: NormMode, eps: float = 1e-6) -> None:
        if mode == "mean_std":
            pair, names = (stats.mean, stats.std), "mean and std"
        elif mode == "quantiles":
            pair, names = (stats.q01, stats.q99), "q01 and q99"
        elif mode == "min_max":
            pair, names = (stats.min, stats.max), "min and max"
        else:
            raise QuantVLAError(f"Unknown normalization mode {mode!r}; use 'mean_std', 'quantiles' or 'min_max'.")
        if pair[0] is None or pair[1] is None:
            raise QuantVLAError(
                f"Normalization mode {mode!r} needs {names} statistics, which are missing; "
                "use stats that have them or pick the other mode."
            )
        low, high = (a.astype(np.float64) for a in pair)
        if low.ndim != 1 or low.shape != high.shape:
            raise QuantVLAError(
                f"The {names} statistics must be 1-D vectors of equal length, "
                f"got shapes {low.shape} and {high.shape}; check the stats file."
            )
        self.mode = mode
        self.eps = eps
        self._low = low
        # The denominator of each formula: std + eps, q99 - q01 + eps, or max - min.
        if mode == "min_max":
            self._span = high - low
        else:
            self._span = (high if mode == "mean_std" else high - low) + eps

    def normalize(self, x: np.ndarray) -> np.ndarray:
        def forward(v: np.ndarray, low: np.ndarray, span: np.ndarray) -> np.ndarray:
            if self.mode == "min_max":
                flat = span == 0
                return np.where(flat, 0.0, (v - low) / np.where(flat, 1.0, span) * 2.0 - 1.0)
            z = (v - low) / span
            return z * 2.0 - 1.0 if self.mode == "quantiles" else z

        return self._apply(x, forward)

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        def inverse(v: np.ndarray, low: np.ndarray, span: np.ndarray) -> np.ndarray:
            z = (v + 1.0) / 2.0 if self.mode in ("quantiles", "min_max") else v
            return z * span + low

        return self._apply(x, inverse)

    def _apply(self, x: np.ndarray, fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        # float64 inside, so a round trip loses nothing beyond the float32 rounding of the output.
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0:
            raise ValueError("Normalizer needs an array with a feature axis, got a scalar; pass a vector.")
        d = min(x.shape[-1], self._low.shape[0])
        out = x.copy()
        out[..., :d] = fn(x[..., :d], self._low[:d], self._span[:d])
        return out.astype(np.float32)


def load_lerobot_norm_stats(files: list[Path]) -> dict[str, NormStats]:
    """Merge LeRobot normalizer safetensors (keys like `observation.state.q01`, `action.mean`).

    `observation.state` becomes "state" and `action` becomes "actions"; other features keep their
    keys. Statistics other than mean/std/q01/q99 (min, max, count, ...) are ignored. The pre- and
    post-processor files both carry some features, so a feature may appear twice, but only with
    equal values.
    """
    merged: dict[str, dict[str, np.ndarray]] = {}
    for file in map(Path, files):
        try:
            tensors = safetensors.numpy.load(file.read_bytes())
        except FileNotFoundError:
            raise QuantVLAError(f"Normalizer file {file} does not exist; check the checkpoint folder.") from None
        except safetensors.SafetensorError as e:
            raise QuantVLAError(
                f"Normalizer file {file} is not a valid safetensors file ({e}); re-export it."
            ) from None
        for flat_key, array in tensors.items():
            feature, dot, stat = flat_key.rpartition(".")
            if not dot:
                raise QuantVLAError(
                    f'Normalizer file {file} has key "{flat_key}", not "<feature>.<stat>"; '
                    "pass LeRobot normalizer files only."
                )
            if stat not in STAT_NAMES:
                continue
            feature_stats = merged.setdefault(_LEROBOT_TO_OPENPI.get(feature, feature), {})
            if stat in feature_stats and not np.array_equal(feature_stats[stat], array):
                raise QuantVLAError(
                    f'Normalizer file {file} disagrees with an earlier file on "{flat_key}"; '
                    "pass files from one checkpoint."
                )
            feature_stats[stat] = array
    return {key: NormStats(**s) for key, s in merged.items()}


def save_lerobot_norm_stats(path: Path, stats: dict[str, NormStats]) -> None:
    """Write stats as a LeRobot normalizer safetensors file, renaming "state"/"actions" back."""
    tensors = {
        f"{_OPENPI_TO_LEROBOT.get(key, key)}.{name}": np.ascontiguousarray(getattr(s, name))
        for key, s in stats.items()
        for name in STAT_NAMES
        if getattr(s, name) is not None
    }
    write_bytes_atomic(Path(path), safetensors.numpy.save(tensors))
