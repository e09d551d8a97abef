"""Train the demo policy: a small π0.5 on the scripted-expert bags, flow matching, on CPU.

    python -m quantvla_ros.sim.train --bags build/sim_demos --out policies/demo_pi05 --seed 0 --max-minutes 45

The bags are read back with `rosbags` (so training also proves the bag format): every control
step gives (camera frame, state, instruction, the next H expert actions), the chunk padded at
the episode end by repeating the last action. Norm stats (mean/std and q01/q99, openpi style)
come from all steps; the tokenizer is trained on the prompts. Inputs go through the loaded
`Policy` (its tokenizer, normalizer and state discretization), so training sees exactly what
inference will. Loss (openpi): t ~ Beta(1.5, 1)·0.999 + 0.001, x_t = t·noise + (1 − t)·a,
target u = noise − a, MSE against the model's own velocity (the inference stages, with autograd)
over the 4 real action dims.

The output folder is a complete checkpoint from the first save on (config.json, tokenizer.model,
assets/metaworld/norm_stats.json, model.safetensors, training.json), and the weights are
replaced atomically every `--save-every` steps, so an interrupted run leaves a usable policy.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from quantvla_ros.atomic import atomic_dir, write_json_atomic
from quantvla_ros.data.bags import expand_bags
from quantvla_ros.data.messages import image_to_rgb, joint_positions
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.gemma import GemmaConfig
from quantvla_ros.models.common.images import image_to_model
from quantvla_ros.models.common.normalizer import Normalizer, NormStats
from quantvla_ros.models.common.siglip import SiglipConfig
from quantvla_ros.models.common.tokenizer import PromptTokenizer, train_tokenizer
from quantvla_ros.models.pi0.checkpoint import save_pi0
from quantvla_ros.models.pi0.config import PI0Config
from quantvla_ros.models.pi0.model import PI0Model
from quantvla_ros.models.pi0.processor import resize_with_pad, tokenize_prompt
from quantvla_ros.models.policy import Observation, Policy, load_float_policy
from quantvla_ros.outputs import OutputKind, check_output_folder
from quantvla_ros.progress import Progress as tqdm
from quantvla_ros.sim.tasks import ACTION_NAMES, CONTROL_DT, STATE_NAMES

ASSET_ID = "metaworld"
CAMERA = "base_0_rgb"
HORIZON = 10
# ~2 M parameters: the openpi structure at widths a 2-core CPU trains in under an hour.
# action_dim is 16, not openpi's 32: it must hold the 10-D state (Policy.prepare pads the state
# to it) and the 4-D action, and fewer all-noise input dims leave the tiny expert less to ignore.
DEMO_CONFIG = PI0Config(
    pi05=True,
    llm=GemmaConfig(width=128, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=32),
    expert=GemmaConfig(width=64, depth=4, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=32),
    vision=SiglipConfig(image_size=64, patch_size=16, width=96, depth=4, num_heads=4, mlp_dim=384),
    action_dim=16,
    action_horizon=HORIZON,
    max_token_len=64,  # replaced by the longest prompt the data can produce
    num_steps=10,
    camera_names=(CAMERA,),
)


@dataclass
class Episode:
    instruction: str
    images: np.ndarray  # uint8 [T, H, W, 3]
    states: np.ndarray  # float32 [T, state_dim]
    actions: np.ndarray  # float32 [T, action_dim]


def read_episodes(bags: list[Path]) -> list[Episode]:
    """Episodes from demo bags: each /instruction starts one; the step topics share stamps."""
    typestore = get_typestore(Stores.ROS2_JAZZY)
    episodes = []
    for bag in tqdm(bags, desc="reading bags", unit="bag"):
        starts: list[tuple[int, str]] = []
        steps: dict[int, dict] = {}
        try:
            with AnyReader([bag], default_typestore=typestore) as reader:
                conns = [
                    c
                    for c in reader.connections
                    if c.topic in ("/instruction", "/camera/image_raw", "/joint_states", "/action")
                ]
                for conn, ns, raw in reader.messages(connections=conns):
                    msg = reader.deserialize(raw, conn.msgtype)
                    if conn.topic == "/instruction":
                        starts.append((ns, msg.data))
                    elif conn.topic == "/camera/image_raw":
                        steps.setdefault(ns, {})["image"] = image_to_rgb(msg)
                    elif conn.topic == "/joint_states":
                        steps.setdefault(ns, {})["state"] = joint_positions(msg, list(STATE_NAMES))
                    else:
                        steps.setdefault(ns, {})["action"] = np.asarray(msg.points[0].positions, np.float32)
        except Exception as e:  # rosbags raises many types for damaged bags
            raise QuantVLAError(f"Could not read demo bag {bag}: {e}") from None
        if not starts:
            raise QuantVLAError(f"Demo bag {bag} has no /instruction message; record it with quantvla_ros.sim.demos.")
        starts.sort()
        start_ns = [s for s, _ in starts]
        grouped: list[list[dict]] = [[] for _ in starts]
        for ns in sorted(steps):
            step = steps[ns]
            if len(step) == 3:  # steps missing a topic (a truncated bag's tail) are dropped
                grouped[max(bisect.bisect_right(start_ns, ns) - 1, 0)].append(step)
        for (_, text), group in zip(starts, grouped, strict=True):
            if group:
                episodes.append(
                    Episode(
                        instruction=text,
                        images=np.stack([s["image"] for s in group]),
                        states=np.stack([s["state"] for s in group]),
                        actions=np.stack([s["action"] for s in group]),
                    )
                )
    return episodes


def compute_stats(x: np.ndarray) -> NormStats:
    q01, q99 = np.quantile(x, 0.01, axis=0), np.quantile(x, 0.99, axis=0)
    # A dimension that never moves would divide by ~0; give it a unit span around its value.
    flat = (q99 - q01) < 1e-3
    q01, q99 = np.where(flat, q01 - 0.5, q01), np.where(flat, q99 + 0.5, q99)
    return NormStats(mean=x.mean(axis=0), std=x.std(axis=0), q01=q01, q99=q99)


class Samples:
    """Every control step as a training sample, held as compact arrays (uint8 images)."""

    def __init__(self, episodes: list[Episode], policy: Policy) -> None:
        size = policy.model.cfg.vision.image_size
        action_norm = Normalizer(policy.info.norm_stats["actions"], "quantiles")  # π0.5's mode, as in predict()
        self.images = np.stack([resize_with_pad(img, size, size) for ep in episodes for img in ep.images])
        self.actions = np.concatenate([action_norm.normalize(ep.actions) for ep in episodes])
        tokens, masks, ends = [], [], []
        end = 0
        for ep in tqdm(episodes, desc="tokenizing", unit="ep"):
            end += len(ep.states)
            for state in ep.states:
                # prepare() normalizes and discretizes the state into the prompt exactly as at inference.
                inputs = policy.prepare(Observation({CAMERA: ep.images[0]}, ep.instruction, state))
                tokens.append(inputs.tokens[0].numpy())
                masks.append(inputs.token_masks[0].numpy())
                ends.append(end)
        self.tokens, self.token_masks = np.stack(tokens), np.stack(masks)
        self.episode_end = np.asarray(ends)
        self.action_dim = policy.model.cfg.action_dim

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        # The chunk of sample i is actions[i .. i+H-1], clamped to its episode's last step.
        chunk = np.minimum(index[:, None] + np.arange(HORIZON)[None], self.episode_end[index, None] - 1)
        actions = np.zeros((len(index), HORIZON, self.action_dim), np.float32)
        actions[..., : self.actions.shape[1]] = self.actions[chunk]
        images = image_to_model(self.images[index]).transpose(0, 3, 1, 2)[:, None]
        return {
            "images": torch.from_numpy(np.ascontiguousarray(images)),
            "image_masks": torch.ones(len(index), 1, dtype=torch.bool),
            "tokens": torch.from_numpy(self.tokens[index]),
            "token_masks": torch.from_numpy(self.token_masks[index]),
            "actions": torch.from_numpy(actions),
        }


def flow_matching_loss(model: PI0Model, batch: dict[str, torch.Tensor], real_dims: int) -> torch.Tensor:
    actions = batch["actions"]
    b = actions.shape[0]
    noise = torch.randn_like(actions)
    t = torch.distributions.Beta(1.5, 1.0).sample((b,)) * 0.999 + 0.001
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    # The inference stages themselves, with autograd: embed and prefix fill a workspace, the velocity
    # reads it. π0.5 reads the state from the prompt, so zeros stand in for the state input.
    ws = model.workspace(tuple(batch["images"].shape), batch["tokens"].shape[1])
    prompt = [batch[name] for name in ("images", "image_masks", "tokens", "token_masks")]
    ws.load(*prompt, torch.zeros(b, model.cfg.max_state_dim), noise)
    model.embed(ws)
    model.prefix(ws)
    v_t = model.velocity(ws, x_t, model.time_constants(t), model.state_token(ws))
    return F.mse_loss(v_t[..., :real_dims], (noise - actions)[..., :real_dims])


def prompt_texts(episodes: list[Episode]) -> list[str]:
    """Tokenizer corpus: the prompts as π0.5 builds them, with varied state digits."""
    rng = np.random.default_rng(0)
    texts = []
    for text in sorted({ep.instruction for ep in episodes}):
        for _ in range(20):
            digits = " ".join(map(str, rng.integers(0, 256, len(STATE_NAMES))))
            texts.append(f"Task: {text}, State: {digits};\nAction: ")
    return texts


def longest_prompt(tokenizer: PromptTokenizer, episodes: list[Episode]) -> int:
    """Tokens of the longest prompt any state can produce (every state value three digits)."""
    state = np.full(len(STATE_NAMES), 255)
    return max(int(tokenize_prompt(tokenizer, ep.instruction, 512, state)[1].sum()) for ep in episodes)


def initial_checkpoint(out: Path, episodes: list[Episode], seed: int, cfg: PI0Config = DEMO_CONFIG) -> Policy:
    """Write tokenizer, config, norm stats and fresh weights to `out`; load them back as a Policy."""
    states = np.concatenate([ep.states for ep in episodes])
    actions = np.concatenate([ep.actions for ep in episodes])
    stats = {"state": compute_stats(states), "actions": compute_stats(actions)}
    # The first checkpoint replaces whatever `out` held in one rename (train() checked that may go).
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(out) as staging:
        train_tokenizer(Path(tmp), prompt_texts(episodes), vocab_size=320)
        tokenizer = PromptTokenizer.from_dir(Path(tmp))
        max_len = int(math.ceil(longest_prompt(tokenizer, episodes) / 8) * 8)
        cfg = cfg.with_changes(vocab_size=tokenizer.vocab_size, max_token_len=max_len)
        torch.manual_seed(seed)
        save_pi0(PI0Model(cfg), staging, "openpi", stats, Path(tmp), asset_id=ASSET_ID)
    return load_float_policy(out, device="cpu", dtype=torch.float32)


DEMO_CHECKPOINT = OutputKind("a checkpoint written by train-demo", lambda p: (p / "training.json").is_file())


def train(
    bags: Path,
    out: Path,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    save_every: int = 500,
    dt: float = CONTROL_DT,
    cfg: PI0Config = DEMO_CONFIG,
    max_minutes: float | None = None,
    overwrite: bool = False,
) -> dict:
    """Train on the bags under `bags` into the checkpoint folder `out`: a new or empty folder, or
    (with `overwrite`) a checkpoint this function wrote before; nothing else is ever replaced."""
    check_output_folder(out, "--out", DEMO_CHECKPOINT, overwrite)
    bag_dirs = expand_bags([Path(bags)])
    episodes = read_episodes(bag_dirs)
    if not episodes:
        raise QuantVLAError(f"No demo episodes found in {bags}; record some with quantvla_ros.sim.demos.")
    out = Path(out)
    policy = initial_checkpoint(out, episodes, seed, cfg)
    samples = Samples(episodes, policy)
    model = policy.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, betas=(0.9, 0.95))
    warmup = min(200, steps // 10)

    def progress(step: int, elapsed: float) -> float:
        """Fraction of the run done: by steps, or by wall clock when that budget binds first."""
        by_time = elapsed / (60 * max_minutes) if max_minutes else 0.0
        return max(step / steps, by_time)

    def lr_at(step: int, done: float) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    log = {
        "bags": [str(b) for b in bag_dirs],
        "episodes": len(episodes),
        "samples": len(samples),
        "tasks": sorted({ep.instruction for ep in episodes}),
        "state_names": list(STATE_NAMES),
        "action_names": list(ACTION_NAMES),
        "action_dt": dt,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "steps_planned": steps,
        "losses": [],
    }
    start, ema = time.time(), None
    bar = tqdm(range(steps), desc="training", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress(step, time.time() - start))
        loss = flow_matching_loss(model, samples.batch(rng.integers(0, len(samples), batch_size)), len(ACTION_NAMES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
        if (step + 1) % 50 == 0:
            log["losses"].append([step + 1, round(ema, 5)])
        out_of_time = progress(step + 1, time.time() - start) >= 1.0
        if (step + 1) % save_every == 0 or out_of_time:
            log.update(steps_done=step + 1, final_loss=round(ema, 5), train_seconds=round(time.time() - start, 1))
            _save(model, out, policy, log)
        if out_of_time:
            break
    bar.close()
    return log


def _save(model: PI0Model, out: Path, policy: Policy, log: dict) -> None:
    model.eval()
    save_pi0(model, out, "openpi", policy.info.norm_stats, asset_id=ASSET_ID)  # tokenizer already there
    write_json_atomic(out / "training.json", log)
    model.train()


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Train the small π0.5 demo policy on MetaWorld demo bags.")
    parser.add_argument("--bags", type=Path, required=True, help="a bag folder or a folder of bags")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (openpi layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint train-demo wrote at --out")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="wall-clock budget: the LR schedule follows whichever of steps and time runs out first, "
        "so a slow or shared CPU still ends with annealed weights (training.json records the steps)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 is the safe default on a shared machine, where OpenMP threads that "
        "wait for a descheduled sibling made a 2-thread run ~10x slower than a 1-thread one",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.bags.exists():
        parser.error(f"Bag path {args.bags} does not exist; record demos with python -m quantvla_ros.sim.demos.")
    log = train(
        args.bags, args.out, args.steps, args.seed, args.batch_size, args.lr, args.save_every,
        max_minutes=args.max_minutes, overwrite=args.overwrite,
    )  # fmt: skip
    print(json.dumps({k: v for k, v in log.items() if k != "losses"}, indent=2))


if __name__ == "__main__":
    main()
