"""Phase 4 of quantize_: attention temperature matching (ATM) and output head balancing (OHB).

Quantizing the LLM and the expert's MLPs shifts what reaches the expert's attention: the
softmax logits of the quantized student get sharper or flatter than the float teacher's, and
the attention block's output drifts in scale. Both are corrected with scalars folded into
float weights, so inference pays nothing:

    ATM, one α per expert attention and head:  α = std(teacher logits) / std(student logits),
         logits = q·kᵀ/√d over the valid (query, key) pairs, over samples and steps;
         α multiplies head h's rows of W_q (RoPE is linear, so scaling q before or after it
         is the same).
    OHB, one β per expert attention (one per layer):  β = RMS(teacher o_proj output) / RMS(student o_proj output);
         β multiplies W_o (and its bias).

Both are clamped in log space (default |log| ≤ 0.3, App. D of the paper) and set to exactly 1
inside a neutral band (default |log| < 0.03). Statistics are pooled over every denoising
step, as in the authors' code: one α per head shared by all steps.

The paper's main text says ±0.4; its appendix and this default say 0.3 (e^±0.3 = [0.74, 1.35]).
The authors' GR00T code clamps α linearly to [0.7, 1.4] with a neutral band |α − 1| < 0.02:
`atm_clamp="linear"`.

Which std (`stat_pooling`; the paper writes only Std(L)):
    "pooled"    one std per head over every valid logit of every call. It includes the spread of
                each query row's mean logit, which softmax ignores (adding a constant to a row of
                logits does not change its attention weights).
    "per_call"  the authors' code: a std per (sample, head) over the (query, key) axes, averaged over
                samples and calls (and an RMS per call for β). Also includes the row means' spread,
                within each call, and weighs calls rather than logits.
    "per_row"   shift-free: the spread of the logits around their own query row's mean, pooled per
                head over rows, samples and calls — only what the softmax temperature acts on.
They are different statistics, not weightings of one: where the row means spread widely the
first two exceed the third. The default follows the study in bench/RESULTS.md.

Which keys (`atm_keys`): "all" — every key a query attends to, the cached prefix's included (π0.5,
SmolVLA's self-attention layers); "own" — only the querying tokens' own keys, as the authors' π0.5
code measures before the cache is joined. Cross-attention (GR00T's even blocks, SmolVLA's odd
layers) has no keys of its own and always uses all of them.

α and β are measured all at once by default, as the authors' code does: both from one run of the
student with neither folded, so β does not see the change α makes to the attention output.
`sequential=True` measures α, folds it, runs the student again and measures β on that.

A site that calibration never observed would have a std of 0 and get whatever the clamp gives:
collect_expert_statistics refuses instead, naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.policy import CalibrationSource
from quantvla_ros.models.stages import StagedModel
from quantvla_ros.quant.config import ATM_KEYS, ATMOHBConfig
from quantvla_ros.quant.linear import QuantLinear
from quantvla_ros.quant.statistics import replay


class ExpertStatistics:
    """Running moments of the expert's attention logits per (layer, head) and o_proj outputs per layer.

    keys: "all" or "own" (see the module docstring), which keys of each query enter the logits.
    """

    def __init__(self, layers: int, heads: int, keys: str = "all") -> None:
        if keys not in ATM_KEYS:
            raise QuantVLAError(f"Unknown ATM keys {keys!r}; choose one of {', '.join(ATM_KEYS)}.")
        self.keys = keys
        self.logit_sum = torch.zeros(layers, heads, dtype=torch.float64)
        self.logit_sumsq = torch.zeros(layers, heads, dtype=torch.float64)
        self.logit_count = torch.zeros(layers, heads, dtype=torch.float64)
        # Squared deviations from each query row's own mean, for the shift-free "per_row" std.
        self.row_sq_dev = torch.zeros(layers, heads, dtype=torch.float64)
        self.out_sumsq = torch.zeros(layers, dtype=torch.float64)
        self.out_count = torch.zeros(layers, dtype=torch.float64)
        # The authors' pooling: one std per (sample, head) per call, and one RMS per call, averaged.
        self.sample_std_sum = torch.zeros(layers, heads, dtype=torch.float64)
        self.samples = torch.zeros(layers, dtype=torch.float64)
        self.call_rms_sum = torch.zeros(layers, dtype=torch.float64)
        self.calls = torch.zeros(layers, dtype=torch.float64)

    def observe_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, own_keys: int | None = None
    ) -> None:
        if self.keys == "own" and own_keys is not None:
            k, allowed = k[:, :, -own_keys:], allowed[..., -own_keys:]
        heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[-1]
        k = k.float().repeat_interleave(heads // kv_heads, dim=1)
        logits = (q.float() @ k.transpose(-1, -2)) / math.sqrt(d)
        valid = allowed[:, None].expand_as(logits).to(logits.dtype)
        row_count = valid.sum(-1)
        row_total = (logits * valid).sum(-1)
        row_mean = row_total / row_count.clamp_min(1)
        row_sq_dev = ((logits - row_mean[..., None]).square() * valid).sum(-1)
        total = row_total.sum(-1).double().cpu()
        squares = (logits.square() * valid).sum((2, 3)).double().cpu()
        count = row_count.sum(-1).double().cpu()
        self.logit_sum[layer] += total.sum(0)
        self.logit_sumsq[layer] += squares.sum(0)
        self.logit_count[layer] += count.sum(0)
        self.row_sq_dev[layer] += row_sq_dev.sum((0, 2)).double().cpu()
        self.sample_std_sum[layer] += _std(total, squares, count).sum(0)
        self.samples[layer] += logits.shape[0]

    def observe_output(self, layer: int, out: torch.Tensor) -> None:
        sumsq = out.float().square().sum().double().cpu()
        self.out_sumsq[layer] += sumsq
        self.out_count[layer] += out.numel()
        self.call_rms_sum[layer] += (sumsq / out.numel()).sqrt()
        self.calls[layer] += 1

    def logit_std(self, pooling: str = "pooled") -> torch.Tensor:
        """Per (layer, head), by `pooling` (see the module docstring)."""
        if pooling == "per_call":
            return self.sample_std_sum / self.samples.clamp_min(1)[:, None]
        if pooling == "per_row":
            return (self.row_sq_dev / self.logit_count.clamp_min(1)).sqrt()
        return _std(self.logit_sum, self.logit_sumsq, self.logit_count)

    def output_rms(self, pooling: str = "pooled") -> torch.Tensor:
        """Per layer: over every output element of every call ("pooled", "per_row"), or the mean per-call RMS."""
        if pooling == "per_call":
            return self.call_rms_sum / self.calls.clamp_min(1)
        return (self.out_sumsq / self.out_count.clamp_min(1)).sqrt()

    def unobserved(self) -> list[int]:
        """Layers whose attention logits or output projection calibration never saw."""
        seen = (self.logit_count.sum(dim=1) > 0) & (self.calls > 0)
        return [i for i, ok in enumerate(seen.tolist()) if not ok]


def _std(total: torch.Tensor, squares: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    count = count.clamp_min(1)
    mean = total / count
    return (squares / count - mean.square()).clamp_min(0).sqrt()


def collect_expert_statistics(
    model: StagedModel,
    source: CalibrationSource,
    batch_size: int = 8,
    seed: int = 0,
    desc: str | None = None,
    keys: str = "all",
) -> ExpertStatistics:
    """The expert attention logits' and output projections' moments over full inferences on the source."""
    sites = model.attention_sites()
    heads = {site.num_heads for site in sites}
    if len(heads) != 1:
        raise ValueError(f"{model.display_name} has expert attentions with different head counts {sorted(heads)}.")
    stats = ExpertStatistics(len(sites), heads.pop(), keys)
    hooks = [
        model.get_submodule(site.o_proj).register_forward_hook(lambda _m, _i, out, i=i: stats.observe_output(i, out))
        for i, site in enumerate(sites)
    ]
    model.attention_observer = stats.observe_attention
    try:
        replay(model, source, batch_size, seed, desc)
    finally:
        model.attention_observer = None
        for h in hooks:
            h.remove()
    if unseen := stats.unobserved():
        names = ", ".join(sites[i].q_proj.rsplit(".", 1)[0] for i in unseen)
        raise RuntimeError(
            f"Calibration saw no call of the expert attention(s) {names}: {model.display_name}'s denoising "
            "path does not report them to attention_observer, so ATM/OHB cannot measure them."
        )
    return stats


def matched_scale(
    teacher: torch.Tensor,
    student: torch.Tensor,
    clamp_log: float = 0.3,
    neutral_log: float = 0.03,
    clamp: str = "log",
    clamp_range: tuple[float, float] = (0.7, 1.4),
    neutral: float = 0.02,
) -> torch.Tensor:
    """teacher / student, clamped, and exactly 1 inside the neutral band.

    "log" (the paper's App. D, the default): |log s| ≤ clamp_log, neutral when |log s| < neutral_log.
    "linear" (the authors' GR00T code): s within clamp_range, neutral when |s − 1| < neutral.
    """
    ratio = teacher / (student + 1e-6)
    if clamp == "linear":
        scale = ratio.clamp(*clamp_range)
        return torch.where((scale - 1).abs() < neutral, torch.ones_like(scale), scale)
    if clamp != "log":
        raise QuantVLAError(f"Unknown clamp {clamp!r}; use 'log' or 'linear'.")
    log = torch.log(ratio).clamp(-clamp_log, clamp_log)
    log = torch.where(log.abs() < neutral_log, torch.zeros_like(log), log)
    return log.exp()


def _scale_rows(linear: torch.nn.Module, factor: torch.Tensor) -> None:
    if isinstance(linear, QuantLinear):
        linear.scale_output_rows(factor)
        return
    w = linear.weight
    w.data = (w.data.float() * factor.to(w.device)[:, None]).to(w.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.float() * factor.to(w.device)).to(linear.bias.dtype)


def fold_atm(model: StagedModel, alpha: torch.Tensor) -> None:
    """α [sites, heads] into the rows of each expert W_q, head by head."""
    for i, site in enumerate(model.attention_sites()):
        _scale_rows(model.get_submodule(site.q_proj), alpha[i].float().repeat_interleave(site.head_dim))


def fold_ohb(model: StagedModel, beta: torch.Tensor) -> None:
    """β [sites] into each expert W_o (and bias)."""
    for i, site in enumerate(model.attention_sites()):
        o_proj = model.get_submodule(site.o_proj)
        _scale_rows(o_proj, torch.full((o_proj.out_features,), float(beta[i])))


@dataclass
class ATMOHBResult:
    alpha: torch.Tensor  # [layers, heads], as folded
    beta: torch.Tensor  # [layers], as folded
    alpha_raw: torch.Tensor
    beta_raw: torch.Tensor
    teacher: ExpertStatistics
    student: ExpertStatistics  # as β was measured: with α folded when sequential
    pooling: str  # the statistic α and β matched

    def to_json(self) -> dict:
        pooling = self.pooling
        return {
            "alpha": self.alpha.tolist(),
            "beta": self.beta.tolist(),
            "alpha_raw": self.alpha_raw.tolist(),
            "beta_raw": self.beta_raw.tolist(),
            "teacher_logit_std": self.teacher.logit_std(pooling).tolist(),
            "student_logit_std": self.student.logit_std(pooling).tolist(),
            "teacher_output_rms": self.teacher.output_rms(pooling).tolist(),
            "student_output_rms": self.student.output_rms(pooling).tolist(),
        }


def calibrate_atm_ohb(
    teacher: StagedModel,
    student: StagedModel,
    source: CalibrationSource,
    config: ATMOHBConfig,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> ATMOHBResult:
    """Measure teacher and student on the same inputs and noise, then fold α and β into the student."""

    def measure(model: StagedModel, desc: str) -> ExpertStatistics:
        return collect_expert_statistics(model, source, batch_size, seed, desc if progress else None, config.atm_keys)

    def scale(teacher_value: torch.Tensor, student_value: torch.Tensor) -> torch.Tensor:
        return matched_scale(teacher_value, student_value, config.clamp_log, config.neutral_log, config.atm_clamp)

    pooling = config.stat_pooling
    t_stats, s_stats = measure(teacher, "teacher"), measure(student, "student")
    t_std, s_std = t_stats.logit_std(pooling), s_stats.logit_std(pooling)
    alpha = scale(t_std, s_std) if config.atm else torch.ones_like(t_std)
    fold_atm(student, alpha)
    if config.sequential and config.ohb:
        s_stats = measure(student, "student with α")
    t_rms, s_rms = t_stats.output_rms(pooling), s_stats.output_rms(pooling)
    beta = scale(t_rms, s_rms) if config.ohb else torch.ones_like(t_rms)
    fold_ohb(student, beta)
    return ATMOHBResult(alpha, beta, t_std / (s_std + 1e-6), t_rms / (s_rms + 1e-6), t_stats, s_stats, pooling)
