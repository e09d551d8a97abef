"""The exact CPU reference in quantvla_kernels: packing, activation quantization, integer GEMMs."""

import pytest
import torch

from quantvla_kernels import (
    code_sums,
    int_matmul,
    pack_int4,
    quantize_per_token,
    quantize_per_token_asym,
    scaled_int_matmul,
    unpack_int4,
    w4a4_linear,
    w4a8_linear,
    w8a8_linear,
)

pytestmark = pytest.mark.unit


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _int8(shape: tuple[int, ...], gen: torch.Generator, low: int = -128, high: int = 128):
    return torch.randint(low, high, shape, dtype=torch.int8, generator=gen)


def _int64_matmul(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    return a_q.long() @ w_q.long().t()


# --- packing ---------------------------------------------------------------------------------


def test_pack_layout_is_pinned():
    q = torch.tensor([[1, -1, -8, 7], [0, 3, -2, -5]], dtype=torch.int8)
    # Element 2j in the low nibble, 2j + 1 in the high nibble, two's complement.
    expected = torch.tensor([[0xF1, 0x78], [0x30, 0xBE]], dtype=torch.uint8)
    assert torch.equal(pack_int4(q), expected)
    assert torch.equal(unpack_int4(expected, 4), q)


def test_pack_round_trips_every_nibble_pair():
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values)  # all 256 (low, high) pairs, one per row
    q = pairs.reshape(1, -1)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 256)
    assert sorted(packed.flatten().tolist()) == list(range(256))
    assert torch.equal(unpack_int4(packed, 512), q)


@pytest.mark.parametrize("shape", [(1, 2), (7, 72), (33, 200), (2, 3, 18)])
def test_pack_round_trips_random_shapes(shape):
    q = _int8(shape, _gen(), -8, 8)
    packed = pack_int4(q)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed, shape[-1]), q)


def test_pack_rejects_bad_input():
    with pytest.raises(TypeError, match="pack_int4: q must be int8"):
        pack_int4(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="last dimension must be even"):
        pack_int4(torch.zeros(2, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"outside the int4 range \[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(TypeError, match="unpack_int4: packed must be uint8"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="k must be twice packed's last dimension, got k=5"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.uint8), 5)


# --- per-token quantization -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_token_error_bound(bits, dtype):
    x = (torch.randn(3, 17, 200, generator=_gen()) * torch.logspace(-3, 2, 17)[:, None]).to(dtype)
    q, scale = quantize_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (3, 17, 1)
    assert q.abs().max() == qmax  # each row's amax lands on the top level
    assert q.min() >= -qmax  # symmetric range: -qmax - 1 is never produced
    err = (x.double() - q.double() * scale.double()).abs()
    # Half a step, plus the float32 rounding of x / scale (a few ulps of qmax, in steps).
    assert (err <= scale.double() * (0.5 + qmax * 2**-22)).all()


def test_quantize_per_token_zero_rows_and_rounding():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [127.0, 0.5, 1.5, -2.5]])
    q, scale = quantize_per_token(x, 8)
    assert torch.equal(q[0], torch.zeros(4, dtype=torch.int8))
    assert scale[0].item() > 0 and torch.isfinite(scale).all()
    assert scale[1].item() == 1.0
    assert q[1].tolist() == [127, 0, 2, -2]  # round half to even


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("offset", [0.0, 3.0, -3.0], ids=["centred", "positive", "negative"])
def test_quantize_per_token_asym_error_bound_and_grid(bits, offset):
    x = torch.randn(17, 200, generator=_gen()) * torch.logspace(-3, 2, 17)[:, None] + offset
    q, step, zero = quantize_per_token_asym(x, bits)
    levels, shift = 2**bits - 1, 2 ** (bits - 1)
    assert q.dtype == torch.int8 and step.dtype == torch.float32 and zero.dtype == torch.int32
    assert zero.shape == step.shape == (17, 1)
    # The unsigned grid 0..2^b-1, shifted by -2^(b-1) into int8.
    assert q.min() >= -shift and q.max() <= levels - shift and zero.min() >= -shift and zero.max() <= levels - shift
    # The row's range, widened to include 0, ends on the grid's ends.
    assert bool((q.amax(dim=1)[x.amax(dim=1) > 0] == levels - shift).all())
    assert bool((q.amin(dim=1)[x.amin(dim=1) < 0] == -shift).all())
    err = (x.double() - (q.double() - zero.double()) * step.double()).abs()
    assert (err <= step.double() * (0.5 + levels * 2**-22)).all()
    # A one-sided row spends no level on the empty side: about half the step of symmetric codes.
    one_sided = (x > 0).all(dim=1) | (x < 0).all(dim=1)
    assert bool(one_sided.any()) == bool(offset)
    _, scale = quantize_per_token(x, bits)
    assert bool((step[one_sided] < 0.51 * scale[one_sided]).all())


