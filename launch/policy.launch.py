"""Start the policy node: `ros2 launch quantvla_ros policy.launch.py policy_path:=/path/to/artifact`.

The node is a managed (lifecycle) node. With `autostart:=true` (the default) it configures and
activates itself and serves at once; with `autostart:=false` it waits unconfigured for a lifecycle
manager, or for `ros2 lifecycle set /policy_node configure` and then `activate`. Deactivating it
stops its actions at once.
"""

from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import LifecycleNode
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    params_file = LaunchConfiguration("params_file")
    policy_path = LaunchConfiguration("policy_path")
    has_policy_path = PythonExpression(["'", policy_path, "' != ''"])
    arguments = {
        "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
        "autostart": ParameterValue(LaunchConfiguration("autostart"), value_type=bool),
    }
    common = dict(
        package="quantvla_ros",
        executable="policy_node",
        name="policy_node",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
    )
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=PathJoinSubstitution([FindPackageShare("quantvla_ros"), "config", "policy.yaml"]),
                description="ROS 2 parameters file with the topic/joint mapping (see config/policy.yaml)",
            ),
            DeclareLaunchArgument("policy_path", default_value="", description="checkpoint or artifact folder"),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="follow /clock"),
            DeclareLaunchArgument(
                "autostart",
                default_value="true",
                description="configure and activate at start; false waits for a lifecycle manager",
            ),
            DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
            # Later entries win: the params file, then the launch arguments.
            LifecycleNode(
                **common,
                parameters=[params_file, {"policy_path": policy_path, **arguments}],
                condition=IfCondition(has_policy_path),
            ),
            LifecycleNode(**common, parameters=[params_file, arguments], condition=UnlessCondition(has_policy_path)),
        ]
    )
