"""Parity of our building blocks with the reference implementations, under the real key names.

Each test builds a tiny random model of the reference library (HF `transformers` or `diffusers`,
from config objects: nothing is downloaded), copies its `state_dict()` into ours key for key, and
compares outputs on random inputs in fp32. The copy maps only the prefix a real checkpoint puts in
front of the reference module's keys (openpi's `paligemma_with_expert.paligemma.model.` before HF
PaliGemma's, GR00T's `backbone.eagle_model.language_model.model.` before HF Qwen3's, ...) and
asserts that every reference key found one of ours and every one of ours was filled, so a passing
test also proves that our module names are the checkpoints' keys.

Tolerance: max |ours - reference| / max |reference| <= 1e-5 in fp32, everywhere. Both sides run the
same math in a different order (fused SDPA vs HF's eager softmax, our fp32 RoPE tables vs HF's),
which leaves 1e-7 to 2e-6; a real mismatch (a wrong norm, RoPE layout, activation or mask) shows
as 1e-4 (exact instead of tanh GELU) to 1. The one place the references round differently from
openpi (π0's time embedding, see the end-to-end test) is held to openpi's precision instead of
loosening the tolerance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from stages import INPUT_NAMES, prefilled
from torch import nn
from transformers.models.gemma import GemmaConfig as HFGemmaConfig
from transformers.models.gemma import GemmaModel as HFGemmaModel
from transformers.models.llama import LlamaConfig
from transformers.models.paligemma import PaliGemmaConfig, PaliGemmaModel
from transformers.models.pi0 import PI0Config as HFPI0Config
from transformers.models.pi0 import PI0ForConditionalGeneration, modeling_pi0
from transformers.models.qwen3 import Qwen3Config as HFQwen3Config
from transformers.models.qwen3 import Qwen3Model as HFQwen3Model
from transformers.models.siglip import SiglipVisionConfig, SiglipVisionModel
from transformers.models.smolvlm import SmolVLMConfig as HFSmolVLMConfig
from transformers.models.smolvlm import SmolVLMModel as HFSmolVLMModel
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

from quantvla_ros.models.common.attention import attention, make_att_2d_masks, rope_cos_sin
from quantvla_ros.models.common.gemma import GemmaConfig
from quantvla_ros.models.common.llama import RMSNorm
from quantvla_ros.models.common.qwen3 import Qwen3Config
from quantvla_ros.models.common.siglip import SiglipConfig
from quantvla_ros.models.groot.config import groot_tiny
from quantvla_ros.models.groot.model import GR00TN15Model
from quantvla_ros.models.pi0.config import tiny
from quantvla_ros.models.pi0.model import PI0Model
from quantvla_ros.models.smolvla.config import smolvla_tiny
from quantvla_ros.models.smolvla.model import ROPE_THETA, SmolVLAModel

pytestmark = pytest.mark.integration

RTOL = 1e-5

# Where each reference module sits in a real checkpoint (openpi / LeRobot π0, NVIDIA GR00T N1.5,
# LeRobot SmolVLA); tests prepend exactly these to the reference keys and nothing else.
PI0_PALIGEMMA = "paligemma_with_expert.paligemma.model."
PI0_EXPERT = "paligemma_with_expert.gemma_expert.model."
GROOT_VISION = "backbone.eagle_model.vision_model."
GROOT_QWEN3 = "backbone.eagle_model.language_model.model."
GROOT_DIT = "action_head.model."
GROOT_VL_SELF_ATTENTION = "action_head.vl_self_attention."
SMOLVLA_VLM = "vlm_with_expert.vlm.model."


# ---- helpers -----------------------------------------------------------------------------------
def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Replaces the reference's init (zero Gemma norms, 0.02-std Linears would hide a wrong `1 + w`
    or a wrong softmax scale) with O(1) random weights: matrices ~ N(0, 1/fan_in), norm weights
    around 1, biases ~ N(0, 0.3²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return module.eval()


def load_by_key(ours: nn.Module, reference: dict[str, torch.Tensor], prefix: str) -> None:
    """Copies reference weights into the `prefix` part of ours under `prefix + key`, asserting that
    the two key sets match exactly there (shapes are checked by load_state_dict)."""
    mapped = {prefix + key: value for key, value in reference.items()}
    ours_keys = {key for key in ours.state_dict() if key.startswith(prefix)}
    assert not ours_keys.isdisjoint(mapped), f"nothing of ours under {prefix!r}"
    unused = sorted(set(mapped) - ours_keys)
    unfilled = sorted(ours_keys - set(mapped))
    assert not unused, f"reference keys with no module of ours: {unused}"
    assert not unfilled, f"our keys the reference does not fill: {unfilled}"
    result = ours.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys


def assert_parity(ours: torch.Tensor, reference: torch.Tensor, rtol: float = RTOL) -> float:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    assert torch.isfinite(ours).all() and torch.isfinite(reference).all()
    assert reference.abs().max() > 1e-3, "a degenerate reference output would make the comparison vacuous"
    err = ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()
    assert err <= rtol, f"max |ours - reference| / max |reference| = {err:.2e} > {rtol:.0e}"
    return err


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """Bool [B, Tq, Tk] -> the 4D float mask HF takes as-is ("an already prepared 4D mask")."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


