"""Run the ClustViT segmentation node on a camera topic.

    ros2 launch clustvit_ros segment.launch.py image_topic:=/camera/image_raw
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

# Launch arguments that, when given, override the parameter file.
OVERRIDES = ("model_path", "device", "input_transport")


def _segment_node(context):
    overrides = {}
    for name in OVERRIDES:
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    return [Node(
        package="clustvit_ros",
        executable="segment_node",
        name="clustvit",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file"), overrides],
        remappings=[("image", LaunchConfiguration("image_topic"))],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="input image topic (raw; '/compressed' is appended for compressed)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([FindPackageShare("clustvit_ros"), "config",
                                                                  "segment.yaml"]),
                              description="parameter file (every default is in config/segment.yaml)"),
        DeclareLaunchArgument("model_path", default_value="",
                              description="checkpoint; empty = params_file's (the packaged default model)"),
        DeclareLaunchArgument("device", default_value="",
                              description="auto | cpu | cuda | cuda:N; empty = params_file's (auto)"),
        DeclareLaunchArgument("input_transport", default_value="",
                              description="raw | compressed; empty = params_file's (raw)"),
        OpaqueFunction(function=_segment_node),
    ])
