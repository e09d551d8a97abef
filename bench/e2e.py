"""End-to-end latency of one policy inference: eager PyTorch against the engine, float and QuantVLA.

    python bench/e2e.py --json bench/e2e.json        # full-size π0.5 on the GPU, random weights
    python bench/e2e.py --config small                # a small π0.5 with the real input shapes, runs on the CPU
    python bench/e2e.py --model groot                 # full-size GR00T N1.5 on the GPU (--config small: CPU)
    python bench/e2e.py --model smolvla               # full-size SmolVLA on the GPU (--config small: CPU)

Full size, batch 1: π0.5 with 3 cameras at 224 px, 200 prompt slots, horizon 50, 10 Euler steps;
GR00T N1.5 with 1 camera at 224 px, its 392-slot prompt budget, horizon 16, 4 Euler steps;
SmolVLA with 3 cameras at 512 px, 48 prompt slots, horizon 50, 10 Euler steps. `--config`
defaults to full on CUDA and small elsewhere. Variants, all in one run on one card (float32
instead of bf16 on the CPU):

    bf16 eager        the model's own sample_actions: its stages over a fresh workspace, the
                      timestep schedule computed on every call
    bf16 optimized    the same stages through the engine (StagedEngine): the workspace kept, the
                      schedule computed once, a CUDA graph per stage
    W4A8 optimized    the same engine over the QuantVLA layout (every LLM Linear and the action
    W4A4 optimized    expert's MLPs) as QuantLinears with dynamic per-token activations

The quantized variants are built without calibration data: `quantize_` with the `quantvla`
method minus what needs data — the QuantVLA layout, MSE-clipped weights, and the DuQuant-style
input transform of each quantized layer (block-Hadamard rotations with signs and the zigzag
permutation, applied at run time by the fused transform+quantize kernel on CUDA) without its
smoothing, and atm=False, ohb=False. That is the full method's run-time work on random weights:
ATM's α and OHB's β fold into existing weights and cost nothing at run time, and smoothing is one
division inside the same fused kernel; calibration data only changes values, not work.

Per variant: median milliseconds over --runs after --warmup of each stage (vision: the model's
embed(), prefix: its prefix(), denoise: all Euler steps, eager including the schedule), timed with
a device sync after each stage, and of the whole call timed on its own; peak GPU memory
(max_memory_allocated, reset before each variant, weights included). Ratios are against bf16
eager and bf16 optimized from the same run. The floor of each stage is max(weight and K/V bytes
read / copy bandwidth, FLOPs / bf16 matmul rate), with both rates measured in this run (a 1 GiB
device-to-device copy, an 8192³ bf16 matmul), weights counted as each variant stores them,
quantized layers at the bf16 rate too. --json is rewritten after every variant, so a run cut
short by a time limit keeps what it measured. Not a test.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from quantvla_ros.atomic import write_json_atomic
from quantvla_ros.engine.staged import StagedEngine
from quantvla_ros.models.groot.config import groot_n15_full, small_groot
from quantvla_ros.models.groot.model import CategorySpecificLinear, GR00TN15Model
from quantvla_ros.models.pi0.config import pi05_full, small_pi05
from quantvla_ros.models.pi0.model import PI0Model
from quantvla_ros.models.smolvla.config import small_smolvla, smolvla_full
from quantvla_ros.models.smolvla.model import SmolVLAModel
from quantvla_ros.models.stages import StagedModel
from quantvla_ros.quant.api import quantize_
from quantvla_ros.quant.config import method_config
from quantvla_ros.quant.layout import LAYOUTS
from quantvla_ros.quant.linear import QuantLinear
from quantvla_ros.quant.memory import layout_memory

STAGES = ("vision", "prefix", "denoise")
# name, (weight bits, activation bits) or None for float, engine or eager
VARIANTS = [
    ("eager", None, False),
    ("optimized", None, True),
    ("W4A8 optimized", (4, 8), True),
    ("W4A4 optimized", (4, 4), True),
]


@dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k)

    def floor_ms(self, bandwidth: float, rate: float) -> float:
        return 1e3 * max(self.bytes / bandwidth, self.flops / rate)


# ---- stages: every family's own, eager or through the engine -----------------------------------
def run_stages(model: StagedModel, batch: dict, optimized: bool, compile: bool):
    """({stage name: fn}, fn of the whole call) over one batch."""
    if optimized:
        engine = StagedEngine(model, compile=compile)
        engine.load(**batch)
        stages = {"vision": engine.embed, "prefix": engine.prefix, "denoise": engine.denoise}
        return stages, lambda: engine.sample_actions(**batch)
    ws = model.workspace(tuple(batch["images"].shape), batch["tokens"].shape[1])
    ws.load(**batch)
    stages = {
        "vision": functools.partial(model.embed, ws),
        "prefix": functools.partial(model.prefix, ws),
        "denoise": lambda: model.denoise(ws, model.step_constants(model.cfg.num_steps)),
    }
    return stages, lambda: model.sample_actions(**batch)


# ---- costs: FLOPs and bytes per stage, for the floor -------------------------------------------
def linear_cost(modules: list[nn.Module], tokens: int) -> Cost:
    """FLOPs of `tokens` rows through each Linear / QuantLinear, and the bytes of its weight as stored."""
    cost = Cost()
    for m in modules:
        if isinstance(m, QuantLinear):
            weight_bytes = m.weight_bytes()
        else:
            weight_bytes = m.weight.numel() * m.weight.element_size()
        cost += Cost(2 * tokens * m.in_features * m.out_features, weight_bytes)
    return cost


def linears(module: nn.Module, skip: tuple[str, ...] = ()) -> list[nn.Module]:
    return [
        m
        for name, m in module.named_modules()
        if isinstance(m, (nn.Linear, QuantLinear)) and not any(name.endswith(s) for s in skip)
    ]


def pi0_costs(model: PI0Model, batch: dict) -> dict[str, Cost]:
    cfg, (b, cams) = model.cfg, batch["images"].shape[:2]
    vis, llm, exp = cfg.vision, cfg.llm, cfg.expert
    pali = model.paligemma_with_expert.paligemma.model
    images, patches = b * cams, vis.num_patches
    conv = pali.vision_tower.vision_model.embeddings.patch_embedding
    vision = linear_cost(linears(pali.vision_tower) + [pali.multi_modal_projector.linear], images * patches)
    vision += Cost(2 * images * patches * conv.weight.numel(), conv.weight.numel() * conv.weight.element_size())
    vision += Cost(vis.depth * images * 4 * patches**2 * vis.width)
    p = cams * patches + batch["tokens"].shape[1]
    heads = llm.num_heads * llm.head_dim
    prefix = linear_cost(linears(model.llm), b * p) + Cost(llm.depth * b * 4 * p * p * heads)
    s = cfg.action_horizon + (0 if cfg.pi05 else 1)
    # adaRMS modulations and the time MLP depend only on the schedule: the engine precomputes them.
    step = linear_cost(linears(model.expert, skip=("dense",)), b * s)
    projections = [model.action_in_proj, model.action_out_proj]
    if not cfg.pi05:
        projections += [model.action_time_mlp_in, model.action_time_mlp_out]
    step += linear_cost(projections, b * cfg.action_horizon)
    kv_bytes = llm.depth * 2 * b * llm.num_kv_heads * (p + s) * llm.head_dim * model.compute_dtype.itemsize
    step += Cost(exp.depth * b * 4 * s * (p + s) * heads, kv_bytes)
    return {"vision": vision, "prefix": prefix, "denoise": step * cfg.num_steps}


def category_cost(layer: CategorySpecificLinear, tokens: int, in_rows: int | None = None) -> Cost:
    """One embodiment's slice of a per-embodiment Linear (the first in_rows inputs, default all)."""
    weight = layer.W[0, :in_rows]
    return Cost(2 * tokens * weight.numel(), weight.numel() * weight.element_size())