def eager(config):
    """HF's eager attention is the plainest reference: matmul, additive mask, fp32 softmax (set on the
    top-level config, it reaches the sub-models' too)."""
    config._attn_implementation = "eager"
    return config


def siglip_reference_config(cfg: SiglipConfig) -> SiglipVisionConfig:
    # PaliGemma's and Eagle's towers read patch tokens, not the pooled output: no attention-pool head.
    return SiglipVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=cfg.eps,
        vision_use_head=False,
    )


def gemma_reference_config(cfg: GemmaConfig, vocab_size: int) -> HFGemmaConfig:
    return eager(
        HFGemmaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            hidden_act="gelu_pytorch_tanh",
            rms_norm_eps=cfg.eps,
            rope_parameters=rope(cfg.rope_theta),
        )
    )


# ---- 1. SigLIP vision tower (π0's PaliGemma and GR00T's Eagle) ----------------------------------
def _pi0_with_tower() -> tuple[nn.Module, str]:
    return PI0Model(tiny(pi05=False)), PI0_PALIGEMMA + "vision_tower."


def _groot_with_tower() -> tuple[nn.Module, str]:
    return GR00TN15Model(groot_tiny()), GROOT_VISION


@pytest.mark.parametrize("build", [_pi0_with_tower, _groot_with_tower], ids=["pi0", "groot"])
def test_siglip_vision_tower_matches_transformers(build: Callable[[], tuple[nn.Module, str]]) -> None:
    torch.manual_seed(0)
    model, prefix = build()
    tower = model.get_submodule(prefix.rstrip("."))
    vision_cfg = model.cfg.vision
    reference = randomize(SiglipVisionModel(eager(siglip_reference_config(vision_cfg))), seed=1)
    # transformers 5 builds SiglipVisionModel without its `vision_model.` level and re-adds it on
    # save/load (`base_model_prefix`); checkpoints, PaliGemma's and Eagle's included, carry it.
    assert SiglipVisionModel.base_model_prefix == "vision_model"
    load_by_key(model, reference.state_dict(), prefix + "vision_model.")

    pixels = torch.rand(3, 3, vision_cfg.image_size, vision_cfg.image_size) * 2 - 1
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state  # after post_layernorm
        got = tower(pixels)
    assert_parity(got, expected)


