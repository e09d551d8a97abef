"""Fidelity of a quantized policy against its float reference, on a calibration-style buffer.

Same observations, same noise for both policies:
- actions: relative MSE  Σ(a_q − a_f)² / Σa_f²  and mean per-sample cosine, in the model's
  normalized action space over the robot's action dimensions;
- per-layer output SQNR of every quantized Linear, layer-local: the QuantLinear is fed the
  float layer's own inputs during the float run, so each number is that layer's error alone,
  not the error accumulated upstream (expert projections that carry a folded α/β include it);
- α per expert layer/head and β per layer, as recorded in the artifact.

Results, rewritten as each candidate finishes: a JSON file and PNG plots per candidate (SQNR per
layer on one y-range for all candidates, α heatmap, β raw and folded against the neutral band),
one SQNR plot comparing every candidate, and a markdown table across them.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # plots are files; never open a window on a robot
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from torch import nn

from quantvla_ros.atomic import atomic_path, write_bytes_atomic, write_json_atomic
from quantvla_ros.models.policy import CalibrationSource, Policy
from quantvla_ros.outputs import OutputKind, check_output_folder, only_entries
from quantvla_ros.progress import Progress as tqdm
from quantvla_ros.quant.fused import member_names
from quantvla_ros.quant.statistics import sample_noise
from quantvla_ros.quant.summary import atm_ohb_summary, group_of


class LayerSQNR:
    def __init__(self) -> None:
        self.signal: dict[str, float] = {}
        self.error: dict[str, float] = {}

    def add(self, name: str, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        ref = reference.float()
        self.signal[name] = self.signal.get(name, 0.0) + float(ref.square().sum())
        self.error[name] = self.error.get(name, 0.0) + float((ref - candidate.float()).square().sum())

    def db(self) -> dict[str, float]:
        return {n: 10 * math.log10(self.signal[n] / max(self.error[n], 1e-30)) for n in self.signal}


@torch.no_grad()
def fidelity(
    reference: Policy,
    candidate: Policy,
    quantized: list[str],
    source: CalibrationSource,
    batch_size: int = 8,
    seed: int = 0,
    desc: str = "fidelity",
) -> dict:
    """Both policies on every observation of `source` (prepared for `reference`), with the same noise.

    quantized: the candidate's quantized layers (an artifact's modules); a fused one is compared
    member by member, against the reference's own Linears of those names. `desc` names the
    candidate on the progress bar."""
    cfg = reference.model.cfg
    noise = sample_noise(len(source), cfg.action_horizon, cfg.action_dim, seed)
    sqnr = LayerSQNR()

    def hook(name: str):
        twin = candidate.model.get_submodule(name)

        def compare(_module, args, out):
            sqnr.add(name, out, twin(args[0].to(candidate.device)).to(out.device))

        return compare

    linears = [member for name in quantized for member in member_names(name)]
    hooks = [reference.model.get_submodule(n).register_forward_hook(hook(n)) for n in linears]
    dims = reference.action_dim
    err = ref_power = 0.0
    cosines: list[float] = []
    try:
        start = 0
        batches = source.batches(batch_size, reference.device)
        for inputs in tqdm(batches, total=math.ceil(len(source) / batch_size), desc=desc, unit="batch"):
            n = inputs.images.shape[0]
            eps = noise[start : start + n]
            a_ref = reference.sample(inputs, eps)[..., :dims].float().cpu()
            a_q = candidate.sample(inputs.to(candidate.device), eps)[..., :dims].float().cpu()
            err += float((a_q - a_ref).square().sum())
            ref_power += float(a_ref.square().sum())
            cosines += torch.nn.functional.cosine_similarity(a_q.flatten(1), a_ref.flatten(1), dim=1).tolist()
            start += n
    finally:
        for h in hooks:
            h.remove()
    return {
        "samples": len(source),
        "action_relative_mse": err / max(ref_power, 1e-30),
        "action_cosine": sum(cosines) / len(cosines),
        "layer_sqnr_db": sqnr.db(),
    }


GROUP_COLORS = {"llm": "tab:blue", "expert_mlp": "tab:orange", "expert_attention": "tab:red", "other": "tab:gray"}
MAX_LAYER_TICKS = 60  # beyond this, the SQNR axes name the groups instead of every layer


REPORT_OUTPUT = OutputKind(
    "a fidelity report", lambda p: (p / "summary.md").is_file() and only_entries(p, suffixes={".json", ".png", ".md"})
)


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def candidate_names(paths: list[str]) -> list[str]:
    """A distinct, file-safe name per candidate: its folder name, or, where folder names collide,
    as many parent folders as it takes to tell them apart (`runs_a__w4`, `runs_b__w4`)."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(parts)

    def name(i: int) -> str:
        return "__".join(parts[i][-depth[i] :])

    while True:
        names = [name(i) for i in range(len(parts))]
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    # The same folder given twice still gets two rows.
    return [n if n not in names[:i] else f"{n}-{names[:i].count(n) + 1}" for i, n in enumerate(names)]