def groot_costs(model: GR00TN15Model, batch: dict) -> dict[str, Cost]:
    cfg, (b, cams) = model.cfg, batch["images"].shape[:2]
    vis, llm, vl_sa = cfg.vision, cfg.llm, cfg.vl_self_attention
    eagle, head = model.backbone.eagle_model, model.action_head
    dit = head.model
    images, patches = b * cams, vis.num_patches
    conv = eagle.vision_model.vision_model.embeddings.patch_embedding
    vision = linear_cost(linears(eagle.vision_model) + linears(eagle.mlp1), images * patches)
    vision += Cost(2 * images * patches * conv.weight.numel(), conv.weight.numel() * conv.weight.element_size())
    vision += Cost(vis.depth * images * 4 * patches**2 * vis.width)
    length = batch["tokens"].shape[1]
    cross = [block.attn1 for i, block in enumerate(dit.transformer_blocks) if dit.is_cross(i)]
    prefix = linear_cost(linears(eagle.language_model) + linears(head.vl_self_attention), b * length)
    prefix += linear_cost([proj for attn in cross for proj in (attn.to_k, attn.to_v)], b * length)
    # Qwen3 is causal: half the score and value products of a full square.
    prefix += Cost(llm.depth * b * 2 * length**2 * llm.num_heads * llm.head_dim)
    prefix += Cost(vl_sa.depth * b * 4 * length**2 * vl_sa.width)
    # Per step: the DiT without its time layers (the engine precomputes every modulation) and without
    # the cross blocks' K/V projections (once per inference, above), then the output layer on the
    # action tokens only; the per-embodiment encoder's W2 sees only the action half.
    t, horizon, width = 1 + cfg.num_target_vision_tokens + cfg.action_horizon, cfg.action_horizon, cfg.dit.width
    step = Cost()
    for block in dit.transformer_blocks:
        attn = block.attn1
        kv = [] if attn in cross else [attn.to_k, attn.to_v]
        step += linear_cost([attn.to_q, *kv, attn.to_out[0], *linears(block.ff)], b * t)
        keys = length if attn in cross else t
        step += Cost(4 * b * t * keys * width)
    step += linear_cost([dit.proj_out_2], b * horizon)
    encoder, decoder = head.action_encoder, head.action_decoder
    step += category_cost(encoder.W1, b * horizon) + category_cost(encoder.W2, b * horizon, encoder.width)
    step += category_cost(encoder.W3, b * horizon)
    step += category_cost(decoder.layer1, b * horizon) + category_cost(decoder.layer2, b * horizon)
    step += Cost(0, len(cross) * 2 * b * length * width * model.compute_dtype.itemsize)
    state = category_cost(head.state_encoder.layer1, b) + category_cost(head.state_encoder.layer2, b)
    return {"vision": vision, "prefix": prefix, "denoise": step * cfg.num_steps + state}


