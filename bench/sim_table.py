"""The project's own Table 2: closed-loop MetaWorld success of the demo policy, float vs quantized.

    python bench/sim_table.py --episodes 10 --out build/sim_table

Same tasks, seeds and sampling noise for every variant; in-process loop (`quantvla eval-sim`
runs the same through the ROS nodes). The calibration buffer comes from scripted-expert bags
recorded with other seeds than the evaluation's. Variants (weights and activations):

    float                  the shipped fp32 demo policy
    QuantVLA W4A8          selective layout + DuQuant-style transform + ATM + OHB
    QuantVLA W4A4          the same with 4-bit activations
    RTN W4A8               selective layout, round-to-nearest, no ATM/OHB
    DuQuant W4A8           selective layout + DuQuant-style transform, no ATM/OHB
    all-linear DuQuant W4A8  every LLM and expert linear (the paper's failing layout), no ATM/OHB

Also reports each variant's action fidelity on the buffer (relative MSE vs float) and the
stored bytes of its quantized layers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from quantvla_ros.data.bags import read_observations
from quantvla_ros.data.buffer import build_buffer
from quantvla_ros.data.mapping import TopicMapping, read_params_file
from quantvla_ros.loader import load_policy
from quantvla_ros.paths import config_file, demo_policy
from quantvla_ros.quant.api import quantize_
from quantvla_ros.quant.artifact import weight_bytes
from quantvla_ros.quant.config import method_config
from quantvla_ros.quant.fidelity import fidelity
from quantvla_ros.sim.demos import record_task
from quantvla_ros.sim.evaluate import evaluate
from quantvla_ros.sim.tasks import DEFAULT_TASKS

VARIANTS = {
    "QuantVLA W4A8": dict(method="quantvla"),
    "QuantVLA W4A4": dict(method="quantvla", a_bits=4),
    "RTN W4A8": dict(method="rtn"),
    "DuQuant W4A8": dict(method="duquant", layout_name="quantvla"),
    "all-linear DuQuant W4A8": dict(method="duquant"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=10, help="per task and variant")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--calibration-episodes", type=int, default=2, help="expert episodes per task to calibrate on")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("build/sim_table"))
    args = parser.parse_args()
    from quantvla_ros.quant.layout import LAYOUTS

    args.out.mkdir(parents=True, exist_ok=True)
    bags = []
    for task in DEFAULT_TASKS:
        bag = args.out / "bags" / task
        if not bag.exists():
            record_task(args.out / "bags", task, episodes=args.calibration_episodes, seed=500)
        bags.append(bag)
    mapping = TopicMapping.from_params(read_params_file(config_file("sim_policy.yaml"), "policy_node"))
    reference = load_policy(demo_policy())
    observations, sources = read_observations(bags, mapping, args.samples)
    buffer = build_buffer(reference, observations, sources)

    rows = {}
    start = time.monotonic()
    rows["float"] = {"eval": evaluate(reference, DEFAULT_TASKS, args.episodes, args.seed)}
    for name, spec in VARIANTS.items():
        spec = dict(spec)
        layout = spec.pop("layout_name", None)
        config = method_config(spec.pop("method"), layout=LAYOUTS[layout] if layout else None, **spec)
        candidate = load_policy(demo_policy())
        record = quantize_(candidate.model, config, buffer, progress=False)
        rows[name] = {
            "eval": evaluate(candidate, DEFAULT_TASKS, args.episodes, args.seed),
            "fidelity": {
                k: v
                for k, v in fidelity(reference, candidate, list(record.modules), buffer).items()
                if k != "layer_sqnr_db"
            },
            "weights": weight_bytes(candidate.model, list(record.modules)),
        }
        print(f"{name}: {100 * rows[name]['eval']['mean_success_rate']:.1f}% ({time.monotonic() - start:.0f} s)")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


def table(rows: dict) -> str:
    tasks = list(next(iter(rows.values()))["eval"]["tasks"])
    head = "| variant | " + " | ".join(tasks) + " | mean | action rel. MSE | quantized layers, bytes vs bf16 |"
    lines = [head, "|" + " --- |" * (len(tasks) + 4)]
    for name, row in rows.items():
        ev = row["eval"]
        cells = " | ".join(f"{100 * ev['tasks'][t]['success_rate']:.0f}%" for t in tasks)
        mse = row.get("fidelity", {}).get("action_relative_mse")
        w = row.get("weights")
        mse_text = "—" if mse is None else f"{mse:.4f}"
        bytes_text = "—" if w is None else f"{w['modules']} layers, {w['ratio']:.2f}x"
        lines.append(f"| {name} | {cells} | **{100 * ev['mean_success_rate']:.1f}%** | {mse_text} | {bytes_text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
