"""Every policy family through the same layers: Policy API, calibration buffer, `quantvla quantize`
with ATM/OHB, artifacts, fidelity reports — none of them branches on the family."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import groot_fixtures
import numpy as np
import pytest
import smolvla_fixtures
import yaml
from tokenizers import Tokenizer

from quantvla_ros.cli import main
from quantvla_ros.data.buffer import build_buffer, load_buffer, save_buffer
from quantvla_ros.loader import load_policy
from quantvla_ros.models.common.normalizer import NormStats
from quantvla_ros.models.groot.family import save_groot
from quantvla_ros.models.policy import Observation
from quantvla_ros.models.smolvla.checkpoint import save_smolvla
from quantvla_ros.models.smolvla.config import smolvla_tiny
from quantvla_ros.models.smolvla.model import SmolVLAModel
from quantvla_ros.paths import config_file
from quantvla_ros.quant.fused import member_names
from quantvla_ros.quant.layout import LAYOUTS
from quantvla_ros.sim.ros_eval import evaluate_over_ros
from quantvla_ros.sim.tasks import ACTION_NAMES, STATE_NAMES

from conftest import INSTRUCTIONS, observation, to_legacy_lerobot

pytestmark = pytest.mark.integration
FAMILIES = ["pi05", "groot", "smolvla"]


@pytest.fixture(scope="module")
def family_checkpoints(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        "pi05": checkpoints[(True, "lerobot")],
        "groot": groot_fixtures.write_checkpoint(root / "groot", "nvidia"),
        "smolvla": smolvla_fixtures.make_smolvla_checkpoint(root),
    }


def observations(family: str, policy, count: int) -> list[Observation]:
    # The tiny GR00T tokenizer knows only its fixture's sentences; others would overflow its prompt.
    known = groot_fixtures.SENTENCES[:3] if family == "groot" else INSTRUCTIONS
    instructions = [known[i % len(known)] for i in range(count)]
    if family == "groot":
        return [groot_fixtures.observation(policy.model.cfg, seed=i, instruction=t) for i, t in enumerate(instructions)]
    if family == "smolvla":
        return [
            Observation(smolvla_fixtures.robot_images(i), t, smolvla_fixtures.robot_state(i))
            for i, t in enumerate(instructions)
        ]
    return [observation(seed=i, instruction=t) for i, t in enumerate(instructions)]


def noise(policy) -> np.ndarray:
    cfg = policy.model.cfg
    return np.random.default_rng(5).standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantvla_quantize_and_fidelity_run_unchanged_on_every_family(family_checkpoints, family, tmp_path, capsys):
    checkpoint = family_checkpoints[family]
    policy = load_policy(checkpoint)
    obs = observations(family, policy, 6)
    buffer_file = save_buffer(build_buffer(policy, obs, sources=[]), tmp_path / "calib.safetensors")
    load_buffer(buffer_file).check_matches(policy)

    out = tmp_path / "w8a8"
    args = ["quantize", "--checkpoint", str(checkpoint), "--out", str(out), "--calib", str(buffer_file)]
    assert main([*args, "--w-bits", "8", "--a-bits", "8", "--batch-size", "3"]) == 0
    quantized = load_policy(out)
    config = quantized.quant_config
    linears = {member for name in config["modules"] for member in member_names(name)}
    assert linears == set(LAYOUTS["quantvla"].select(policy.model))
    sites = policy.model.attention_sites()
    alpha, beta = np.array(config["atm_ohb"]["alpha"]), np.array(config["atm_ohb"]["beta"])
    assert alpha.shape == (len(sites), sites[0].num_heads) and beta.shape == (len(sites),)
    assert np.all((alpha >= np.exp(-0.3) - 1e-6) & (alpha <= np.exp(0.3) + 1e-6))

    # W8A8 keeps a tiny random model's actions close to float; the artifact alone reproduces them.
    eps = noise(policy)
    reference = policy.predict(obs[0], eps).actions
    actions = quantized.predict(obs[0], eps).actions
    assert actions.shape == reference.shape == (policy.horizon, policy.action_dim)
    assert np.abs(actions - reference).max() < 0.2 * np.abs(reference).max()
    np.testing.assert_array_equal(load_policy(out).predict(obs[0], eps).actions, actions)

    report = tmp_path / "report"
    fidelity = ["fidelity", "--reference", str(checkpoint), "--candidate", str(out), "--buffer", str(buffer_file)]
    assert main([*fidelity, "--out", str(report)]) == 0
    capsys.readouterr()
    result = json.loads((report / "w8a8.json").read_text())
    assert result["samples"] == 6 and result["action_relative_mse"] < 0.05
    # Every quantized layer that inference runs has a figure; π0.5 and SmolVLA never run their last
    # LLM layer's o_proj and MLP (the expert reads only that layer's K/V), so those four have none.
    measured = set(result["layer_sqnr_db"])
    assert measured <= linears and len(linears - measured) == (0 if family == "groot" else 4)


def sim_checkpoint(family: str, root: Path) -> Path:
    """A tiny random policy of the family with the simulator's camera, state and action sizes."""
    camera = ("base_0_rgb",)
    rng = np.random.default_rng(0)

    def stats(dim: int) -> NormStats:
        low = rng.uniform(-1, 0, dim)
        return NormStats(min=low, max=low + 1, mean=low + 0.5, std=np.full(dim, 0.3), q01=low, q99=low + 1)

    if family == "groot":
        tokenizer = groot_fixtures.write_tokenizer(root / "groot_tokenizer")
        cfg = replace(groot_fixtures.tiny_config(tokenizer), camera_names=camera, max_token_len=256)
        sizes = {"state.arm": len(STATE_NAMES), "action.arm": len(ACTION_NAMES)}
        norm = {key: stats(dim) for key, dim in sizes.items()}
        return save_groot(groot_fixtures.tiny_model(cfg), root / "groot_sim", "nvidia", norm, tokenizer, "so100")
    tokenizer = smolvla_fixtures.write_smolvlm_tokenizer(root / "smolvla_tokenizer")
    vocab_size = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size()
    cfg = replace(smolvla_tiny(vocab_size), camera_names=camera, max_state_dim=16)
    norm = {"state": stats(len(STATE_NAMES)), "actions": stats(len(ACTION_NAMES))}
    return save_smolvla(SmolVLAModel(cfg).eval(), root / "smolvla_sim", norm, tokenizer)