def test_quantize_per_token_asym_keeps_zero_exact_and_zero_rows():
    x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 2.55], [-2.55, 0.0, -1.0]])
    q, step, zero = quantize_per_token_asym(x, 8)
    assert torch.equal(q[0], zero[0].expand(3).to(torch.int8)) and step[0].item() > 0
    assert ((q.int() - zero) * (x == 0)).abs().max() == 0  # 0 is a code exactly
    assert (q[1] - zero[1]).tolist() == [0, 100, 255] and (q[2] - zero[2]).tolist() == [-255, 0, -100]


def test_quantize_per_token_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        quantize_per_token(torch.zeros(2, 4), 3)
    with pytest.raises(TypeError, match="x must be a floating point tensor"):
        quantize_per_token(torch.zeros(2, 4, dtype=torch.int32), 8)


# --- integer GEMM -----------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 17, 50])
@pytest.mark.parametrize("k, n", [(72, 200), (200, 72), (7, 3), (130, 45)])
def test_int_matmul_exact_on_odd_shapes(m, k, n):
    gen = _gen()
    a_q, w_q = _int8((m, k), gen), _int8((n, k), gen)
    out = int_matmul(a_q, w_q)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.long(), _int64_matmul(a_q, w_q))


@pytest.mark.parametrize("m, k, n", [(17, 8, 8), (50, 1024, 64), (64, 256, 2048)])
def test_int_matmul_exact_on_int_mm_shapes(m, k, n):
    gen = _gen()
    a_q, w_q = _int8((m, k), gen), _int8((n, k), gen)
    assert torch.equal(int_matmul(a_q, w_q).long(), _int64_matmul(a_q, w_q))


@pytest.mark.parametrize("m, n", [(3, 5), (24, 16)])  # fallback, then _int_mm
def test_int_matmul_exact_at_extremes_for_k_16384(m, n):
    k = 16384
    a_q = torch.full((m, k), -128, dtype=torch.int8)
    w_q = torch.full((n, k), -128, dtype=torch.int8)
    w_q[1::2] = 127
    out = int_matmul(a_q, w_q)
    assert out[0, 0].item() == 128 * 128 * k and out[0, 1].item() == -128 * 127 * k
    assert torch.equal(out.long(), _int64_matmul(a_q, w_q))


def test_int_matmul_takes_int_mm_only_where_cuda_would(monkeypatch):
    calls = []
    real_int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or real_int_mm(a, b))
    gen = _gen()
    for m, k, n in [(16, 64, 64), (17, 72, 200), (50, 200, 72), (50, 130, 45), (50, 64, 64)]:
        int_matmul(_int8((m, k), gen), _int8((n, k), gen))
    assert calls == [(17, 72), (50, 200), (50, 64)]


def test_int_matmul_rejects_bad_input():
    a_q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="int_matmul: w_q must be int8, got torch.float32"):
        int_matmul(a_q, torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"int_matmul: a_q must be 2-D, got shape \(2, 4, 8\)"):
        int_matmul(torch.zeros(2, 4, 8, dtype=torch.int8), a_q)
    with pytest.raises(ValueError, match=r"disagree on K \(8 vs 6\)"):
        int_matmul(a_q, torch.zeros(4, 6, dtype=torch.int8))


# --- scaled GEMM and linears ------------------------------------------------------------------


