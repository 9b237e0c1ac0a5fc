"""What ROS 2 users of perception nodes expect: a lifecycle node, several cameras on one model,
a confidence image, the class map, camera_info, transport losses counted, REP 2003 QoS.

Real node processes, real rclpy, DDS on loopback.
"""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from ros_helpers import NodeProcess, Probe, diagnostic_values, image_message, wait_for

pytestmark = [pytest.mark.ros, pytest.mark.slow]


@pytest.fixture(scope="module")
def ros():
    probe = Probe("features_probe")
    yield probe
    probe.close()


def _stamp(message) -> tuple[int, int]:
    return message.header.stamp.sec, message.header.stamp.nanosec


def _answer(ros, topic: str, camera, message, timeout: float = 30.0):
    """Publish until ``topic`` carries an output with this frame's stamp; that output."""
    stamp = _stamp(message)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        camera.publish(message)  # best effort: resend until it gets through
        if wait_for(lambda: any(_stamp(m) == stamp for m in ros.received(topic)), 1.0, 0.005):
            return next(m for m in ros.received(topic) if _stamp(m) == stamp)
    raise AssertionError(f"nothing on {topic} for the frame stamped {stamp}")


def _status(ros, name: str, since: float):
    with ros.lock:
        arrays = [m for t, m in ros.messages["/diagnostics"] if t > since]
    found = [s for a in arrays for s in a.status if s.name == name]
    return found[-1] if found else None


def _fresh_status(ros, name: str, timeout: float = 10.0):
    since = time.monotonic()
    assert wait_for(lambda: _status(ros, name, since) is not None, timeout), f"no {name!r} in /diagnostics"
    return _status(ros, name, since)


def _rss_mb(pid: int, kind: str = "VmRSS") -> float:
    """Resident memory (MB); RssAnon is the process's own data (weights, activations), not code pages."""
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith(kind + ":"))


# -- lifecycle ------------------------------------------------------------------------------------------
class Lifecycle:
    """The node's lifecycle services, called the way a lifecycle manager does."""

    def __init__(self, probe: Probe, node: str):
        from lifecycle_msgs.srv import ChangeState, GetState
        self.probe, self.node = probe, node
        self.change = probe.node.create_client(ChangeState, f"{node}/change_state")
        self.get = probe.node.create_client(GetState, f"{node}/get_state")
        assert self.change.wait_for_service(timeout_sec=60) and self.get.wait_for_service(timeout_sec=60)

    def state(self) -> str:
        from lifecycle_msgs.srv import GetState
        future = self.get.call_async(GetState.Request())
        assert wait_for(future.done, 20)
        return future.result().current_state.label

    def transition(self, transition_id: int) -> bool:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState
        future = self.change.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        assert wait_for(future.done, 120), f"transition {transition_id} timed out"
        return future.result().success


