"""SmolVLA network: shapes, masks, the prefix cache, pixel shuffle, RoPE, full-size counts."""

from __future__ import annotations

import re

import pytest
import torch
from smolvla_fixtures import model_inputs, tiny_model
from stages import prefilled
from torch import nn

from quantvla_ros.models.common.attention import attention, make_att_2d_masks
from quantvla_ros.models.common.embeddings import sincos_time_embedding
from quantvla_ros.models.smolvla.config import expert_mlp_dim, smolvla_full, smolvla_tiny
from quantvla_ros.models.smolvla.model import SmolVLAModel, pixel_shuffle

pytestmark = pytest.mark.unit


@pytest.fixture
def model() -> SmolVLAModel:
    return tiny_model(vocab_size=512)


@pytest.fixture(scope="module")
def full() -> SmolVLAModel:
    with torch.device("meta"):
        return SmolVLAModel(smolvla_full())


def test_actions_have_chunk_shape_and_are_finite(model):
    actions = model.sample_actions(**model_inputs(model.cfg))
    assert actions.shape == (2, 50, 8)
    assert actions.dtype == torch.float32
    assert torch.isfinite(actions).all()


def test_same_noise_same_actions_and_other_noise_other_actions(model):
    batch = model_inputs(model.cfg)
    first = model.sample_actions(**batch)
    torch.testing.assert_close(model.sample_actions(**batch), first, rtol=0, atol=0)
    batch["noise"] = batch["noise"] + 0.5
    assert (model.sample_actions(**batch) - first).abs().max() > 1e-3


def joint_velocity(model: SmolVLAModel, batch: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor):
    """LeRobot's training forward, written out independently: one pass over [prefix ; suffix] where
    self-attention layers attend jointly (the prefix never to the suffix) and cross-attention
    layers let the prefix attend to itself and the actions to the prefix K/V re-projected by the
    expert's k/v_proj, queries at positions from 0; the action-time MLP over the concatenation."""
    cfg = model.cfg
    prefix_embs, prefix_pad = model.embed_prefix(
        batch["images"], batch["image_masks"], batch["tokens"], batch["token_masks"], batch["state"]
    )
    b, p = prefix_pad.shape
    h = cfg.action_horizon
    time_emb = sincos_time_embedding(t, cfg.expert.width, cfg.min_period, cfg.max_period)
    action_emb = model.action_in_proj(x_t)
    fused = torch.cat([action_emb, time_emb[:, None, :].expand(b, h, -1)], dim=2)
    suffix = model.action_time_mlp_out(torch.nn.functional.silu(model.action_time_mlp_in(fused)))
    prefix_ar = torch.zeros(b, p, dtype=torch.bool)
    prefix_ar[:, -1] = True
    pad = torch.cat([prefix_pad, torch.ones(b, h, dtype=torch.bool)], dim=1)
    allowed = make_att_2d_masks(pad, torch.cat([prefix_ar, torch.ones(b, h, dtype=torch.bool)], dim=1))
    positions = torch.cumsum(pad.long(), dim=1) - 1
    cos, sin = model.rope(positions)
    cross_rope = model.rope(positions[:, p:] - positions[:, p:].min(dim=1, keepdim=True).values)
    xp, xs = prefix_embs, suffix
    for i, (vlm_layer, expert_layer) in enumerate(zip(model.llm.layers, model.expert.layers, strict=True)):
        qp, kp, vp = vlm_layer.query_key_value(xp, cos[:, :, :p], sin[:, :, :p])
        if cfg.is_cross_layer(i):
            out_p = attention(qp, kp, vp, allowed[:, :p, :p])
            ks, vs = expert_layer.cross_key_value(kp, vp)
            out_s = attention(expert_layer.query(xs, *cross_rope), ks, vs, allowed[:, p:, :p])
        else:
            qs, ks, vs = expert_layer.query_key_value(xs, cos[:, :, p:], sin[:, :, p:])
            out = attention(torch.cat([qp, qs], dim=2), torch.cat([kp, ks], dim=2), torch.cat([vp, vs], dim=2), allowed)
            out_p, out_s = out[:, :p], out[:, p:]
        xp, xs = vlm_layer.finish(xp, out_p), expert_layer.finish(xs, out_s)
    return model.action_out_proj(model.expert.norm(xs)[:, -h:])


