"""Start the policy node: `ros2 launch quantvla_ros policy.launch.py policy_path:=/path/to/artifact`."""

from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    params_file = LaunchConfiguration("params_file")
    policy_path = LaunchConfiguration("policy_path")
    use_sim_time = LaunchConfiguration("use_sim_time")
    has_policy_path = PythonExpression(["'", policy_path, "' != ''"])
    common = dict(package="quantvla_ros", executable="policy_node", name="policy_node", output="screen")
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=PathJoinSubstitution([FindPackageShare("quantvla_ros"), "config", "policy.yaml"]),
                description="ROS 2 parameters file with the topic/joint mapping (see config/policy.yaml)",
            ),
            DeclareLaunchArgument("policy_path", default_value="", description="checkpoint or artifact folder"),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="follow /clock"),
            # Later entries win: the params file, then the launch arguments.
            Node(
                **common,
                parameters=[
                    params_file,
                    {
                        "policy_path": policy_path,
                        "use_sim_time": ParameterValue(use_sim_time, value_type=bool),
                    },
                ],
                condition=IfCondition(has_policy_path),
            ),
            Node(
                **common,
                parameters=[params_file, {"use_sim_time": ParameterValue(use_sim_time, value_type=bool)}],
                condition=UnlessCondition(has_policy_path),
            ),
        ]
    )