def smolvla_costs(model: SmolVLAModel, batch: dict) -> dict[str, Cost]:
    cfg, (b, cams) = model.cfg, batch["images"].shape[:2]
    vis, text, width = cfg.vlm.vision, cfg.text, cfg.expert.width
    vlm = model.vlm
    images, patches, per_image = b * cams, vis.num_patches, cfg.vlm.tokens_per_image
    conv = vlm.vision_model.embeddings.patch_embedding
    vision = linear_cost(linears(vlm.vision_model), images * patches)
    vision += linear_cost(linears(vlm.connector), images * per_image) + linear_cost([model.state_proj], b)
    vision += Cost(2 * images * patches * conv.weight.numel(), conv.weight.numel() * conv.weight.element_size())
    vision += Cost(vis.depth * images * 4 * patches**2 * vis.width)
    p, s = cams * per_image + batch["tokens"].shape[1] + 1, cfg.action_horizon
    heads = text.num_heads * text.head_dim
    # The last text layer's output is never read: its o_proj and MLP do not run.
    last = model.llm.layers[-1]
    unused = [last.self_attn.o_proj, *linears(last.mlp)]
    prefix = linear_cost([m for m in linears(model.llm) if m not in unused], b * p)
    prefix += Cost(text.depth * b * 4 * p * p * heads)
    # The cross layers' k/v_proj re-project the prefix K/V once per inference, not per step.
    cross = [layer.self_attn for i, layer in enumerate(model.expert.layers) if cfg.is_cross_layer(i)]
    cross_kv = [proj for attn in cross for proj in (attn.k_proj, attn.v_proj)]
    prefix += linear_cost(cross_kv, b * p)
    step = linear_cost([m for m in linears(model.expert) if m not in cross_kv], b * s)
    step += linear_cost([model.action_in_proj, model.action_out_proj, model.action_time_mlp_out], b * s)
    # action_time_mlp_in's time half is in the engine's schedule: only its action half runs.
    action_half = model.action_time_mlp_in.weight[:, :width]
    step += Cost(2 * b * s * action_half.numel(), action_half.numel() * action_half.element_size())
    itemsize = model.compute_dtype.itemsize
    for i in range(cfg.expert.depth):
        keys = p if cfg.is_cross_layer(i) else p + s
        step += Cost(4 * b * s * keys * heads, 2 * b * text.num_kv_heads * keys * text.head_dim * itemsize)
    return {"vision": vision, "prefix": prefix, "denoise": step * cfg.num_steps}


