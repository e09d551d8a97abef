"""Latency and peak memory of one π0.5 inference (eager PyTorch), per stage and in total.

    python bench/latency.py                      # full-size π0.5 on a GPU, bf16
    python bench/latency.py --config small       # a small π0.5 with the real input shapes, runs anywhere

Random weights at the real shapes: 3 cameras at 224 px, 200 prompt slots, horizon 50, 10
Euler steps. Stages: vision (SigLIP + projector + prompt embedding), prefix (LLM pass that
fills the KV cache), denoise (all expert steps). Medians over --runs after --warmup.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from datetime import date

import torch

from quantvla_ros.models.pi0.config import pi05_full, small_pi05, tiny
from quantvla_ros.models.pi0.model import PI0Model

CONFIGS = {
    "pi05_full": lambda: pi05_full().with_changes(action_horizon=50, max_token_len=200, num_steps=10),
    "small": lambda: small_pi05().with_changes(action_horizon=50, num_steps=10),
    "tiny": lambda: tiny(True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_once(model: PI0Model, batch: dict, device: torch.device) -> dict[str, float]:
    cfg = model.cfg
    times = {}
    t0 = time.perf_counter()
    prefix = model.embed_prefix(batch["images"], batch["image_masks"], batch["tokens"], batch["token_masks"])
    sync(device)
    t1 = time.perf_counter()
    kv = model.compute_prefix_kv(*prefix)
    sync(device)
    t2 = time.perf_counter()
    x_t = batch["noise"]
    for step in range(cfg.num_steps):
        t = torch.full((1,), 1.0 - step / cfg.num_steps, device=device)
        x_t = x_t - model.velocity_cached(batch["state"], prefix[1], kv, x_t, t) / cfg.num_steps
    sync(device)
    t3 = time.perf_counter()
    times.update(vision=t1 - t0, prefix=t2 - t1, denoise=t3 - t2, total=t3 - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="pi05_full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = CONFIGS[args.config]()
    torch.manual_seed(0)
    with device:
        model = PI0Model(cfg).set_dtype(dtype).eval()
    size, cams = cfg.vision.image_size, len(cfg.camera_names)
    with device:
        batch = dict(
            images=torch.rand(1, cams, 3, size, size) * 2 - 1,
            image_masks=torch.ones(1, cams, dtype=torch.bool),
            tokens=torch.randint(0, cfg.vocab_size, (1, cfg.max_token_len)),
            token_masks=torch.ones(1, cfg.max_token_len, dtype=torch.bool),
            state=torch.zeros(1, cfg.action_dim),
            noise=torch.randn(1, cfg.action_horizon, cfg.action_dim),
        )
    for _ in range(args.warmup):
        run_once(model, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [run_once(model, batch, device) for _ in range(args.runs)]
    medians = {k: 1e3 * statistics.median(r[k] for r in runs) for k in runs[0]}
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        card = torch.cuda.get_device_name(device)
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        card = "CPU"
    params = sum(model.component_parameters().values())
    result = {
        "date": date.today().isoformat(),
        "device": card,
        "torch": torch.__version__,
        "config": args.config,
        "parameters": params,
        "dtype": str(dtype).removeprefix("torch."),
        "cameras": cams,
        "prompt_slots": cfg.max_token_len,
        "horizon": cfg.action_horizon,
        "steps": cfg.num_steps,
        "runs": args.runs,
        "median_ms": {k: round(v, 2) for k, v in medians.items()},
        "peak_memory_gib": round(peak_gib, 3),
    }
    print(f"{args.config} ({params / 1e9:.2f} B params, {result['dtype']}) on {card}, eager, {args.runs} runs")
    print("  " + "  ".join(f"{k} {v:8.2f} ms" for k, v in medians.items()))
    print(f"  peak memory {peak_gib:.2f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
