"""Demo: play the packaged street video into the segmentation node.

    ros2 launch clustvit_ros demo.launch.py
    ros2 run rqt_image_view rqt_image_view /clustvit/overlay
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    share = FindPackageShare("clustvit_ros")
    return LaunchDescription([
        DeclareLaunchArgument("source", default_value=PathJoinSubstitution([share, "demo", "vtest_excerpt.mp4"]),
                              description="video file, image folder or image to play"),
        DeclareLaunchArgument("rate", default_value="10.0", description="frames per second"),
        DeclareLaunchArgument("loop", default_value="true", description="restart at the end"),
        DeclareLaunchArgument("model_path", default_value="", description="checkpoint; empty = the packaged model"),
        DeclareLaunchArgument("device", default_value="", description="auto | cpu | cuda | cuda:N"),
        Node(
            package="clustvit_ros",
            executable="image_source",
            name="image_source",
            # Typed: `rate:=5` would otherwise arrive as an integer and be refused.
            parameters=[{"source": ParameterValue(LaunchConfiguration("source"), value_type=str),
                         "rate": ParameterValue(LaunchConfiguration("rate"), value_type=float),
                         "loop": ParameterValue(LaunchConfiguration("loop"), value_type=bool),
                         "frame_id": "camera"}],
            remappings=[("image", "/camera/image_raw")],
            output="screen",
        ),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch", "segment.launch.py"])),
            launch_arguments={"image_topic": "/camera/image_raw", "device": LaunchConfiguration("device"),
                              "model_path": LaunchConfiguration("model_path")}.items(),
        ),
    ])
