"""The calibration node: recorded bags -> calibration buffer -> (optionally) a quantized artifact.

Offline, and run once: it reads the same topic/joint mapping as the policy node (pass the
same params file), so calibration samples are prepared exactly as live observations are.

    calibration_node --ros-args --params-file config/policy.yaml --params-file config/calibration.yaml
    quantvla calibrate --params-file config/policy.yaml --params-file config/calibration.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from rclpy.node import Node
from rclpy.parameter import Parameter

from quantvla_ros.atomic import check_target
from quantvla_ros.data.bags import read_observations
from quantvla_ros.data.buffer import build_buffer, save_buffer
from quantvla_ros.data.mapping import TopicMapping
from quantvla_ros.models.policy import load_float_policy
from quantvla_ros.outputs import check_output_folder
from quantvla_ros.quant.api import quantize_
from quantvla_ros.quant.artifact import ARTIFACT_OUTPUT, read_quant_config, save_artifact
from quantvla_ros.quant.config import method_config
from quantvla_ros.quant.summary import written_lines
from quantvla_ros.ros.entry import run_node
from quantvla_ros.ros.params import declare, require
from quantvla_ros.ros.policy_node import PARAMETERS, REQUIRED

OVERWRITE_FLAG = "--overwrite (parameter overwrite: true)"
CALIBRATION_PARAMETERS = {
    "bags": Parameter.Type.STRING_ARRAY,
    "buffer": "calibration.safetensors",
    "samples": 128,
    "tolerance": 0.1,
    "artifact": "",
    "method": "quantvla",
    "w_bits": 4,
    "a_bits": 8,
    "batch_size": 8,
    "seed": 0,
    "overwrite": False,  # replace an earlier artifact at `artifact` (never any other folder)
}


def run_calibration(params: dict, log=print) -> dict:
    """Build the buffer from the bags and, when `artifact` is set, quantize into it.

    Output paths and the mapping are checked first: reading bags can take long, and a run that
    could never write its result should say so before it starts.
    """
    mapping = TopicMapping.from_params(params)
    require(params, ["policy_path", "bags"], "config/calibration.yaml")
    check_target(Path(params["buffer"]), "Calibration buffer")
    overwrite = bool(params.get("overwrite"))
    if params.get("artifact"):
        check_output_folder(params["artifact"], "Artifact folder", ARTIFACT_OUTPUT, overwrite, OVERWRITE_FLAG)
    policy = load_float_policy(
        params["policy_path"], device=params.get("device", "cpu"), asset_id=params.get("asset_id") or None
    )
    mapping.check_policy(policy)
    observations, sources = read_observations(
        [Path(b) for b in params["bags"]], mapping, int(params["samples"]), float(params["tolerance"])
    )
    topics = {
        "cameras": dict(zip(mapping.camera_topics, mapping.camera_names, strict=True)),
        "instruction": mapping.instruction_topic,
        "joint_states": mapping.joint_states_topic,
    }
    buffer = build_buffer(policy, observations, sources)
    buffer.manifest["topics"] = topics
    path = save_buffer(buffer, params["buffer"])
    log(f"Wrote {path}: {len(buffer)} samples from {len(sources)} bag(s).")
    result = {"buffer": str(path), "samples": len(buffer)}
    if params.get("artifact"):
        config = method_config(params["method"], w_bits=int(params["w_bits"]), a_bits=int(params["a_bits"]))
        record = quantize_(policy.model, config, buffer, batch_size=int(params["batch_size"]))
        calibration = {"buffer": str(path), "samples": len(buffer), "sources": sources, "topics": topics}
        out = save_artifact(policy.model, policy.info, record, Path(params["artifact"]), calibration, overwrite)
        log(written_lines(str(out), read_quant_config(out), policy.model.LINEAR_GROUPS))
        result["artifact"] = str(out)
    return result


class CalibrationNode(Node):
    def __init__(self) -> None:
        super().__init__("calibration_node")
        self.params = declare(self, {**PARAMETERS, **CALIBRATION_PARAMETERS})
        require(self.params, [*REQUIRED, "bags"], "config/calibration.yaml")


def main(args: list[str] | None = None) -> int:
    return run_node(
        "calibration_node", CalibrationNode, lambda node: run_calibration(node.params, node.get_logger().info), args
    )


if __name__ == "__main__":
    sys.exit(main())
