"""Which Linear layers run as integers: named layouts over a model's module names.

QuantVLA's finding (Table 1) is that quantizing the LLM costs little, while quantizing the
action expert's attention projections breaks the policy; its layout quantizes every LLM
linear and only the expert's MLPs. The other layouts reproduce the paper's comparisons.
Everything else (vision tower, projector, embeddings, norms incl. adaRMS, action and time
projections) always stays in floating point: no layout pattern reaches it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

LLM = (
    r"paligemma_with_expert\.paligemma\.model\.language_model\.layers\.\d+\."
    r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
)
EXPERT_MLP = r"paligemma_with_expert\.gemma_expert\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
EXPERT_ATTENTION = r"paligemma_with_expert\.gemma_expert\.model\.layers\.\d+\.self_attn\.[qkvo]_proj"


@dataclass(frozen=True)
class Layout:
    """Module-name regexes (full match): a Linear is quantized if an include matches and no exclude."""

    name: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    def select(self, model: nn.Module) -> list[str]:
        include = [re.compile(p) for p in self.include]
        exclude = [re.compile(p) for p in self.exclude]
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and any(p.fullmatch(name) for p in include)
            and not any(p.fullmatch(name) for p in exclude)
        ]

    def to_json(self) -> dict:
        return {"name": self.name, "include": list(self.include), "exclude": list(self.exclude)}


LAYOUTS = {
    "quantvla": Layout("quantvla", (LLM, EXPERT_MLP)),
    "llm_only": Layout("llm_only", (LLM,)),
    "expert_all": Layout("expert_all", (EXPERT_MLP, EXPERT_ATTENTION)),
    "llm_and_expert_all": Layout("llm_and_expert_all", (LLM, EXPERT_MLP, EXPERT_ATTENTION)),
}


def get_layout(name: str, include: list[str] | None = None, exclude: list[str] | None = None) -> Layout:
    """A named layout, or `custom` built from include/exclude regexes."""
    if name == "custom":
        if not include:
            raise ValueError("The custom layout needs at least one --include pattern (a regex over module names).")
        for pattern in [*include, *(exclude or [])]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"Layout pattern {pattern!r} is not a valid regular expression ({e}).") from None
        return Layout("custom", tuple(include), tuple(exclude or ()))
    if name not in LAYOUTS:
        raise ValueError(f"Unknown layout {name!r}; choose one of {', '.join([*LAYOUTS, 'custom'])}.")
    layout = LAYOUTS[name]
    return Layout(layout.name, layout.include, layout.exclude + tuple(exclude or ()))
