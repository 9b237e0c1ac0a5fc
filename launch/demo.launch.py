"""Demo: play the packaged street video into the segmentation node.

    ros2 launch clustvit_ros demo.launch.py
    ros2 run rqt_image_view rqt_image_view /clustvit/overlay

When either process ends (the node failing to start, or the video ending with
loop:=false) the launch ends too, non-zero if the node failed.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, RegisterEventHandler, Shutdown
from launch.event_handlers import OnProcessExit
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def _video_ended(event, context):
    return None if context.is_shutdown else [Shutdown(reason="the video ended")]


def generate_launch_description():
    share = FindPackageShare("clustvit_ros")
    camera = Node(
        package="clustvit_ros",
        executable="image_source",
        name="image_source",
        # Typed: `rate:=5` would otherwise arrive as an integer and be refused.
        parameters=[{"source": ParameterValue(LaunchConfiguration("source"), value_type=str),
                     "rate": ParameterValue(LaunchConfiguration("rate"), value_type=float),
                     "loop": ParameterValue(LaunchConfiguration("loop"), value_type=bool),
                     "frame_id": "camera"}],
        remappings=[("image", LaunchConfiguration("image_topic"))],
        output="screen",
    )
    return LaunchDescription([
        DeclareLaunchArgument("source", default_value=PathJoinSubstitution([share, "demo", "vtest_excerpt.mp4"]),
                              description="video file, image folder or image to play"),
        DeclareLaunchArgument("rate", default_value="10.0", description="frames per second"),
        DeclareLaunchArgument("loop", default_value="true", description="restart at the end"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="topic the video is played on and the node listens to"),
        DeclareLaunchArgument("model_path", default_value="", description="checkpoint; empty = the packaged model"),
        DeclareLaunchArgument("device", default_value="", description="auto | cpu | cuda | cuda:N"),
        camera,
        RegisterEventHandler(OnProcessExit(target_action=camera, on_exit=_video_ended)),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch", "segment.launch.py"])),
            launch_arguments={"image_topic": LaunchConfiguration("image_topic"),
                              "device": LaunchConfiguration("device"),
                              "model_path": LaunchConfiguration("model_path")}.items(),
        ),
    ])
