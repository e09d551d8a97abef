"""The Triton kernels, run by Triton's CPU interpreter, against the exact reference in quantvla_kernels.

Integer sums must be bit-exact; float32 and float16 outputs too, since the interpreter does the
reference's float32 operations in the reference's order (only split-K with group scales sums
the groups in another order). bfloat16 outputs are checked to one bf16 step: the interpreter
rounds float32 -> bfloat16 toward zero where torch and CUDA round to nearest even.
Every output is poisoned first, so an element a kernel fails to write cannot pass.
"""

import os

# The kernels are built for the interpreter when @triton.jit runs, i.e. when their modules are
# first imported: so before that import (pytest collects this module before any test runs).
os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from quantvla_kernels import (
    code_sums,
    dispatch,
    int_matmul,
    pack_int4,
    quantize_per_channel,
    quantize_per_token,
    quantize_per_token_asym,
    quantized_matmul,
    scaled_int_matmul,
    triton_gemm,
    triton_quant,
    uses_triton,
    w4a4_linear,
    w4a8_linear,
    w8a8_linear,
)
from quantvla_kernels._triton import interpreted

pytestmark = pytest.mark.unit

SHAPES = [(1, 200, 72), (17, 200, 72), (50, 256, 40)]  # M, K, N: none a multiple of the 16x32x32 tile


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, gen, low=-128, high=128) -> torch.Tensor:
    return torch.randint(low, high, shape, dtype=torch.int8, generator=gen)


def _poisoned(shape, dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype)


def _assert_close_to_reference(y: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    assert y.dtype == ref.dtype and not y.isnan().any()
    if exact and y.dtype != torch.bfloat16:
        assert torch.equal(y, ref)
    else:
        # One step of the output dtype (bf16: the interpreter truncates; group sums in another order
        # can cross a rounding boundary), plus a few float32 roundings of the largest term.
        eps = torch.finfo(y.dtype).eps
        torch.testing.assert_close(y.float(), ref.float(), rtol=eps, atol=8 * 2**-24 * ref.abs().max().item())


def test_kernels_run_in_the_interpreter():
    assert interpreted(triton_gemm._gemm_kernel) and interpreted(triton_quant._quantize_kernel), (
        "quantvla_kernels' Triton modules were imported before TRITON_INTERPRET=1 was set"
    )
    with pytest.raises(ValueError, match=r"the interpreter \(TRITON_INTERPRET=1\) needs cpu tensors, got one on meta"):
        triton_quant.quantize_rows(torch.zeros(2, 4, device="meta"), 8)


# --- activation quantization ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m, k", [(1, 200), (17, 72), (3, 9000)])  # 9000: more than one block per row
def test_quantize_rows_is_bit_identical(dtype, bits, m, k):
    gen = _gen(m * k + bits)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, m)[:, None]).to(dtype)
    out = (_poisoned((m, k), torch.int8), _poisoned((m, 1), torch.float32))
    q, scale, zero = triton_quant.quantize_rows(x, bits, out=out)
    ref_q, ref_scale = quantize_per_token(x, bits)
    assert q is out[0] and zero is None and torch.equal(q, ref_q) and torch.equal(scale, ref_scale)

    out = (_poisoned((m, k), torch.int8), _poisoned((m, 1), torch.float32), _poisoned((m, 1), torch.int32))
    got = triton_quant.quantize_rows(x + 0.3 * x.abs().amax(), bits, out=out, asymmetric=True)  # one-sided rows too
    assert all(a is b for a, b in zip(got, out, strict=True))
    ref = quantize_per_token_asym(x + 0.3 * x.abs().amax(), bits)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))

    static = torch.rand(k, generator=gen) * x.float().abs().amax(dim=0) / 100 + 1e-4  # clamps many values
    out = (_poisoned((m, k), torch.int8), _poisoned((m, 1), torch.float32))
    q, scale, _ = triton_quant.quantize_rows(x, bits, static, out=out)
    ref_q, ref_scale = quantize_per_channel(x, static, bits)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


def test_quantize_rows_rounds_half_to_even_and_keeps_zero_rows():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [127.0, 0.5, 1.5, -2.5], [-7.0, 3.5, 4.5, -0.5]])
    q, scale, _ = triton_quant.quantize_rows(x, 8)
    assert q[:2].tolist() == [[0, 0, 0, 0], [127, 0, 2, -2]]  # scale 1: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    assert scale[0].item() == torch.finfo(torch.float32).tiny and scale[1].item() == 1.0
    assert torch.equal(q, quantize_per_token(x, 8)[0])
    q, _, _ = triton_quant.quantize_rows(x[2:], 4)
    assert q.tolist() == [[-7, 4, 4, 0]]  # scale 1: 3.5 -> 4 and 4.5 -> 4