@torch.no_grad()
def test_cached_steps_compute_lerobots_joint_training_velocity(model):
    batch = model_inputs(model.cfg)
    ws = prefilled(model, batch)
    t = torch.tensor([0.8, 0.3])
    got = model.velocity(ws, batch["noise"], model.time_constants(t))
    torch.testing.assert_close(got, joint_velocity(model, batch, batch["noise"], t), rtol=1e-5, atol=1e-5)


def test_denoising_steps_leave_the_prefix_caches_as_they_were(model):
    batch = model_inputs(model.cfg)
    ws = prefilled(model, batch)
    p = ws.prefix_pad.shape[1]
    before = [c[:, :, :, :p].clone() for c in ws.self_kv] + [c.clone() for c in ws.cross_kv]
    model.denoise(ws, model.step_constants(3))
    after = [c[:, :, :, :p] for c in ws.self_kv] + ws.cross_kv
    assert len(before) == model.cfg.num_vlm_layers
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b, a)


@torch.no_grad()
def test_action_tokens_attend_causally(model):
    batch = model_inputs(model.cfg)
    ws = prefilled(model, batch)
    time = model.time_constants(torch.full((2,), 0.5))
    reference = model.velocity(ws, batch["noise"], time)
    last_moved = batch["noise"].clone()
    last_moved[:, -1] += 1.0
    moved = model.velocity(ws, last_moved, time)
    torch.testing.assert_close(moved[:, :-1], reference[:, :-1], rtol=0, atol=1e-6)
    assert (moved[:, -1] - reference[:, -1]).abs().max() > 1e-4
    first_moved = batch["noise"].clone()
    first_moved[:, 0] += 1.0
    moved = model.velocity(ws, first_moved, time)
    assert (moved[:, -1] - reference[:, -1]).abs().max() > 1e-4


def test_prefix_never_sees_the_state_token_but_actions_do(model):
    batch = model_inputs(model.cfg)
    ws = prefilled(model, batch)
    moved_ws = prefilled(model, {**batch, "state": batch["state"] + 1.0})
    p = ws.prefix_pad.shape[1]
    # Every valid token before the state keeps its K/V (padding rows see nothing and are never read).
    before_state = ws.prefix_pad.clone()
    before_state[:, -1] = False
    for cache, moved in zip(ws.self_kv + ws.cross_kv, moved_ws.self_kv + moved_ws.cross_kv, strict=True):
        for kv, kv_moved in zip(cache[:, :, :, :p], moved[:, :, :, :p], strict=True):
            torch.testing.assert_close(
                kv_moved.transpose(1, 2)[before_state], kv.transpose(1, 2)[before_state], rtol=0, atol=1e-6
            )
    assert (moved_ws.self_kv[-1][1][:, :, p - 1] - ws.self_kv[-1][1][:, :, p - 1]).abs().max() > 1e-4
    reference = model.sample_actions(**batch)
    batch["state"] = batch["state"] + 1.0
    assert (model.sample_actions(**batch) - reference).abs().max() > 1e-4


def test_masked_camera_and_padded_tokens_do_not_influence_actions(model):
    batch = model_inputs(model.cfg)
    reference = model.sample_actions(**batch)
    changed = dict(batch)
    changed["images"] = batch["images"].clone()
    changed["images"][1, -1] = -changed["images"][1, -1]  # the camera masked out for sample 1
    changed["tokens"] = batch["tokens"].clone()
    changed["tokens"][:, 7:] = (changed["tokens"][:, 7:] + 1) % model.cfg.vlm.vocab_size  # padding slots
    torch.testing.assert_close(model.sample_actions(**changed), reference, rtol=1e-5, atol=1e-5)