# ---- 2. Qwen3 decoder (GR00T's Eagle LLM) --------------------------------------------------------
def test_qwen3_decoder_matches_transformers_with_left_padding() -> None:
    torch.manual_seed(0)
    # GR00T's tiny config with head_dim ≠ width / heads (as in Qwen3-0.6B), so a reshape that
    # assumed width = heads · head_dim could not pass; GQA 4:2 and the q/k norms as in Qwen3-1.7B.
    base = groot_tiny()
    llm = dataclasses.replace(base.llm, head_dim=24)
    model = GR00TN15Model(base.with_changes(llm=llm)).eval()
    assert isinstance(llm, Qwen3Config) and llm.rope_theta == 1e6
    reference_cfg = HFQwen3Config(
        vocab_size=llm.vocab_size,
        hidden_size=llm.width,
        intermediate_size=llm.mlp_dim,
        num_hidden_layers=llm.depth,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.head_dim,
        rms_norm_eps=llm.eps,
        rope_parameters=rope(llm.rope_theta),
    )
    reference = randomize(HFQwen3Model(eager(reference_cfg)), seed=2)
    load_by_key(model, reference.state_dict(), GROOT_QWEN3)

    # Left padding as our processor pads: row 0 has 3 padding tokens, row 1 none.
    b, t = 2, 9
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, :3] = False
    embeds = torch.randn(b, t, llm.width)
    # Our forward counts positions over valid tokens only (a padded prompt keeps its unpadded
    # positions) and masks padding keys causally; HF gets the same as attention_mask + position_ids.
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions)
        got = model.backbone.eagle_model.language_model.model(embeds, mask)
    # Padding queries see nothing; their rows are defined by neither side's contract.
    assert_parity(got[mask], expected.last_hidden_state[mask])
    # Row 0's valid tokens must not depend on the padding at all: equal to the unpadded run.
    with torch.no_grad():
        alone = reference(inputs_embeds=embeds[:1, 3:]).last_hidden_state
    assert_parity(got[0, 3:], alone[0])


# ---- 3. Gemma as π0 runs it (PaliGemma prefix and the action expert) ----------------------------
def pi0_config():
    """π0 with head_dim ≠ width / heads in both streams (the real expert has 8·256 ≠ 1024) and
    MQA (one KV head) as in gemma_2b / gemma_300m."""
    llm = GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=32)
    expert = GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=32)
    return tiny(pi05=False).with_changes(llm=llm, expert=expert)


def test_pi0_paligemma_prefix_matches_transformers() -> None:
    """The whole prefix pass: SigLIP -> projector -> [image tokens | √width-scaled text] -> Gemma
    under π0's bidirectional prefix mask with a masked camera and padded prompt."""
    torch.manual_seed(0)
    cfg = pi0_config()
    model = PI0Model(cfg).eval()
    reference_cfg = PaliGemmaConfig(
        vision_config=siglip_reference_config(cfg.vision),
        text_config=gemma_reference_config(cfg.llm, cfg.vocab_size),
        projection_dim=cfg.llm.width,
    )
    reference = randomize(PaliGemmaModel(eager(reference_cfg)), seed=3)
    # transformers 5 holds PaliGemma's tower as a bare SiglipVisionModel; checkpoints (PaliGemma's
    # own, openpi's, LeRobot's) keep its `vision_model.` level, the tower's base_model_prefix.
    state = {
        key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") else key: v
        for key, v in reference.state_dict().items()
    }
    load_by_key(model, state, PI0_PALIGEMMA)

    b, cams, text = 2, len(cfg.camera_names), 6
    images = torch.rand(b, cams, 3, cfg.image_size, cfg.image_size) * 2 - 1
    image_masks = torch.ones(b, cams, dtype=torch.bool)
    image_masks[1, 1] = False  # a missing camera: its tokens are padding
    tokens = torch.randint(0, cfg.vocab_size, (b, text))
    token_masks = torch.ones(b, text, dtype=torch.bool)
    token_masks[0, 4:] = False  # π0 pads prompts on the right
    zeros = torch.zeros(b, cfg.max_state_dim), torch.zeros(b, cfg.action_horizon, cfg.action_dim)
    ws = prefilled(model, dict(zip(INPUT_NAMES, (images, image_masks, tokens, token_masks, *zeros), strict=True)))
    pad, p = ws.prefix_pad, ws.prefix_pad.shape[1]
    allowed = make_att_2d_masks(pad, torch.zeros_like(pad))
    positions = torch.cumsum(pad.long(), dim=1) - 1
    with torch.no_grad():
        # HF's pieces composed as openpi composes them: image features unscaled, text embeddings
        # × √width (transformers 5 folds that scale into Gemma's embedding layer).
        image_features = reference.get_image_features(pixel_values=images.flatten(0, 1)).pooler_output
        ref_embs = torch.cat(
            [image_features.reshape(b, -1, cfg.llm.width), reference.language_model.embed_tokens(tokens)], dim=1
        )
        expected = reference.language_model(
            inputs_embeds=ref_embs, attention_mask=additive_mask(allowed), position_ids=positions, use_cache=True
        )
    assert_parity(ws.prefix_embs, ref_embs)
    # The K/V cache the action expert reads: post-RoPE keys and values of every layer (the last
    # layer's output is never read at inference, and every other layer's feeds the next one's K/V).
    for cache, layer in zip(ws.kv, expected.cache.layers, strict=True):
        for row in range(b):
            assert_parity(cache[0, row, :, :p][:, pad[row]], layer.keys[row][:, pad[row]])
            assert_parity(cache[1, row, :, :p][:, pad[row]], layer.values[row][:, pad[row]])


