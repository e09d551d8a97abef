"""The `quantvla` command: thin wrappers over the layers."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from quantvla_ros.errors import QuantVLAError

DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _family_and_config(path: str, asset_id: str | None = None) -> tuple:
    """A checkpoint folder's family and config, or a published model's by name (REFERENCE_CONFIGS)."""
    from quantvla_ros.models.registry import REFERENCE_CONFIGS, family_for

    if path in REFERENCE_CONFIGS:
        family, make_config = REFERENCE_CONFIGS[path]
        return family, make_config(), None
    family, raw = family_for(Path(path))
    info = family.read_checkpoint(Path(path), raw, asset_id)
    return family, info.config, info


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from quantvla_ros.quant.artifact import is_artifact, read_quant_config
    from quantvla_ros.quant.summary import quantization_summary

    family, cfg, info = _family_and_config(args.path, args.asset_id)
    summary = {"config": args.path}
    if info is not None:
        summary = {
            "path": str(info.path),
            "layout": info.layout,
            "cameras": list(cfg.camera_names),
            "state_dim": info.state_dim,
            "action_dim": info.action_dim,
            "normalization": {"state": info.state_norm, "actions": info.action_norm},
        }
    with torch.device("meta"):
        model = family.build_model(cfg)
    counts = model.component_parameters()
    summary.update(
        model=model.display_name,
        horizon=cfg.action_horizon,
        denoising_steps=cfg.num_steps,
        parameters=counts,
        total_parameters=sum(counts.values()),
        bf16_weight_gib=round(2 * sum(counts.values()) / 2**30, 3),
    )
    if info is not None and is_artifact(info.path):
        summary["quantization"] = quantization_summary(read_quant_config(info.path), model.LINEAR_GROUPS)
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def _read_image(spec: str) -> tuple[str, np.ndarray]:
    from PIL import Image

    name, sep, file = spec.partition("=")
    if not sep:
        raise QuantVLAError(f"--image {spec!r} must look like CAMERA=FILE, e.g. base_0_rgb=frame.png.")
    try:
        with Image.open(file) as img:
            return name, np.asarray(img.convert("RGB"))
    except OSError as e:
        raise QuantVLAError(f"--image {file} could not be read as an image ({e}).") from None


def cmd_predict(args: argparse.Namespace) -> None:
    from quantvla_ros.loader import load_policy
    from quantvla_ros.models.policy import Observation, checked_state
    from quantvla_ros.models.registry import read_checkpoint

    # Arguments first: a typo should not wait for a model to load.
    try:
        state = np.array([float(v) for v in args.state.split(",")], np.float32)
    except ValueError:
        raise QuantVLAError(f"--state {args.state!r} must be comma-separated numbers.") from None
    obs = Observation(images=dict(_read_image(s) for s in args.image), instruction=args.instruction, state=state)
    info = read_checkpoint(Path(args.path), args.asset_id)  # its description only: no weights yet
    checked_state(obs, tuple(info.config.camera_names), info.state_dim, info.config.max_state_dim)
    policy = load_policy(args.path, device=args.device, dtype=_dtype(args.dtype), asset_id=args.asset_id)
    noise = None
    if args.seed is not None:
        cfg = policy.model.cfg
        noise = np.random.default_rng(args.seed).standard_normal((cfg.action_horizon, cfg.action_dim))
    start = time.perf_counter()
    chunk = policy.predict(obs, noise)
    latency_ms = 1e3 * (time.perf_counter() - start)
    out = {"model": policy.model.display_name, "device": str(policy.device), "latency_ms": round(latency_ms, 2)}
    if policy.info.action_names is not None:
        out["action_names"] = list(policy.info.action_names)
    out.update(dt=chunk.dt, actions=chunk.actions.round(6).tolist())
    print(json.dumps(out, ensure_ascii=False))


def _layout(args: argparse.Namespace):
    """--layout/--include/--exclude as a Layout, or None for the method's own."""
    from quantvla_ros.quant.config import METHODS
    from quantvla_ros.quant.layout import get_layout

    if args.layout is None and not args.include and not args.exclude:
        return None
    name = args.layout or ("custom" if args.include else METHODS[args.method or "quantvla"].layout.name)
    if args.include and name != "custom":
        raise QuantVLAError(f"--include builds a custom layout, but --layout is {name}; pass --layout custom with it.")
    return get_layout(name, args.include, args.exclude)