def _dequant_reference(a_q, a_scale, w_q, w_scale, group_size, bias):
    w_scale = w_scale.double()
    if group_size is not None:
        w_scale = w_scale.repeat_interleave(group_size, dim=1)
    else:
        w_scale = w_scale[:, None]
    y = (a_q.double() * a_scale.double()) @ (w_q.double() * w_scale).t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("m, k, n", [(1, 72, 200), (50, 288, 96)])
@pytest.mark.parametrize("group_size", [None, 8, 24])
def test_scaled_int_matmul_matches_float64_dequant(m, k, n, group_size):
    gen = _gen()
    a_q, w_q = _int8((m, k), gen, -127, 128), _int8((n, k), gen, -8, 8)
    a_scale = torch.rand(m, 1, generator=gen) + 0.01
    groups = 1 if group_size is None else k // group_size
    w_scale = torch.rand(n, groups, generator=gen) + 0.01
    if group_size is None:
        w_scale = w_scale.squeeze(1)
    bias = torch.randn(n, generator=gen)
    y = scaled_int_matmul(a_q, a_scale, w_q, w_scale, group_size, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref = _dequant_reference(a_q, a_scale, w_q, w_scale, group_size, bias)
    # The integer sums are exact, so only the float32 epilogue rounds: at most one rounding per
    # group sum, scale product and bias add, each relative to the magnitudes it combines.
    magnitude = _dequant_reference(a_q.abs(), a_scale, w_q.abs(), w_scale, group_size, bias.abs())
    assert ((y.double() - ref).abs() <= (groups + 3) * 2**-24 * magnitude).all()


@pytest.mark.parametrize("group_size", [None, 24])
def test_scaled_int_matmul_with_a_zero_point_is_the_shifted_product(group_size):
    gen = _gen()
    m, k, n = 9, 72, 40
    x = torch.randn(m, k, generator=gen) + 1.5
    a_q, a_scale, a_zero = quantize_per_token_asym(x, 8)
    w_q = _int8((n, k), gen, -8, 8)
    groups = 1 if group_size is None else k // group_size
    w_scale = (torch.rand(n, groups, generator=gen) + 0.01).squeeze(1) if group_size is None else torch.rand(n, groups)
    w_sum = code_sums(w_q, group_size)
    assert torch.equal(w_sum.reshape(n, groups), w_q.reshape(n, groups, -1).sum(dim=2).int())
    y = scaled_int_matmul(a_q, a_scale, w_q, w_scale, group_size, None, torch.float32, a_zero, w_sum)
    # The same GEMM on the shifted codes q - zero, which int16 holds, in float64.
    ref = _dequant_reference(a_q.short() - a_zero.short(), a_scale, w_q, w_scale, group_size, None)
    magnitude = _dequant_reference((a_q.short() - a_zero.short()).abs(), a_scale, w_q.abs(), w_scale, group_size, None)
    assert ((y.double() - ref).abs() <= (groups + 3) * 2**-24 * magnitude).all()
    with pytest.raises(ValueError, match="a_zero and w_sum come together"):
        scaled_int_matmul(a_q, a_scale, w_q, w_scale, group_size, a_zero=a_zero)
    with pytest.raises(ValueError, match=r"w_sum must be int32"):
        scaled_int_matmul(a_q, a_scale, w_q, w_scale, group_size, a_zero=a_zero, w_sum=w_sum.float())
    long_k = torch.zeros(1, 2**16, dtype=torch.int8)
    with pytest.raises(ValueError, match="with a zero point K must be at most 65535"):
        scaled_int_matmul(long_k, torch.ones(1, 1), long_k, torch.ones(1), None, None, torch.float32,
                          torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))  # fmt: skip


def test_scaled_int_matmul_group_scales_act_per_group():
    # Two groups of 4 with opposite scales: a per-channel shortcut would give 0 instead.
    a_q = torch.ones(1, 8, dtype=torch.int8)
    w_q = torch.ones(1, 8, dtype=torch.int8)
    y = scaled_int_matmul(a_q, torch.ones(1, 1), w_q, torch.tensor([[1.0, 0.5]]), group_size=4)
    assert y.item() == 6.0