def test_pi0_action_expert_matches_transformers_gemma() -> None:
    """The expert stream as a denoising step runs it, with the prefix masked out of its view,
    equals an HF GemmaModel; π0's expert has no token embedding, so HF's is dropped."""
    torch.manual_seed(0)
    cfg = pi0_config()
    model = PI0Model(cfg).eval()
    reference = randomize(HFGemmaModel(gemma_reference_config(cfg.expert, vocab_size=16)), seed=4)
    state = reference.state_dict()
    state.pop("embed_tokens.weight")
    load_by_key(model, state, PI0_EXPERT)

    b, t = 2, 1 + cfg.action_horizon
    x = torch.randn(b, t, cfg.expert.width)
    # π0's suffix mask: the state token and the first action open causal blocks, the actions
    # attend to each other bidirectionally.
    ar = torch.tensor([1, 1] + [0] * (t - 2), dtype=torch.bool)[None].expand(b, -1)
    allowed = make_att_2d_masks(torch.ones(b, t, dtype=torch.bool), ar)
    positions = torch.arange(t)[None].expand(b, -1) + torch.tensor([[5], [9]])  # as if after a prefix
    ws = model.workspace((b, len(cfg.camera_names), 3, cfg.image_size, cfg.image_size), 4)
    p = ws.prefix_pad.shape[1]
    ws.suffix_mask.copy_(torch.cat([torch.zeros(b, t, p, dtype=torch.bool), allowed], dim=2))
    ws.suffix_bias.copy_(additive_mask(ws.suffix_mask))
    cos, sin = rope_cos_sin(positions, cfg.expert.head_dim, cfg.expert.rope_theta)
    ws.suffix_cos.copy_(cos)
    ws.suffix_sin.copy_(sin)
    with torch.no_grad():
        got = model.expert_stream(ws, x, None)
        expected = reference(inputs_embeds=x, attention_mask=additive_mask(allowed), position_ids=positions)
    assert_parity(got, expected.last_hidden_state)


