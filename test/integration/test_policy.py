"""The Policy API end to end: checkpoint folder + robot-unit observation -> action chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.loader import load_policy

from conftest import ACTION_DIM, STATE_DIM, observation, robot_stats

pytestmark = pytest.mark.integration
KINDS = [(False, "openpi"), (True, "openpi"), (False, "lerobot"), (True, "lerobot")]
IDS = ["pi0-openpi", "pi05-openpi", "pi0-lerobot", "pi05-lerobot"]


def noise(policy, seed: int = 3) -> np.ndarray:
    cfg = policy.model.cfg
    return np.random.default_rng(seed).standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)


@pytest.fixture(scope="module")
def policies(checkpoints):
    return {kind: load_policy(checkpoints[kind]) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_predict_returns_a_deterministic_chunk_in_robot_units(policies, kind):
    policy = policies[kind]
    assert policy.camera_names == ("base_0_rgb", "left_wrist_0_rgb")
    assert (policy.state_dim, policy.action_dim, policy.horizon) == (STATE_DIM, ACTION_DIM, 5)
    eps = noise(policy)
    chunk = policy.predict(observation(), noise=eps)
    assert chunk.actions.shape == (policy.horizon, ACTION_DIM) and chunk.actions.dtype == np.float32
    assert np.isfinite(chunk.actions).all()
    np.testing.assert_array_equal(policy.predict(observation(), noise=eps).actions, chunk.actions)
    # Un-normalized with the checkpoint's statistics: normalized outputs of order 1 land
    # within a few spreads of the robot's own means, far from the model's [-1, 1] range.
    stats = robot_stats()["actions"]
    spread = (stats.q99 - stats.q01) if kind[0] else stats.std
    z = np.abs(chunk.actions - stats.mean) / spread
    assert z.max() < 20 and np.abs(chunk.actions).max() > 2


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_predict_matches_the_model_on_hand_prepared_inputs(policies, kind):
    """The processing chain is the documented one: resize-with-pad, [-1,1], normalize, prompt."""
    policy = policies[kind]
    obs = observation()
    inputs = policy.prepare(obs)
    assert inputs.images.shape == (1, 2, 3, 28, 28)
    assert inputs.images.min() >= -1 and inputs.images.max() <= 1
    assert inputs.image_masks.all()
    expected_state = policy._state_norm.normalize(obs.state)
    np.testing.assert_allclose(inputs.state[0, :STATE_DIM].numpy(), expected_state, rtol=1e-6)
    assert (inputs.state[0, STATE_DIM:] == 0).all()
    assert inputs.tokens[0, 0] == policy.processor.tokenizer.bos_id
    length = int(inputs.token_masks.sum())
    assert (inputs.tokens[0, length:] == policy.processor.tokenizer.pad_id).all()


def test_pi05_reads_the_state_from_its_prompt(policies):
    policy = policies[(True, "openpi")]
    stats = robot_stats()["state"]
    low = observation(state=stats.q01 + 0.1 * (stats.q99 - stats.q01))
    high = observation(state=stats.q99 - 0.1 * (stats.q99 - stats.q01))
    assert not torch.equal(policy.prepare(low).tokens, policy.prepare(high).tokens)
    eps = noise(policy)
    assert np.abs(policy.predict(low, eps).actions - policy.predict(high, eps).actions).max() > 1e-3


def test_pi0_prompt_does_not_contain_the_state(policies):
    policy = policies[(False, "openpi")]
    stats = robot_stats()["state"]
    a = policy.prepare(observation(state=stats.mean))
    b = policy.prepare(observation(state=stats.mean + stats.std))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.state, b.state)


def test_missing_camera_is_masked_and_its_content_is_irrelevant(policies):
    policy = policies[(True, "lerobot")]
    obs = observation()
    del obs.images["left_wrist_0_rgb"]
    inputs = policy.prepare(obs)
    assert inputs.image_masks.tolist() == [[True, False]]
    assert (inputs.images[0, 1] == -1).all()
    assert np.isfinite(policy.predict(obs, noise(policy)).actions).all()


def test_openpi_and_lerobot_exports_of_the_same_weights_act_alike(policies):
    for pi05 in (False, True):
        a, b = policies[(pi05, "openpi")], policies[(pi05, "lerobot")]
        eps = noise(a)
        np.testing.assert_allclose(
            a.predict(observation(), eps).actions, b.predict(observation(), eps).actions, rtol=1e-4, atol=1e-3
        )


@pytest.mark.parametrize(
    ("obs", "message"),
    [
        (dict(images={"top_cam": np.zeros((8, 8, 3), np.uint8)}), r"camera\(s\) \['top_cam'\] are not inputs"),
        (dict(images={}), "has no image"),
        (
            dict(state=np.zeros(STATE_DIM + 1, np.float32)),
            f"has {STATE_DIM + 1} values but this policy expects {STATE_DIM}",
        ),
        (dict(state=np.full(STATE_DIM, np.nan, np.float32)), "NaN or Inf"),
        (dict(images={"base_0_rgb": np.zeros((8, 8), np.uint8)}), "uint8 H×W×3"),
    ],
    ids=["unknown-camera", "no-image", "state-size", "nan-state", "mono-image"],
)
def test_bad_observations_fail_with_one_clear_sentence(policies, obs, message):
    with pytest.raises(ValueError, match=message):
        policies[(True, "openpi")].predict(observation(**obs))


def test_bad_noise_shape_and_bad_path_are_clear(policies, tmp_path):
    with pytest.raises(ValueError, match="noise has shape"):
        policies[(True, "openpi")].predict(observation(), noise=np.zeros((2, 2)))
    with pytest.raises(QuantVLAError, match="does not exist"):
        load_policy(tmp_path / "nowhere")


def test_bfloat16_policy_runs_on_cpu(checkpoints):
    policy = load_policy(checkpoints[(True, "openpi")], dtype=torch.bfloat16)
    reference = load_policy(checkpoints[(True, "openpi")])
    eps = noise(policy)
    low = policy.predict(observation(), eps).actions
    high = reference.predict(observation(), eps).actions
    spread = robot_stats()["actions"].q99 - robot_stats()["actions"].q01
    assert np.abs(low - high).max() < 0.1 * spread.max()


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_the_inference_engine_predicts_what_the_model_predicts(policies, checkpoints, kind):
    engine_policy = load_policy(checkpoints[kind], engine="on")
    assert type(engine_policy.sampler).__name__ == "StagedEngine"
    assert policies[kind].sampler is policies[kind].model  # "auto" on the CPU runs the model itself
    eps = noise(engine_policy)
    expected = policies[kind].predict(observation(), eps).actions
    np.testing.assert_allclose(engine_policy.predict(observation(), eps).actions, expected, rtol=1e-4, atol=1e-4)


def test_an_unknown_engine_mode_is_one_clear_sentence(checkpoints):
    with pytest.raises(ValueError, match="engine 'fast' must be one of auto, on, off"):
        load_policy(checkpoints[(True, "openpi")], engine="fast")
