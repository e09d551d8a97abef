"""Build a calibration buffer (and optionally an artifact) from bags:
`ros2 launch quantvla_ros calibrate.launch.py policy_path:=/models/pi05 artifact:=/models/pi05_w4a8`."""

from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("quantvla_ros")
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=PathJoinSubstitution([share, "config", "policy.yaml"]),
                description="the policy node's parameters file: the topic/joint mapping to calibrate with",
            ),
            DeclareLaunchArgument(
                "calibration_file",
                default_value=PathJoinSubstitution([share, "config", "calibration.yaml"]),
                description="bags, sample count, output paths and quantization settings",
            ),
            DeclareLaunchArgument("policy_path", description="the float checkpoint folder"),
            DeclareLaunchArgument("artifact", default_value="", description="artifact folder to write, or empty"),
            DeclareLaunchArgument("use_sim_time", default_value="false"),
            Node(
                package="quantvla_ros",
                executable="calibration_node",
                name="calibration_node",
                output="screen",
                parameters=[
                    LaunchConfiguration("params_file"),
                    LaunchConfiguration("calibration_file"),
                    {
                        "policy_path": LaunchConfiguration("policy_path"),
                        "artifact": LaunchConfiguration("artifact"),
                        "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
                    },
                ],
            ),
        ]
    )