# ---- 4. SmolVLM pieces for SmolVLA --------------------------------------------------------------
def test_smolvla_backbone_matches_transformers_smolvlm() -> None:
    """SmolVLM's vision tower + pixel-shuffle connector, and its SmolLM2 (Llama) text layers as
    SmolVLA runs them over the prefix (K/V cache and hidden states)."""
    torch.manual_seed(0)
    cfg = smolvla_tiny()
    model = SmolVLAModel(cfg).eval()
    vision, text = cfg.vlm.vision, cfg.text
    reference_cfg = HFSmolVLMConfig(
        vision_config=SmolVLMVisionConfig(
            hidden_size=vision.width,
            intermediate_size=vision.mlp_dim,
            num_hidden_layers=vision.depth,
            num_attention_heads=vision.num_heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=vision.eps,
        ),
        # LeRobot keeps the first num_vlm_layers text layers, and rotates with its own RoPE at
        # 1e4 whatever the text config says: the reference gets exactly that.
        text_config=LlamaConfig(
            vocab_size=cfg.vlm.vocab_size,
            hidden_size=text.width,
            intermediate_size=text.mlp_dim,
            num_hidden_layers=text.depth,
            num_attention_heads=text.num_heads,
            num_key_value_heads=text.num_kv_heads,
            head_dim=text.head_dim,
            rms_norm_eps=text.eps,
            rope_parameters=rope(ROPE_THETA),
        ),
        scale_factor=cfg.vlm.scale_factor,
    )
    reference = randomize(HFSmolVLMModel(eager(reference_cfg)), seed=5)
    state = reference.state_dict()
    # SmolVLA never applies the text model's final norm (it reads K/V only); check the layers'
    # output through it with our RMSNorm instead.
    final_norm = RMSNorm(text.width, text.eps)
    final_norm.load_state_dict({"weight": state.pop("text_model.norm.weight")})
    load_by_key(model, state, SMOLVLA_VLM)

    b, cams = 2, len(cfg.camera_names)
    images = torch.rand(b, cams, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        got_images = model.embed_images(images)
        expected_images = reference.get_image_features(pixel_values=images).pooler_output
    assert_parity(got_images, torch.stack(expected_images))

    # The prefix as SmolVLA builds it: [images | prompt (right-padded) | state], bidirectional
    # except the state token, which sees everything and is seen by nothing.
    t = 12
    embs = torch.randn(b, t, text.width)
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[1, 8:11] = False
    ar = torch.zeros(b, t, dtype=torch.bool)
    ar[:, -1] = True
    allowed = make_att_2d_masks(pad, ar)
    positions = torch.cumsum(pad.long(), dim=1) - 1
    # A workspace with no camera whose prefix is these embeddings (prompt_len + the state token = t).
    ws = model.workspace((b, 0, 3, cfg.image_size, cfg.image_size), t - 1)
    ws.prefix_embs.copy_(embs)
    ws.prefix_pad.copy_(pad)
    with torch.no_grad():
        model.prefix(ws)
        x = embs
        cos, sin = model.rope(positions)
        for layer in model.llm.layers:
            q, k, v = layer.query_key_value(x, cos, sin)
            x = layer.finish(x, attention(q, k, v, allowed))
        got = final_norm(x)
        expected = reference.text_model(
            inputs_embeds=embs, attention_mask=additive_mask(allowed), position_ids=positions, use_cache=True
        )
        self_kv, cross_kv = iter(ws.self_kv), iter(ws.cross_kv)
        for i, (expert_layer, layer) in enumerate(zip(model.expert.layers, expected.cache.layers, strict=True)):
            # What expert layer i attends to in the prefix: the text layer's K/V, or for a
            # cross-attention layer their projection through its own k/v_proj.
            if cfg.is_cross_layer(i):
                got_k, got_v = next(cross_kv)
                want_k, want_v = expert_layer.cross_key_value(layer.keys, layer.values)
            else:
                got_k, got_v = next(self_kv)[:, :, :, :t]
                want_k, want_v = layer.keys, layer.values
            for row in range(b):
                assert_parity(got_k[row][:, pad[row]], want_k[row][:, pad[row]])
                assert_parity(got_v[row][:, pad[row]], want_v[row][:, pad[row]])
    assert_parity(got[pad], expected.last_hidden_state[pad])


# ---- 5. GR00T's action head vs diffusers ---------------------------------------------------------
class ReferenceTimestepEncoder(nn.Module):
    """Isaac-GR00T's TimestepEncoder: diffusers' sinusoidal projection (256 channels, cos first,
    frequency shift 1) then its TimestepEmbedding MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=1)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=width)

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(tau))


class ReferenceAdaLayerNorm(nn.Module):
    """GR00T's own AdaLayerNorm (cross_attention_dit.py): LayerNorm without affine, then
    ·(1 + scale) + shift with (scale, shift) = linear(silu(temb)) in that order. diffusers'
    AdaLayerNorm splits a batched temb as (shift, scale), so it cannot stand in for it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(width, eps=1e-5, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(nn.functional.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class ReferenceDiTBlock(nn.Module):
    """GR00T's BasicTransformerBlock with norm_type "ada_norm" (no positional embedding, dropout
    off at inference) from diffusers' Attention (biased, optionally cross) and FeedForward."""

    def __init__(self, width: int, heads: int, head_dim: int, context_dim: int | None) -> None:
        super().__init__()
        self.norm1 = ReferenceAdaLayerNorm(width)
        self.attn1 = DiffusersAttention(
            query_dim=width, cross_attention_dim=context_dim, heads=heads, dim_head=head_dim, bias=True, out_bias=True
        )
        self.norm3 = nn.LayerNorm(width, eps=1e-5, elementwise_affine=False)
        self.ff = FeedForward(width, activation_fn="gelu-approximate", final_dropout=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x, temb), encoder_hidden_states=context)
        return x + self.ff(self.norm3(x))


class ReferenceDiT(nn.Module):
    """GR00T N1.5's DiT (interleave_self_attention: even blocks cross-attend to the VL tokens, odd
    ones self-attend; no attention mask) and its output layer, which splits (shift, scale)."""

    def __init__(self, width: int, heads: int, head_dim: int, depth: int, context_dim: int, output_dim: int) -> None:
        super().__init__()
        self.timestep_encoder = ReferenceTimestepEncoder(width)
        self.transformer_blocks = nn.ModuleList(
            ReferenceDiTBlock(width, heads, head_dim, context_dim if i % 2 == 0 else None) for i in range(depth)
        )
        self.norm_out = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(width, 2 * width)
        self.proj_out_2 = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        temb = self.timestep_encoder(tau)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, temb, context if i % 2 == 0 else None)
        shift, scale = self.proj_out_1(nn.functional.silu(temb)).chunk(2, dim=1)
        return self.proj_out_2(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])


