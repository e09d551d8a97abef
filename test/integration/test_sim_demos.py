"""Demo bags: what the generator writes, that rosbags reads it back, and that training learns from it."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from quantvla_ros.cli import main
from quantvla_ros.data.bags import read_observations
from quantvla_ros.data.mapping import TopicMapping, read_params_file
from quantvla_ros.loader import load_policy
from quantvla_ros.models.common.gemma import GemmaConfig
from quantvla_ros.models.common.siglip import SiglipConfig
from quantvla_ros.models.pi0.config import PI0Config
from quantvla_ros.paths import config_file
from quantvla_ros.sim.demos import TOPICS, record_task
from quantvla_ros.sim.tasks import ACTION_NAMES, CONTROL_DT, INSTRUCTIONS, STATE_NAMES
from quantvla_ros.sim.train import Samples, flow_matching_loss, initial_checkpoint, read_episodes, train

pytestmark = pytest.mark.integration

TINY = PI0Config(
    pi05=True,
    llm=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16),
    expert=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16),
    vision=SiglipConfig(image_size=32, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=64),
    action_dim=16,
    action_horizon=10,
    num_steps=3,
    camera_names=("base_0_rgb",),
)


@pytest.fixture(scope="module")
def bags(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demos")
    info = record_task(out, "reach", episodes=2, seed=0, width=48, height=32)
    assert info["episodes"] == 2 and info["failed_seeds"] == 0
    return out


def test_bag_topics_types_and_counts(bags):
    bag = bags / "reach"
    assert list(bag.glob("*.mcap")), "the bag is stored as mcap"
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_JAZZY)) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        assert {c.topic: c.msgtype for c in reader.connections} == TOPICS
        assert counts["/instruction"] == 2
        steps = counts["/camera/image_raw"]
        assert steps > 20 and all(counts[t] == steps for t in ("/joint_states", "/action", "/clock"))
        messages = {topic: [] for topic in TOPICS}
        for conn, ns, raw in reader.messages():
            messages[conn.topic].append((ns, reader.deserialize(raw, conn.msgtype)))
    assert [m.data for _, m in messages["/instruction"]] == [INSTRUCTIONS["reach"]] * 2
    ns, image = messages["/camera/image_raw"][1]
    assert (image.encoding, image.height, image.width, image.step) == ("rgb8", 32, 48, 144)
    assert image.header.stamp.sec * 10**9 + image.header.stamp.nanosec == ns == round(CONTROL_DT * 1e9)
    _, joints = messages["/joint_states"][0]
    assert list(joints.name) == list(STATE_NAMES) and len(joints.position) == len(STATE_NAMES)
    _, action = messages["/action"][0]
    assert list(action.joint_names) == list(ACTION_NAMES) and len(action.points) == 1
    assert len(action.points[0].positions) == 4 and np.all(np.abs(action.points[0].positions) <= 1)
    assert action.points[0].time_from_start.nanosec == round(CONTROL_DT * 1e9)
    # The second episode starts at its instruction, after a gap no single step spans.
    second = messages["/instruction"][1][0]
    stamps = [t for t, _ in messages["/action"]]
    assert second > stamps[0] and second - max(t for t in stamps if t < second) > 10 * CONTROL_DT * 1e9


def test_read_back_and_short_training_lowers_the_loss(bags, tmp_path):
    episodes = read_episodes([bags / "reach"])
    assert len(episodes) == 2 and all(ep.instruction == INSTRUCTIONS["reach"] for ep in episodes)
    assert episodes[0].images.shape[1:] == (32, 48, 3) and episodes[0].states.shape[1] == len(STATE_NAMES)
    policy = initial_checkpoint(tmp_path / "init", episodes, seed=0, cfg=TINY)
    samples = Samples(episodes, policy)
    assert len(samples) == sum(len(ep.states) for ep in episodes)
    batch = samples.batch(np.arange(0, len(samples), max(1, len(samples) // 16)))
    assert batch["actions"].shape[1:] == (10, 16) and not batch["actions"][..., 4:].any()
    model = policy.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        loss = flow_matching_loss(model, batch, len(ACTION_NAMES))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_train_writes_a_loadable_policy(bags, tmp_path):
    log = train(bags, tmp_path / "policy", steps=4, batch_size=4, save_every=2, cfg=TINY)
    assert log["steps_done"] == 4 and log["episodes"] == 2
    policy = load_policy(tmp_path / "policy")
    assert policy.state_dim == len(STATE_NAMES) and policy.action_dim == len(ACTION_NAMES)
    assert policy.horizon == 10 and policy.camera_names == ("base_0_rgb",)
    assert (tmp_path / "policy" / "training.json").exists()


def test_the_calibration_reader_takes_the_generated_bags_with_the_sim_mapping(bags):
    mapping = TopicMapping.from_params(read_params_file(config_file("sim_policy.yaml"), "policy_node"))
    observations, sources = read_observations([bags / "reach"], mapping, samples=6)
    assert len(observations) == 6 and sources[0]["bag"] == "reach"
    assert {o.instruction for o in observations} == {INSTRUCTIONS["reach"]}
    assert observations[0].images["base_0_rgb"].shape == (32, 48, 3)
    assert observations[0].state.shape == (len(STATE_NAMES),)


def test_record_demos_replaces_only_its_own_bags_and_only_when_asked(tmp_path, capsys):
    out = tmp_path / "demos"
    (out / "reach").mkdir(parents=True)
    (out / "reach" / "calibration.safetensors").write_bytes(b"someone's buffer")
    args = ["record-demos", "--out", str(out), "--tasks", "reach", "--episodes", "1", "--width", "32", "--height", "32"]
    assert main(args) == 2
    assert f"--out {out} is a non-empty folder that is not a folder of rosbag2 bags" in capsys.readouterr().err
    assert (out / "reach" / "calibration.safetensors").read_bytes() == b"someone's buffer"
    shutil.rmtree(out / "reach")
    assert main(args) == 0
    bag = sorted(p.name for p in (out / "reach").iterdir())
    assert main(args) == 2
    assert "already holds a rosbag2 bag; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "reach").iterdir()) == bag
    assert [p.name for p in out.iterdir()] == ["reach"]


def test_train_demo_never_writes_over_another_checkpoint(bags, checkpoints, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(checkpoints[(True, "openpi")], other)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    args = ["train-demo", "--bags", str(bags), "--steps", "1", "--save-every", "1", "--batch-size", "2"]
    assert main([*args, "--out", str(other), "--overwrite"]) == 2
    assert "is a non-empty folder that is not a checkpoint written by train-demo" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