def test_visible_images_and_tokens_do_influence_actions(model):
    batch = model_inputs(model.cfg)
    reference = model.sample_actions(**batch)
    for key in ("images", "tokens"):
        changed = dict(batch)
        changed[key] = batch[key].clone()
        if key == "images":
            changed[key][:, 0] = -changed[key][:, 0]
        else:
            changed[key][:, 1] = (changed[key][:, 1] + 1) % model.cfg.vlm.vocab_size
        assert (model.sample_actions(**changed) - reference).abs().max() > 1e-4, key


def test_pixel_shuffle_folds_each_block_of_patches_row_by_row():
    # A 4×4 grid of patches whose features are (row, col); scale 2 gives a 2×2 grid of tokens.
    grid = torch.tensor([[[r, c] for c in range(4)] for r in range(4)], dtype=torch.float32)
    tokens = pixel_shuffle(grid.reshape(1, 16, 2), scale=2)
    assert tokens.shape == (1, 4, 8)
    expected_first = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1], dtype=torch.float32)  # (0,0) (0,1) (1,0) (1,1)
    expected_second = torch.tensor([0, 2, 0, 3, 1, 2, 1, 3], dtype=torch.float32)  # the block right of it
    expected_third = torch.tensor([2, 0, 2, 1, 3, 0, 3, 1], dtype=torch.float32)  # the block below the first
    torch.testing.assert_close(tokens[0, 0], expected_first)
    torch.testing.assert_close(tokens[0, 1], expected_second)
    torch.testing.assert_close(tokens[0, 2], expected_third)