@dataclass(frozen=True)
class ModelEntry:
    build: type[StagedModel]
    configs: dict[str, Callable[[], object]]
    costs: Callable[[nn.Module, dict], dict[str, Cost]]  # model, batch -> cost per stage


MODELS = {
    "pi05": ModelEntry(
        PI0Model,
        {"full": pi05_full, "small": lambda: small_pi05().with_changes(action_horizon=50, num_steps=10)},
        pi0_costs,
    ),
    "groot": ModelEntry(GR00TN15Model, {"full": groot_n15_full, "small": small_groot}, groot_costs),
    "smolvla": ModelEntry(SmolVLAModel, {"full": smolvla_full, "small": small_smolvla}, smolvla_costs),
}


# ---- measurement ----------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], None], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    sync(device)
    return 1e3 * (time.perf_counter() - t0)


def ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and matmul FLOP/s in the variants' float dtype."""
    copy_bytes, n = (2**30, 8192) if device.type == "cuda" else (2**26, 1024)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    copy_s = statistics.median(timed_ms(lambda: dst.copy_(src), device) for _ in range(10)) / 1e3
    mm_s = statistics.median(timed_ms(lambda: a @ b, device) for _ in range(10)) / 1e3
    return {"bandwidth_Bps": 2 * copy_bytes / copy_s, "matmul_flops": 2 * n**3 / mm_s, "matmul_n": n}


@torch.no_grad()
def run_variant(model: StagedModel, batch: dict, optimized: bool, args, device: torch.device) -> dict:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stages, whole = run_stages(model, batch, optimized, args.compile)
    for _ in range(args.warmup):
        whole()
        for fn in stages.values():
            fn()
    sync(device)
    per_stage = {name: [] for name in stages}
    for _ in range(args.runs):
        for name, fn in stages.items():
            per_stage[name].append(timed_ms(fn, device))
    total = [timed_ms(whole, device) for _ in range(args.runs)]
    result = {name: statistics.median(v) for name, v in per_stage.items()}
    result["total"] = statistics.median(total)
    result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result