def test_groot_timestep_encoder_matches_diffusers() -> None:
    torch.manual_seed(0)
    model = GR00TN15Model(groot_tiny()).eval()
    reference = randomize(ReferenceTimestepEncoder(model.cfg.input_embedding_dim), seed=6)
    load_by_key(model, reference.state_dict(), GROOT_DIT + "timestep_encoder.")
    # The discretised τ GR00T feeds (int(t · 1000) for t in {0, 1/4, 2/4, 3/4}) and the ends.
    tau = torch.tensor([0, 1, 250, 500, 750, 999])
    with torch.no_grad():
        assert_parity(model.action_head.model.timestep_encoder(tau), reference(tau))


def test_groot_feed_forward_matches_diffusers() -> None:
    torch.manual_seed(0)
    model = GR00TN15Model(groot_tiny()).eval()
    width = model.cfg.input_embedding_dim
    reference = randomize(FeedForward(width, activation_fn="gelu-approximate", final_dropout=True), seed=7)
    # `net.0.proj` and `net.2` around the parameter-free dropout `net.1` (and `net.3`).
    load_by_key(model, reference.state_dict(), GROOT_DIT + "transformer_blocks.1.ff.")
    x = torch.randn(2, 5, width)
    with torch.no_grad():
        assert_parity(model.action_head.model.transformer_blocks[1].ff(x), reference(x))