def test_pixel_shuffle_matches_smolvlm_connector_reshapes():
    # transformers' SmolVLMConnector.pixel_shuffle, written out as its sequence of views and permutes.
    x = torch.randn(2, 64, 3)
    b, seq, d, s = 2, 64, 3, 4
    side = 8
    ref = x.view(b, side, side, d).view(b, side, side // s, d * s).permute(0, 2, 1, 3)
    ref = ref.reshape(b, side // s, side // s, d * s * s).permute(0, 2, 1, 3).reshape(b, seq // s**2, d * s * s)
    torch.testing.assert_close(pixel_shuffle(x, s), ref, rtol=0, atol=0)


def test_rope_matches_lerobot_formula(model):
    # LeRobot's apply_rope: timescale 1e4^(2i/d), halves rotated as [x1 cos - x2 sin, x2 cos + x1 sin].
    from quantvla_ros.models.common.attention import apply_rope

    x = torch.randn(1, 2, 5, 8)
    positions = torch.tensor([[0, 1, 2, 7, 30]])
    radians = positions[..., None].float() / 10_000 ** (2 * torch.arange(4).float() / 8)
    sin, cos = radians.sin()[:, None], radians.cos()[:, None]
    x1, x2 = x[..., :4], x[..., 4:]
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    torch.testing.assert_close(apply_rope(x, *model.rope(positions)), expected, rtol=1e-5, atol=1e-5)


def test_attention_observer_sees_every_expert_layer_every_step(model):
    batch = model_inputs(model.cfg)
    calls = []
    model.attention_observer = lambda site, q, k, allowed, own: calls.append((site, q.shape, k.shape, allowed.shape))
    model.sample_actions(**batch)
    cfg = model.cfg
    depth, steps = cfg.num_vlm_layers, cfg.num_steps
    assert [c[0] for c in calls] == list(range(depth)) * steps
    prefix = len(cfg.camera_names) * cfg.vlm.tokens_per_image + cfg.max_token_len + 1
    horizon, e = cfg.action_horizon, cfg.expert
    for site, q_shape, k_shape, allowed_shape in calls:
        keys = prefix if cfg.is_cross_layer(site) else prefix + horizon
        assert q_shape == (2, e.num_heads, horizon, e.head_dim)
        assert k_shape == (2, e.num_kv_heads, keys, e.head_dim)
        assert allowed_shape == (2, horizon, keys)


def test_bfloat16_model_tracks_float32(model):
    batch = model_inputs(model.cfg)
    reference = model.sample_actions(**batch)
    model.set_dtype(torch.bfloat16)
    assert model.llm.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.expert.layers[1].self_attn.k_proj.weight.dtype == torch.bfloat16
    assert model.expert.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.vlm.vision_model.embeddings.patch_embedding.weight.dtype == torch.float32
    assert model.state_proj.weight.dtype == model.action_out_proj.weight.dtype == torch.float32
    low = model.sample_actions(**batch)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - reference).abs().max() < 0.15 * reference.abs().max()


def test_full_size_expert_derivation(full):
    cfg = full.cfg
    assert (cfg.expert.width, cfg.expert.mlp_dim, cfg.expert.num_heads, cfg.expert.num_kv_heads) == (720, 2048, 15, 5)
    assert expert_mlp_dim(720) == 2048
    assert cfg.vlm.tokens_per_image == 64
    assert full.vlm.connector.modality_projection.proj.weight.shape == (960, 12288)
    assert full.state_proj.weight.shape == (960, 32)
    assert full.action_time_mlp_in.weight.shape == (720, 1440)
    for i, layer in enumerate(full.expert.layers):
        attn = layer.self_attn
        assert attn.q_proj.weight.shape == (960, 720)
        assert attn.k_proj.weight.shape == ((320, 320) if i % 2 else (320, 720)), i
        assert attn.v_proj.weight.shape == attn.k_proj.weight.shape


def test_full_size_parameter_counts_match_the_reference(full):
    counts = full.component_parameters()
    # reference §4: vision 87M + 12M connector, LLM 157M + 47M embedding, expert 98M + 1.6M projections.
    assert counts["vision"] == pytest.approx(99e6, rel=0.02)
    assert counts["llm"] == pytest.approx(204e6, rel=0.01)
    assert counts["expert"] == pytest.approx(98e6, rel=0.01)
    assert counts["action_projections"] == pytest.approx(1.6e6, rel=0.03)
    lm_head = 49280 * 960  # in the checkpoint, never loaded
    assert sum(counts.values()) + lm_head == pytest.approx(450e6, rel=0.01)
    assert all(p.is_meta for p in full.parameters())


def test_linear_groups_select_every_backbone_and_expert_linear(full):
    linears = [name for name, m in full.named_modules() if isinstance(m, nn.Linear)]
    selected = {group: [n for n in linears if re.fullmatch(rx, n)] for group, rx in full.LINEAR_GROUPS.items()}
    assert {g: len(v) for g, v in selected.items()} == {"llm": 16 * 7, "expert_mlp": 16 * 3, "expert_attention": 16 * 4}
    assert not set(selected["llm"]) & set(selected["expert_attention"])
    assert "vlm_with_expert.lm_expert.layers.15.mlp.down_proj" in selected["expert_mlp"]


def test_attention_sites_name_each_expert_layers_projections(full):
    sites = full.attention_sites()
    modules = dict(full.named_modules())
    assert len(sites) == 16
    for site in sites:
        assert isinstance(modules[site.q_proj], nn.Linear) and isinstance(modules[site.o_proj], nn.Linear)
        assert (site.num_heads, site.head_dim) == (15, 64)
        assert modules[site.q_proj].out_features == site.num_heads * site.head_dim


def test_tiny_config_keeps_every_structural_feature():
    cfg = smolvla_tiny()
    assert cfg.text.num_kv_heads < cfg.text.num_heads  # GQA
    assert cfg.num_vlm_layers < cfg.vlm.text.depth  # truncated text model
    assert cfg.vlm.scale_factor > 1 and cfg.vlm.tokens_per_image * cfg.vlm.scale_factor**2 == cfg.vlm.vision.num_patches
    assert [cfg.is_cross_layer(i) for i in range(4)] == [False, True, False, True]
    assert cfg.action_horizon == 50
