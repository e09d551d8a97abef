"""ATM and OHB: statistics recover planted ratios, clamps and neutral band, folding is exact."""

from __future__ import annotations

import math

import pytest
import torch

from quantvla_ros.models.pi0.config import tiny
from quantvla_ros.models.pi0.model import PI0Model
from quantvla_ros.models.policy import ModelInputs
from quantvla_ros.quant.calibration import (
    ExpertStatistics,
    collect_expert_statistics,
    fold_atm,
    fold_ohb,
    matched_scale,
)
from quantvla_ros.quant.linear import QuantLinear

pytestmark = pytest.mark.unit


def planted(ratio_per_head: list[float], seed: int = 0, kv_heads: int = 1):
    """Teacher q/k with logit std ~1 and student q shrunk by 1/ratio per head; invalid pairs hold junk.
    kv_heads: 1 as π0's expert (multi-query), 2 as SmolVLA's (grouped), one per head as GR00T's DiT."""
    g = torch.Generator().manual_seed(seed)
    b, h, tq, tk, d = 3, len(ratio_per_head), 6, 20, 16
    q_t = torch.randn(b, h, tq, d, generator=g)
    k = torch.randn(b, kv_heads, tk, d, generator=g)
    q_s = q_t / torch.tensor(ratio_per_head)[None, :, None, None]
    allowed = torch.ones(b, tq, tk, dtype=torch.bool)
    allowed[:, :, -5:] = False
    k = k.clone()
    k[:, :, -5:] = 1e4  # would dominate every moment if masked pairs were counted
    return q_t, q_s, k, allowed


def test_logit_std_is_taken_over_valid_pairs_only():
    q, _, k, allowed = planted([1.0, 1.0])
    stats = ExpertStatistics(layers=1, heads=2)
    stats.observe_attention(0, q, k, allowed)
    logits = (q @ k.transpose(-1, -2))[..., :-5] / 4.0
    expected = logits.permute(1, 0, 2, 3).reshape(2, -1).std(dim=1, unbiased=False)
    torch.testing.assert_close(stats.logit_std()[0].float(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["multi-query", "grouped", "multi-head"])
@pytest.mark.parametrize("pooling", ["pooled", "per_call", "per_row"])
def test_atm_recovers_a_planted_per_head_ratio_and_pools_over_calls(kv_heads, pooling):
    ratios = [1.0, 1.2, 0.85, 1.1]
    teacher, student = ExpertStatistics(2, 4), ExpertStatistics(2, 4)
    for call in range(3):  # several denoising steps / batches pooled
        q_t, q_s, k, allowed = planted(ratios, seed=call, kv_heads=kv_heads)
        for layer in range(2):
            teacher.observe_attention(layer, q_t, k, allowed)
            student.observe_attention(layer, q_s, k, allowed)
    alpha = matched_scale(teacher.logit_std(pooling), student.logit_std(pooling), clamp_log=0.3, neutral_log=0.03)
    torch.testing.assert_close(alpha.float(), torch.tensor([ratios, ratios]), rtol=1e-4, atol=1e-4)


def test_grouped_keys_serve_their_own_query_heads():
    # Heads 0-1 read key head 0 and heads 2-3 key head 1: scaling key head 1 moves only heads 2 and 3.
    q, _, k, allowed = planted([1.0] * 4, kv_heads=2)
    base, moved = ExpertStatistics(1, 4), ExpertStatistics(1, 4)
    base.observe_attention(0, q, k, allowed)
    moved.observe_attention(0, q, k * torch.tensor([1.0, 3.0])[None, :, None, None], allowed)
    torch.testing.assert_close(moved.logit_std("per_row") / base.logit_std("per_row"),
                               torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64))  # fmt: skip


