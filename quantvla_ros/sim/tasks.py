"""The simulated robot's vocabulary: tasks, instructions, state and action names.

Kept apart from `env.py` so training, the ROS side and tests can use the names without
importing MuJoCo.
"""

# One instruction per task; the tasks are the MT10 ones whose scripted experts always succeed.
INSTRUCTIONS: dict[str, str] = {
    "reach": "reach the goal position",
    "push": "push the puck to the goal",
    "pick-place": "pick up the puck and place it at the goal",
    "door-open": "open the door",
    "drawer-open": "open the drawer",
    "drawer-close": "close the drawer",
    "button-press-topdown": "press the button from the top",
    "window-open": "slide the window open",
    "window-close": "slide the window closed",
}
# The demo policy's tasks: six MT10 tasks whose experts solve every seed in under 100 steps.
DEFAULT_TASKS = ("reach", "door-open", "drawer-open", "drawer-close", "button-press-topdown", "window-open")

STATE_NAMES = (
    "hand_x", "hand_y", "hand_z", "gripper_opening",
    "object_x", "object_y", "object_z",
    "goal_x", "goal_y", "goal_z",
)  # fmt: skip
ACTION_NAMES = ("ee_dx", "ee_dy", "ee_dz", "gripper_effort")
CONTROL_DT = 0.0125  # seconds per action: MetaWorld's 0.0025 s timestep × frame_skip 5
