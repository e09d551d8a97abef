"""The fused input transform + activation quantization kernel, run by Triton's CPU interpreter.

The kernel rotates each Hadamard block with log2 b butterflies (u + v, u - v); the torch transform
(InputTransform.apply) with one b × b product, which agrees to float32 rounding. So the kernel is
checked bit for bit against the same steps written out here with butterflies in torch, then
quantize_per_token / quantize_per_token_asym / quantize_per_channel; and the butterflies against
InputTransform.apply to float32 rounding. Every output is poisoned first, so an element the kernel
fails to write cannot pass. The interpreter runs one program (row) at a time, so most cases use
few rows.
"""

import os

# The kernels are built for the interpreter when @triton.jit runs, i.e. when their modules are
# first imported: so before that import (pytest collects this module before any test runs).
os.environ["TRITON_INTERPRET"] = "1"

import itertools
import math

import pytest
import torch

from quantvla_kernels import (
    dispatch,
    fuses_transform,
    quantize_per_channel,
    quantize_per_token,
    quantize_per_token_asym,
    quantized_matmul,
)
from quantvla_kernels import triton_transform as tt
from quantvla_kernels._triton import interpreted
from quantvla_ros.quant.linear import QuantLinear
from quantvla_ros.quant.transforms import InputTransform, duquant, random_signs, rotation_block

pytestmark = pytest.mark.unit