def test_quantize_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="quantize_rows: bits must be 4 or 8, got 2"):
        triton_quant.quantize_rows(torch.zeros(2, 4), 2)
    with pytest.raises(ValueError, match=r"x must be a float \[M, K\] tensor with K > 0"):
        triton_quant.quantize_rows(torch.zeros(2, 4, dtype=torch.int8), 8)
    with pytest.raises(ValueError, match=r"static_scale must be \[K\]=\[4\]"):
        triton_quant.quantize_rows(torch.zeros(2, 4), 8, torch.ones(3))
    with pytest.raises(ValueError, match="static per-channel scales are symmetric"):
        triton_quant.quantize_rows(torch.zeros(2, 4), 8, torch.ones(4), asymmetric=True)
    with pytest.raises(ValueError, match=r"out must be torch.int8 \[2, 4\], torch.float32 \[2, 1\], torch.int32"):
        triton_quant.quantize_rows(torch.zeros(2, 4), 8, out=(torch.zeros(2, 4, dtype=torch.int8),), asymmetric=True)


# --- GEMMs --------------------------------------------------------------------------------------


def _weights(n, k, w_bits, gen):
    """(codes int8 [N, K] for the reference, what the kernel reads)."""
    w_q = _int8((n, k), gen, -8, 8) if w_bits == 4 else _int8((n, k), gen)
    return w_q, pack_int4(w_q) if w_bits == 4 else w_q


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("split_k", [1, 3])
def test_int_gemm_accumulator_is_exact(m, k, n, w_bits, split_k):
    gen = _gen(m + k + n + w_bits)
    a_q = _int8((m, k), gen)
    w_q, w = _weights(n, k, w_bits, gen)
    out = _poisoned((m, n), torch.int32)
    assert triton_gemm.int_gemm(a_q, w, w_bits, split_k, out=out) is out
    assert torch.equal(out, int_matmul(a_q, w_q))


@pytest.mark.parametrize("w_bits", [4, 8])
def test_int_gemm_holds_extreme_products_over_long_k(w_bits):
    k = 1024
    a_q = torch.full((17, k), -128, dtype=torch.int8)
    w_q = torch.full((40, k), -8 if w_bits == 4 else -128, dtype=torch.int8)
    w_q[1::2] = 7 if w_bits == 4 else 127
    w = pack_int4(w_q) if w_bits == 4 else w_q
    # Also a fixed config of the kind the GPU benchmark passes, with tiles of other sizes.
    config = {"BM": 32, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3}
    out = triton_gemm.int_gemm(a_q, w, w_bits, split_k=2, out=_poisoned((17, 40), torch.int32), config=config)
    assert out[0, 0].item() == -128 * w_q[0, 0].item() * k
    assert torch.equal(out, int_matmul(a_q, w_q))


