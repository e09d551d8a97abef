"""Which Linear layers run as integers: named layouts over a model's Linear groups.

QuantVLA's finding (Table 1) is that quantizing the LLM costs little, while quantizing the
action expert's attention projections breaks the policy; its layout quantizes every LLM
linear and only the expert's MLPs. The other layouts reproduce the paper's comparisons.
Each model family names its groups ("llm", "expert_mlp", "expert_attention") as regexes over
its module names (`LINEAR_GROUPS`), so one layout means the same thing for π0.5, GR00T N1.5
and SmolVLA. Everything else (vision tower, projector, embeddings, norms incl. adaRMS / AdaLN,
state/action/time projections) always stays in floating point: no group reaches it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from quantvla_ros.errors import QuantVLAError


@dataclass(frozen=True)
class Layout:
    """A Linear is quantized if it is in one of `groups` or matches an `include` regex (full
    match over module names), and matches no `exclude`."""

    name: str
    groups: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def select(self, model: nn.Module) -> list[str]:
        include = [re.compile(model.LINEAR_GROUPS[g]) for g in self.groups] + [re.compile(p) for p in self.include]
        exclude = [re.compile(p) for p in self.exclude]
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and any(p.fullmatch(name) for p in include)
            and not any(p.fullmatch(name) for p in exclude)
        ]

    def select_or_refuse(self, model: nn.Module) -> list[str]:
        """select(), refusing a layout that selects nothing (a pattern that matches no module name)."""
        names = self.select(model)
        if not names:
            raise QuantVLAError(f"Layout {self.name!r} selects no Linear layer of this model; check its patterns.")
        return names

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "groups": list(self.groups),
            "include": list(self.include),
            "exclude": list(self.exclude),
        }


LAYOUTS = {
    "quantvla": Layout("quantvla", ("llm", "expert_mlp")),
    "llm_only": Layout("llm_only", ("llm",)),
    "expert_all": Layout("expert_all", ("expert_mlp", "expert_attention")),
    "llm_and_expert_all": Layout("llm_and_expert_all", ("llm", "expert_mlp", "expert_attention")),
}


def get_layout(name: str, include: list[str] | None = None, exclude: list[str] | None = None) -> Layout:
    """A named layout, or `custom` built from include/exclude regexes."""
    if name == "custom":
        if not include:
            raise QuantVLAError("The custom layout needs at least one --include pattern (a regex over module names).")
        for pattern in [*include, *(exclude or [])]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise QuantVLAError(f"Layout pattern {pattern!r} is not a valid regular expression ({e}).") from None
        return Layout("custom", include=tuple(include), exclude=tuple(exclude or ()))
    if name not in LAYOUTS:
        raise QuantVLAError(f"Unknown layout {name!r}; choose one of {', '.join([*LAYOUTS, 'custom'])}.")
    layout = LAYOUTS[name]
    return Layout(layout.name, layout.groups, layout.include, layout.exclude + tuple(exclude or ()))