def test_scaled_int_matmul_out_dtype():
    gen = _gen()
    a_q, w_q = _int8((4, 16), gen), _int8((8, 16), gen)
    y = scaled_int_matmul(a_q, torch.ones(4, 1), w_q, torch.ones(8), out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16


def test_scaled_int_matmul_rejects_bad_scales():
    a_q, w_q = torch.zeros(4, 8, dtype=torch.int8), torch.zeros(6, 8, dtype=torch.int8)
    a_scale, w_scale = torch.ones(4, 1), torch.ones(6)
    with pytest.raises(ValueError, match=r"a_scale must be a float tensor of shape \(4, 1\)"):
        scaled_int_matmul(a_q, torch.ones(4), w_q, w_scale)
    with pytest.raises(ValueError, match=r"w_scale must be a float tensor of shape \(6,\)"):
        scaled_int_matmul(a_q, a_scale, w_q, torch.ones(6, 2))
    with pytest.raises(ValueError, match=r"w_scale must be a float tensor of shape \(6, 2\)"):
        scaled_int_matmul(a_q, a_scale, w_q, w_scale, group_size=4)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of K=8, got 3"):
        scaled_int_matmul(a_q, a_scale, w_q, torch.ones(6, 2), group_size=3)
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(6,\)"):
        scaled_int_matmul(a_q, a_scale, w_q, w_scale, bias=torch.ones(4))


def _quantize_weight(w: torch.Tensor, bits: int, group_size: int | None):
    # A stand-in for the weight quantizer (not this package's): scale = amax / qmax, full signed range.
    qmax = 2 ** (bits - 1) - 1
    n, k = w.shape
    groups = w.reshape(n, -1, group_size or k)
    scale = groups.abs().amax(dim=-1) / qmax
    q = torch.round(groups / scale[..., None]).clamp(-qmax - 1, qmax).to(torch.int8).reshape(n, k)
    return q, scale if group_size else scale.squeeze(1)


def _dequant_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    scale = scale[:, None] if group_size is None else scale.repeat_interleave(group_size, dim=1)
    return q.float() * scale


@pytest.mark.parametrize("group_size", [None, 64])
def test_w4a8_linear_close_to_float_matmul(group_size):
    gen = _gen()
    x = torch.randn(2, 25, 256, generator=gen)
    w = torch.randn(96, 256, generator=gen) / 16
    bias = torch.randn(96, generator=gen)
    w_q, w_scale = _quantize_weight(w, 4, group_size)
    y = w4a8_linear(x, pack_int4(w_q), w_scale, 256, group_size, bias)
    assert y.shape == (2, 25, 96) and y.dtype == torch.float32
    ref = x @ _dequant_weight(w_q, w_scale, group_size).t() + bias
    # Only the int8 activation rounding separates the two: ~1% of the output scale.
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


def test_w8a8_and_w4a4_linear_keep_input_dtype_and_shape():
    gen = _gen()
    x = torch.randn(3, 4, 64, generator=gen).to(torch.bfloat16)
    w = torch.randn(32, 64, generator=gen)
    w8, s8 = _quantize_weight(w, 8, None)
    y8 = w8a8_linear(x, w8, s8)
    assert y8.shape == (3, 4, 32) and y8.dtype == torch.bfloat16
    ref = x.float() @ _dequant_weight(w8, s8, None).t()
    assert (y8.float() - ref).abs().max() < 0.02 * ref.abs().max()
    w4, s4 = _quantize_weight(w, 4, 16)
    y4 = w4a4_linear(x, pack_int4(w4), s4, 64, group_size=16)
    a_q, a_scale = quantize_per_token(x, 4)
    ref4 = (a_q.float() * a_scale) @ _dequant_weight(w4, s4, 16).t()
    torch.testing.assert_close(y4.float(), ref4, rtol=1e-2, atol=1e-2)


def test_linears_reject_bad_input():
    packed = torch.zeros(8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"w4a8_linear: x must be \[\.\.\., K\] with K=16"):
        w4a8_linear(torch.zeros(2, 12), packed, torch.ones(8), 16)
    with pytest.raises(ValueError, match="w4a8_linear: act_bits must be 4 or 8, got 2"):
        w4a8_linear(torch.zeros(2, 16), packed, torch.ones(8), 16, act_bits=2)