def print_table(rows: list[dict]) -> None:
    head = f"{'variant':<20}" + "".join(f"{s + ' ms':>12}" for s in (*STAGES, "total"))
    head += f"{'peak GiB':>10}{'vs eager':>10}{'vs opt':>9}{'floor ms':>10}{'of floor':>10}"
    print(head)
    for r in rows:
        line = f"{r['variant']:<20}" + "".join(f"{r['ms'][s]:>12.2f}" for s in (*STAGES, "total"))
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        line += f"{peak:>10}{r['vs_eager']:>9.2f}x{r['vs_optimized']:>8.2f}x"
        line += f"{r['floor_ms']['total']:>10.2f}{r['floor_ms']['total'] / r['ms']['total']:>9.0%}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="pi05")
    parser.add_argument("--config", choices=["full", "small"], help="full (default on CUDA) or small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, help="timed runs per variant (default 50 on CUDA, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 5 on CUDA, 1 on the CPU)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the engine's stages")
    parser.add_argument("--json", help="also write the results to this file (after every variant)")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; run on a GPU machine or pass --device cpu --config small.")
    args.config = args.config or ("full" if cuda else "small")
    args.runs = args.runs or (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    float_name = "bf16" if cuda else "fp32"
    entry = MODELS[args.model]
    cfg = entry.configs[args.config]()
    card = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{args.model} {args.config} on {card}, torch {torch.__version__}, {args.runs} runs after {args.warmup}")

    caps = ceilings(device, dtype)
    print(
        f"ceilings: copy {caps['bandwidth_Bps'] / 1e12:.2f} TB/s, {float_name} matmul "
        f"{caps['matmul_flops'] / 1e12:.1f} TFLOP/s ({caps['matmul_n']}³)"
    )
    layout = LAYOUTS["quantvla"]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": card,
        "torch": torch.__version__,
        "model": args.model,
        "config": args.config,
        "runs": args.runs,
        "warmup": args.warmup,
        "compile": args.compile,
        "ceilings": caps,
        "rows": [],
    }
    rows, model = report["rows"], None
    for name, quant, optimized in VARIANTS:
        if model is None or quant is not None:
            model = None
            gc.collect()
            torch.manual_seed(0)
            with device:
                model = entry.build(cfg).set_dtype(dtype).eval()
            if "weight_memory" not in report:
                memory = layout_memory(
                    model, method_config("quantvla", layout=layout, w_bits=4, duquant_smoothing=False)
                )
                report["weight_memory"] = {
                    **{k: v for k, v in memory.items() if k != "modules"},
                    "linears": len(memory["modules"]),
                }
            if quant is not None:
                w_bits, a_bits = quant
                config = method_config(
                    "quantvla",
                    layout=layout,
                    w_bits=w_bits,
                    a_bits=a_bits,
                    atm=False,
                    ohb=False,
                    duquant_smoothing=False,
                )
                quantize_(model, config, progress=False)
        batch = model.example_inputs()
        label = name if quant else f"{float_name} {name}"
        t0 = time.perf_counter()
        result = run_variant(model, batch, optimized, args, device)
        costs = entry.costs(model, batch)
        floor = {s: c.floor_ms(caps["bandwidth_Bps"], caps["matmul_flops"]) for s, c in costs.items()}
        floor["total"] = sum(floor.values())
        rows.append(
            {
                "variant": label,
                "ms": {k: result[k] for k in (*STAGES, "total")},
                "peak_gib": result["peak_gib"],
                "floor_ms": floor,
                "gflops": {s: c.flops / 1e9 for s, c in costs.items()},
                "weight_and_kv_mb": {s: c.bytes / 1e6 for s, c in costs.items()},
            }
        )
        for r in rows:
            r["vs_eager"] = rows[0]["ms"]["total"] / r["ms"]["total"]
            r["vs_optimized"] = rows[1]["ms"]["total"] / r["ms"]["total"] if len(rows) > 1 else None
        if args.json:
            write_json_atomic(Path(args.json), report)
        print(f"  {label}: {result['total']:.2f} ms ({time.perf_counter() - t0:.0f} s with warm-up)")
    print()
    print_table(rows)
    memory, mib = report["weight_memory"], 2**20
    print(
        f"\nweight memory of the quantized components ({memory['layout']} layout, "
        f"{memory['linears']} Linears): bf16 {memory['bf16_bytes'] / mib:.1f} MiB -> "
        f"W4 {memory['quantized_bytes'] / mib:.1f} MiB ({memory['ratio']:.2f}x); whole model in bf16 "
        f"{memory['model_bf16_bytes'] / mib:.1f} -> {memory['model_quantized_bytes'] / mib:.1f} MiB"
    )
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
