"""The segmentation node's parameters: declared with descriptors, read at start-up, applied at runtime.

Descriptors carry types, ranges and read-only flags, so rclpy itself rejects a
wrong type, an out-of-range value or a change to a start-up parameter, with a
reason; the callbacks here only check what a descriptor cannot express (a
string from a fixed set, a budget for a strategy without a knob).

The token-reduction knob is declared from the active strategy's ``KnobSpec``
(range and default from there, the model's own default for ClustViT): its
name is ``merge_threshold`` for ClustViT and ``strategy_knob`` for the peer
strategies, as the README documents.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType,
                                SetParametersResult)
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from ..inference.devices import PRECISIONS
from ..inference.engine import MAX_INFERENCE_SIZE
from ..model.reduction import KnobSpec, StrategySpec, strategy_names

STRING, INTEGER, DOUBLE, BOOL, STRINGS, INTEGERS = (
    ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_INTEGER, ParameterType.PARAMETER_DOUBLE,
    ParameterType.PARAMETER_BOOL, ParameterType.PARAMETER_STRING_ARRAY, ParameterType.PARAMETER_INTEGER_ARRAY)
# Parameters of earlier versions that now mean something else: refused with the new way.
RETIRED = {
    "qos_reliability": "the input QoS follows REP 2003 now: set qos_overrides.<input topic>.subscription."
                       "reliability (e.g. qos_overrides./camera/image_raw.subscription.reliability: reliable)",
    "qos_depth": "the input QoS follows REP 2003 now: set qos_overrides.<input topic>.subscription.depth",
}
TRANSPORTS = ("raw", "compressed")


class StartupError(RuntimeError):
    """The node cannot start (bad model file, bad start-up parameter); the message says why."""


def descriptor(description: str, kind: int, read_only: bool = False,
               float_range: Optional[tuple[float, float]] = None,
               int_range: Optional[tuple[int, int]] = None, constraints: str = "") -> ParameterDescriptor:
    result = ParameterDescriptor(description=description, type=kind, read_only=read_only,
                                 additional_constraints=constraints)
    if float_range is not None:
        result.floating_point_range = [FloatingPointRange(
            from_value=float(float_range[0]), to_value=float(float_range[1]), step=0.0)]
    if int_range is not None:
        result.integer_range = [IntegerRange(from_value=int(int_range[0]), to_value=int(int_range[1]), step=1)]
    return result


@dataclass
class StartupSettings:
    """The read-only parameters, as read once when the node starts."""

    model_path: str
    device: str
    precision: str
    num_threads: int
    input_transport: str
    inference_size: int
    max_input_pixels: int
    diagnostic_period: float
    merge_strategy: str
    cameras: list[str] = field(default_factory=list)


def declare_startup(node: Node) -> StartupSettings:
    """Declare the start-up parameters and read them; StartupError names a bad one."""
    for name, advice in RETIRED.items():
        if name in node._parameter_overrides:  # given on the command line or in a params file
            raise StartupError(f"parameter {name!r} is no longer used: {advice}")
    declare = node.declare_parameter
    declare("model_path", "", descriptor(
        "ClustViT checkpoint (.safetensors); empty = the packaged default model", STRING, read_only=True))
    declare("device", "auto", descriptor(
        "auto (CUDA when available, else CPU), cpu, cuda or cuda:N", STRING, read_only=True,
        constraints="auto|cpu|cuda|cuda:N"))
    declare("precision", "auto", descriptor(
        "auto (fp16 on CUDA; bf16 on a CPU where it is faster; else fp32), fp32, bf16 or fp16", STRING,
        read_only=True, constraints="|".join(PRECISIONS)))
    declare("half", False, descriptor("deprecated: precision fp16", BOOL, read_only=True))
    declare("num_threads", 0, descriptor(
        "CPU threads for inference; 0 = the library's default (every core)", INTEGER, read_only=True,
        int_range=(0, 1024)))
    declare("input_transport", "raw", descriptor(
        "raw: sensor_msgs/Image on 'image'; compressed: sensor_msgs/CompressedImage on 'image/compressed'",
        STRING, read_only=True, constraints="|".join(TRANSPORTS)))
    declare("inference_size", 0, descriptor(
        "long side (px) frames are scaled to before inference, aspect kept; 0 = the model's own",
        INTEGER, read_only=True, int_range=(0, MAX_INFERENCE_SIZE)))
    declare("max_input_pixels", 4096 * 4096, descriptor(
        "frames with more pixels are rejected (bounded latency and memory); 0 = no limit but OpenCV's own",
        INTEGER, read_only=True, int_range=(0, 2 ** 31 - 1)))
    declare("diagnostic_period", 1.0, descriptor("seconds between /diagnostics messages", DOUBLE,
                                                 read_only=True, float_range=(0.1, 60.0)))
    declare("merge_strategy", "", descriptor(
        f"token reduction: {', '.join(strategy_names())}; empty = clustvit when the model has a cluster "
        "module, else none", STRING, read_only=True, constraints="|".join(strategy_names())))
    declare("cameras", Parameter.Type.STRING_ARRAY, descriptor(
        "camera names served by this one model: each subscribes <name>/image and publishes ~/<name>/...; "
        "empty = one camera on 'image' and ~/labels ...", STRINGS, read_only=True))

    def get(name: str) -> Any:
        return node.get_parameter(name).value

    try:
        cameras = list(get("cameras") or [])
    except ParameterUninitializedException:
        cameras = []
    settings = StartupSettings(
        model_path=get("model_path"), device=get("device"), precision=get("precision"),
        num_threads=get("num_threads"), input_transport=get("input_transport"),
        inference_size=get("inference_size"), max_input_pixels=get("max_input_pixels"),
        diagnostic_period=get("diagnostic_period"), merge_strategy=get("merge_strategy"), cameras=cameras)
    if get("half"):
        node.get_logger().warn("parameter 'half' is deprecated: use precision:=fp16")
        if settings.precision == "auto":
            settings.precision = "fp16"
    _check_startup(settings)
    return settings


def _check_startup(settings: StartupSettings) -> None:
    """What descriptors cannot check: strings from a fixed set, names that must form topics."""
    if settings.input_transport not in TRANSPORTS:
        raise StartupError(f"input_transport {settings.input_transport!r}: expected raw or compressed")
    if settings.precision not in PRECISIONS:
        raise StartupError(f"precision {settings.precision!r}: expected {', '.join(PRECISIONS)}")
    if settings.inference_size and settings.inference_size < 32:
        raise StartupError(f"inference_size {settings.inference_size}: must be 0 (model default) or >= 32")
    seen = set()
    for camera in settings.cameras:
        if not camera or not all(c.isalnum() or c == "_" for c in camera) or camera[0].isdigit():
            raise StartupError(f"camera name {camera!r}: use letters, digits and '_' (it becomes a topic "
                               "namespace), not starting with a digit")
        if camera in seen:
            raise StartupError(f"camera {camera!r} is listed twice")
        seen.add(camera)


def knob_parameter_name(strategy: StrategySpec) -> Optional[str]:
    """The ROS name of a strategy's knob: merge_threshold for ClustViT, strategy_knob for the others."""
    if strategy.knob is None:
        return None
    return "merge_threshold" if strategy.name == "clustvit" else "strategy_knob"