def test_groot_dit_matches_diffusers_blocks() -> None:
    """The whole DiT (timestep encoder, ada-norm cross/self blocks, output layer) on one step, with
    the cross-attention K/V precomputed as our sampler does; and a padded VL sequence under our key
    mask equals GR00T's unmasked run on the unpadded one."""
    torch.manual_seed(0)
    cfg = groot_tiny()
    model = GR00TN15Model(cfg).eval()
    dit_cfg = cfg.dit
    reference = randomize(
        ReferenceDiT(
            cfg.input_embedding_dim,
            dit_cfg.num_heads,
            dit_cfg.head_dim,
            dit_cfg.depth,
            context_dim=cfg.llm.width,
            output_dim=cfg.dit_output_dim,
        ),
        seed=8,
    )
    load_by_key(model, reference.state_dict(), GROOT_DIT)
    dit = model.action_head.model

    b, t, s = 2, 1 + cfg.num_target_vision_tokens + cfg.action_horizon, 7
    x = torch.randn(b, t, cfg.input_embedding_dim)
    context = torch.randn(b, s, cfg.llm.width)
    tau = torch.tensor([250, 750])
    full = torch.ones(b, s, dtype=torch.bool)

    def run(mask: torch.Tensor) -> torch.Tensor:
        blocks, output = dit.time_modulations(tau)
        bias = additive_mask(mask[:, None, :].expand(b, t, s))
        return dit.output(dit(x, blocks, dit.cross_kv(context), bias), output)

    with torch.no_grad():
        assert_parity(run(full), reference(x, context, tau))
        # Row 0 with 3 left-padding VL tokens, masked as keys, against the reference without them.
        mask = full.clone()
        mask[0, :3] = False
        got = run(mask)
        assert_parity(got[0], reference(x[:1], context[:1, 3:], tau[:1])[0])
        assert_parity(got[1], reference(x[1:], context[1:], tau[1:])[0])


def test_groot_vl_self_attention_matches_diffusers_basic_transformer_block() -> None:
    """GR00T's VL self-attention is a stack of plain diffusers BasicTransformerBlocks (affine
    LayerNorms, biased attention, tanh-GELU FeedForward, no mask); ours masks padding keys, so a
    padded row's valid tokens must equal the reference on the unpadded sequence."""
    torch.manual_seed(0)
    cfg = groot_tiny()
    model = GR00TN15Model(cfg).eval()
    vlsa = cfg.vl_self_attention
    reference = nn.ModuleList(
        BasicTransformerBlock(
            vlsa.width,
            vlsa.num_heads,
            vlsa.head_dim,
            activation_fn="gelu-approximate",
            attention_bias=True,
            norm_type="layer_norm",
            norm_eps=1e-5,
            final_dropout=True,
        )
        for _ in range(vlsa.depth)
    )
    randomize(reference, seed=9)
    load_by_key(
        model, {f"transformer_blocks.{k}": v for k, v in reference.state_dict().items()}, GROOT_VL_SELF_ATTENTION
    )

    def run_reference(x: torch.Tensor) -> torch.Tensor:
        for block in reference:
            x = block(x)
        return x

    b, s = 2, 7
    x = torch.randn(b, s, vlsa.width)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, :3] = False
    with torch.no_grad():
        got = model.action_head.vl_self_attention(x, mask)
        assert_parity(got[0, 3:], run_reference(x[:1, 3:])[0])
        assert_parity(got[1], run_reference(x[1:])[0])


