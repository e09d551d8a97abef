"""GR00T N1.5 in plain PyTorch: sampling, the cached cross-attention, AdaLN order, sizes, groups, observers."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from groot_fixtures import tiny_model

from quantvla_ros.models.groot.config import TransformerConfig, groot_n15_full, groot_tiny
from quantvla_ros.models.groot.model import DiT, DiTBlock, GR00TN15Model

pytestmark = pytest.mark.unit

CFG = groot_tiny()


def inputs(batch: int = 2, pad: int = 5, max_token_len: int | None = None, seed: int = 0):
    """Random images, a prompt with the image placeholders, left padding of `pad` on row 1."""
    cfg = CFG if max_token_len is None else CFG.with_changes(max_token_len=max_token_len)
    gen = torch.Generator().manual_seed(seed)
    cams = len(cfg.camera_names)
    prompt = torch.randint(0, cfg.image_token_id, (batch, 20), generator=gen)
    placeholders = torch.full((batch, cams * cfg.tokens_per_image), cfg.image_token_id)
    body = torch.cat([prompt[:, :6], placeholders, prompt[:, 6:]], dim=1)
    tokens = torch.zeros(batch, cfg.max_token_len, dtype=torch.long)
    masks = torch.zeros(batch, cfg.max_token_len, dtype=torch.bool)
    for row in range(batch):
        # Row 1 has a shorter prompt, so `pad` more padding on the left, as the processor writes it.
        row_body = body[row, pad:] if row == 1 else body[row]
        tokens[row, -row_body.shape[0] :] = row_body
        masks[row, -row_body.shape[0] :] = True
    return dict(
        images=torch.rand(batch, cams, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1,
        image_masks=torch.ones(batch, cams, dtype=torch.bool),
        tokens=tokens,
        token_masks=masks,
        state=torch.randn(batch, cfg.max_state_dim, generator=gen),
        noise=torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=gen),
    )


@pytest.fixture(scope="module")
def model() -> GR00TN15Model:
    return tiny_model(CFG)


def test_sample_actions_shapes_and_finite(model):
    out = model.sample_actions(**inputs())
    assert out.shape == (2, CFG.action_horizon, CFG.action_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, inputs()["noise"])


def test_cross_attention_kv_is_computed_once_per_inference_not_per_step(model):
    calls = []
    hooks = [
        block.attn1.to_k.register_forward_hook(lambda *_: calls.append(1))
        for i, block in enumerate(model.action_head.model.transformer_blocks)
        if DiT.is_cross(i)
    ]
    try:
        model.sample_actions(**inputs())
    finally:
        for h in hooks:
            h.remove()
    assert CFG.num_steps > 1 and len(calls) == len(hooks) > 0


def test_deterministic_given_noise_and_noise_matters(model):
    a, b = model.sample_actions(**inputs()), model.sample_actions(**inputs())
    assert torch.equal(a, b)
    other = inputs()
    other["noise"] = other["noise"] + 1.0
    assert not torch.allclose(model.sample_actions(**other), a)


def test_padding_does_not_change_the_actions(model):
    short = model.sample_actions(**inputs(pad=0, max_token_len=70))
    long = model.sample_actions(**inputs(pad=0, max_token_len=90))
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)


def test_euler_schedule_uses_gr00t_discrete_times(model):
    seen = []
    hook = model.action_head.model.timestep_encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        model.sample_actions(**inputs(batch=1))
        model.sample_actions(**inputs(batch=1), num_steps=2)
    finally:
        hook.remove()
    # The timestep encoder runs once per inference, over every step's τ at once.
    assert [t.tolist() for t in seen] == [[0, 250, 500, 750], [0, 500]]


def test_time_runs_from_noise_to_actions_over_unit_time():
    # A decoder whose output is the constant c makes the velocity c: t from 0 to 1 must give noise + c.
    model = tiny_model(CFG)
    layer2 = model.action_head.action_decoder.layer2
    c = torch.linspace(-2, 2, CFG.action_dim)
    with torch.no_grad():
        layer2.W.zero_()
        layer2.b[CFG.embodiment_id] = c
    x = inputs()
    for steps in (4, 3):
        torch.testing.assert_close(model.sample_actions(**x, num_steps=steps), x["noise"] + c, rtol=0, atol=1e-5)


def test_adaptive_norm_splits_scale_then_shift_and_the_output_layer_shift_then_scale():
    dit_cfg = TransformerConfig(num_heads=2, head_dim=4, depth=1)
    width = dit_cfg.width
    x, temb = torch.randn(3, 5, width), torch.randn(3, width)
    first, second = torch.randn(width), torch.randn(width)
    normed = F.layer_norm(x, (width,))
    block = DiTBlock(dit_cfg, context_dim=None)
    with torch.no_grad():
        block.norm1.linear.weight.zero_()
        block.norm1.linear.bias.copy_(torch.cat([first, second]))
    torch.testing.assert_close(block.norm1(x, block.norm1.modulation(temb)), normed * (1 + first) + second)

    dit = DiT(dit_cfg, context_dim=width, output_dim=width)
    with torch.no_grad():
        dit.proj_out_1.weight.zero_()
        dit.proj_out_1.bias.copy_(torch.cat([first, second]))
        dit.proj_out_2.weight.copy_(torch.eye(width))
        dit.proj_out_2.bias.zero_()
    modulation = dit.proj_out_1(F.silu(temb))
    torch.testing.assert_close(dit.output(x, modulation), F.layer_norm(x, (width,), eps=1e-6) * (1 + second) + first)


@pytest.fixture(scope="module")
def full() -> GR00TN15Model:
    with torch.device("meta"):
        return GR00TN15Model(groot_n15_full())


def test_full_size_parameter_counts_match_the_reference(full):
    # vla-architectures.md §4: vision ≈414M, LLM ≈0.91B (12 layers + 311M embedding), DiT ≈550M,
    # VL self-attention ≈200M, per-embodiment MLPs ≈315M, ≈2.4B in all.
    counts = full.component_parameters()
    reference = {
        "vision": 414e6,
        "llm": 0.91e9,
        "expert": 550e6,
        "vl_self_attention": 200e6,
        "embodiment_mlps": 315e6,
    }
    for name, expected in reference.items():
        assert counts[name] == pytest.approx(expected, rel=0.03), name
    assert sum(counts.values()) == sum(p.numel() for p in full.parameters())
    assert sum(counts.values()) == pytest.approx(2.4e9, rel=0.03)
    assert full.backbone.eagle_model.language_model.model.embed_tokens.weight.numel() == pytest.approx(311e6, rel=0.01)


def test_linear_groups_select_quantvla_layout_on_full_size(full):
    names = [n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)]
    counts = {g: sum(bool(re.fullmatch(p, n)) for n in names) for g, p in full.LINEAR_GROUPS.items()}
    assert counts == {"llm": 84, "expert_mlp": 32, "expert_attention": 64}
    assert not any(re.fullmatch(full.LINEAR_GROUPS["expert_mlp"], n) for n in names if "vl_self_attention" in n)


def test_attention_sites_are_the_dit_blocks(full):
    sites = full.attention_sites()
    modules = dict(full.named_modules())
    assert len(sites) == 16
    assert {(s.num_heads, s.head_dim) for s in sites} == {(32, 48)}
    for i, site in enumerate(sites):
        q, o = modules[site.q_proj], modules[site.o_proj]
        assert q.out_features == 32 * 48 == o.in_features
        # Even blocks cross-attend to the 2048-wide VL tokens, odd ones self-attend.
        assert modules[site.q_proj.replace("to_q", "to_k")].in_features == (2048 if i % 2 == 0 else 1536)


def test_attention_observer_sees_every_dit_attention_on_every_step(model):
    records = []
    model.attention_observer = lambda site, q, k, allowed, own: records.append(
        (site, q.shape, k.shape, allowed.clone())
    )
    x = inputs()
    try:
        model.sample_actions(**x)
    finally:
        model.attention_observer = None
    depth, heads, d = CFG.dit.depth, CFG.dit.num_heads, CFG.dit.head_dim
    assert len(records) == depth * CFG.num_steps
    assert [r[0] for r in records] == list(range(depth)) * CFG.num_steps
    tokens = 1 + CFG.num_target_vision_tokens + CFG.action_horizon
    for site, q_shape, k_shape, allowed in records:
        keys = CFG.max_token_len if site % 2 == 0 else tokens
        assert q_shape == (2, heads, tokens, d)
        assert k_shape == (2, heads, keys, d)
        assert allowed.shape == (2, tokens, keys)
        expected = x["token_masks"][:, None, :].expand(2, tokens, keys) if site % 2 == 0 else torch.ones_like(allowed)
        assert torch.equal(allowed, expected)


def test_bf16_keeps_norms_and_small_modules_fp32():
    model = tiny_model(CFG).set_dtype(torch.bfloat16)
    params = dict(model.named_parameters())
    assert params["backbone.eagle_model.language_model.model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert params["action_head.model.transformer_blocks.0.ff.net.2.weight"].dtype == torch.bfloat16
    for fp32 in (
        "backbone.eagle_model.language_model.model.layers.0.self_attn.q_norm.weight",
        "action_head.model.transformer_blocks.0.norm1.linear.weight",
        "action_head.vlln.weight",
        "action_head.state_encoder.layer1.W",
        "action_head.model.proj_out_2.weight",
    ):
        assert params[fp32].dtype == torch.float32, fp32
    out = model.sample_actions(**inputs())
    reference = tiny_model(CFG).sample_actions(**inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - reference).abs().mean() < 0.1 * reference.abs().mean()