def test_lifecycle_transitions_topics_and_memory(ros, node_model, street_frames):
    from lifecycle_msgs.msg import Transition
    from sensor_msgs.msg import Image
    process = NodeProcess("segment_lifecycle_node", {"model_path": node_model, "device": "cpu"},
                          {"image": "/lc/image", "__node": "clustvit_lc"}, name="lifecycle")
    try:
        ros.listen(Image, "/clustvit_lc/labels")
        camera = ros.publisher(Image, "/lc/image")
        lifecycle = Lifecycle(ros, "/clustvit_lc")
        assert lifecycle.state() == "unconfigured"
        idle_mb = _rss_mb(process.process.pid, "RssAnon")
        assert camera.get_subscription_count() == 0  # nothing subscribed before activation
        frame = image_message(cv2.resize(street_frames[0], (160, 120)), stamp_ns=1 * 10 ** 9)
        cleaned = []
        for cycle in range(4):
            assert lifecycle.transition(Transition.TRANSITION_CONFIGURE) and lifecycle.state() == "inactive"
            loaded_mb = _rss_mb(process.process.pid, "RssAnon")
            assert loaded_mb > idle_mb + 10, (idle_mb, loaded_mb)  # the model is in memory now
            assert camera.get_subscription_count() == 0  # inactive: configured but not listening
            assert lifecycle.transition(Transition.TRANSITION_ACTIVATE) and lifecycle.state() == "active"
            assert wait_for(lambda: camera.get_subscription_count() > 0, 20)
            frame.header.stamp.sec = 10 + cycle
            labels = _answer(ros, "/clustvit_lc/labels", camera, frame)
            assert (labels.width, labels.height) == (160, 120)
            serving_mb = _rss_mb(process.process.pid, "RssAnon")  # model plus what inference keeps
            assert lifecycle.transition(Transition.TRANSITION_DEACTIVATE) and lifecycle.state() == "inactive"
            assert wait_for(lambda: camera.get_subscription_count() == 0, 20)
            assert lifecycle.transition(Transition.TRANSITION_CLEANUP) and lifecycle.state() == "unconfigured"
            cleaned_mb = _rss_mb(process.process.pid, "RssAnon")
            print(f"lifecycle cycle {cycle}: anonymous RSS unconfigured {idle_mb:.0f} MB, "
                  f"configured {loaded_mb:.0f} MB, serving {serving_mb:.0f} MB,"
                  f" after cleanup {cleaned_mb:.0f} MB (total RSS {_rss_mb(process.process.pid):.0f} MB)")
            # The fp32 weights alone are 23 MB; glibc keeps some freed pages, so ask for 20 MB back.
            # Measured against the serving state: the first inference grows allocator arenas and
            # oneDNN caches by ~10 MB that stay for the next activation, so "configured, before any
            # frame" would charge that growth to cleanup (CI saw 447 -> 436 MB that way).
            assert cleaned_mb < serving_mb - 20, (loaded_mb, serving_mb, cleaned_mb)
            cleaned.append(cleaned_mb)
        # Nothing piles up from cycle to cycle: a model left behind would add its 23 MB each time, 46 MB
        # over the two cycles compared. The first cycle's inference leaves allocator arenas that later
        # cycles reuse, and heap fragmentation moves the after-cleanup figure by up to ~10 MB a cycle,
        # so compare after cleanup, once warmed up, over two cycles, against one model's size.
        assert cleaned[3] < cleaned[1] + 23, cleaned
        assert lifecycle.transition(Transition.TRANSITION_CONFIGURE)
        assert lifecycle.transition(Transition.TRANSITION_INACTIVE_SHUTDOWN) and lifecycle.state() == "finalized"
    finally:
        assert process.stop() == 0, process.log()


def test_lifecycle_configure_fails_with_a_bad_model_and_the_node_lives(ros, tmp_path):
    from lifecycle_msgs.msg import Transition
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    process = NodeProcess("segment_lifecycle_node", {"model_path": bad}, {"__node": "clustvit_lc_bad"},
                          name="lifecycle-bad")
    try:
        lifecycle = Lifecycle(ros, "/clustvit_lc_bad")
        assert not lifecycle.transition(Transition.TRANSITION_CONFIGURE)
        assert lifecycle.state() == "unconfigured" and process.process.poll() is None
        assert "configure failed: cannot load model" in process.log() and "bad.safetensors" in process.log()
    finally:
        assert process.stop() == 0, process.log()


# -- several cameras --------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [2, 4])
def test_several_cameras_one_model(ros, node_model, street_frames, count):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image
    names = ["front", "rear", "left", "right"][:count]
    node = f"/clustvit_cams{count}"
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "cpu", "cameras": names,
                                           "diagnostic_period": 0.5},
                          {"__node": node.strip("/"), "__ns": f"/rig{count}"}, name=f"cams{count}")
    node = f"/rig{count}{node}"
    try:
        cameras = {}
        for name in names:
            ros.listen(Image, f"{node}/{name}/labels")
            ros.listen(DiagnosticArray, f"{node}/{name}/frame_stats")
            cameras[name] = ros.publisher(Image, f"/rig{count}/{name}/image")
        ros.listen(DiagnosticArray, "/diagnostics")
        assert wait_for(lambda: all(c.get_subscription_count() > 0 for c in cameras.values()), 90), process.log()
        # Every camera at once, several rounds: each frame answered on its own camera's topics.
        for round_index in range(3):
            sent = {}
            for index, name in enumerate(names):
                frame = cv2.resize(street_frames[(index + round_index) % len(street_frames)], (160 + 16 * index, 120))
                message = image_message(frame, stamp_ns=(100 * round_index + index) * 10 ** 9, frame_id=f"{name}_link")
                sent[name] = message
                cameras[name].publish(message)
            for name, message in sent.items():
                labels = _answer(ros, f"{node}/{name}/labels", cameras[name], message)
                assert labels.header.frame_id == f"{name}_link" and labels.width == message.width
        status = _fresh_status(ros, f"{node.rsplit('/', 1)[1]}: segmentation")
        assert diagnostic_values(status)["cameras"] == ", ".join(names)
        for name in names:
            values = diagnostic_values(_fresh_status(ros, f"{node.rsplit('/', 1)[1]}: camera {name}"))
            assert int(values["frames_processed"]) >= 3, values
            assert values["input_topic"] == f"/rig{count}/{name}/image"
        batch_sizes = {int(diagnostic_values(m.status[0])["batch_size"]) for name in names
                       for m in ros.received(f"{node}/{name}/frame_stats") if m.status[0].level == b"\x00"}
        assert batch_sizes <= set(range(1, count + 1))
    finally:
        assert process.stop() == 0, process.log()