# ---- π0 end to end: transformers' own PI0ForConditionalGeneration --------------------------------
def pi0_reference_key(key: str) -> str:
    """An HF PI0ForConditionalGeneration key -> its openpi checkpoint key: the inverse of the "pi0"
    renames in transformers' conversion_mapping.py (which load LeRobot/openpi checkpoints), plus the
    tower's `vision_model.` level (SiglipVisionModel.base_model_prefix)."""
    for hf, openpi in (
        ("model.vlm.vision_tower.", PI0_PALIGEMMA + "vision_tower.vision_model."),
        ("model.vlm.", PI0_PALIGEMMA),
        ("model.dit.", PI0_EXPERT),
        ("embed_action_time.", ""),
    ):
        if key.startswith(hf):
            return openpi + key.removeprefix(hf)
    return key


def test_pi0_sample_actions_matches_transformers_pi0(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole π0 inference (prefix cache, 3 Euler steps of the expert) against transformers' π0."""
    torch.manual_seed(0)
    cfg = pi0_config()
    model = PI0Model(cfg).eval()
    image_token_id = cfg.vocab_size  # HF's π0 appends the placeholder after the vocabulary, as PaliGemma
    vlm = PaliGemmaConfig(
        vision_config=siglip_reference_config(cfg.vision),
        text_config=gemma_reference_config(cfg.llm, cfg.vocab_size),
        projection_dim=cfg.llm.width,
        image_token_id=image_token_id,
    )
    reference_cfg = HFPI0Config(
        vlm_config=vlm.to_dict(),
        dit_config=gemma_reference_config(cfg.expert, cfg.vocab_size).to_dict(),
        chunk_size=cfg.action_horizon,
        max_state_dim=cfg.max_state_dim,
        max_action_dim=cfg.action_dim,
        num_inference_steps=cfg.num_steps,
    )
    reference = randomize(PI0ForConditionalGeneration(eager(reference_cfg)), seed=10)
    state = reference.state_dict()
    # π0's expert embeds no tokens; transformers builds the Gemma stack with a table it never reads.
    state.pop("model.dit.embed_tokens.weight")
    load_by_key(model, {pi0_reference_key(k): v for k, v in state.items()}, "")

    # openpi computes the sincos time embedding in float64 and rounds once; transformers multiplies
    # in float32, whose rounding of angles up to 2π/4e-3 ≈ 1.6e3 rad moves sin/cos by ~1e-4. Hold
    # the reference to openpi's precision so that the comparison can stay at 1e-5.
    def time_embedding_fp64(self, time: torch.Tensor) -> torch.Tensor:
        fraction = torch.linspace(0.0, 1.0, self.config.dit_config.hidden_size // 2, dtype=torch.float64)
        period = self.config.min_period * (self.config.max_period / self.config.min_period) ** fraction
        angle = (2 * math.pi / period)[None] * time.double()[:, None]
        return torch.cat([angle.sin(), angle.cos()], dim=1).float()

    monkeypatch.setattr(modeling_pi0.PI0TimestepEmbeddings, "forward", time_embedding_fp64)

    b, cams, text = 2, len(cfg.camera_names), 6
    per_image = cfg.vision.num_patches
    images = torch.rand(b, cams, 3, cfg.image_size, cfg.image_size) * 2 - 1
    tokens = torch.randint(0, cfg.vocab_size, (b, text))
    token_masks = torch.ones(b, text, dtype=torch.bool)
    token_masks[0, 4:] = False
    robot_state = torch.randn(b, cfg.action_dim)
    noise = torch.randn(b, cfg.action_horizon, cfg.action_dim)
    with torch.no_grad():
        got = model.sample_actions(
            images, torch.ones(b, cams, dtype=torch.bool), tokens, token_masks, robot_state, noise
        )
        input_ids = torch.cat([torch.full((b, cams * per_image), image_token_id), tokens], dim=1)
        attention_mask = torch.cat([torch.ones(b, cams * per_image, dtype=torch.long), token_masks.long()], dim=1)
        expected = reference.sample_actions(
            state=robot_state,
            input_ids=input_ids,
            pixel_values=images,
            noise=noise,
            attention_mask=attention_mask,
            pixel_attention_mask=torch.ones(b, cams, dtype=torch.bool),
        )
    assert_parity(got, expected)
