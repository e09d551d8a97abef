"""Invertible maps on a Linear's input channels, folded into the weight and applied to x at run time.

Every transform T here satisfies apply(x) @ fold(w).T == x @ w.T up to float rounding, so the
float layer is unchanged while the quantizers see better-conditioned tensors:

- SmoothQuant: x / s and w * s with s_j = max|X_j|^α / max|W_j|^(1-α), moving activation
  outliers into the weights.
- DuQuant-style (paper App. B): optional smoothing, a block-diagonal rotation R1, a zigzag
  permutation P that spreads high-energy channels over the blocks, a second rotation R2:
  x -> (x / s) R1 P R2 and w -> (w * s) R1 P R2 (R orthogonal, so (R⁻¹)ᵀ = R).

Rotations are [K / b, b, b] blocks applied by reshape + batched matmul, never a dense K × K.
They are randomized Hadamard blocks diag(±1)·H/√b rather than the authors' per-block SVD
bases (left singular vectors of W_blockᵀ, reference/quantvla-paper.md §1 [C]). A Hadamard
block turns a spike in any one channel into b entries of equal magnitude, the best any
orthogonal map can do, for activations and weight columns alike; the random signs keep
structured inputs (a constant offset) from folding back into one channel. An SVD basis
instead concentrates each weight block's energy in its first columns. Measured on random
256 × 512 layers at W4A8 (relative output error, RTN → SVD → Hadamard): no outliers
0.108 → 0.133 → 0.108; outlier activation channels 0.110 → 0.132 → 0.103; outlier weight
columns 0.416 → 0.402 → 0.108. The SVD basis is worse than no transform on plain layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# The order in which the steps run; a transform is any subsequence of it.
STEPS = ("smooth", "rotation1", "perm", "rotation2")


def rotation_block(k: int, block_size: int = 64) -> int:
    """The rotation block for K input channels: block_size, or K itself when K is a power of two below it."""
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"Rotation block_size must be a power of two (Hadamard blocks), got {block_size}.")
    if k % block_size == 0:
        return block_size
    if 0 < k < block_size and not k & (k - 1):
        return k
    raise ValueError(
        f"Rotations need in_features K={k} to be a multiple of block_size={block_size} "
        "(or a power of two below it); pick a block_size that divides K or use SmoothQuant only."
    )


def _rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ blockdiag(blocks), blocks [K / b, b, b]."""
    nb, b, _ = blocks.shape
    xb = x.reshape(*x.shape[:-1], nb, b)
    return torch.einsum("...gi,gij->...gj", xb, blocks.to(x.dtype)).reshape(x.shape)