def test_camera_names_are_checked_at_startup(node_model):
    process = NodeProcess("segment_node", {"model_path": node_model, "cameras": ["front", "front"]},
                          {"__node": "clustvit_twice"}, name="twice")
    assert process.wait(120) == 1 and "camera 'front' is listed twice" in process.log()
    process = NodeProcess("segment_node", {"model_path": node_model, "cameras": ["front/left"]},
                          {"__node": "clustvit_slash"}, name="slash")
    assert process.wait(120) == 1 and "camera name 'front/left'" in process.log()


# -- confidence, class map, camera_info -----------------------------------------------------------------
@pytest.fixture(scope="module")
def outputs_node(ros, node_model):
    from sensor_msgs.msg import CameraInfo, Image
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "cpu", "publish_confidence": True},
                          {"image": "/out/cam/image_raw", "__node": "clustvit_out"}, name="outputs")
    for topic in ("labels", "confidence"):
        ros.listen(Image, f"/clustvit_out/{topic}")
    ros.listen(CameraInfo, "/clustvit_out/camera_info")
    camera = ros.publisher(Image, "/out/cam/image_raw")
    info = ros.publisher(CameraInfo, "/out/cam/camera_info")
    assert wait_for(lambda: camera.get_subscription_count() > 0, 90), process.log()
    yield process, camera, info
    assert process.stop() == 0, process.log()


def test_confidence_image_matches_the_labels(ros, outputs_node, street_frames):
    _, camera, _ = outputs_node
    message = image_message(street_frames[1], stamp_ns=5 * 10 ** 9, frame_id="conf")
    labels = _answer(ros, "/clustvit_out/labels", camera, message)
    confidence = _answer(ros, "/clustvit_out/confidence", camera, message)
    assert (confidence.encoding, confidence.width, confidence.height) == ("mono8", labels.width, labels.height)
    assert confidence.header.frame_id == "conf"
    values = np.frombuffer(confidence.data, np.uint8)
    # The winning class of 11 has at least 1/11 of the probability; a trained model is mostly sure.
    assert values.min() >= 255 // 11 - 1 and np.median(values) > 128


def test_class_map_is_readable_and_read_only(ros, outputs_node, node_model):
    from clustvit_ros.model import read_metadata
    config = read_metadata(node_model)[0]
    names, colours = ros.get_parameters("/clustvit_out", "class_names", "class_colors")
    assert list(names) == list(config.class_names)
    assert list(colours) == [v for colour in config.palette for v in colour]
    result = ros.set_parameters("/clustvit_out", class_names=["x"] * len(names))[0]
    assert not result.successful and "read-only" in result.reason.lower()