def test_per_row_statistic_ignores_a_shift_of_each_query_rows_logits():
    # A vector added to every key adds q_r·u/√d to each logit of row r: softmax cannot tell, and
    # neither can the per-row std; the pooled and per-call ones grow with the rows' spread.
    q, _, k, allowed = planted([1.0, 1.0])
    shifted = k + 3.0 * torch.randn(16, generator=torch.Generator().manual_seed(9))
    plain, moved = ExpertStatistics(1, 2), ExpertStatistics(1, 2)
    plain.observe_attention(0, q, k[..., :-5, :], allowed[..., :-5])
    moved.observe_attention(0, q, shifted[..., :-5, :], allowed[..., :-5])
    torch.testing.assert_close(moved.logit_std("per_row"), plain.logit_std("per_row"))
    for pooling in ("pooled", "per_call"):
        assert bool((moved.logit_std(pooling) > 1.5 * plain.logit_std(pooling)).all()), pooling


def test_own_keys_restrict_the_logits_to_the_querying_tokens_keys():
    q, _, k, allowed = planted([1.0, 1.0])
    own, reference = ExpertStatistics(1, 2, keys="own"), ExpertStatistics(1, 2)
    own.observe_attention(0, q, k, allowed, own_keys=8)
    reference.observe_attention(0, q, k[:, :, -8:], allowed[..., -8:])
    for pooling in ("pooled", "per_call", "per_row"):
        torch.testing.assert_close(own.logit_std(pooling), reference.logit_std(pooling))
    # Cross-attention has no keys of its own: every key counts.
    cross, every = ExpertStatistics(1, 2, keys="own"), ExpertStatistics(1, 2)
    cross.observe_attention(0, q, k, allowed, own_keys=None)
    every.observe_attention(0, q, k, allowed)
    torch.testing.assert_close(cross.logit_std(), every.logit_std())


def test_ohb_recovers_a_planted_rms_ratio():
    teacher, student = ExpertStatistics(3, 1), ExpertStatistics(3, 1)
    g = torch.Generator().manual_seed(1)
    for layer, ratio in enumerate([1.0, 1.25, 0.8]):
        out = torch.randn(2, 7, 32, generator=g)
        teacher.observe_output(layer, out)
        student.observe_output(layer, out / ratio)
    beta = matched_scale(teacher.output_rms(), student.output_rms(), 0.3, 0.03)
    torch.testing.assert_close(beta.float(), torch.tensor([1.0, 1.25, 0.8]), rtol=1e-5, atol=1e-5)


def test_clamp_and_neutral_band():
    teacher = torch.tensor([2.0, 0.5, 1.02, 0.98, 1.2], dtype=torch.float64)
    scale = matched_scale(teacher, torch.ones(5, dtype=torch.float64), clamp_log=0.3, neutral_log=0.03)
    expected = torch.tensor([math.exp(0.3), math.exp(-0.3), 1.0, 1.0, 1.2], dtype=torch.float64)
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=1e-6)
    assert scale[2] == 1.0 and scale[3] == 1.0  # exactly one, not merely close


@pytest.fixture
def model() -> PI0Model:
    torch.manual_seed(0)
    return PI0Model(tiny(True)).eval()


