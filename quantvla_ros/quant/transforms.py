"""Invertible maps on a Linear's input channels, folded into the weight and applied to x at run time.

Every transform T here satisfies apply(x) @ fold(w).T == x @ w.T up to float rounding, so the
float layer is unchanged while the quantizers see better-conditioned tensors:

- SmoothQuant: x / s and w * s with s_j = max|X_j|^α / max|W_j|^(1-α), moving activation
  outliers into the weights.
- DuQuant-style (paper App. B): optional smoothing, a block-diagonal rotation R1, a zigzag
  permutation P that spreads high-energy channels over the blocks, a second rotation R2:
  x -> (x / s) R1 P R2 and w -> (w * s) R1 P R2 (R orthogonal, so (R⁻¹)ᵀ = R).

Rotations act on K / b blocks of b channels, never as a dense K × K, in one of two forms:

- Randomized Hadamard (default), diag(±1)·H_b/√b: stored as its K signs, int8 [K / b, b] under
  rotation{1,2}_signs, and applied as the signs and one batched product with the shared H_b/√b
  (the GPU's fused kernel runs it as log2 b butterflies instead).
- The authors' per-block SVD basis (reference/quantvla-paper.md §1 [C]), duquant(rotation="svd"):
  left singular vectors of W_blockᵀ, dense float32 [K / b, b, b] under rotation{1,2}.

Why Hadamard is the default: a Hadamard block turns a spike in any one channel into b entries
of equal magnitude, the best any orthogonal map can do, for activations and weight columns
alike; the random signs keep structured inputs (a constant offset) from folding back into one
channel. An SVD basis instead concentrates each weight block's energy in its first columns.
Measured on random 256 × 512 layers at W4A8, no smoothing (relative output error, mean of five
seeds, RTN → SVD → Hadamard): no outliers 0.107 → 0.134 → 0.108; four activation channels × 60
0.112 → 0.134 → 0.109; two weight columns × 20 0.420 → 0.401 → 0.105. The SVD basis is worse
than no transform on plain layers.

Hadamard is also 4·b times smaller to store: 2 bytes per input channel for both rotations
against 512 for dense b = 64 blocks, which would add 50% to an int4 layer with 2048 outputs.

Two things of the authors' DuQuant (reference/quantvla-paper.md §1) are not here, on purpose:
- The output-side "restore" rotation: their code also rotates each weight's output rows by a
  per-block basis before quantizing and undoes it after the GEMM (y · R_out). Here every output
  channel has its own scale (or group scales), which already adapts to each row's range, and
  the restore would cost a b × b rotation of every layer's output at run time, outside the
  integer GEMM and its epilogue. Not offered as an option: it needs an output transform in
  QuantLinear and in every kernel.
- The "per-channel smoothing coefficient 0.15" of the paper's App. D: in their code it blends the
  weight energy that orders the zigzag permutation, (1 − 0.15)·e + 0.15·mean(e). That map is
  increasing in e, so it cannot change the order, and the permutation is the same without it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from quantvla_ros.errors import QuantVLAError

# The order in which the steps run; a transform is any subsequence of it holding at most one
# form of each rotation (dense blocks or Hadamard signs).
STEPS = ("smooth", "rotation1", "rotation1_signs", "perm", "rotation2", "rotation2_signs")
ROTATIONS = ("hadamard", "svd")


def rotation_block(k: int, block_size: int = 64) -> int:
    """The rotation block for K input channels: the largest power of two up to block_size dividing K.

    Most widths are multiples of 64; SmolVLA's 720-wide action expert gets blocks of 16.
    """
    if block_size <= 0 or block_size & (block_size - 1):
        raise QuantVLAError(f"Rotation block_size must be a power of two (Hadamard blocks), got {block_size}.")
    b = block_size
    while b > 1 and k % b:
        b //= 2
    if b == 1 < block_size:
        raise QuantVLAError(f"Rotations need an even number of input features, got K={k}; use SmoothQuant only.")
    return b


def _rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ blockdiag(blocks), blocks [K / b, b, b]."""
    nb, b, _ = blocks.shape
    xb = x.reshape(*x.shape[:-1], nb, b)
    return torch.einsum("...gi,gij->...gj", xb, blocks.to(x.dtype)).reshape(x.shape)


