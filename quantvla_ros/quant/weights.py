"""Symmetric int4/int8 weight quantization, per output channel or per group along K.

Each row (or group) gets its own clipping ratio, chosen from a small grid by the squared error
of the reconstruction, as the authors' code does (reference/quantvla-paper.md §1 [C]).

The scale is clip * amax / (2^(b-1) - 1), i.e. amax / 7 for int4, and the codes use the full
signed range [-2^(b-1), 2^(b-1) - 1]. Dividing by 7 rather than 8 keeps a row's largest
magnitude representable whatever its sign (there is no +8 code); the extra -8 level is still
used, by negative weights beyond 7 * scale once the search clips the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)


@dataclass(frozen=True)
class QuantizedWeight:
    """w ≈ q * scale, with scale broadcast over each row ([N]) or each group of K ([N, K // group_size])."""

    q: torch.Tensor  # int8 [N, K], values in [-2^(bits-1), 2^(bits-1) - 1]
    scale: torch.Tensor  # float32 [N] or [N, K // group_size]
    bits: int
    group_size: int | None


def code_range(bits: int) -> tuple[int, int]:
    """The signed codes a `bits`-wide weight may take: (-2^(bits-1), 2^(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check_bits_and_group(fn: str, bits: int, group_size: int | None, k: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"{fn}: weight bits must be 4 or 8, got {bits}.")
    if group_size is not None and (group_size <= 0 or k % group_size):
        raise ValueError(
            f"{fn}: group_size must be a positive divisor of in_features K={k}, got {group_size}; "
            "pick one that divides K or use None for per-channel scales."
        )


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
) -> QuantizedWeight:
    """Quantize a float weight [N, K] with a per-row (or per-group) MSE-optimal clipping ratio.

    The grid should contain 1.0: then the chosen scale is never worse than plain round-to-nearest.
    Ties keep the earlier grid point.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight: w must be a 2-D float tensor [N, K], got {w.dtype} {tuple(w.shape)}.")
    n, k = w.shape
    check_bits_and_group("quantize_weight", bits, group_size, k)
    if not clip_grid or any(not 0.0 < c <= 1.0 for c in clip_grid):
        raise ValueError(f"quantize_weight: clip_grid must be non-empty with ratios in (0, 1], got {tuple(clip_grid)}.")
    # Runs offline, so the device sync of this check is affordable.
    if not torch.isfinite(w).all():
        raise ValueError("quantize_weight: w has NaN or infinite values; check the checkpoint this layer came from.")

    lo, hi = code_range(bits)
    groups = w.float().reshape(n, -1, group_size or k)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = torch.zeros_like(amax)
    # One grid point at a time over every row at once: a [grid, N, K] tensor would cost 1.2 GB
    # for π0.5's gate_proj, while this keeps the peak at a few copies of the weight.
    for clip in clip_grid:
        # A zero row gets the smallest normal scale instead of 0, so w / scale is 0 rather than NaN.
        scale = (clip * amax / hi).clamp(min=torch.finfo(torch.float32).tiny)
        err = ((torch.round(groups / scale).clamp(lo, hi) * scale - groups) ** 2).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)

    q = torch.round(groups / best_scale).clamp(lo, hi).to(torch.int8).reshape(n, k)
    scale = best_scale.reshape(n, -1)
    return QuantizedWeight(q=q, scale=scale[:, 0] if group_size is None else scale, bits=bits, group_size=group_size)


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 weight [N, K] that qw stands for."""
    n, k = qw.q.shape
    groups = qw.q.float().reshape(n, -1, qw.group_size or k)
    return (groups * qw.scale.float().reshape(n, -1, 1)).reshape(n, k)