STEPS = ("smooth", "rotation1_signs", "perm", "rotation2_signs")  # transform_quantize_rows' order
SUBSETS = [s for r in range(len(STEPS) + 1) for s in itertools.combinations(STEPS, r)]
# M, K: 96 has rotation blocks of 32 (1/√32 is inexact in float32), 720 of 16 (SmolVLA's expert),
# 200 of 8 and no multiple of the 64-wide tile used without rotations.
SHAPES = [(1, 64), (17, 96), (2, 720), (1, 1024), (3, 200)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _poisoned(m: int, k: int, zero: bool = False) -> tuple[torch.Tensor, ...]:
    codes_and_scales = (torch.full((m, k), -128, dtype=torch.int8), torch.full((m, 1), float("nan")))
    return (*codes_and_scales, torch.full((m, 1), -(2**31), dtype=torch.int32)) if zero else codes_and_scales


def _input(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # Rows over four decades, a few outlier channels, and a zero row (the smallest normal scale);
    # all finite in float16.
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]
    x[:, torch.randint(0, k, (3,), generator=gen)] *= 20
    if m > 1:
        x[m // 2] = 0
    return x.to(dtype)


def _steps(k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    b = rotation_block(k)
    return {
        "smooth": torch.rand(k, generator=gen) * 4 + 0.05,
        "rotation1_signs": random_signs(k, b, gen),
        "perm": torch.randperm(k, generator=gen),
        "rotation2_signs": random_signs(k, b, gen),
    }


def _butterflies(t: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """t [M, K] @ blockdiag(diag(signs) H_b / √b) in the kernel's float32 operations and order."""
    m, k = t.shape
    nb, b = signs.shape
    t = t.reshape(m, nb, b) * signs
    h = 1
    while h < b:
        pairs = t.view(m, nb, b // (2 * h), 2, h)
        u, v = pairs[..., 0, :], pairs[..., 1, :]
        t = torch.stack((u + v, u - v), dim=-2).reshape(m, nb, b)
        h *= 2
    return (t * (1 / math.sqrt(b))).reshape(m, k)


def _transformed(x: torch.Tensor, steps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The kernel's transform of x, step by step in torch; InputTransform.apply to float32 rounding."""
    t = x.float()
    for name in STEPS:
        if name not in steps:
            continue
        if name == "smooth":
            t = t / steps[name]
        elif name == "perm":
            t = t[:, steps[name]]
        else:
            t = _butterflies(t, steps[name])
    if steps:
        reference = InputTransform(**steps).apply(x.float())
        torch.testing.assert_close(t, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())
    return t


def _check(x: torch.Tensor, bits: int, steps: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Per token (symmetric, with a zero point) and with static scales: the kernel's codes, scales
    and zero points against the torch reference."""
    m, k = x.shape
    t = _transformed(x, steps)
    args = [steps.get(name) for name in STEPS]
    out = _poisoned(m, k)
    q, scale, zero = tt.transform_quantize_rows(x, bits, *args, out=out)
    ref_q, ref_scale = quantize_per_token(t, bits)
    assert q is out[0] and scale is out[1] and zero is None
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)

    out = _poisoned(m, k, zero=True)
    got = tt.transform_quantize_rows(x, bits, *args, out=out, asymmetric=True)
    assert all(a is b for a, b in zip(got, out, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(got, quantize_per_token_asym(t, bits), strict=True))

    static = torch.rand(k, generator=gen) * t.abs().amax(dim=0) / 50 + 1e-4  # saturates many values
    q, scale, _ = tt.transform_quantize_rows(x, bits, *args, static_scale=static, out=_poisoned(m, k))
    ref_q, ref_scale = quantize_per_channel(t, static, bits)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


def test_kernel_runs_in_the_interpreter():
    assert interpreted(tt._transform_quantize_kernel), (
        "quantvla_kernels.triton_transform was imported before TRITON_INTERPRET=1 was set"
    )


@pytest.mark.parametrize("steps", SUBSETS, ids=lambda s: "+".join(s) or "none")
def test_every_subset_of_steps_is_bit_identical(steps):
    # Each subset gets its own shape, bits and input dtype, so every one of those meets several subsets.
    i = SUBSETS.index(steps)
    (m, k), bits, dtype = SHAPES[(i + 1) % len(SHAPES)], (8, 4)[i % 2], DTYPES[i % len(DTYPES)]
    gen = _gen(i)
    x = _input(m, k, dtype, gen)
    _check(x, bits, {n: t for n, t in _steps(k, gen).items() if n in steps}, gen)


@pytest.mark.parametrize("k", [4112, 9216], ids=["b16-2-chunks", "b64-3-chunks"])
def test_rows_longer_than_one_chunk(k):
    # The permutation gathers across chunks of the scratch row; the last chunk is mostly padding.
    assert k > tt._MAX_CHUNK
    gen = _gen(k)
    _check(_input(2, k, torch.bfloat16, gen), 8, _steps(k, gen), gen)


def test_action_expert_rows():
    # The π0.5 expert's row count, with a zero row among them; K kept small for the interpreter.
    gen = _gen(50)
    _check(_input(50, 64, torch.bfloat16, gen), 8, _steps(64, gen), gen)


def test_rounds_half_to_even_after_the_transform():
    # Smoothing by 1/2 doubles each value exactly: scale 1, and 0.25 -> 0.5 -> 0, 0.75 -> 1.5 -> 2.
    x = torch.tensor([[63.5, 0.25, 0.75, -1.25]])
    q, scale, _ = tt.transform_quantize_rows(x, 8, smooth=torch.full((4,), 0.5))
    assert q.tolist() == [[127, 0, 2, -2]] and scale.item() == 1.0


def test_transform_quantize_rows_rejects_bad_input():
    x, signs = torch.zeros(2, 96), torch.ones(3, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="transform_quantize_rows: bits must be 4 or 8, got 2"):
        tt.transform_quantize_rows(x, 2)
    with pytest.raises(ValueError, match=r"x must be a float \[M, K\] tensor with K > 0"):
        tt.transform_quantize_rows(x.to(torch.int8), 8)
    with pytest.raises(ValueError, match=r"smooth must be float32 \[K\]=\[96\], got torch.float16 \(96,\)"):
        tt.transform_quantize_rows(x, 8, smooth=torch.ones(96, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"perm must be int64 \[K\]=\[96\], got torch.int32"):
        tt.transform_quantize_rows(x, 8, perm=torch.arange(96, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"static_scale must be float32 \[K\]=\[96\], got torch.float32 \(95,\)"):
        tt.transform_quantize_rows(x, 8, static_scale=torch.ones(95))
    with pytest.raises(ValueError, match=r"rotation block b must be a power of two .* got signs of shape \(4, 24\)"):
        tt.transform_quantize_rows(x, 8, signs1=torch.ones(4, 24, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"signs2 must be int8 \[K / b, b\]=\[3, 32\], got torch.int8 \(6, 16\)"):
        tt.transform_quantize_rows(x, 8, signs1=signs, signs2=torch.ones(6, 16, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"signs1 must be int8 \[K / b, b\]=\[3, 32\], got torch.float32"):
        tt.transform_quantize_rows(x, 8, signs1=signs.float())
    with pytest.raises(ValueError, match=r"out must be torch.int8 \[2, 96\], torch.float32 \[2, 1\]\."):
        tt.transform_quantize_rows(x, 8, signs1=signs, out=_poisoned(2, 95))
    with pytest.raises(ValueError, match=r"out must be .*torch.int32 \[2, 1\]"):
        tt.transform_quantize_rows(x, 8, signs1=signs, out=_poisoned(2, 96), asymmetric=True)
    with pytest.raises(ValueError, match="static per-channel scales are symmetric"):
        tt.transform_quantize_rows(x, 8, static_scale=torch.ones(96), asymmetric=True)


# --- QuantLinear on the Triton path: fused against unfused -------------------------------------


@pytest.fixture
def triton_path(monkeypatch):
    """Route CPU tensors through the (interpreted) Triton kernels and count the fused launches."""
    monkeypatch.setattr(dispatch, "uses_triton", lambda x, layer: True)
    calls = []
    fused = tt.transform_quantize_rows
    monkeypatch.setattr(tt, "transform_quantize_rows", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    return calls


def _duquant_layer(k: int, n: int, w_bits: int, a_bits: int, rotation: str = "hadamard", **kwargs) -> QuantLinear:
    gen = _gen(k + n + w_bits)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen))
    absmax = torch.rand(k, generator=gen) * 5 + 0.1
    transform = duquant(linear.weight, absmax, smooth_alpha=0.5, block_size=32, rotation=rotation)
    return QuantLinear.from_float(linear, w_bits, a_bits, transform=transform, **kwargs)


@pytest.mark.parametrize(
    "w_bits, a_bits, kwargs",
    [
        (4, 8, {"group_size": 64}),
        (8, 8, {}),
        (8, 8, {"input_scale": torch.rand(128, generator=_gen(1)) * 0.05 + 0.01}),
        (4, 8, {"asymmetric": True}),
        (4, 4, {"group_size": 64, "asymmetric": True}),
    ],
    ids=["W4A8-g64", "W8A8", "W8A8-static", "W4A8-asym", "W4A4-g64-asym"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_fused_path_equals_the_unfused_triton_path(triton_path, w_bits, a_bits, kwargs, dtype):
    layer = _duquant_layer(128, 40, w_bits, a_bits, **kwargs)
    assert layer.transform_kind == "smooth+rotation1_signs+perm+rotation2_signs"
    x = _input(6, 128, dtype, _gen(w_bits + len(kwargs))).reshape(2, 3, 128)
    steps = {name: getattr(layer, f"input_{name}") for name in STEPS}
    with torch.no_grad():
        fused = layer(x)
        unfused = dispatch._triton_matmul(_transformed(x.reshape(6, 128), steps), layer, dtype)
    assert triton_path == [1]
    assert fused.shape == (2, 3, 40) and fused.dtype == dtype
    assert torch.equal(fused.reshape(6, 40), unfused)


def test_dense_rotations_and_float_activations_stay_unfused(triton_path):
    svd = _duquant_layer(128, 40, 4, 8, rotation="svd")
    weight_only = _duquant_layer(128, 40, 4, 16)
    x = torch.randn(3, 128, generator=_gen(0))
    assert not fuses_transform(x, svd) and not fuses_transform(x, weight_only)
    with torch.no_grad():
        y = svd(x)
        weight_only(x)
    assert triton_path == []
    assert torch.equal(y, dispatch._triton_matmul(svd.transform.apply(x), svd, torch.float32))


def test_fusing_needs_the_triton_path():
    layer = _duquant_layer(128, 40, 4, 8)
    x = torch.randn(3, 128)
    assert not fuses_transform(x, layer)
    with pytest.raises(ValueError, match="quantized_matmul: fuse_transform=True needs the Triton path"):
        quantized_matmul(x, layer, torch.float32, fuse_transform=True)