@pytest.mark.parametrize("family", ["groot", "smolvla"])
def test_the_simulator_loop_runs_every_family_through_the_policy_node(family, tmp_path):
    checkpoint = sim_checkpoint(family, tmp_path)
    result = evaluate_over_ros(checkpoint, config_file("sim_policy.yaml"), ["reach"], episodes=1, seed=0, max_steps=10)
    task = result["tasks"]["reach"]
    # Ten simulator steps are two action chunks, each answering its observation over DDS.
    assert len(task["successes"]) == 1 and task["mean_length"] == 10 and result["via"] == "ros"


@pytest.mark.parametrize("family", ["pi0", "smolvla"])
def test_lerobot_exports_from_before_the_processor_pipelines_load_their_statistics(
    checkpoints, family_checkpoints, family, tmp_path
):
    folder = checkpoints[(False, "lerobot")] if family == "pi0" else family_checkpoints["smolvla"]
    current = load_policy(folder)
    legacy = load_policy(to_legacy_lerobot(folder, tmp_path / "legacy"))
    for key in ("state", "actions"):
        np.testing.assert_array_equal(legacy.info.norm_stats[key].mean, current.info.norm_stats[key].mean)
        np.testing.assert_array_equal(legacy.info.norm_stats[key].std, current.info.norm_stats[key].std)
    obs = observations(family, current, 1)[0]
    eps = noise(current)
    np.testing.assert_allclose(legacy.predict(obs, eps).actions, current.predict(obs, eps).actions, rtol=1e-5)


def test_the_embodiment_of_a_multi_robot_groot_checkpoint_is_chosen_everywhere(family_checkpoints, tmp_path, capsys):
    folder = Path(shutil.copytree(family_checkpoints["groot"], tmp_path / "groot_two_robots"))
    metadata_file = folder / "experiment_cfg" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    tag = groot_fixtures.TAG
    metadata_file.write_text(json.dumps({tag: metadata[tag], "gr1": metadata[tag]}))

    args = ["quantize", "--checkpoint", str(folder), "--out", str(tmp_path / "rtn"), "--method", "rtn"]
    assert main(args) == 2
    assert "several embodiments" in capsys.readouterr().err
    assert main([*args, "--asset-id", tag]) == 0
    artifact = load_policy(tmp_path / "rtn")
    assert artifact.info.asset_id == tag and artifact.model.cfg.embodiment_id == 2

    cameras = list(artifact.camera_names)
    params = {
        "policy_path": str(folder),
        "asset_id": tag,
        "camera_names": cameras,
        "camera_topics": [f"/two_robots/{c}" for c in cameras],
        "camera_types": ["raw"] * len(cameras),
        "state_joints": [f"j{i}" for i in range(groot_fixtures.STATE_DIM)],
        "action_joints": [f"a{i}" for i in range(groot_fixtures.ACTION_DIM)],
    }
    (tmp_path / "node.yaml").write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    node = [
        str(Path(sys.executable).parent / "policy_node"),
        "--ros-args",
        "--params-file",
        str(tmp_path / "node.yaml"),
    ]
    proc = subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The node logs one line once it serves, or one error sentence and exits.
        first_line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert "Serving" in first_line and str(folder) in first_line
