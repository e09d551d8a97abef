"""One MetaWorld (v3) task as a robot the rest of the project can talk to.

`SimEnv(task, seed).reset()` gives an `SimObservation` (RGB frame, state vector, instruction);
`step(action)` applies MetaWorld's 4-D action (end-effector dx, dy, dz, gripper effort, each in
[-1, 1]) for one control period and says whether the task is solved. Episodes are
deterministic per seed: the seed fixes MetaWorld's random object and goal placement.

The state is the hand position, the gripper opening, the main object's position and the goal
position (10 values, names in `STATE_NAMES`). Proprioception alone (hand + gripper) would leave
the policy to find the object and goal in the camera image, which a policy this small does not
learn in under an hour of CPU training; MetaWorld exposes both positions, so the state carries
them, the way a robot would get them from a detector. The image is still an input.
"""

from __future__ import annotations

import contextlib
import os
import warnings

from quantvla_ros.errors import QuantVLAError

# Headless rendering; must be set before mujoco is imported. A user's choice (egl, glfw) wins.
os.environ.setdefault("MUJOCO_GL", "osmesa")
# OSMesa and triton (which torch imports lazily, e.g. when it builds a model) each bundle LLVM;
# loading triton after OSMesa segfaults, the other order works.
with contextlib.suppress(ImportError):
    import triton  # noqa: F401

from dataclasses import dataclass

import metaworld.policies
import mujoco
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from quantvla_ros.sim.tasks import ACTION_NAMES, INSTRUCTIONS, STATE_NAMES

# "scene" is a free camera looking at the table from the front-left, so the arm, the object and
# the goal are all in view; MetaWorld's own "corner" cameras render upside down in v3.
SCENE_CAMERA = dict(lookat=(0.0, 0.65, 0.1), distance=1.1, azimuth=135.0, elevation=-30.0)
MAX_STEPS = 200  # the experts finish in under 100 steps; MetaWorld's own limit is 500


@dataclass
class SimObservation:
    image: np.ndarray  # uint8 H×W×3 RGB, or None when rendering is off
    state: np.ndarray  # float32 [len(STATE_NAMES)]
    instruction: str


class SimEnv:
    """A MetaWorld task with the goal observable, seeded placement and an offscreen camera.

    Close it (or use it as a context manager) before making another: with OSMesa, a renderer
    freed by the garbage collector while another is current corrupts the other's frames.
    """

    state_names = STATE_NAMES  # JointState.name on the ROS side
    action_names = ACTION_NAMES  # JointTrajectory.joint_names on the ROS side

    def __init__(
        self,
        task: str,
        width: int = 112,
        height: int = 112,
        camera: str = "scene",
        render: bool = True,
        max_steps: int = MAX_STEPS,
    ) -> None:
        if task not in INSTRUCTIONS:
            raise QuantVLAError(f"Unknown task {task!r}; use one of {sorted(INSTRUCTIONS)}.")
        self.task = task
        self.instruction = INSTRUCTIONS[task]
        self.max_steps = max_steps
        env = ALL_V3_ENVIRONMENTS[f"{task}-v3"]()
        # What metaworld's goal-observable wrapper does, minus its reset in the constructor:
        # the goal goes into the observation and each reset draws a placement from the seed.
        env._partially_observable = False
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        del env.sawyer_observation_space  # cached for the partially observable layout
        env.max_path_length = max(env.max_path_length, max_steps)  # MetaWorld raises past its limit
        self._env = env
        self.dt = float(env.dt)  # model timestep 0.0025 s × frame_skip 5 = 0.0125 s
        self._renderer = None
        if render:
            self._renderer = mujoco.Renderer(env.model, height, width)
            # Shadows and reflections cost ~80% of a software-rendered frame and add nothing here.
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
                self._renderer.scene.flags[flag] = 0
            self._camera = camera if camera != "scene" else _scene_camera()
            if camera != "scene" and mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, camera) < 0:
                self.close()
                raise QuantVLAError(f"Unknown camera {camera!r}; use 'scene' or one of the model's cameras.")
        self.steps = 0
        self._obs: np.ndarray | None = None

    def reset(self, seed: int) -> SimObservation:
        self._env.seed(seed)
        self._obs, _ = self._env.reset()
        self.steps = 0
        return self.observe()

    def step(self, action: np.ndarray) -> tuple[SimObservation, bool, bool]:
        """Apply one action; returns (observation, success, done) with done on success or time-out."""
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if action.shape != (len(ACTION_NAMES),):
            raise QuantVLAError(f"The action has {action.size} values; MetaWorld takes {len(ACTION_NAMES)}.")
        self._obs, _, _, _, info = self._env.step(action)
        self.steps += 1
        success = bool(info["success"])
        return self.observe(), success, success or self.steps >= self.max_steps

    def observe(self) -> SimObservation:
        return SimObservation(image=self.render(), state=self.state(), instruction=self.instruction)

    def state(self) -> np.ndarray:
        """hand xyz, gripper opening, object xyz, goal xyz from MetaWorld's 39-D observation."""
        obs = self._obs
        return np.concatenate([obs[0:4], obs[4:7], obs[-3:]]).astype(np.float32)

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current observation, clipped as step() would."""
        with warnings.catch_warnings():
            # The experts warn that their gains exceed the action range; the clip is the design.
            warnings.simplefilter("ignore", UserWarning)
            action = _expert(self.task).get_action(self._obs)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def render(self) -> np.ndarray | None:
        if self._renderer is None:
            return None
        self._renderer.update_scene(self._env.data, self._camera)
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()

    def __enter__(self) -> SimEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scene_camera() -> mujoco.MjvCamera:
    cam = mujoco.MjvCamera()
    cam.type = mujoco.mjtCamera.mjCAMERA_FREE
    cam.lookat[:] = SCENE_CAMERA["lookat"]
    cam.distance = SCENE_CAMERA["distance"]
    cam.azimuth = SCENE_CAMERA["azimuth"]
    cam.elevation = SCENE_CAMERA["elevation"]
    return cam


_EXPERTS: dict[str, metaworld.policies.policy.Policy] = {}


def _expert(task: str):
    if task not in _EXPERTS:
        name = "Sawyer" + "".join(w.capitalize() for w in task.split("-")) + "V3Policy"
        _EXPERTS[task] = getattr(metaworld.policies, name)()
    return _EXPERTS[task]
