"""`ros2 launch` for real: the launch files started by the ROS 2 launch CLI against an installed package.

Needs a ROS 2 installation with launch and launch_ros and this package installed
in a sourced workspace (`colcon build`, then `source install/setup.bash`); it
skips cleanly where there is none (CI: launch is not installable from pip).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import cv2
import pytest

from ros_helpers import Probe, image_message, wait_for

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def _launch_available() -> bool:
    if shutil.which("ros2") is None:
        return False
    try:
        found = subprocess.run(["ros2", "pkg", "prefix", "clustvit_ros"], capture_output=True, text=True, timeout=60)
        import launch  # noqa: F401
        import launch_ros  # noqa: F401
    except (ImportError, subprocess.TimeoutExpired):
        return False
    return found.returncode == 0


if not _launch_available():
    pytest.skip("no ROS 2 launch installation with clustvit_ros installed (colcon) on this machine",
                allow_module_level=True)


class Launch:
    def __init__(self, *arguments: str, name: str):
        self.log_path = f"/tmp/clustvit-launch-{name}-{os.getpid()}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(["ros2", "launch", "clustvit_ros", *arguments], stdout=self._log,
                                        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                        start_new_session=True)

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path) as handle:
            return handle.read()

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C as a terminal sends it: to the whole process group."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def ros():
    probe = Probe("launch_probe")
    yield probe
    probe.close()


@pytest.mark.parametrize("launch_file, extra", [("segment.launch.py", []), ("demo.launch.py", []),
                                                ("segment.launch.py", ["lifecycle:=true"])])
def test_a_failed_start_ends_the_launch_non_zero(launch_file, extra):
    launch = Launch(launch_file, "model_path:=/nonexistent/model.safetensors", *extra, name="fail")
    code = launch.wait(180)
    log = launch.log()
    assert code != 0, log
    assert "/nonexistent/model.safetensors: no such file" in log and "(its reason is logged above)" in log, log


def test_demo_launch_segments_the_video_and_stops_on_ctrl_c(ros):
    from sensor_msgs.msg import Image
    ros.listen(Image, "/clustvit/overlay")
    launch = Launch("demo.launch.py", "device:=cpu", name="demo")
    try:
        assert wait_for(lambda: len(ros.received("/clustvit/overlay")) >= 3, 240), launch.log()
    finally:
        assert launch.interrupt() == 0, launch.log()


def _answer(ros, topic, camera, message, timeout=60.0):
    stamp = (message.header.stamp.sec, message.header.stamp.nanosec)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        camera.publish(message)
        if wait_for(lambda: any((m.header.stamp.sec, m.header.stamp.nanosec) == stamp
                                for m in ros.received(topic)), 1.0):
            return True
    return False


def test_lifecycle_autostart_reaches_active(ros, street_frames):
    from sensor_msgs.msg import Image
    ros.listen(Image, "/lc_launch/clustvit/labels")
    launch = Launch("segment.launch.py", "lifecycle:=true", "autostart:=true", "namespace:=lc_launch",
                    "image_topic:=/lc_launch/camera", "device:=cpu", name="lifecycle")
    try:
        camera = ros.publisher(Image, "/lc_launch/camera")
        assert wait_for(lambda: camera.get_subscription_count() > 0, 240), launch.log()
        frame = image_message(cv2.resize(street_frames[0], (160, 120)), stamp_ns=3 * 10 ** 9)
        assert _answer(ros, "/lc_launch/clustvit/labels", camera, frame), launch.log()
    finally:
        assert launch.interrupt() == 0, launch.log()


def test_two_cameras_from_a_params_file(ros, street_frames, tmp_path):
    from sensor_msgs.msg import Image
    params = tmp_path / "two_cameras.yaml"
    params.write_text("/**:\n  ros__parameters:\n    cameras: [front, rear]\n    device: cpu\n")
    for name in ("front", "rear"):
        ros.listen(Image, f"/rig/clustvit/{name}/labels")
    launch = Launch("segment.launch.py", f"params_file:={params}", "namespace:=rig", name="cameras")
    try:
        cameras = {name: ros.publisher(Image, f"/rig/{name}/image") for name in ("front", "rear")}
        assert wait_for(lambda: all(c.get_subscription_count() for c in cameras.values()), 240), launch.log()
        for index, (name, camera) in enumerate(cameras.items()):
            frame = image_message(cv2.resize(street_frames[index], (160, 120)), stamp_ns=(7 + index) * 10 ** 9,
                                  frame_id=name)
            assert _answer(ros, f"/rig/clustvit/{name}/labels", camera, frame), launch.log()
    finally:
        assert launch.interrupt() == 0, launch.log()
