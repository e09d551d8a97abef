"""The `quantvla` command: thin wrappers over the layers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from quantvla_ros.models.checkpoint import read_checkpoint
    from quantvla_ros.models.config import pi0_full, pi05_full
    from quantvla_ros.models.pi0 import PI0Model

    if args.path in ("pi05_full", "pi0_full"):
        cfg, summary = (pi05_full() if args.path == "pi05_full" else pi0_full()), {"config": args.path}
    else:
        info = read_checkpoint(Path(args.path), args.asset_id)
        cfg = info.config
        summary = {
            "path": str(info.path),
            "layout": info.layout,
            "cameras": list(cfg.camera_names),
            "state_dim": info.state_dim,
            "action_dim": info.action_dim,
            "normalization": {"state": info.state_norm, "actions": info.action_norm},
        }
    with torch.device("meta"):
        counts = PI0Model(cfg).component_parameters()
    summary.update(
        model="pi05" if cfg.pi05 else "pi0",
        horizon=cfg.action_horizon,
        denoising_steps=cfg.num_steps,
        parameters=counts,
        total_parameters=sum(counts.values()),
        bf16_weight_gib=round(2 * sum(counts.values()) / 2**30, 3),
    )
    print(json.dumps(summary, indent=2))


def _read_image(spec: str) -> tuple[str, np.ndarray]:
    from PIL import Image

    name, sep, file = spec.partition("=")
    if not sep:
        raise ValueError(f"--image {spec!r} must look like CAMERA=FILE, e.g. base_0_rgb=frame.png.")
    try:
        with Image.open(file) as img:
            return name, np.asarray(img.convert("RGB"))
    except OSError as e:
        raise ValueError(f"--image {file} could not be read as an image ({e}).") from None


def cmd_predict(args: argparse.Namespace) -> None:
    from quantvla_ros.models.policy import Observation, load_policy

    policy = load_policy(args.path, device=args.device, dtype=_dtype(args.dtype), asset_id=args.asset_id)
    try:
        state = np.array([float(v) for v in args.state.split(",")], np.float32)
    except ValueError:
        raise ValueError(f"--state {args.state!r} must be comma-separated numbers.") from None
    obs = Observation(images=dict(_read_image(s) for s in args.image), instruction=args.instruction, state=state)
    noise = None
    if args.seed is not None:
        cfg = policy.model.cfg
        noise = np.random.default_rng(args.seed).standard_normal((cfg.action_horizon, cfg.action_dim))
    print(json.dumps({"actions": policy.predict(obs, noise).actions.round(6).tolist()}))


def cmd_demo(args: argparse.Namespace) -> None:
    from quantvla_ros.demo import run_demo

    run_demo(Path(args.out), args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantvla", description="Quantized VLA policies for ROS 2.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="describe a checkpoint folder, or pi05_full / pi0_full")
    info.add_argument("path")
    info.add_argument("--asset-id", help="openpi asset folder to read statistics from")
    info.set_defaults(func=cmd_info)

    predict = sub.add_parser("predict", help="run a policy once on image files, an instruction and a state")
    predict.add_argument("path")
    predict.add_argument("--image", action="append", required=True, metavar="CAMERA=FILE")
    predict.add_argument("--instruction", required=True)
    predict.add_argument("--state", required=True, help="comma-separated robot state")
    predict.add_argument("--device", default="cpu")
    predict.add_argument("--dtype", choices=DTYPES)
    predict.add_argument("--asset-id")
    predict.add_argument("--seed", type=int, help="fix the sampling noise")
    predict.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="the main job on the embedded default policy")
    demo.add_argument("--out", default="build/demo")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"quantvla {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
