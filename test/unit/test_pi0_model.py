"""π0 / π0.5 network: shapes, masks, caching, dtypes, full-size parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stages import prefilled

from quantvla_ros.models.common.attention import apply_rope, attention, make_att_2d_masks, rope_cos_sin
from quantvla_ros.models.common.embeddings import sincos_time_embedding
from quantvla_ros.models.pi0.config import PI0Config, pi0_full, pi05_full, tiny
from quantvla_ros.models.pi0.model import PI0Model

pytestmark = pytest.mark.unit


def inputs(cfg: PI0Config, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size, cams = cfg.vision.image_size, len(cfg.camera_names)
    token_masks = torch.ones(batch, cfg.max_token_len, dtype=torch.bool)
    token_masks[:, 9:] = False
    image_masks = torch.ones(batch, cams, dtype=torch.bool)
    image_masks[1, -1] = False
    return dict(
        images=torch.rand(batch, cams, 3, size, size, generator=g) * 2 - 1,
        image_masks=image_masks,
        tokens=torch.randint(0, cfg.vocab_size, (batch, cfg.max_token_len), generator=g),
        token_masks=token_masks,
        state=torch.randn(batch, cfg.action_dim, generator=g),
        noise=torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=g),
    )


@pytest.fixture(params=[False, True], ids=["pi0", "pi05"])
def model(request) -> PI0Model:
    torch.manual_seed(1)
    return PI0Model(tiny(request.param)).eval()


def test_actions_have_chunk_shape_and_are_finite(model):
    batch = inputs(model.cfg)
    actions = model.sample_actions(**batch)
    assert actions.shape == (2, model.cfg.action_horizon, model.cfg.action_dim)
    assert actions.dtype == torch.float32
    assert torch.isfinite(actions).all()


def test_same_noise_same_actions_and_other_noise_other_actions(model):
    batch = inputs(model.cfg)
    a = model.sample_actions(**batch)
    b = model.sample_actions(**batch)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    batch["noise"] = batch["noise"] + 0.5
    assert (model.sample_actions(**batch) - a).abs().max() > 1e-3


def joint_velocity(model: PI0Model, batch: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor):
    """openpi's training forward, written out independently: the LLM and the expert side by side
    in one pass over [prefix ; suffix], each layer's attention over the concatenated sequence
    under big_vision's mask (the prefix never sees the suffix); the action-time MLP over the
    concatenation, adaRMS from the time condition of each sample."""
    cfg = model.cfg
    embs, prefix_pad = model.embed_prefix(batch["images"], batch["image_masks"], batch["tokens"], batch["token_masks"])
    b, p = prefix_pad.shape
    h, width = cfg.action_horizon, cfg.expert.width
    time_emb = sincos_time_embedding(t, width)
    action_emb = model.action_in_proj(x_t)
    if cfg.pi05:
        cond = F.silu(model.time_mlp_out(F.silu(model.time_mlp_in(time_emb))))
        suffix, suffix_ar = action_emb, [1] + [0] * (h - 1)
    else:
        cond = None
        fused = torch.cat([action_emb, time_emb[:, None, :].expand(b, h, width)], dim=2)
        action_time = model.action_time_mlp_out(F.silu(model.action_time_mlp_in(fused)))
        suffix = torch.cat([model.state_proj(batch["state"])[:, None, :], action_time], dim=1)
        suffix_ar = [1, 1] + [0] * (h - 1)
    s = suffix.shape[1]
    pad = torch.cat([prefix_pad, torch.ones(b, s, dtype=torch.bool)], dim=1)
    ar = torch.cat([torch.zeros(b, p, dtype=torch.bool), torch.tensor([suffix_ar], dtype=torch.bool).expand(b, s)], 1)
    allowed = make_att_2d_masks(pad, ar)
    cos, sin = rope_cos_sin(torch.cumsum(pad.long(), dim=1) - 1, cfg.llm.head_dim, cfg.llm.rope_theta)

    def modulation(norm):
        return None if cond is None else norm.modulation(cond)

    xp, xs = embs, suffix
    for llm_layer, expert_layer in zip(model.llm.layers, model.expert.layers, strict=True):
        qp, kp, vp, _ = llm_layer.project_qkv(xp)
        qs, ks, vs, gate = expert_layer.project_qkv(xs, modulation(expert_layer.input_layernorm))
        q, k = (apply_rope(torch.cat(pair, dim=2), cos, sin) for pair in ((qp, qs), (kp, ks)))
        out = attention(q, k, torch.cat([vp, vs], dim=2), allowed)
        xp = llm_layer.finish(xp, out[:, :p], None)
        xs = expert_layer.finish(xs, out[:, p:], gate, modulation(expert_layer.post_attention_layernorm))
    out, _ = model.expert.norm(xs, modulation(model.expert.norm))
    return model.action_out_proj(out[:, -h:])


@torch.no_grad()
def test_cached_steps_compute_openpis_joint_training_velocity(model):
    batch = inputs(model.cfg)
    ws = prefilled(model, batch)
    t = torch.tensor([0.9, 0.25])
    got = model.velocity(ws, batch["noise"], model.time_constants(t), model.state_token(ws))
    torch.testing.assert_close(got, joint_velocity(model, batch, batch["noise"], t), rtol=1e-5, atol=1e-5)


def test_denoising_steps_leave_the_prefix_cache_as_it_was(model):
    batch = inputs(model.cfg)
    ws = prefilled(model, batch)
    p = ws.prefix_pad.shape[1]
    before = [cache[:, :, :, :p].clone() for cache in ws.kv]
    model.denoise(ws, model.step_constants(3))
    assert len(ws.kv) == model.cfg.llm.depth
    for cache, old in zip(ws.kv, before, strict=True):
        assert torch.equal(cache[:, :, :, :p], old)


def test_training_through_the_stages_gets_gradients_to_every_part(model):
    """sim/train.py runs embed, prefix and velocity with autograd: the cache writes must not break it."""
    batch = inputs(model.cfg)
    ws = model.workspace(tuple(batch["images"].shape), batch["tokens"].shape[1])
    ws.load(**batch)
    model.embed(ws)
    model.prefix(ws)
    v = model.velocity(ws, batch["noise"], model.time_constants(torch.tensor([0.3, 0.7])), model.state_token(ws))
    v.square().mean().backward()
    for part in (model.action_out_proj, model.expert.layers[0].mlp.down_proj, model.llm.layers[0].self_attn.k_proj):
        assert part.weight.grad is not None and part.weight.grad.abs().max() > 0
    vision = model.paligemma_with_expert.paligemma.model.vision_tower
    assert next(vision.parameters()).grad.abs().max() > 0


def test_masked_camera_and_padded_tokens_do_not_influence_actions(model):
    batch = inputs(model.cfg)
    reference = model.sample_actions(**batch)
    changed = dict(batch)
    changed["images"] = batch["images"].clone()
    changed["images"][1, -1] = -changed["images"][1, -1]  # the camera masked out for sample 1
    changed["tokens"] = batch["tokens"].clone()
    changed["tokens"][:, 9:] = (changed["tokens"][:, 9:] + 1) % model.cfg.vocab_size  # padding slots
    torch.testing.assert_close(model.sample_actions(**changed), reference, rtol=1e-5, atol=1e-5)


def test_visible_inputs_do_influence_actions(model):
    batch = inputs(model.cfg)
    reference = model.sample_actions(**batch)
    for key in ("images", "tokens"):
        changed = dict(batch)
        changed[key] = batch[key].clone()
        if key == "images":
            changed[key][:, 0] = -changed[key][:, 0]
        else:
            changed[key][:, 1] = (changed[key][:, 1] + 1) % model.cfg.vocab_size
        assert (model.sample_actions(**changed) - reference).abs().max() > 1e-4, key


def test_state_enters_pi0_through_its_token_and_pi05_only_through_the_prompt(model):
    batch = inputs(model.cfg)
    reference = model.sample_actions(**batch)
    batch["state"] = batch["state"] + 1.0
    moved = (model.sample_actions(**batch) - reference).abs().max()
    if model.cfg.pi05:
        assert moved == 0
    else:
        assert moved > 1e-4


def test_bfloat16_model_tracks_float32(model):
    batch = inputs(model.cfg)
    reference = model.sample_actions(**batch)
    model.set_dtype(torch.bfloat16)
    assert model.llm.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.expert.layers[0].input_layernorm.parameters())
    assert model.action_out_proj.weight.dtype == torch.float32
    low = model.sample_actions(**batch)
    assert torch.isfinite(low).all()
    assert (low - reference).abs().max() < 0.15 * reference.abs().max()


def test_attention_mask_follows_big_vision_rule():
    pad = torch.tensor([[True, True, True, True, False]])
    ar = torch.tensor([[0, 0, 1, 0, 0]])
    allowed = make_att_2d_masks(pad, ar)[0]
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def test_time_embedding_endpoints():
    emb = sincos_time_embedding(torch.tensor([0.0, 1.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    # The longest period is 4 s, so t = 1 s is a quarter turn of the last frequency.
    torch.testing.assert_close(emb[1, 3], torch.tensor(1.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (pi0_full(), {"vision": 414.8e6, "llm": 2508.5e6, "expert": 311.5e6, "total": 3.24e9}),
        (pi05_full(), {"vision": 414.8e6, "llm": 2508.5e6, "expert": 427.9e6, "total": 3.35e9}),
    ],
    ids=["pi0", "pi05"],
)
def test_full_size_parameter_counts_on_meta_device(cfg, expected):
    with torch.device("meta"):
        model = PI0Model(cfg)
    counts = model.component_parameters()
    for part in ("vision", "llm", "expert"):
        assert counts[part] == pytest.approx(expected[part], rel=2e-3), part
    assert sum(counts.values()) == pytest.approx(expected["total"], rel=5e-3)
    assert all(p.is_meta for p in model.parameters())