def test_camera_info_is_scaled_to_the_labels(ros, outputs_node, street_frames):
    from sensor_msgs.msg import CameraInfo
    _, camera, info_publisher = outputs_node
    info = CameraInfo(width=480, height=360, distortion_model="plumb_bob", d=[0.1, 0.0, 0.0, 0.0, 0.0])
    info.k = [400.0, 0.0, 240.0, 0.0, 400.0, 180.0, 0.0, 0.0, 1.0]
    info.p = [400.0, 0.0, 240.0, 0.0, 0.0, 400.0, 180.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert wait_for(lambda: info_publisher.get_subscription_count() > 0, 30)
    info_publisher.publish(info)
    time.sleep(0.5)
    try:
        assert ros.set_parameters("/clustvit_out", labels_at_input_resolution=False)[0].successful
        message = image_message(street_frames[2], stamp_ns=6 * 10 ** 9, frame_id="optical")
        labels = _answer(ros, "/clustvit_out/labels", camera, message)
        scaled = _answer(ros, "/clustvit_out/camera_info", camera, message)
    finally:
        ros.set_parameters("/clustvit_out", labels_at_input_resolution=True)
    assert (scaled.width, scaled.height) == (labels.width, labels.height) != (480, 360)
    assert scaled.header.frame_id == "optical"
    factor = labels.width / 480
    assert scaled.k[0] == pytest.approx(400 * factor) and scaled.k[2] == pytest.approx(240 * factor)
    assert scaled.p[5] == pytest.approx(400 * labels.height / 360) and list(scaled.d) == list(info.d)


# -- transport and QoS -------------------------------------------------------------------------------------
def test_frames_lost_in_transport_are_counted(ros, node_model, street_frames):
    """Big raw frames over best-effort DDS get lost here; every lost one is counted from sequence numbers."""
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "cpu", "diagnostic_period": 0.5},
                          {"image": "/lossy/image", "__node": "clustvit_lossy"}, name="lossy")
    try:
        ros.listen(DiagnosticArray, "/diagnostics")
        camera = ros.publisher(Image, "/lossy/image")
        assert wait_for(lambda: camera.get_subscription_count() > 0, 90), process.log()
        big = image_message(cv2.resize(street_frames[3], (1920, 1080)))
        small = image_message(cv2.resize(street_frames[3], (64, 48)))
        # First frames until one arrives (best effort right after discovery may drop the very first):
        # a camera's frames before the node heard of it are not "lost", so counting starts there.
        def heard() -> bool:
            camera.publish(small)
            return int(diagnostic_values(_fresh_status(ros, "clustvit_lossy: segmentation"))["frames_received"]) > 0
        assert wait_for(heard, 30), process.log()
        time.sleep(1.0)  # any small frame still in flight arrives
        settled = diagnostic_values(_fresh_status(ros, "clustvit_lossy: segmentation"))
        published = int(settled["frames_received"]) + int(settled["frames_lost_in_transport"])
        for index in range(40):
            camera.publish(big if index % 2 == 0 else small)
            published += 1
            time.sleep(0.15)
        camera.publish(small)  # a last one that arrives, so every gap before it is seen
        published += 1
        time.sleep(1.0)
        values = diagnostic_values(_fresh_status(ros, "clustvit_lossy: segmentation"))
        received, lost = int(values["frames_received"]), int(values["frames_lost_in_transport"])
        print(f"transport: published {published}, received {received}, lost {lost}")
        assert lost > 0 and received + lost == published, values
    finally:
        assert process.stop() == 0, process.log()


def test_retired_qos_parameters_are_refused_with_the_rep2003_way(node_model):
    process = NodeProcess("segment_node", {"model_path": node_model, "qos_reliability": "reliable"},
                          {"__node": "clustvit_old_qos"}, name="oldqos")
    assert process.wait(120) == 1
    assert "qos_reliability" in process.log() and "qos_overrides." in process.log()


# -- precision and threads ----------------------------------------------------------------------------
def test_precision_and_threads_are_reported(ros, node_model):
    from diagnostic_msgs.msg import DiagnosticArray
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "cpu", "precision": "bf16",
                                           "num_threads": 1, "diagnostic_period": 0.5},
                          {"__node": "clustvit_bf16"}, name="bf16")
    try:
        ros.listen(DiagnosticArray, "/diagnostics")
        values = diagnostic_values(_fresh_status(ros, "clustvit_bf16: segmentation", timeout=90))
        assert values["precision"].startswith("bf16 (requested)") and values["cpu_threads"] == "1"
        assert values["device"] == "cpu (bf16)"
    finally:
        assert process.stop() == 0, process.log()


def test_half_is_a_deprecated_alias_and_fp16_needs_cuda(node_model):
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "cpu", "half": True},
                          {"__node": "clustvit_half"}, name="half")
    assert process.wait(120) == 1
    log = process.log()
    assert "'half' is deprecated: use precision:=fp16" in log and "half precision needs a CUDA device" in log