@pytest.mark.parametrize("m, n", [(1, 72), (17, 72), (50, 40)])
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("split_k", [1, 3])  # slices of 2 of the 4 groups: the third is empty
def test_group_sums_are_exact_with_unit_scales(m, n, w_bits, split_k):
    # Every group sum and their total stays below 2**24, so float32 holds them exactly.
    gen = _gen(m + n)
    k, group = 256, 64
    a_q = _int8((m, k), gen)
    w_q, w = _weights(n, k, w_bits, gen)
    y = triton_gemm.scaled_int_gemm(
        a_q, torch.ones(m, 1), w, torch.ones(n, k // group), w_bits, group, split_k=split_k,
        out=_poisoned((m, n), torch.float32),
    )  # fmt: skip
    assert torch.equal(y, int_matmul(a_q, w_q).float())


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("split_k", [1, 4])
def test_scaled_int_gemm_matches_reference(m, k, n, w_bits, group_size, split_k):
    gen = _gen(m + k + n + w_bits + (group_size or 0) + split_k)
    if group_size is not None:
        k = 256  # group sizes are powers of two, and none >= 32 divides 200
    a_q = _int8((m, k), gen, -127, 128)
    w_q, w = _weights(n, k, w_bits, gen)
    a_scale = torch.rand(m, 1, generator=gen) + 0.01
    w_scale = torch.rand(n, *(() if group_size is None else (k // group_size,)), generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)  # QuantLinear keeps the model's bias dtype
    # Each case takes one output dtype and bias setting, so all of them run without a full product.
    out_dtype = [torch.float32, torch.bfloat16, torch.float16][(m + w_bits + split_k) % 3]
    bias = None if (m + w_bits) % 2 else bias
    y = triton_gemm.scaled_int_gemm(
        a_q, a_scale, w, w_scale, w_bits, group_size, bias, out_dtype, split_k, out=_poisoned((m, n), out_dtype)
    )
    ref = scaled_int_matmul(a_q, a_scale, w_q, w_scale, group_size, bias, out_dtype)
    _assert_close_to_reference(y, ref, exact=group_size is None or split_k == 1)


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("split_k", [1, 3])
def test_scaled_int_gemm_with_a_zero_point_matches_reference(m, k, n, w_bits, group_size, split_k):
    gen = _gen(m + k + n + w_bits + (group_size or 0) + split_k)
    if group_size is not None:
        k = 256
    x = torch.randn(m, k, generator=gen) + 1.0
    a_q, a_scale, a_zero = quantize_per_token_asym(x, (8, 4)[(m + split_k) % 2])
    w_q, w = _weights(n, k, w_bits, gen)
    w_scale = torch.rand(n, *(() if group_size is None else (k // group_size,)), generator=gen) * 0.01 + 1e-3
    w_sum = code_sums(w_q, group_size)
    y = triton_gemm.scaled_int_gemm(
        a_q, a_scale, w, w_scale, w_bits, group_size, None, torch.float32, split_k,
        out=_poisoned((m, n), torch.float32), a_zero=a_zero, w_sum=w_sum,
    )  # fmt: skip
    ref = scaled_int_matmul(a_q, a_scale, w_q, w_scale, group_size, None, torch.float32, a_zero, w_sum)
    _assert_close_to_reference(y, ref, exact=group_size is None or split_k == 1)


@pytest.mark.parametrize("group_size", [None, 512])
def test_zero_point_correction_holds_the_extreme_sums(group_size):
    # (q - zero) = -255 against weight codes of ±128 over K = 1024: int32 wraps inside the
    # correction (a_q * w and zero * w_sum each reach ~2**25) but the corrected sum is exact.
    k, n = 1024, 40
    a_q = torch.full((17, k), -128, dtype=torch.int8)
    a_zero = torch.full((17, 1), 127, dtype=torch.int32)
    w_q = torch.full((n, k), -128, dtype=torch.int8)
    w_q[1::2] = 127
    w_scale = torch.ones(n) if group_size is None else torch.ones(n, k // group_size)
    w_sum = code_sums(w_q, group_size)
    y = triton_gemm.scaled_int_gemm(
        a_q, torch.ones(17, 1), w_q, w_scale, 8, group_size, split_k=2, a_zero=a_zero, w_sum=w_sum
    )
    assert y[0, 0].item() == (-128 - 127) * -128 * k
    assert torch.equal(y, scaled_int_matmul(a_q, torch.ones(17, 1), w_q, w_scale, group_size, None, torch.float32,
                                            a_zero, w_sum))  # fmt: skip


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_int_gemm_out_dtypes_with_bias(out_dtype):
    gen = _gen(1)
    m, k, n = 17, 200, 72
    a_q = _int8((m, k), gen, -127, 128)
    w_q, w = _weights(n, k, 4, gen)
    a_scale, w_scale, bias = torch.rand(m, 1, generator=gen), torch.rand(n, generator=gen), torch.randn(n)
    y = triton_gemm.scaled_int_gemm(
        a_q, a_scale, w, w_scale, 4, None, bias, out_dtype, 2, out=_poisoned((m, n), out_dtype)
    )
    _assert_close_to_reference(y, scaled_int_matmul(a_q, a_scale, w_q, w_scale, None, bias, out_dtype), exact=True)


def test_gemms_reject_bad_input():
    a_q = torch.zeros(4, 64, dtype=torch.int8)
    w8, w4 = torch.zeros(8, 64, dtype=torch.int8), torch.zeros(8, 32, dtype=torch.uint8)
    ones = (torch.ones(4, 1), torch.ones(8))
    with pytest.raises(ValueError, match="int_gemm: a_q must be an int8"):
        triton_gemm.int_gemm(a_q.float(), w8, 8)
    with pytest.raises(ValueError, match=r"4-bit weights must be uint8 \[N, 32\] \(pack_int4\)"):
        triton_gemm.int_gemm(a_q, w8, 4)
    with pytest.raises(ValueError, match="K must be even, got K=63"):
        triton_gemm.int_gemm(a_q[:, :63], w4, 4)
    with pytest.raises(ValueError, match="w_bits must be 4 or 8, got 2"):
        triton_gemm.int_gemm(a_q, w8, 2)
    with pytest.raises(ValueError, match="split_k must be at least 1, got 0"):
        triton_gemm.int_gemm(a_q, w8, 8, split_k=0)
    with pytest.raises(ValueError, match="group_size must be a power of two >= 32 that divides K=64, got 16"):
        triton_gemm.scaled_int_gemm(a_q, ones[0], w8, torch.ones(8, 4), 8, group_size=16)
    with pytest.raises(ValueError, match=r"w_scale must be float \[8, 2\]"):
        triton_gemm.scaled_int_gemm(a_q, ones[0], w8, ones[1], 8, group_size=32)
    with pytest.raises(ValueError, match=r"a_scale must be float \[4, 1\]"):
        triton_gemm.scaled_int_gemm(a_q, torch.ones(4), w8, ones[1], 8)
    with pytest.raises(ValueError, match="config needs BM, BN, BK"):
        triton_gemm.int_gemm(a_q, w8, 8, config={"BM": 16, "BN": 32})
    with pytest.raises(ValueError, match="BK must divide 32"):
        triton_gemm.scaled_int_gemm(a_q, *ones[:1], w8, torch.ones(8, 2), 8, 32, config={"BM": 16, "BN": 32, "BK": 64})
    with pytest.raises(ValueError, match="a_zero and w_sum come together"):
        triton_gemm.scaled_int_gemm(a_q, *ones[:1], w8, ones[1], 8, a_zero=torch.zeros(4, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"w_sum must be int32 \[8\]"):
        triton_gemm.scaled_int_gemm(
            a_q, *ones[:1], w8, ones[1], 8, a_zero=torch.zeros(4, 1, dtype=torch.int32), w_sum=torch.zeros(8, 2)
        )
    with pytest.raises(ValueError, match=r"out must be torch.bfloat16 \[4, 8\]"):
        triton_gemm.scaled_int_gemm(a_q, *ones[:1], w8, ones[1], 8, out_dtype=torch.bfloat16, out=torch.empty(4, 8))


# --- whole layers: quantize + GEMM, as QuantLinear runs them on CUDA ----------------------------


def _layer(k, n, w_bits, a_bits, group_size=None, static=False, gen=None, asymmetric=False):
    w_q, w = _weights(n, k, w_bits, gen)
    w_scale = torch.rand(n, *(() if group_size is None else (k // group_size,)), generator=gen) * 0.01 + 1e-3
    return SimpleNamespace(
        weight_packed=w, weight_scale=w_scale, bias=torch.randn(n, generator=gen), in_features=k,
        w_bits=w_bits, a_bits=a_bits, group_size=group_size, w_q=w_q,
        input_scale=torch.rand(k, generator=gen) * 0.02 + 1e-3 if static else None,
        weight_sum=code_sums(w_q, group_size) if asymmetric else None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "w_bits, a_bits, reference",
    [(8, 8, w8a8_linear), (4, 8, w4a8_linear), (4, 4, w4a4_linear)],
    ids=["W8A8", "W4A8", "W4A4"],
)
@pytest.mark.parametrize("m", [1, 50])
@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "zero-point"])
def test_triton_layer_path_matches_reference_linears(w_bits, a_bits, reference, m, asymmetric):
    gen = _gen(m + w_bits + a_bits)
    k, n = 256, 72
    layer = _layer(k, n, w_bits, a_bits, group_size=None if m == 1 else 64, gen=gen, asymmetric=asymmetric)
    x = torch.randn(m, k, generator=gen) * 3 + asymmetric  # rows off centre, where a zero point helps
    y = dispatch._triton_matmul(x, layer, torch.float32)
    if w_bits == 8:
        ref = reference(x, layer.w_q, layer.weight_scale, layer.group_size, layer.bias, asymmetric=asymmetric)
    else:
        ref = reference(
            x, layer.weight_packed, layer.weight_scale, k, layer.group_size, layer.bias, asymmetric=asymmetric
        )
    assert torch.equal(y, ref)


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 8), (4, 4)])
@pytest.mark.parametrize("activations", ["per-token", "zero-point", "static"])
def test_quantized_matmul_on_cpu_is_the_reference_and_triton_agrees(w_bits, a_bits, activations):
    gen = _gen(w_bits * a_bits + len(activations))
    static, asymmetric = activations == "static", activations == "zero-point"
    layer = _layer(200, 72, w_bits, a_bits, static=static, gen=gen, asymmetric=asymmetric)
    x = torch.randn(17, 200, generator=gen)
    if static:
        a_q, a_scale = quantize_per_channel(x, layer.input_scale, a_bits)
        a_zero = None
    elif asymmetric:
        a_q, a_scale, a_zero = quantize_per_token_asym(x, a_bits)
    else:
        (a_q, a_scale), a_zero = quantize_per_token(x, a_bits), None
    ref = scaled_int_matmul(
        a_q, a_scale, layer.w_q, layer.weight_scale, None, layer.bias, torch.bfloat16, a_zero, layer.weight_sum
    )
    assert not uses_triton(x, layer)
    assert torch.equal(quantized_matmul(x, layer, torch.bfloat16), ref)
    _assert_close_to_reference(dispatch._triton_matmul(x, layer, torch.bfloat16), ref, exact=True)


def test_quantized_matmul_matches_quantlinear():
    from quantvla_ros.quant.linear import QuantLinear

    gen = _gen(3)
    linear = torch.nn.Linear(256, 72)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(72, 256, generator=gen))
    x = torch.randn(50, 256, generator=gen)
    for kwargs in [
        dict(w_bits=4, a_bits=8, group_size=64),
        dict(w_bits=8, a_bits=8, input_scale=torch.rand(256) + 0.1),
        dict(w_bits=4, a_bits=4, asymmetric=True),
    ]:
        layer = QuantLinear.from_float(linear, **kwargs)
        with torch.no_grad():
            ref = layer(x)
        assert torch.equal(quantized_matmul(x, layer, torch.float32), ref)
        assert torch.equal(dispatch._triton_matmul(x, layer, torch.float32), ref)


def test_quantized_matmul_rejects_float_activations_and_bad_shapes():
    layer = SimpleNamespace(w_bits=4, a_bits=16, in_features=8)
    with pytest.raises(ValueError, match="got W4A16; float activations"):
        quantized_matmul(torch.zeros(2, 8), layer, torch.float32)
    layer.a_bits = 8
    with pytest.raises(ValueError, match=r"x must be \[M, 8\], got shape \(2, 6\)"):
        quantized_matmul(torch.zeros(2, 6), layer, torch.float32)


def test_import_without_triton():
    # A robot without triton: the package imports, the CPU path works, the Triton path says why not.
    script = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ModuleNotFoundError
import torch
from types import SimpleNamespace
import quantvla_kernels
layer = SimpleNamespace(weight_packed=torch.ones(3, 8, dtype=torch.int8), weight_scale=torch.ones(3), bias=None,
                        input_scale=None, weight_sum=None, in_features=8, w_bits=8, a_bits=8, group_size=None)
print(quantvla_kernels.quantized_matmul(torch.ones(2, 8), layer, torch.float32).sum().item())
try:
    import quantvla_kernels.triton_gemm
except ModuleNotFoundError as e:
    print(e)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "48.0"
    assert "the Triton kernels need triton, which is not installed" in lines[1]


def test_kernels_run_when_triton_was_imported_before_the_interpreter_flag():
    # As in the full suite, where other modules import triton before this file sets the flag:
    # triton's own @jit helpers are then compiled-mode objects the interpreter cannot call.
    script = """
import os
import triton
os.environ["TRITON_INTERPRET"] = "1"
import torch
from quantvla_kernels import int_matmul, pack_int4, quantize_per_token, triton_gemm, triton_quant
x = torch.randn(17, 200)
q, scale, _ = triton_quant.quantize_rows(x, 8)
assert torch.equal(q, quantize_per_token(x, 8)[0])
w = torch.randint(-8, 8, (72, 200), dtype=torch.int8)
assert torch.equal(triton_gemm.int_gemm(q, pack_int4(w), 4, split_k=3), int_matmul(q, w))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_outgrown_split_k_counters_stay_allocated_for_graphs_captured_on_them():
    device = torch.device("cpu")
    first = triton_gemm._split_k_counters(device, 8)
    grown = triton_gemm._split_k_counters(device, first.numel() + 1)
    assert grown.numel() > first.numel() and grown.data_ptr() != first.data_ptr()
    assert any(t is first for t in triton_gemm._outgrown_locks)
    assert triton_gemm._split_k_counters(device, 8) is grown
