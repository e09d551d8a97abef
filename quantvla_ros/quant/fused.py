"""Linears that read one input, quantized as one layer: one input transform, one activation
quantization, one integer GEMM over their concatenated rows, split afterwards.

q/k/v of an attention and gate/up of an MLP read the same normed hidden state (each family lists
them: StagedModel.linear_fusions). Quantized apart, every one of them transforms and quantizes
that input again and runs a GEMM with a third of the rows (at π0.5's prefix, k and v are
968×2048×256: 16 output tiles for 132 SMs). Fused, the transform is computed from the
concatenated weight, so it serves every row; ATM's α still folds head by head into the q rows.

The fused layer is a QuantLinear with `split_sizes`, registered beside its members under their
names joined by "+" ("self_attn.q_proj+k_proj+v_proj"). Each member stays at its own name as a
QuantLinearPart, a view of its rows: the model's `project` (models/common/projection.py) runs
the fused GEMM once and splits it, and a member called on its own (fidelity's per-layer
comparison) runs the fused GEMM and keeps its rows.
"""

from __future__ import annotations

import torch
from torch import nn

from quantvla_ros.quant.linear import QuantLinear


def fused_name(members: tuple[str, ...]) -> str:
    """Where a group's fused layer lives: "a.b.q_proj", "a.b.k_proj" -> "a.b.q_proj+k_proj"."""
    parent = members[0].rpartition(".")[0]
    return f"{parent}.{'+'.join(m.rpartition('.')[2] for m in members)}"


def member_names(name: str) -> list[str]:
    """The linears a layer's name stands for: its members for a fused name, else itself."""
    parent, _, leaf = name.rpartition(".")
    return [f"{parent}.{m}" for m in leaf.split("+")]


def concatenated(linears: list[nn.Linear]) -> nn.Linear:
    """One float Linear whose rows are the given linears' rows, in order (they share in_features)."""
    first = linears[0]
    has_bias = any(linear.bias is not None for linear in linears)
    out = nn.Linear(first.in_features, sum(linear.out_features for linear in linears), bias=has_bias)
    out = out.to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([linear.weight for linear in linears]))
        if has_bias:
            biases = [
                torch.zeros(linear.out_features, dtype=out.bias.dtype, device=out.bias.device)
                if linear.bias is None
                else linear.bias
                for linear in linears
            ]
            out.bias.copy_(torch.cat(biases))
    return out


class QuantLinearPart(nn.Module):
    """One member of a fused QuantLinear: its rows of the fused output, under its own name."""

    def __init__(self, fused: QuantLinear, index: int) -> None:
        super().__init__()
        # Not a submodule: the fused layer is registered once, beside its members.
        self.__dict__["fused"] = fused
        self.index = index
        start = sum(fused.split_sizes[:index])
        self.rows = slice(start, start + fused.split_sizes[index])
        self.in_features, self.out_features = fused.in_features, fused.split_sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.rows]

    @torch.no_grad()
    def scale_output_rows(self, factor: torch.Tensor) -> None:
        """Multiply this member's output channel n by factor[n] (folds ATM's α into the q rows)."""
        full = torch.ones(self.fused.out_features, device=factor.device)
        full[self.rows] = factor
        self.fused.scale_output_rows(full)

    def extra_repr(self) -> str:
        return f"rows {self.rows.start}..{self.rows.stop} of a fused layer"