def _knob_descriptor(strategy: StrategySpec, knob: KnobSpec) -> ParameterDescriptor:
    text = (f"{strategy.name} {knob.name}: {knob.description}; no-op at {knob.noop:g}, "
            f"{knob.faster} is faster")
    if knob.integer:
        return descriptor(text, INTEGER, int_range=(int(knob.low), int(knob.high)))
    return descriptor(text, DOUBLE, float_range=(knob.low, knob.high))


@dataclass
class RuntimeSettings:
    """The parameters that may change while the node runs, as last applied."""

    knob: Optional[float] = None  # the operator's setting; a latency budget moves the effective value
    target_latency_ms: float = 0.0
    publish_overlay: bool = True
    overlay_alpha: float = 0.5
    labels_at_input_resolution: bool = True
    publish_confidence: bool = False


def declare_runtime(node: Node, strategy: StrategySpec, knob_default: Optional[float],
                    class_names: list[str], palette: list, apply: Callable[[dict], None]) -> None:
    """Declare the runtime parameters and the read-only class map, apply them, and keep applying changes."""
    knob_name = knob_parameter_name(strategy)
    names = ["target_latency_ms", "publish_overlay", "overlay_alpha", "labels_at_input_resolution",
             "publish_confidence"]
    if knob_name is not None:
        default = int(knob_default) if strategy.knob.integer else float(knob_default)
        node.declare_parameter(knob_name, default, _knob_descriptor(strategy, strategy.knob))
        names.append(knob_name)
    node.declare_parameter("target_latency_ms", 0.0, descriptor(
        "latency budget (receive -> labels); > 0 lets the node move the strategy's knob frame by frame to "
        "hold it; 0 = off", DOUBLE, float_range=(0.0, 10000.0)))
    node.declare_parameter("publish_overlay", True, descriptor(
        "publish ~/overlay (computed only while someone subscribes)", BOOL))
    node.declare_parameter("overlay_alpha", 0.5, descriptor("palette opacity in ~/overlay", DOUBLE,
                                                            float_range=(0.0, 1.0)))
    node.declare_parameter("labels_at_input_resolution", True, descriptor(
        "~/labels (and ~/confidence) at the input image size, else at the network's inference size", BOOL))
    node.declare_parameter("publish_confidence", False, descriptor(
        "publish ~/confidence: mono8, the winning class's probability x 255 (computed only while subscribed)",
        BOOL))
    node.declare_parameter("class_names", list(class_names), descriptor(
        "the model's classes; label value i is class_names[i]", STRINGS, read_only=True))
    node.declare_parameter("class_colors", [int(v) for colour in palette for v in colour], descriptor(
        "RGB colour of each class in ~/overlay, three integers per class", INTEGERS, read_only=True))
    apply({p.name: p.value for p in node.get_parameters(names)})

    def validate(params) -> SetParametersResult:
        """No side effects here: reject with a reason, or accept."""
        for param in params:
            if param.name == "target_latency_ms" and param.value > 0.0 and knob_name is None:
                return SetParametersResult(successful=False, reason=(
                    f"target_latency_ms steers a strategy's knob; merge_strategy {strategy.name!r} has none"))
        return SetParametersResult(successful=True)

    if hasattr(node, "add_post_set_parameters_callback"):  # Iron and newer
        node.add_on_set_parameters_callback(validate)
        node.add_post_set_parameters_callback(lambda params: apply({p.name: p.value for p in params}))
    else:  # Humble: apply inside the (single) validating callback
        def validate_and_apply(params) -> SetParametersResult:
            result = validate(params)
            if result.successful:
                apply({p.name: p.value for p in params})
            return result
        node.add_on_set_parameters_callback(validate_and_apply)
