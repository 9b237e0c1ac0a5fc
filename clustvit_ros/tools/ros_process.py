"""Node processes and a recording probe node, for the demo, the node benchmark and the tests.

Everything here starts real ROS 2 processes: callers must have set
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and their own ROS_DOMAIN_ID
(``require_local_ros_environment`` checks).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def require_local_ros_environment() -> None:
    """Refuse to start ROS processes whose DDS traffic could leave this machine."""
    if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST" or "ROS_DOMAIN_ID" not in os.environ:
        raise RuntimeError("set ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and ROS_DOMAIN_ID first")


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# The package's executables (setup.py's console scripts) and the modules behind them.
EXECUTABLES = {
    "segment_node": "clustvit_ros.ros.segment_node",
    "segment_lifecycle_node": "clustvit_ros.ros.segment_lifecycle_node",
    "image_source": "clustvit_ros.ros.image_source",
}


class NodeProcess:
    """A real node process (``python -m <the executable's module> --ros-args ...``)."""

    def __init__(self, executable: str, parameters: dict, remaps: Optional[dict] = None, name: str = "node",
                 params_file: Optional[str] = None):
        args = [sys.executable, "-m", EXECUTABLES[executable], "--ros-args"]
        if params_file:
            args += ["--params-file", str(params_file)]  # before -p: explicit values win
        for key, value in parameters.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (list, tuple)):
                value = "[" + ", ".join(str(v) for v in value) + "]"
            args += ["-p", f"{key}:={value}"]
        for source, target in (remaps or {}).items():
            args += ["-r", f"{source}:={target}"]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"clustvit-test-{name}-{os.getpid()}.log"
        self._log = open(self.log_path, "w")
        require_local_ros_environment()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT, like Ctrl-C
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return self.process.returncode


class Probe:
    """A node spinning in a background thread that records what it hears and calls parameter services."""

    def __init__(self, name: str = "probe"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        require_local_ros_environment()
        self._owns_context = not rclpy.ok()  # then close() also ends the ROS context it started
        if self._owns_context:
            rclpy.init()
        self.node = rclpy.create_node(name)
        self.messages: dict[str, list] = defaultdict(list)
        self.lock = threading.Lock()
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def listen(self, message_type, topic: str, qos=10) -> None:
        def record(message, topic=topic):
            with self.lock:
                self.messages[topic].append((time.monotonic(), message))
        self.node.create_subscription(message_type, topic, record, qos)

    def received(self, topic: str) -> list:
        with self.lock:
            return [m for _, m in self.messages[topic]]

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()

    def publisher(self, message_type, topic: str, qos=None):
        from rclpy.qos import QoSProfile
        return self.node.create_publisher(message_type, topic, qos or QoSProfile(depth=1))

    def set_parameters(self, node_name: str, **values) -> list:
        """Through the node's SetParameters service; returns the per-parameter results."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter
        client = self.node.create_client(SetParameters, f"{node_name}/set_parameters")
        assert client.wait_for_service(timeout_sec=20), f"{node_name}/set_parameters not available"
        request = SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg() for name, value in values.items()])
        future = client.call_async(request)
        assert wait_for(future.done, 20), "set_parameters call timed out"
        self.node.destroy_client(client)
        return future.result().results

    def get_parameters(self, node_name: str, *names) -> list:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python
        client = self.node.create_client(GetParameters, f"{node_name}/get_parameters")
        assert client.wait_for_service(timeout_sec=20)
        future = client.call_async(GetParameters.Request(names=list(names)))
        assert wait_for(future.done, 20)
        self.node.destroy_client(client)
        return [parameter_value_to_python(v) for v in future.result().values]

    def close(self) -> None:
        # Join the spin thread and end the context here, not in interpreter teardown: a thread
        # still inside rclpy's wait at exit aborts the process ("terminate called ...").
        self.executor.shutdown(timeout_sec=5.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()
        if self._owns_context:
            import rclpy
            rclpy.try_shutdown()


def image_message(bgr: np.ndarray, encoding: str = "bgr8", stamp_ns: int = 0, frame_id: str = "camera"):
    """A sensor_msgs/Image of ``bgr`` in the given encoding."""
    import cv2
    from sensor_msgs.msg import Image
    conversions = {"bgr8": None, "rgb8": cv2.COLOR_BGR2RGB, "bgra8": cv2.COLOR_BGR2BGRA,
                   "rgba8": cv2.COLOR_BGR2RGBA, "mono8": cv2.COLOR_BGR2GRAY, "mono16": cv2.COLOR_BGR2GRAY}
    pixels = bgr if conversions[encoding] is None else cv2.cvtColor(bgr, conversions[encoding])
    if encoding == "mono16":
        pixels = pixels.astype("<u2") * 257
    pixels = np.ascontiguousarray(pixels)
    message = Image(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding, is_bigendian=0,
                    step=pixels.strides[0], data=pixels.tobytes())
    message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    message.header.frame_id = frame_id
    return message


def diagnostic_values(status) -> dict:
    return {kv.key: kv.value for kv in status.values}


def node_diagnostics(probe: Probe) -> list:
    """The segmentation node's statuses among what ``probe`` heard on /diagnostics, oldest first."""
    return [status for array in probe.received("/diagnostics") for status in array.status
            if status.name.startswith("clustvit")]