def _short(name: str) -> str:
    """A layer's name from its block index on ("3.mlp.down_proj"), short enough for an axis."""
    parts = name.split(".")
    first = next((i for i, part in enumerate(parts) if part.isdigit()), max(len(parts) - 2, 0))
    return ".".join(parts[first:])


def _layer_axis(ax, names: list[str], groups: dict[str, str], positions: list[int] | None = None) -> None:
    """Name the layers on the x axis (each one, or each group's span when there are many) and shade the groups."""
    positions = list(range(len(names))) if positions is None else positions
    spans: list[tuple[str, int, int]] = []
    for x, name in zip(positions, names, strict=True):
        group = group_of(groups, name)
        if spans and spans[-1][0] == group:
            spans[-1] = (group, spans[-1][1], x)
        else:
            spans.append((group, x, x))
    for group, lo, hi in spans:
        ax.axvspan(lo - 0.5, hi + 0.5, color=GROUP_COLORS.get(group, "tab:gray"), alpha=0.07, linewidth=0)
    if len(names) <= MAX_LAYER_TICKS:
        ax.set_xticks(positions)
        ax.set_xticklabels([f"{group_of(groups, n)} {_short(n)}" for n in names], rotation=90, fontsize=6)
    else:
        ax.set_xticks([(lo + hi) / 2 for _, lo, hi in spans])
        ax.set_xticklabels([f"{group} ({hi - lo + 1})" for group, lo, hi in spans])
    ax.set_xlim(min(positions) - 0.5, max(positions) + 0.5)


def sqnr_limits(rows: dict[str, tuple[dict, dict]]) -> tuple[float, float]:
    """One SQNR y-range for every candidate's plot, so their bars compare at a glance."""
    values = [v for result, _ in rows.values() for v in result["layer_sqnr_db"].values()] or [0.0]
    return min(0.0, min(values) - 2.0), max(values) + 5.0


def _sqnr_figure(layers: int):
    return plt.subplots(figsize=(max(8.0, layers * 0.16) if layers <= MAX_LAYER_TICKS else 14.0, 5.0))


def plot_sqnr(name: str, result: dict, groups: dict[str, str], ylim: tuple[float, float], out: Path) -> Path | None:
    """Layer-local output SQNR per quantized layer, coloured by group, with the mean as reference line."""
    sqnr = result["layer_sqnr_db"]
    if not sqnr:
        return None
    names, values = list(sqnr), list(sqnr.values())
    fig, ax = _sqnr_figure(len(names))
    colors = [GROUP_COLORS.get(group_of(groups, n), "tab:gray") for n in names]
    ax.bar(range(len(names)), values, width=0.8, color=colors)
    mean = sum(values) / len(values)
    ax.axhline(mean, color="black", linestyle="--", linewidth=0.9, label=f"mean {mean:.1f} dB")
    _layer_axis(ax, names, groups)
    ax.set_ylim(*ylim)
    ax.set_ylabel("output SQNR [dB] (higher is better)")
    ax.set_title(f"{name}: layer-local output SQNR of each quantized layer (model order)")
    present = dict.fromkeys(group_of(groups, n) for n in names)
    patches = [Patch(color=GROUP_COLORS.get(g, "tab:gray"), label=g) for g in present]
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], *patches], loc="lower right", fontsize=8)
    return _save(fig, out)