def _quant_config(args: argparse.Namespace, **more):
    """The QuantConfig the weight options name (method preset, then each given option), as `quantize`
    writes and `layout` estimates it."""
    from quantvla_ros.quant.config import method_config

    return method_config(
        args.method or "quantvla",
        layout=_layout(args),
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        group_size=args.group_size,
        transform=args.transform,
        smoothquant_alpha=args.smoothquant_alpha,
        duquant_rotation=args.duquant_rotation,
        static_activations=True if args.static_activations else None,
        duquant_smoothing=False if args.no_duquant_smoothing else None,
        asymmetric_activations=None if args.activations is None else args.activations == "asymmetric",
        **more,
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cmd_layout(args: argparse.Namespace) -> None:
    import torch

    from quantvla_ros.quant.artifact import is_artifact, read_quant_config
    from quantvla_ros.quant.memory import artifact_memory, layout_memory

    given = [f"--{name.replace('_', '-')}" for name in WEIGHT_OPTIONS if getattr(args, name) not in (None, False)]
    artifact = None
    if is_artifact(args.checkpoint):
        if given:
            raise QuantVLAError(
                f"{args.checkpoint} is an artifact, whose quantization is fixed; drop {', '.join(given)} "
                "or pass its float checkpoint to estimate another."
            )
        artifact = read_quant_config(Path(args.checkpoint))
    else:
        config = _quant_config(args)
    family, cfg, _ = _family_and_config(args.checkpoint)
    with torch.device("meta"):
        model = family.build_model(cfg)
    if artifact is not None:
        report = artifact_memory(model, artifact)
        method, bits, group = artifact["method"], f"W{artifact['w_bits']}A{artifact['a_bits']}", artifact["group_size"]
    else:
        report = layout_memory(model, config)
        method, bits, group = config.method, config.linear.bits, config.linear.group_size
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    for row in report["modules"]:
        print(f"{row['name']:<72} {row['out_features']:>6}x{row['in_features']:<6} {row['quantized_bytes']:>12,} B")
    print(
        f"{method}, layout {report['layout']}: {report['quantized_linears']} of {report['linear_layers']} Linear "
        "layers quantized"
        + (
            ""
            if len(report["modules"]) == report["quantized_linears"]
            else f", as {len(report['modules'])} layers (q/k/v and gate/up fused),"
        )
        + f" to {bits}{'' if group is None else f' g{group}'}; their weights "
        f"{_size(report['bf16_bytes'])} bf16 -> {_size(report['quantized_bytes'])} ({report['ratio']:.3f}x); "
        f"whole model {_size(report['model_bf16_bytes'])} -> {_size(report['model_quantized_bytes'])}"
        + ("" if artifact is None else " (as the artifact stores them)")
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from quantvla_ros.data.buffer import load_buffer
    from quantvla_ros.models.policy import load_float_policy
    from quantvla_ros.outputs import check_output_folder
    from quantvla_ros.quant.api import quantize_
    from quantvla_ros.quant.artifact import ARTIFACT_OUTPUT, is_artifact, read_quant_config, save_artifact
    from quantvla_ros.quant.summary import written_lines

    config = _quant_config(
        args,
        atm=False if args.no_atm else None,
        ohb=False if args.no_ohb else None,
        atm_clamp=args.atm_clamp,
        stat_pooling=args.stat_pooling,
        atm_keys=args.atm_keys,
        clamp_log=args.clamp_log,
        sequential=True if args.atm_ohb_sequential else None,
        neutral_log=args.neutral_log,
        seed=args.seed,
    )
    if is_artifact(args.checkpoint):
        raise QuantVLAError(
            f"--checkpoint {args.checkpoint} is already a quantized artifact; pass the float checkpoint."
        )
    check_output_folder(args.out, "--out", ARTIFACT_OUTPUT, args.overwrite)
    buffer = None if args.calib is None else load_buffer(args.calib)
    policy = load_float_policy(args.checkpoint, device=args.device, dtype=_dtype(args.dtype), asset_id=args.asset_id)
    calibration = {}
    if buffer is not None:
        buffer.check_matches(policy, str(args.calib))
        calibration = {
            "buffer": str(args.calib),
            "samples": len(buffer),
            "sources": buffer.manifest.get("sources", []),
            "instructions": buffer.manifest.get("instructions", []),
            "seed": args.seed,
        }
    record = quantize_(policy.model, config, buffer, batch_size=args.batch_size)
    out = save_artifact(policy.model, policy.info, record, Path(args.out), calibration, args.overwrite)
    print(written_lines(str(out), read_quant_config(out), policy.model.LINEAR_GROUPS))


def cmd_fidelity(args: argparse.Namespace) -> None:
    from quantvla_ros.data.buffer import load_buffer
    from quantvla_ros.loader import load_policy
    from quantvla_ros.outputs import check_output_folder
    from quantvla_ros.quant.artifact import is_artifact
    from quantvla_ros.quant.fidelity import REPORT_OUTPUT, candidate_names, fidelity, start_report, write_report

    out = Path(args.out)
    check_output_folder(out, "--out", REPORT_OUTPUT, args.overwrite)
    for path in args.candidate:
        if not is_artifact(path):
            raise QuantVLAError(f"--candidate {path} is not a quantized artifact (no quant_config.json).")
    buffer = load_buffer(args.buffer)
    reference = load_policy(args.reference, device=args.device, asset_id=args.asset_id)
    buffer.check_matches(reference, f"--buffer {args.buffer}")
    start_report(out, args.overwrite)
    rows = {}
    for name, path in zip(candidate_names(args.candidate), args.candidate, strict=True):
        candidate = load_policy(path, device=args.device)
        modules = list(candidate.quant_config["modules"])
        result = fidelity(reference, candidate, modules, buffer, args.batch_size, desc=f"fidelity {name}")
        rows[name] = (result, candidate.quant_config)
        summary = write_report(rows, reference.model, out)
    print(summary.read_text())
    # The table alone does not say where the plots went; the default --out is easy to miss.
    print(f"Wrote {out}: {summary.name}, sqnr_comparison.png and each candidate's JSON and plots.")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from rclpy.parameter import Parameter

    from quantvla_ros.data.mapping import read_params_file
    from quantvla_ros.ros.calibration_node import CALIBRATION_PARAMETERS, run_calibration

    params = {k: v for k, v in CALIBRATION_PARAMETERS.items() if not isinstance(v, Parameter.Type)}
    for file in args.params_file:
        params.update(read_params_file(Path(file), "calibration_node"))
    overrides = {
        "policy_path": args.policy_path,
        "bags": args.bags,
        "buffer": args.buffer,
        "samples": args.samples,
        "artifact": args.artifact,
        "method": args.method,
        "device": args.device,
        "asset_id": args.asset_id,
        "overwrite": True if args.overwrite else None,
        "w_bits": args.w_bits,
        "a_bits": args.a_bits,
    }
    if not (args.artifact or params.get("artifact")) and (args.w_bits or args.a_bits):
        raise QuantVLAError("--w-bits and --a-bits set the artifact's bits; pass --artifact (or drop them).")
    params.update({k: v for k, v in overrides.items() if v is not None})
    run_calibration(params)


def cmd_eval_sim(args: argparse.Namespace) -> None:
    from quantvla_ros.outputs import check_output_folder
    from quantvla_ros.paths import config_file
    from quantvla_ros.sim.evaluate import RESULTS_OUTPUT, evaluate, markdown_table, write_results

    if args.out:
        check_output_folder(args.out, "--out", RESULTS_OUTPUT, args.overwrite)
    if args.ros:
        from quantvla_ros.sim.ros_eval import evaluate_over_ros

        params = Path(args.params_file) if args.params_file else config_file("sim_policy.yaml")
        result = evaluate_over_ros(Path(args.policy), params, args.tasks, args.episodes, args.seed, args.execute_steps)
    else:
        from quantvla_ros.loader import load_policy

        policy = load_policy(args.policy, device=args.device, asset_id=args.asset_id)
        result = evaluate(policy, args.tasks, args.episodes, args.seed, args.execute_steps)
    result["policy"] = args.policy
    print(markdown_table(result))
    if args.out:
        write_results(result, Path(args.out), args.overwrite)


def cmd_demo(args: argparse.Namespace) -> None:
    from quantvla_ros.demo import run_demo

    run_demo(Path(args.out), args.episodes)


DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"
# One checkpoint may carry statistics for several robots: openpi's assets/<asset_id>/ folders and
# GR00T's embodiment tags in experiment_cfg/metadata.json.
ASSET_HELP = "openpi asset folder or GR00T embodiment tag whose statistics to use (when there are several)"


# The choices of quant/config.py (METHODS, TRANSFORMS, STAT_POOLINGS, ATM_KEYS), spelled out so
# building the parser imports no torch; test/unit/test_cli_errors.py checks they agree.
METHOD_NAMES = ("quantvla", "rtn", "smoothquant", "duquant")
TRANSFORM_NAMES = ("none", "smoothquant", "duquant")
STAT_POOLING_NAMES = ("pooled", "per_call", "per_row")
ATM_KEY_NAMES = ("all", "own")
# The options that decide what quantize stores, so layout estimates with the same vocabulary.
WEIGHT_OPTIONS = (
    "method",
    "layout",
    "include",
    "exclude",
    "w_bits",
    "a_bits",
    "group_size",
    "transform",
    "smoothquant_alpha",
    "duquant_rotation",
    "static_activations",
    "activations",
    "no_duquant_smoothing",
)


def weight_options(p: argparse.ArgumentParser) -> None:
    """WEIGHT_OPTIONS; unset ones keep the method preset's value."""
    p.add_argument("--method", choices=METHOD_NAMES, help="preset (default quantvla); the options below refine it")
    p.add_argument("--layout", help="quantvla | llm_only | expert_all | llm_and_expert_all | custom (preset's)")
    p.add_argument("--include", action="append", help="module-name regex (with --layout custom)")
    p.add_argument("--exclude", action="append", help="module-name regex to keep in float")
    p.add_argument("--w-bits", type=int, choices=(4, 8), help="weight bits (preset: 4)")
    p.add_argument("--a-bits", type=int, choices=(4, 8, 16), help="activation bits, 16 = float (preset: 8)")
    p.add_argument("--group-size", type=int, help="per-group weight scales along K (64, 128)")
    p.add_argument("--transform", choices=TRANSFORM_NAMES, help="input transform (preset's: duquant for quantvla)")
    p.add_argument("--smoothquant-alpha", type=float, help="SmoothQuant migration strength (0.5)")
    p.add_argument("--duquant-rotation", choices=("hadamard", "svd"), help="DuQuant block rotations")
    p.add_argument(
        "--static-activations", action="store_true", help="static per-channel activation scales (p99.9) from --calib"
    )
    p.add_argument(
        "--activations",
        choices=("symmetric", "asymmetric"),
        help="per-token activation codes: symmetric (preset), or with a zero point (the paper's App. A)",
    )
    p.add_argument(
        "--no-duquant-smoothing", action="store_true", help="rotations and permutation only (the authors' code)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantvla", description="Quantized VLA policies for ROS 2.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="describe a checkpoint folder, or a published model at full size")
    info.add_argument("path", help="checkpoint folder, or pi0_full, pi05_full, groot_n1_5_full, smolvla_full")
    info.add_argument("--asset-id", help=ASSET_HELP)
    info.set_defaults(func=cmd_info)

    predict = sub.add_parser("predict", help="run a policy once on image files, an instruction and a state")
    predict.add_argument("path", help="float checkpoint folder or quantized artifact")
    predict.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="CAMERA=FILE",
        help="an image file for one of the policy's cameras (repeat per camera; `quantvla info` lists them)",
    )
    predict.add_argument("--instruction", required=True, help="the task in words, e.g. 'pick up the cup'")
    predict.add_argument("--state", required=True, help="comma-separated robot state in robot units")
    predict.add_argument("--device", default="auto", help=DEVICE_HELP)
    predict.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    predict.add_argument("--asset-id", help=ASSET_HELP)
    predict.add_argument("--seed", type=int, help="fix the sampling noise")
    predict.set_defaults(func=cmd_predict)

    layout = sub.add_parser(
        "layout", help="which Linears a quantization stores as integers, and the weight memory before/after"
    )
    layout.add_argument(
        "checkpoint",
        help="float checkpoint (estimate what quantize would write), artifact (what it stores), or pi0_full, "
        "pi05_full, groot_n1_5_full, smolvla_full",
    )
    weight_options(layout)
    layout.add_argument("--json", action="store_true")
    layout.set_defaults(func=cmd_layout)

    quantize = sub.add_parser("quantize", help="post-training quantization into a reusable artifact")
    quantize.add_argument("--checkpoint", required=True, help="float checkpoint folder")
    quantize.add_argument("--calib", help="calibration buffer (safetensors) for ATM/OHB and activation ranges")
    quantize.add_argument("--out", required=True, help="artifact folder to write (new or empty)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an earlier artifact at --out")
    weight_options(quantize)
    quantize.add_argument("--atm-clamp", choices=("log", "linear"), help="log ±0.3 (paper) or [0.7, 1.4] (code)")
    quantize.add_argument(
        "--stat-pooling",
        choices=STAT_POOLING_NAMES,
        help="ATM/OHB statistic: pooled moments, the authors' per-call average, or the shift-free per-row std",
    )
    quantize.add_argument(
        "--atm-keys", choices=ATM_KEY_NAMES, help="ATM logits over every key, or only the querying tokens' own"
    )
    quantize.add_argument("--no-atm", action="store_true", help="skip attention temperature matching")
    quantize.add_argument("--no-ohb", action="store_true", help="skip output head balancing")
    quantize.add_argument(
        "--atm-ohb-sequential", action="store_true", help="measure OHB's β after ATM's α is folded (default: at once)"
    )
    quantize.add_argument("--clamp-log", type=float, help="clamp |log α|, |log β| (0.3)")
    quantize.add_argument("--neutral-log", type=float, help="|log| below this sets α, β to 1 (0.03)")
    quantize.add_argument("--device", default="auto", help=DEVICE_HELP)
    quantize.add_argument("--asset-id", help=ASSET_HELP)
    quantize.add_argument("--dtype", choices=DTYPES)
    quantize.add_argument("--batch-size", type=int, default=8)
    quantize.add_argument("--seed", type=int, default=0)
    quantize.set_defaults(func=cmd_quantize)

    fid = sub.add_parser("fidelity", help="compare quantized artifacts with their float policy")
    fid.add_argument("--reference", required=True, help="float checkpoint folder")
    fid.add_argument("--candidate", action="append", required=True, help="artifact folder (repeatable)")
    fid.add_argument("--buffer", required=True, help="calibration-style buffer of observations")
    fid.add_argument("--out", default="build/fidelity", help="folder for JSON, PNG plots and summary.md")
    fid.add_argument("--overwrite", action="store_true", help="replace an earlier fidelity report at --out")
    fid.add_argument("--device", default="auto", help=DEVICE_HELP)
    fid.add_argument("--asset-id", help=ASSET_HELP + " (of the reference)")
    fid.add_argument("--batch-size", type=int, default=8)
    fid.set_defaults(func=cmd_fidelity)

    calib = sub.add_parser("calibrate", help="recorded bags -> calibration buffer (-> quantized artifact)")
    calib.add_argument(
        "--params-file", action="append", required=True, help="ROS 2 params YAML (policy.yaml, then calibration.yaml)"
    )
    calib.add_argument("--policy-path", help="float checkpoint folder")
    calib.add_argument("--bags", nargs="+", help="rosbag2 folders, ROS 1 .bag files, or folders of them")
    calib.add_argument("--buffer", help="calibration buffer to write")
    calib.add_argument("--samples", type=int)
    calib.add_argument("--artifact", help="also quantize into this artifact folder")
    calib.add_argument("--overwrite", action="store_true", help="replace an earlier artifact at --artifact")
    calib.add_argument("--method", choices=METHOD_NAMES)
    calib.add_argument("--w-bits", type=int, choices=(4, 8), help="the artifact's weight bits (params file: 4)")
    calib.add_argument("--a-bits", type=int, choices=(4, 8, 16), help="the artifact's activation bits (params file: 8)")
    calib.add_argument("--device", help=DEVICE_HELP)
    calib.add_argument("--asset-id", help=ASSET_HELP)
    calib.set_defaults(func=cmd_calibrate)

    from quantvla_ros.sim.tasks import DEFAULT_TASKS, INSTRUCTIONS

    ev = sub.add_parser("eval-sim", help="closed-loop MetaWorld success rate of a policy or artifact")
    ev.add_argument("--policy", required=True, help="checkpoint folder or quantized artifact")
    ev.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(INSTRUCTIONS))
    ev.add_argument("--episodes", type=int, default=10, help="per task")
    ev.add_argument("--seed", type=int, default=1000, help="episode i of each task uses seed + i")
    ev.add_argument("--execute-steps", type=int, default=5, help="actions executed from each chunk")
    ev.add_argument("--ros", action="store_true", help="through the sim node and the policy node over DDS")
    ev.add_argument("--params-file", help="policy node params for --ros (default config/sim_policy.yaml)")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.add_argument("--asset-id", help=ASSET_HELP + " (in-process runs)")
    ev.add_argument("--out", help="folder for results.json and results.md")
    ev.add_argument("--overwrite", action="store_true", help="replace earlier results at --out")
    ev.set_defaults(func=cmd_eval_sim)

    demo = sub.add_parser("demo", help="the main job on the embedded default policy")
    demo.add_argument("--out", default="build/demo")
    demo.add_argument("--episodes", type=int, default=2, help="per task and policy")
    demo.set_defaults(func=cmd_demo)
    for name, (_, text) in PASSTHROUGH.items():
        # Listed here; main() hands their arguments to their own parser (`quantvla record-demos --help`).
        sub.add_parser(name, help=text, add_help=False)
    return parser


# Commands whose own module parses the rest of the line (`quantvla record-demos --help`).
PASSTHROUGH = {
    "record-demos": ("quantvla_ros.sim.demos", "record scripted MetaWorld demonstrations as mcap bags"),
    "train-demo": ("quantvla_ros.sim.train", "train the small π0.5 demo policy on those bags"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        command = argv[0]

        def run() -> None:
            importlib.import_module(PASSTHROUGH[command][0]).main(argv[1:], prog=f"quantvla {command}")
    else:
        args = build_parser().parse_args(argv)
        command = args.command

        def run() -> None:
            args.func(args)

    try:
        run()
    except (QuantVLAError, ChildProcessError) as e:
        # User errors and failed child nodes end in their message (with the node's log); anything
        # else is a bug and keeps its traceback.
        print(f"quantvla {command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader stopped early (`quantvla info pi05_full | head`): not an error. Point stdout at
        # /dev/null so the interpreter's last flush does not raise again (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
