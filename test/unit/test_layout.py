"""Named quantization layouts select exactly the modules the paper's tables describe."""

from __future__ import annotations

import pytest
import torch

from quantvla_ros.models.pi0.config import pi05_full
from quantvla_ros.models.pi0.model import PI0Model
from quantvla_ros.quant.config import method_config
from quantvla_ros.quant.layout import LAYOUTS, get_layout
from quantvla_ros.quant.memory import layout_memory

pytestmark = pytest.mark.unit
LLM = "paligemma_with_expert.paligemma.model.language_model.layers"
EXPERT = "paligemma_with_expert.gemma_expert.model.layers"


@pytest.fixture(scope="module")
def full_pi05() -> PI0Model:
    with torch.device("meta"):
        return PI0Model(pi05_full())


def test_quantvla_layout_is_every_llm_linear_and_the_expert_mlps(full_pi05):
    selected = set(LAYOUTS["quantvla"].select(full_pi05))
    expected = {f"{LLM}.{i}.self_attn.{p}_proj" for i in range(18) for p in "qkvo"}
    expected |= {f"{LLM}.{i}.mlp.{p}_proj" for i in range(18) for p in ("gate", "up", "down")}
    expected |= {f"{EXPERT}.{i}.mlp.{p}_proj" for i in range(18) for p in ("gate", "up", "down")}
    assert selected == expected
    assert len(selected) == 126 + 54


@pytest.mark.parametrize(("name", "count"), [("llm_only", 126), ("expert_all", 126), ("llm_and_expert_all", 252)])
def test_paper_comparison_layouts_have_the_paper_counts(full_pi05, name, count):
    assert len(LAYOUTS[name].select(full_pi05)) == count


def test_float_parts_are_never_selected(full_pi05):
    everything = set(LAYOUTS["llm_and_expert_all"].select(full_pi05))
    assert not any("vision_tower" in n or "multi_modal_projector" in n or "layernorm" in n for n in everything)
    assert not any(n.startswith(("action_", "time_mlp")) for n in everything)


def test_custom_layout_and_extra_excludes(full_pi05):
    custom = get_layout("custom", include=[rf"{EXPERT}\.\d+\.mlp\.down_proj"])
    assert len(custom.select(full_pi05)) == 18
    trimmed = get_layout("quantvla", exclude=[rf"{LLM}\.0\..*"])
    assert len(trimmed.select(full_pi05)) == 180 - 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("w4a8_everything",), "Unknown layout 'w4a8_everything'; choose one of quantvla"),
        (("custom",), "needs at least one --include"),
        (("custom", ["mlp(("]), "is not a valid regular expression"),
    ],
)
def test_bad_layouts_are_one_sentence(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_layout(*args)


@pytest.mark.parametrize("method", ["rtn", "quantvla"])
def test_quantvla_weight_bytes_are_at_most_030_of_bf16(full_pi05, method):
    report = layout_memory(full_pi05, method_config(method))
    # 180 Linears as 108 layers: per LLM layer q/k/v fused, o, gate/up fused, down; per expert layer
    # gate/up fused and down.
    assert report["quantized_linears"] == 180 and len(report["modules"]) == 18 * 4 + 18 * 2
    assert report["ratio"] <= 0.30, report["ratio"]
    # 2.2 B parameters in the selected modules (the paper reports 4.27 GB for LLM + DiT in FP16).
    assert report["bf16_bytes"] / 1e9 == pytest.approx(4.42, abs=0.1)
    saved = report["model_bf16_bytes"] - report["model_quantized_bytes"]
    assert saved == report["bf16_bytes"] - report["quantized_bytes"]