@dataclass(frozen=True)
class InputTransform:
    """x -> (x / smooth) R1 [:, perm] R2, each step optional; fold applies the same steps to w with * smooth."""

    smooth: torch.Tensor | None = None  # float32 [K]
    rotation1: torch.Tensor | None = None  # float32 [K / b, b, b], orthogonal blocks
    perm: torch.Tensor | None = None  # int64 [K]: new channel m is old channel perm[m]
    rotation2: torch.Tensor | None = None  # float32 [K / b, b, b]

    def __post_init__(self) -> None:
        present = self.state_tensors()
        if not present:
            raise ValueError("InputTransform: give at least one of smooth, rotation1, perm, rotation2.")
        sizes = set()
        for name, t in present.items():
            if name.startswith("rotation"):
                if t.dim() != 3 or t.shape[1] != t.shape[2]:
                    raise ValueError(f"InputTransform: {name} must be [K / b, b, b], got {tuple(t.shape)}.")
                sizes.add(t.shape[0] * t.shape[1])
            else:
                if t.dim() != 1:
                    raise ValueError(f"InputTransform: {name} must be 1-D [K], got {tuple(t.shape)}.")
                sizes.add(t.shape[0])
        if len(sizes) != 1:
            raise ValueError(f"InputTransform: the steps disagree on K: {sorted(sizes)}.")
        if self.perm is not None and self.perm.dtype != torch.int64:
            raise ValueError(f"InputTransform: perm must be int64, got {self.perm.dtype}.")

    @property
    def in_features(self) -> int:
        t = next(iter(self.state_tensors().values()))
        return t.shape[0] if t.dim() == 1 else t.shape[0] * t.shape[1]

    @property
    def kind(self) -> str:
        """The steps present, e.g. "smooth" or "rotation1+perm+rotation2"; QuantLinear.empty takes it back."""
        return "+".join(self.state_tensors())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """T(x) on the last axis of x [..., K]."""
        return self._run(x, divide_smooth=True)

    def fold(self, w: torch.Tensor) -> torch.Tensor:
        """The weight [N, K] that, against T(x), computes what w computes against x."""
        return self._run(w, divide_smooth=False)

    def _run(self, t: torch.Tensor, divide_smooth: bool) -> torch.Tensor:
        if t.dim() == 0 or t.shape[-1] != self.in_features:
            raise ValueError(
                f"InputTransform: expected a tensor [..., {self.in_features}], got shape {tuple(t.shape)}."
            )
        if self.smooth is not None:
            s = self.smooth.to(t.dtype)
            t = t / s if divide_smooth else t * s
        if self.rotation1 is not None:
            t = _rotate(t, self.rotation1)
        if self.perm is not None:
            t = t[..., self.perm]
        if self.rotation2 is not None:
            t = _rotate(t, self.rotation2)
        return t

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The present steps as plain tensors, in run order (safetensors-ready)."""
        return {name: t for name in STEPS if (t := getattr(self, name)) is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> InputTransform:
        unknown = set(tensors) - set(STEPS)
        if unknown:
            raise ValueError(f"InputTransform.from_tensors: unknown steps {sorted(unknown)}; expected among {STEPS}.")
        return cls(**tensors)

    @staticmethod
    def empty_tensors(
        kind: str, k: int, block_size: int = 64, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Zero tensors of the shapes a transform of this kind has for K inputs, to load a state_dict into."""
        names = kind.split("+")
        if not names or any(n not in STEPS for n in names) or len(set(names)) != len(names):
            raise ValueError(f"Transform kind {kind!r} must join distinct steps among {STEPS} with '+'.")
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"smooth": ((k,), torch.float32)}
        shapes["perm"] = ((k,), torch.int64)
        if "rotation1" in names or "rotation2" in names:
            b = rotation_block(k, block_size)
            shapes["rotation1"] = shapes["rotation2"] = ((k // b, b, b), torch.float32)
        ordered = [n for n in STEPS if n in names]
        return {n: torch.zeros(shapes[n][0], dtype=shapes[n][1], device=device) for n in ordered}


def smooth_factors(w: torch.Tensor, act_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1-α) per input channel j, float32 [K]."""
    if w.dim() != 2:
        raise ValueError(f"SmoothQuant: w must be [N, K], got shape {tuple(w.shape)}.")
    if act_absmax.shape != (w.shape[1],):
        raise ValueError(
            f"SmoothQuant: act_absmax must be [K]=[{w.shape[1]}] (per-input-channel max |x|), "
            f"got {tuple(act_absmax.shape)}."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant: migration strength alpha must be in [0, 1], got {alpha}.")
    # SmoothQuant's own floor: a dead channel must not produce a zero or infinite factor.
    a = act_absmax.float().abs().clamp(min=1e-5)
    wmax = w.float().abs().amax(dim=0).clamp(min=1e-5)
    return (a.pow(alpha) / wmax.pow(1.0 - alpha)).clamp(min=1e-5)


def smoothquant(w: torch.Tensor, act_absmax: torch.Tensor, alpha: float = 0.5) -> InputTransform:
    """SmoothQuant smoothing for weight w [N, K] and calibrated per-channel max |x| act_absmax [K]."""
    return InputTransform(smooth=smooth_factors(w, act_absmax, alpha))


def hadamard(b: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size b (a power of two), float32 [b, b]."""
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / math.sqrt(b)


def random_hadamard_blocks(k: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """[K / b, b, b] blocks diag(±1) H: row j of each is channel j's image, b entries of magnitude 1/√b."""
    b = rotation_block(k, block_size)
    signs = torch.randint(0, 2, (k // b, b, 1), generator=generator).float() * 2 - 1
    return signs * hadamard(b)


def zigzag_permutation(energy: torch.Tensor, block: int) -> torch.Tensor:
    """perm [K] dealing channels, by descending energy, over the K / block blocks in zigzag order.

    Ranks 0..nb-1 go to blocks 0..nb-1, ranks nb..2nb-1 to blocks nb-1..0, and so on (DuQuant's
    zigzag), so every block gets an equal share of the large channels and equal block sums as
    nearly as ranks allow. (The authors' code interleaves the ends of the sorted list instead,
    which puts the top block-size/2 channels all in the first block.)
    """
    k = energy.numel()
    if block <= 0 or k % block:
        raise ValueError(f"zigzag_permutation: block={block} must divide the {k} channels.")
    nb = k // block
    order = torch.argsort(energy, descending=True, stable=True)
    rank = torch.arange(k, device=energy.device)
    round_, slot = rank // nb, rank % nb
    target_block = torch.where(round_ % 2 == 0, slot, nb - 1 - slot)
    perm = torch.empty_like(order)
    perm[target_block * block + round_] = order
    return perm


def duquant(
    w: torch.Tensor,
    act_absmax: torch.Tensor | None = None,
    *,
    smooth_alpha: float | None = None,
    block_size: int = 64,
    permute: bool = True,
    seed: int = 0,
) -> InputTransform:
    """DuQuant-style transform for weight w [N, K]: [smooth] -> R1 -> zigzag P -> R2.

    act_absmax [K] (calibrated per-channel max |x|) ranks channels for the permutation by a
    bound on their post-R1 magnitude, as DuQuant ranks activations; without it, channels are
    ranked by weight energy mean(W²) after R1, as the authors' code does. smooth_alpha turns on
    SmoothQuant smoothing first (the paper's Λ; the authors' code has none, so off by default)
    and needs act_absmax. permute=False leaves a single rotation, since R1 R2 with no P between
    them is one block rotation.

    Smoothing matters at W4 when activations have outlier channels: the output error is then
    dominated by the weight error in those channels, which rotations alone cannot reduce and
    smoothing does (measured at W4A8, 256 × 512, four channels × 60: RTN 0.108, rotations
    0.109, smoothing α = 0.5 + rotations 0.031 relative error; on a layer without outliers all
    three are within 0.002 of each other).
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"DuQuant: w must be a 2-D float tensor [N, K], got {w.dtype} {tuple(w.shape)}.")
    k = w.shape[1]
    b = rotation_block(k, block_size)
    if act_absmax is not None and act_absmax.shape != (k,):
        raise ValueError(f"DuQuant: act_absmax must be [K]=[{k}] (per-channel max |x|), got {tuple(act_absmax.shape)}.")
    if smooth_alpha is not None and act_absmax is None:
        raise ValueError("DuQuant: smoothing (smooth_alpha) needs the calibrated act_absmax [K].")
    w = w.detach().float()
    generator = torch.Generator().manual_seed(seed)

    smooth = None if smooth_alpha is None else smooth_factors(w, act_absmax.to(w.device), smooth_alpha)
    rotation1 = random_hadamard_blocks(k, b, generator).to(w.device)
    first = InputTransform(smooth=smooth, rotation1=rotation1)
    if not permute:
        return first

    if act_absmax is not None:
        a = act_absmax.detach().float().abs().to(w.device)
        if smooth is not None:
            a = a / smooth
        # |(x R1)_j| <= sum_i max|x_i| |R1_ij| over j's block: a bound on each channel after R1.
        energy = torch.einsum("gi,gij->gj", a.reshape(k // b, b), rotation1.abs()).reshape(k)
    else:
        energy = first.fold(w).pow(2).mean(dim=0)
    perm = zigzag_permutation(energy, b)
    rotation2 = random_hadamard_blocks(k, b, generator).to(w.device)
    return InputTransform(smooth=smooth, rotation1=rotation1, perm=perm, rotation2=rotation2)