def plot_comparison(
    rows: dict[str, tuple[dict, dict]], groups: dict[str, str], model_order: list[str], out: Path
) -> Path | None:
    """Every candidate's per-layer SQNR on one axis, layers in model order (a layer one candidate
    keeps in float is a gap in its line)."""
    measured = {n for result, _ in rows.values() for n in result["layer_sqnr_db"]}
    layers = [n for n in model_order if n in measured]
    if not layers:
        return None
    index = {n: i for i, n in enumerate(layers)}
    fig, ax = _sqnr_figure(len(layers))
    for name, (result, _) in rows.items():
        sqnr = result["layer_sqnr_db"]
        ax.plot([index[n] for n in sqnr], list(sqnr.values()), marker="o", markersize=3, linewidth=1, label=name)
    _layer_axis(ax, layers, groups)
    ax.set_ylim(*sqnr_limits(rows))
    ax.set_ylabel("output SQNR [dB] (higher is better)")
    ax.set_title("Layer-local output SQNR, every candidate")
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_atm_ohb(name: str, quant_config: dict, out: Path) -> Path | None:
    """α per expert attention layer and head (heatmap), β raw and folded per layer with the neutral band."""
    atm_ohb = quant_config.get("atm_ohb")
    if not atm_ohb:
        return None
    alpha, beta, beta_raw = (np.asarray(atm_ohb[k], dtype=np.float64) for k in ("alpha", "beta", "beta_raw"))
    log_clamp = quant_config.get("atm_clamp", "log") == "log"
    band = math.exp(quant_config.get("neutral_log", 0.03))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    low, high = min(alpha.min(), 1 / 1.35), max(alpha.max(), 1.35)
    image = left.imshow(alpha.T, aspect="auto", cmap="coolwarm", norm=TwoSlopeNorm(1.0, low, high), origin="lower")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("expert attention layer")
    left.set_ylabel("head")
    left.set_title("ATM α (1 = unchanged)")
    fig.colorbar(image, ax=left)
    if not quant_config.get("atm", True):
        left.text(0.5, 0.5, "ATM off", transform=left.transAxes, ha="center", va="center")
    elif np.all(alpha == 1.0):
        left.text(0.5, 0.5, "every α is 1:\nno head left the neutral band", transform=left.transAxes,
                  ha="center", va="center", bbox={"facecolor": "white", "alpha": 0.85})  # fmt: skip
    x = np.arange(len(beta))
    if log_clamp:
        right.axhspan(1 / band, band, color="gray", alpha=0.2, label=f"neutral band (|log β| < {math.log(band):.2f})")
    right.plot(x, beta_raw, marker="x", linestyle=":", label="β raw (measured)")
    right.plot(x, beta, marker="o", label="β folded (after clamp and band)")
    right.axhline(1.0, color="black", linewidth=0.7)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("expert attention layer")
    right.set_title("OHB β" + ("" if quant_config.get("ohb", True) else " (OHB off)"))
    right.legend(fontsize=8)
    fig.suptitle(name)
    return _save(fig, out)


def summary_table(rows: dict[str, tuple[dict, dict]]) -> str:
    """Markdown table across candidates: name -> (fidelity result, quant_config)."""
    lines = [
        "| candidate | method | layout | bits | quantized layers | weight bytes vs bf16 | action rel. MSE | "
        "action cosine | mean layer SQNR dB | min layer SQNR dB | α, β moved |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (result, qc) in rows.items():
        sqnr = list(result["layer_sqnr_db"].values()) or [float("nan")]
        ratio = qc.get("weight_bytes", {}).get("ratio")
        moved = atm_ohb_summary(qc)
        moved_text = "" if moved is None else f"{moved['atm']['moved']}/{moved['atm']['heads']} heads, "
        moved_text += "" if moved is None else f"{moved['ohb']['moved']}/{moved['ohb']['layers']} layers"
        lines.append(
            f"| {name} | {qc.get('method')} | {qc.get('layout', {}).get('name')} "
            f"| W{qc.get('w_bits')}A{qc.get('a_bits')} "
            f"| {len(qc.get('modules', {}))} | {'' if ratio is None else f'{ratio:.3f}'} "
            f"| {result['action_relative_mse']:.4g} | {result['action_cosine']:.4f} "
            f"| {sum(sqnr) / len(sqnr):.1f} | {min(sqnr):.1f} | {moved_text} |"
        )
    return "\n".join(lines) + "\n"


def start_report(out_dir: Path, overwrite: bool = False) -> None:
    """Make `out_dir` ready for a report: new, empty, or (with overwrite) an earlier report, cleared."""
    if check_output_folder(out_dir, "Fidelity report folder", REPORT_OUTPUT, overwrite):
        shutil.rmtree(out_dir)  # holds only an earlier report's files (REPORT_OUTPUT checked)
    out_dir.mkdir(parents=True, exist_ok=True)


def write_report(rows: dict[str, tuple[dict, dict]], reference: nn.Module, out_dir: Path) -> Path:
    """Every candidate so far: its JSON and plots, the comparison plot and summary.md. Called after
    each candidate, so a long run shows its results as they come; every SQNR plot is redrawn on
    the y-range of all candidates so far. `reference` (the float model) gives the layer groups and order."""
    groups = reference.LINEAR_GROUPS
    ylim = sqnr_limits(rows)
    for name, (result, qc) in rows.items():
        plots = [
            plot_sqnr(name, result, groups, ylim, out_dir / f"{name}_layer_sqnr.png"),
            plot_atm_ohb(name, qc, out_dir / f"{name}_atm_ohb.png"),
        ]
        record = {**result, "quant_config": qc, "plots": [p.name for p in plots if p is not None]}
        write_json_atomic(out_dir / f"{name}.json", record)
    order = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear)]
    plot_comparison(rows, groups, order, out_dir / "sqnr_comparison.png")
    summary = out_dir / "summary.md"
    write_bytes_atomic(summary, summary_table(rows).encode())
    return summary
