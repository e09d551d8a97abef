"""`make demo`: the main job, end to end, on the embedded demo policy.

1. Record a demonstration bag per task from MetaWorld's scripted experts (the robot's own data).
2. Run the calibration node on those bags, the way launch starts it: it builds the calibration
   buffer with the policy node's own topic mapping and quantizes the shipped π0.5 demo policy
   with QuantVLA W4A8 into an artifact.
3. Start the simulator node and the policy node, talking over DDS on loopback, and run the same
   episodes (same tasks, seeds and sampling noise) with the float policy and the artifact.
4. Print success, latency and weight memory side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from quantvla_ros.atomic import write_bytes_atomic, write_json_atomic
from quantvla_ros.outputs import OutputKind, check_output_folder, only_entries
from quantvla_ros.paths import config_file, demo_policy
from quantvla_ros.sim.demos import record_task
from quantvla_ros.sim.ros_eval import evaluate_over_ros
from quantvla_ros.sim.tasks import DEFAULT_TASKS

EVAL_SEED = 1000  # placements the demo policy never saw (its demonstrations use seeds from 0)
CALIBRATION_SEED = 500
ARTIFACT_NAME = "demo_pi05_quantvla_w4a8"
DEMO_OUTPUT = OutputKind(
    "a demo folder",
    lambda p: only_entries(
        p, names={"bags", "calibration.yaml", "calibration.safetensors", ARTIFACT_NAME, "results.json"}
    ),
)


def _calibrate(policy: Path, bags: list[Path], out: Path) -> Path:
    """The calibration node as launch runs it: entry point + the policy node's params + calibration params."""
    artifact = out / ARTIFACT_NAME
    params = out / "calibration.yaml"
    write_bytes_atomic(
        params,
        yaml.safe_dump(
            {
                "/**": {
                    "ros__parameters": {
                        "policy_path": str(policy),
                        "bags": [str(b) for b in bags],
                        "buffer": str(out / "calibration.safetensors"),
                        "samples": 64,
                        "artifact": str(artifact),
                        "method": "quantvla",
                        "w_bits": 4,
                        "a_bits": 8,
                        "overwrite": True,  # the artifact of an earlier run in this demo folder
                    }
                }
            }
        ).encode(),
    )
    exe = Path(sys.executable).parent / "calibration_node"
    cmd = [str(exe), "--ros-args", "--params-file", str(config_file("sim_policy.yaml")), "--params-file", str(params)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ChildProcessError(
            f"The calibration node exited with code {done.returncode}; its log ends:\n"
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return artifact


def _weights(path: Path) -> dict:
    """Weight bytes of the quantized layers (bf16 vs stored) and of the whole folder's tensors."""
    quant_config = path / "quant_config.json"
    size = (path / "model.safetensors").stat().st_size
    if not quant_config.exists():
        return {"model_file_mib": size / 2**20, "layers": None}
    return {"model_file_mib": size / 2**20, "layers": json.loads(quant_config.read_text())["weight_bytes"]}


def run_demo(out_dir: Path = Path("build/demo"), episodes: int = 2, tasks: tuple[str, ...] = DEFAULT_TASKS) -> dict:
    # A rerun reuses its own folder (the bags are recorded once); any other folder is refused.
    check_output_folder(out_dir, "--out", DEMO_OUTPUT, overwrite=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = demo_policy()
    start = time.monotonic()
    print(f"[1/4] Demonstration bags from the scripted experts -> {out_dir / 'bags'}")
    bags = []
    for task in tasks:
        bag = out_dir / "bags" / task
        if not bag.exists():
            record_task(out_dir / "bags", task, episodes=1, seed=CALIBRATION_SEED)
        bags.append(bag)
    print("[2/4] Calibration node: bags -> calibration buffer -> QuantVLA W4A8 artifact")
    artifact = _calibrate(policy, bags, out_dir)
    rows = {}
    for step, (name, path) in enumerate((("float (fp32)", policy), ("QuantVLA W4A8", artifact)), start=3):
        print(f"[{step}/4] Sim node <-> policy node over DDS: {name}, {episodes} episode(s) x {len(tasks)} tasks")
        result = evaluate_over_ros(path, config_file("sim_policy.yaml"), list(tasks), episodes, EVAL_SEED)
        rows[name] = {"result": result, "weights": _weights(path), "path": str(path)}
    print_table(rows, tasks)
    print(f"Done in {time.monotonic() - start:.0f} s. Artifacts, bags and the buffer are in {out_dir}.")
    write_json_atomic(out_dir / "results.json", rows)
    return rows


def print_table(rows: dict, tasks: tuple[str, ...]) -> None:
    header = f"{'task':<22}" + "".join(f"{name:>18}" for name in rows)
    print("\nSuccess rate per task (same seeds and noise for both policies):")
    print(header)
    for task in tasks:
        cells = "".join(f"{100 * r['result']['tasks'][task]['success_rate']:>17.0f}%" for r in rows.values())
        print(f"{task:<22}{cells}")
    print(f"{'mean':<22}" + "".join(f"{100 * r['result']['mean_success_rate']:>17.1f}%" for r in rows.values()))
    print(f"{'mean episode steps':<22}" + "".join(f"{r['result']['mean_length']:>18.1f}" for r in rows.values()))
    latency = [r["result"]["policy_latency_p50_ms"] for r in rows.values()]
    print(f"{'latency p50 (CPU)':<22}" + "".join(f"{'n/a' if v is None else f'{v:.1f} ms':>18}" for v in latency))
    print(f"{'model.safetensors':<22}" + "".join(f"{r['weights']['model_file_mib']:>14.2f} MiB" for r in rows.values()))
    layers = next((r["weights"]["layers"] for r in rows.values() if r["weights"]["layers"]), None)
    if layers:
        print(
            f"Quantized layers ({layers['modules']}): {layers['bf16'] / 2**20:.2f} MiB in bf16 -> "
            f"{layers['quantized'] / 2**20:.2f} MiB stored ({layers['ratio']:.2f}x)."
        )
    print(
        "On the CPU, QuantLinear runs the exact integer reference, which is slower than float matmul; "
        "the speed-up comes from the GPU kernels (bench/gemm.py)."
    )
