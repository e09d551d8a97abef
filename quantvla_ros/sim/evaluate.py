"""Closed-loop success rates of a policy on MetaWorld tasks, in-process.

    python -m quantvla_ros.sim.evaluate --policy policies/demo_pi05 --episodes 10 --seed 1000 \\
        --out build/eval_demo_pi05

Each episode resets the task with seed `seed + i` (the demos use seeds from 0, so the default
1000 evaluates on placements the policy never saw), then repeatedly asks the policy for an
action chunk and executes its first K actions, until success or the step limit. Sampling noise
comes from a generator seeded per episode, so a run is repeatable. Writes `results.json` and
`results.md` (a markdown table) to `--out`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from quantvla_ros.atomic import write_bytes_atomic, write_json_atomic
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.loader import load_policy
from quantvla_ros.models.policy import Observation, Policy
from quantvla_ros.outputs import OutputKind, check_output_folder, only_entries
from quantvla_ros.progress import Progress as tqdm
from quantvla_ros.sim.env import MAX_STEPS, SimEnv
from quantvla_ros.sim.tasks import DEFAULT_TASKS, INSTRUCTIONS


def run_episode(
    policy: Policy, env: SimEnv, seed: int, execute_steps: int, latencies: list[float] | None = None
) -> tuple[bool, int]:
    """One closed-loop episode; returns (success, steps taken) and adds each inference's seconds to `latencies`."""
    camera = policy.camera_names[0]
    rng = np.random.default_rng(seed)
    obs = env.reset(seed)
    while True:
        noise = rng.standard_normal((policy.horizon, policy.model.cfg.action_dim)).astype(np.float32)
        start = time.perf_counter()
        chunk = policy.predict(Observation({camera: obs.image}, obs.instruction, obs.state), noise)
        if latencies is not None:
            latencies.append(time.perf_counter() - start)
        for action in chunk.actions[:execute_steps]:
            obs, success, done = env.step(action)
            if done:
                return success, env.steps


def evaluate(
    policy: Policy,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    episodes: int = 10,
    seed: int = 1000,
    execute_steps: int = 5,
    max_steps: int = MAX_STEPS,
    width: int = 112,
    height: int = 112,
    camera: str = "scene",
) -> dict:
    """Success rate and mean episode length per task, plus their averages over the tasks."""
    if not 1 <= execute_steps <= policy.horizon:
        raise QuantVLAError(f"execute_steps is {execute_steps}; use 1 to the policy's horizon {policy.horizon}.")
    outcomes: dict[str, list[tuple[bool, int]]] = {}
    latencies: list[float] = []
    bar = tqdm(total=len(tasks) * episodes, desc="evaluating", unit="ep")
    for task in tasks:
        results = outcomes.setdefault(task, [])
        with SimEnv(task, width, height, camera, max_steps=max_steps) as env:
            for i in range(episodes):
                results.append(run_episode(policy, env, seed + i, execute_steps, latencies))
                bar.set_postfix(task=task, success=sum(s for s, _ in results))
                bar.update()
    bar.close()
    return {
        **summarize(outcomes, episodes, seed, execute_steps, max_steps),
        "policy_latency_p50_ms": round(1e3 * float(np.median(latencies)), 2),
        "via": "in-process",
    }


def summarize(
    outcomes: dict[str, list[tuple[bool, int]]], episodes: int, seed: int, execute_steps: int, max_steps: int
) -> dict:
    """(success, steps) per episode and task -> success rate and mean length per task and overall."""
    per_task = {
        task: {
            "success_rate": float(np.mean([s for s, _ in results])),
            "mean_length": float(np.mean([n for _, n in results])),
            "successes": [bool(s) for s, _ in results],
        }
        for task, results in outcomes.items()
    }
    return {
        "tasks": per_task,
        "mean_success_rate": float(np.mean([r["success_rate"] for r in per_task.values()])),
        "mean_length": float(np.mean([r["mean_length"] for r in per_task.values()])),
        "episodes": episodes,
        "seed": seed,
        "execute_steps": execute_steps,
        "max_steps": max_steps,
    }


RESULTS_OUTPUT = OutputKind("evaluation results", lambda p: only_entries(p, names={"results.json", "results.md"}))


def write_results(result: dict, out: Path, overwrite: bool = False) -> str:
    """results.json and results.md in `out` (earlier results there only with `overwrite`); returns the table."""
    table = markdown_table(result)
    check_output_folder(out, "--out", RESULTS_OUTPUT, overwrite)
    write_json_atomic(out / "results.json", result)
    write_bytes_atomic(out / "results.md", table.encode())
    return table


def markdown_table(result: dict) -> str:
    lines = ["| task | success | mean length |", "|---|---|---|"]
    for task, r in result["tasks"].items():
        lines.append(f"| {task} | {100 * r['success_rate']:.0f}% | {r['mean_length']:.1f} |")
    lines.append(f"| **mean** | **{100 * result['mean_success_rate']:.1f}%** | {result['mean_length']:.1f} |")
    latency = result.get("policy_latency_p50_ms")
    if latency is not None:
        lines.append(f"\nPolicy latency p50 ({result['via']}): {latency:.1f} ms")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Closed-loop MetaWorld success rates of a policy (in-process).")
    parser.add_argument("--policy", type=Path, required=True, help="checkpoint folder or quantized artifact")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(INSTRUCTIONS))
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--execute-steps", type=int, default=5, help="actions executed from each chunk")
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results at --out")
    args = parser.parse_args(argv)
    if args.out:
        check_output_folder(args.out, "--out", RESULTS_OUTPUT, args.overwrite)
    policy = load_policy(args.policy)
    start = time.time()
    result = evaluate(policy, args.tasks, args.episodes, args.seed, args.execute_steps, args.max_steps)
    result.update(policy=str(args.policy), seconds=round(time.time() - start, 1))
    print(markdown_table(result))
    if args.out:
        write_results(result, args.out, args.overwrite)


if __name__ == "__main__":
    main()
