"""Run the ClustViT segmentation node on a camera topic.

    ros2 launch clustvit_ros segment.launch.py image_topic:=/camera/image_raw
    ros2 launch clustvit_ros segment.launch.py lifecycle:=true autostart:=true
    ros2 launch clustvit_ros segment.launch.py params_file:=cameras.yaml   # e.g. cameras: [front, rear]

If the node cannot start (a bad model file, say) or dies, the whole launch shuts
down and ``ros2 launch`` exits non-zero, with the node's reason in the log above.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler, Shutdown
from launch.event_handlers import OnProcessExit
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition

# Launch arguments that, when given, override the parameter file: name -> what an empty value means.
OVERRIDES = {
    "model_path": "checkpoint; empty = params_file's (the packaged default model)",
    "device": "auto | cpu | cuda | cuda:N; empty = params_file's (auto)",
    "input_transport": "raw | compressed; empty = params_file's (raw)",
    "precision": "auto | fp32 | bf16 | fp16; empty = params_file's (auto)",
}


class NodeFailed(RuntimeError):
    """Raised inside launch so that `ros2 launch` returns non-zero (a process exit alone does not)."""


def _exited(event, context):
    if event.returncode != 0:
        raise NodeFailed(f"{event.action.name} exited with code {event.returncode} (its reason is logged above)")
    if context.is_shutdown:  # Ctrl-C: launch is already shutting everything down
        return None
    return [Shutdown(reason=f"{event.action.name} exited")]


def _configure_failed(event, context):
    raise NodeFailed(f"{event.action.node_name} could not be configured (its reason is logged above)")


def _segment_node(context):
    overrides = {}
    for name in OVERRIDES:
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    lifecycle = LaunchConfiguration("lifecycle").perform(context).lower() in ("true", "1", "yes")
    common = dict(package="clustvit_ros", name="clustvit", namespace=LaunchConfiguration("namespace"),
                  parameters=[LaunchConfiguration("params_file"), overrides],
                  remappings=[("image", LaunchConfiguration("image_topic"))], output="screen", emulate_tty=True)
    if not lifecycle:
        node = Node(executable="segment_node", **common)
        return [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_exited))]
    node = LifecycleNode(executable="segment_lifecycle_node", **common)
    actions = [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_exited))]
    if LaunchConfiguration("autostart").perform(context).lower() in ("true", "1", "yes"):
        actions += [
            # configure now; activate once configured; a failed configure ends the launch
            EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                        transition_id=Transition.TRANSITION_CONFIGURE)),
            RegisterEventHandler(OnStateTransition(
                target_lifecycle_node=node, start_state="configuring", goal_state="inactive",
                entities=[EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                                      transition_id=Transition.TRANSITION_ACTIVATE))])),
            RegisterEventHandler(OnStateTransition(
                target_lifecycle_node=node, start_state="configuring", goal_state="unconfigured",
                entities=[OpaqueFunction(function=lambda context: _configure_failed(
                    context.locals.event, context))])),
        ]
    return actions


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="input image topic (raw; '/compressed' is appended for compressed)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([FindPackageShare("clustvit_ros"), "config",
                                                                  "segment.yaml"]),
                              description="parameter file (every default is in config/segment.yaml)"),
        *[DeclareLaunchArgument(name, default_value="", description=description)
          for name, description in OVERRIDES.items()],
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="true: the managed node segment_lifecycle_node (configure, activate ...)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="with lifecycle:=true, drive the node to active at once"),
        OpaqueFunction(function=_segment_node),
    ])