def one_step(model: PI0Model) -> torch.Tensor:
    """One Euler step from fixed noise on a fixed observation: noise minus the velocity at t = 1."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    size = cfg.vision.image_size
    return model.sample_actions(
        torch.rand(1, 2, 3, size, size, generator=g) * 2 - 1,
        torch.ones(1, 2, dtype=torch.bool),
        torch.randint(0, cfg.vocab_size, (1, cfg.max_token_len), generator=g),
        torch.ones(1, cfg.max_token_len, dtype=torch.bool),
        torch.zeros(1, cfg.max_state_dim),
        torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=g),
        num_steps=1,
    )


def explicit_scaling(model: PI0Model, alpha: torch.Tensor, beta: torch.Tensor) -> list:
    """Scale q and o_proj outputs at run time with hooks: the unfolded definition of ATM/OHB."""
    head_dim = model.cfg.expert.head_dim
    hooks = []
    for i, layer in enumerate(model.expert.layers):
        a = alpha[i].repeat_interleave(head_dim)
        hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda _m, _i, out, a=a: out * a))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(lambda _m, _i, out, b=beta[i]: out * b))
    return hooks


@pytest.mark.parametrize("quantized_projections", [False, True], ids=["float", "quantized"])
def test_folding_equals_explicit_run_time_scaling(model, quantized_projections):
    layers, heads = model.cfg.expert.depth, model.cfg.expert.num_heads
    alpha = torch.linspace(0.75, 1.3, layers * heads).reshape(layers, heads)
    beta = torch.tensor([0.8, 1.3])
    if quantized_projections:
        for layer in model.expert.layers:
            attn = layer.self_attn
            attn.q_proj = QuantLinear.from_float(attn.q_proj, w_bits=8, a_bits=8)
            attn.o_proj = QuantLinear.from_float(attn.o_proj, w_bits=8, a_bits=8)
    hooks = explicit_scaling(model, alpha, beta)
    explicit = one_step(model)
    for h in hooks:
        h.remove()
    unscaled = one_step(model)
    fold_atm(model, alpha)
    fold_ohb(model, beta)
    folded = one_step(model)
    assert (explicit - unscaled).abs().max() > 1e-3  # the scales matter
    torch.testing.assert_close(folded, explicit, rtol=1e-4, atol=1e-5)


def test_per_call_pooling_averages_per_sample_stds_while_pooled_weights_every_logit():
    stats = ExpertStatistics(layers=1, heads=1)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 1, 8, 4, generator=g)
    allowed = torch.ones(1, 5, 8, dtype=torch.bool)
    stds = []
    for scale in (1.0, 3.0):
        q = torch.randn(1, 1, 5, 4, generator=g) * scale
        stats.observe_attention(0, q, k, allowed)
        stds.append(((q @ k.transpose(-1, -2)) / 2.0).std(unbiased=False))
    torch.testing.assert_close(stats.logit_std("per_call")[0, 0].float(), torch.stack(stds).mean())
    assert abs(stats.logit_std("pooled")[0, 0] - stats.logit_std("per_call")[0, 0]) > 1e-3
    stats.observe_output(0, torch.full((2, 3), 2.0))
    stats.observe_output(0, torch.full((1, 3), 4.0))
    assert stats.output_rms("per_call")[0] == pytest.approx(3.0)
    assert stats.output_rms("pooled")[0] == pytest.approx(math.sqrt((6 * 4 + 3 * 16) / 9))


def test_calibration_refuses_an_attention_site_it_never_observed(model, monkeypatch):
    """A denoising path that skips the observer at one site must not get α = β = e^-0.3 folded in."""
    source = [
        ModelInputs(
            images=torch.rand(1, 2, 3, model.cfg.image_size, model.cfg.image_size) * 2 - 1,
            image_masks=torch.ones(1, 2, dtype=torch.bool),
            tokens=torch.randint(0, model.cfg.vocab_size, (1, model.cfg.max_token_len)),
            token_masks=torch.ones(1, model.cfg.max_token_len, dtype=torch.bool),
            state=torch.zeros(1, model.cfg.max_state_dim),
        )
    ]

    class Source(list):
        def batches(self, batch_size, device="cpu"):
            return iter(self)

    observe = ExpertStatistics.observe_attention
    monkeypatch.setattr(
        ExpertStatistics, "observe_attention", lambda self, layer, *a: layer == 1 or observe(self, layer, *a)
    )
    with pytest.raises(
        RuntimeError, match=r"saw no call of the expert attention\(s\) .*gemma_expert.model.layers.1.self_attn"
    ):
        collect_expert_statistics(model, Source(source))


def test_linear_clamp_is_the_authors_range_and_band():
    teacher = torch.tensor([2.0, 0.5, 1.01, 1.1], dtype=torch.float64)
    scale = matched_scale(teacher, torch.ones(4, dtype=torch.float64), clamp="linear")
    torch.testing.assert_close(scale, torch.tensor([1.4, 0.7, 1.0, 1.1], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Unknown clamp"):
        matched_scale(teacher, teacher, clamp="cubic")
