"""Fidelity of a quantized policy against its float reference, on a calibration-style buffer.

Same observations, same noise for both policies:
- actions: relative MSE  Σ(a_q − a_f)² / Σa_f²  and mean per-sample cosine, in the model's
  normalized action space over the robot's action dimensions;
- per-layer output SQNR of every quantized Linear, layer-local: the QuantLinear is fed the
  float layer's own inputs during the float run, so each number is that layer's error alone,
  not the error accumulated upstream (expert projections that carry a folded α/β include it);
- α per expert layer/head and β per layer, as recorded in the artifact.

Results: a JSON file and PNG plots per candidate, plus a markdown table across candidates.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # plots are files; never open a window on a robot
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from quantvla_ros.atomic import write_bytes_atomic, write_json_atomic
from quantvla_ros.models.policy import CalibrationSource, Policy
from quantvla_ros.outputs import OutputKind, check_output_folder, only_entries
from quantvla_ros.quant.statistics import sample_noise


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
) -> dict:
    """Both policies on every observation of `source` (prepared for `reference`), with the same noise."""
    cfg = reference.model.cfg
    noise = sample_noise(len(source), cfg.action_horizon, cfg.action_dim, seed)
    sqnr = LayerSQNR()

    def hook(name: str):
        twin = candidate.model.get_submodule(name)

        def compare(_module, args, out):
            sqnr.add(name, out, twin(args[0].to(next(twin.buffers()).device)).to(out.device))

        return compare

    hooks = [reference.model.get_submodule(n).register_forward_hook(hook(n)) for n in quantized]
    dims = reference.action_dim
    err = ref_power = 0.0
    cosines: list[float] = []
    try:
        start = 0
        batches = source.batches(batch_size, reference.device)
        for inputs in tqdm(batches, total=math.ceil(len(source) / batch_size), desc="fidelity", unit="batch"):
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


def plot_candidate(name: str, result: dict, quant_config: dict, out_dir: Path) -> list[Path]:
    """PNG plots: per-layer SQNR, and α (heatmap) / β per expert layer when the artifact has them."""
    written = []
    sqnr = result["layer_sqnr_db"]
    if sqnr:
        fig, ax = plt.subplots(figsize=(max(8, len(sqnr) * 0.06), 4))
        ax.bar(range(len(sqnr)), list(sqnr.values()), width=1.0, color="tab:blue")
        ax.set_xlabel("quantized layer (model order: LLM layers, then expert layers)")
        ax.set_ylabel("output SQNR [dB]")
        ax.set_title(f"{name}: layer-local output SQNR")
        fig.tight_layout()
        written.append(out_dir / f"{name}_layer_sqnr.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    atm_ohb = quant_config.get("atm_ohb")
    if atm_ohb:
        alpha = torch.tensor(atm_ohb["alpha"])
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        image = left.imshow(alpha.T.numpy(), aspect="auto", cmap="coolwarm", vmin=0.7, vmax=1.4)
        left.set_xlabel("expert layer")
        left.set_ylabel("head")
        left.set_title("ATM α")
        fig.colorbar(image, ax=left)
        right.plot(atm_ohb["beta"], marker="o", label="β (folded)")
        right.plot(atm_ohb["beta_raw"], marker="x", linestyle=":", label="β raw")
        right.axhline(1.0, color="gray", linewidth=0.8)
        right.set_xlabel("expert layer")
        right.set_title("OHB β")
        right.legend()
        fig.suptitle(name)
        fig.tight_layout()
        written.append(out_dir / f"{name}_atm_ohb.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def summary_table(rows: dict[str, tuple[dict, dict]]) -> str:
    """Markdown table across candidates: name -> (fidelity result, quant_config)."""
    lines = [
        "| candidate | method | layout | bits | quantized layers | weight bytes vs bf16 | action rel. MSE | "
        "action cosine | mean layer SQNR dB | min layer SQNR dB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (result, qc) in rows.items():
        sqnr = list(result["layer_sqnr_db"].values()) or [float("nan")]
        ratio = qc.get("weight_bytes", {}).get("ratio")
        lines.append(
            f"| {name} | {qc.get('method')} | {qc.get('layout', {}).get('name')} "
            f"| W{qc.get('w_bits')}A{qc.get('a_bits')} "
            f"| {len(qc.get('modules', {}))} | {'' if ratio is None else f'{ratio:.3f}'} "
            f"| {result['action_relative_mse']:.4g} | {result['action_cosine']:.4f} "
            f"| {sum(sqnr) / len(sqnr):.1f} | {min(sqnr):.1f} |"
        )
    return "\n".join(lines) + "\n"


REPORT_OUTPUT = OutputKind(
    "a fidelity report", lambda p: (p / "summary.md").is_file() and only_entries(p, suffixes={".json", ".png", ".md"})
)


def write_report(rows: dict[str, tuple[dict, dict]], out_dir: Path, overwrite: bool = False) -> Path:
    if check_output_folder(out_dir, "Fidelity report folder", REPORT_OUTPUT, overwrite):
        shutil.rmtree(out_dir)  # holds only an earlier report's files (REPORT_OUTPUT checked)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (result, qc) in rows.items():
        plots = plot_candidate(name, result, qc, out_dir)
        record = {**result, "quant_config": qc, "plots": [p.name for p in plots]}
        write_json_atomic(out_dir / f"{name}.json", record)
    summary = out_dir / "summary.md"
    write_bytes_atomic(summary, summary_table(rows).encode())
    return summary