@functools.cache
def _scaled_hadamard(b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """H_b / √b (Sylvester's construction, b a power of two), one per size, device and dtype."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return (h / math.sqrt(b)).to(device=device, dtype=dtype)


def _hadamard_rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ blockdiag(diag(s) H_b / √b) for signs s [K / b, b]: one sign product and one
    batched product with the shared b × b matrix, two operations whatever b (a butterfly takes
    3 log2 b small ones, which dominate on the CPU). The Triton kernel computes the same rotation
    with butterflies, which round differently in the last bits."""
    nb, b = signs.shape
    t = x.reshape(*x.shape[:-1], nb, b) * signs
    return (t @ _scaled_hadamard(b, x.device, x.dtype)).reshape(x.shape)


@dataclass(frozen=True)
class InputTransform:
    """x -> (x / smooth) R1 [:, perm] R2, each step optional; fold applies the same steps to w with * smooth.

    Each rotation is either dense blocks (rotation1, rotation2) or Hadamard signs (rotation1_signs,
    rotation2_signs). Construction checks shapes and dtypes only, never values, so QuantLinear can
    rebuild one around its buffers on every forward for free.
    """

    smooth: torch.Tensor | None = None  # float32 [K]
    rotation1: torch.Tensor | None = None  # float32 [K / b, b, b], orthogonal blocks
    rotation1_signs: torch.Tensor | None = None  # int8 [K / b, b] of ±1: blocks diag(±1) H_b / √b
    perm: torch.Tensor | None = None  # int64 [K]: new channel m is old channel perm[m]
    rotation2: torch.Tensor | None = None  # float32 [K / b, b, b]
    rotation2_signs: torch.Tensor | None = None  # int8 [K / b, b]

    def __post_init__(self) -> None:
        present = self.state_tensors()
        if not present:
            raise ValueError("InputTransform: give at least one of the steps " + ", ".join(STEPS) + ".")
        for name in ("rotation1", "rotation2"):
            if name in present and f"{name}_signs" in present:
                raise ValueError(f"InputTransform: give {name} as dense blocks or as {name}_signs, not both.")
        sizes = set()
        for name, t in present.items():
            if name.endswith("_signs"):
                if t.dim() != 2 or t.dtype != torch.int8:
                    raise ValueError(f"InputTransform: {name} must be int8 [K / b, b], got {t.dtype} {tuple(t.shape)}.")
            elif name.startswith("rotation"):
                if t.dim() != 3 or t.shape[1] != t.shape[2]:
                    raise ValueError(f"InputTransform: {name} must be [K / b, b, b], got {tuple(t.shape)}.")
            elif t.dim() != 1:
                raise ValueError(f"InputTransform: {name} must be 1-D [K], got {tuple(t.shape)}.")
            sizes.add(math.prod(t.shape[:2]))
        if len(sizes) != 1:
            raise ValueError(f"InputTransform: the steps disagree on K: {sorted(sizes)}.")
        if self.perm is not None and self.perm.dtype != torch.int64:
            raise ValueError(f"InputTransform: perm must be int64, got {self.perm.dtype}.")
        # The steps in run order, kept: a QuantLinear runs them on every call.
        object.__setattr__(self, "_steps", tuple(present.items()))
        object.__setattr__(self, "_in_features", sizes.pop())

    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def block_size(self) -> int | None:
        """The rotation block size b (the last axis of either form), or None without rotations."""
        return next((t.shape[-1] for n, t in self.state_tensors().items() if n.startswith("rotation")), None)

    @property
    def kind(self) -> str:
        """The steps present, e.g. "smooth" or "rotation1_signs+perm+rotation2_signs"; QuantLinear.empty takes it."""
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
        for name, step in self._steps:
            if name == "smooth":
                s = step.to(t.dtype)
                t = t / s if divide_smooth else t * s
            elif name == "perm":
                t = t[..., step]
            elif name.endswith("_signs"):
                t = _hadamard_rotate(t, step)
            else:
                t = _rotate(t, step)
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
        if any(n.startswith("rotation") for n in names):
            b = rotation_block(k, block_size)
            shapes["rotation1"] = shapes["rotation2"] = ((k // b, b, b), torch.float32)
            shapes["rotation1_signs"] = shapes["rotation2_signs"] = ((k // b, b), torch.int8)
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


def random_signs(k: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """int8 [K / b, b] of ±1: the randomized Hadamard rotation blockdiag(diag(±1) H_b / √b)."""
    b = rotation_block(k, block_size)
    return torch.randint(0, 2, (k // b, b), generator=generator, dtype=torch.int8) * 2 - 1


def svd_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 [K / b, b, b]: for each b-column block of w [N, K], the left singular vectors U of W_blockᵀ."""
    n, k = w.shape
    b = rotation_block(k, block_size)
    blocks = w.float().reshape(n, k // b, b).permute(1, 2, 0)  # W_blockᵀ, [K / b, b, N]
    # U must be a full b × b basis; the reduced SVD gives that when N >= b and skips the [N, N] factor.
    return torch.linalg.svd(blocks, full_matrices=n < b).U


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
    rotation: str = "hadamard",
    seed: int = 0,
) -> InputTransform:
    """DuQuant-style transform for weight w [N, K]: [smooth] -> R1 -> zigzag P -> R2.

    rotation "hadamard" (default) draws randomized Hadamard blocks from seed; "svd" takes the
    authors' basis of the weight as each rotation sees it (R2's after smoothing, R1 and P), see
    the module docstring for why it is not the default.

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
    if rotation not in ROTATIONS:
        raise ValueError(f"DuQuant: rotation must be one of {', '.join(ROTATIONS)}, got {rotation!r}.")
    k = w.shape[1]
    b = rotation_block(k, block_size)
    if act_absmax is not None and act_absmax.shape != (k,):
        raise ValueError(f"DuQuant: act_absmax must be [K]=[{k}] (per-channel max |x|), got {tuple(act_absmax.shape)}.")
    if smooth_alpha is not None and act_absmax is None:
        raise ValueError("DuQuant: smoothing (smooth_alpha) needs the calibrated act_absmax [K].")
    w = w.detach().float()
    generator = torch.Generator().manual_seed(seed)

    def with_rotation(steps: dict[str, torch.Tensor], i: int) -> InputTransform:
        if rotation == "hadamard":
            return InputTransform(**steps, **{f"rotation{i}_signs": random_signs(k, b, generator).to(w.device)})
        before = InputTransform(**steps).fold(w) if steps else w
        return InputTransform(**steps, **{f"rotation{i}": svd_blocks(before, b)})

    steps = {} if smooth_alpha is None else {"smooth": smooth_factors(w, act_absmax.to(w.device), smooth_alpha)}
    first = with_rotation(steps, 1)
    if not permute:
        return first

    if act_absmax is not None:
        a = act_absmax.detach().float().abs().to(w.device).reshape(k // b, b)
        if first.smooth is not None:
            a = a / first.smooth.reshape(k // b, b)
        # |(x R1)_j| <= sum_i max|x_i| |R1_ij| over j's block: a bound on each channel after R1.
        # Every entry of a Hadamard block has magnitude 1/√b, so its channels share one bound.
        if rotation == "hadamard":
            energy = (a.sum(-1, keepdim=True) / math.sqrt(b)).expand(k // b, b)
        else:
            energy = torch.einsum("gi,gij->gj", a, first.rotation1.abs())
        energy = energy.reshape(k)
    else:
        energy = first.fold(w).pow(2).mean(dim=0)
    return with_rotation({**first.state_tensors(), "perm": zigzag_permutation(energy, b)}, 2)
