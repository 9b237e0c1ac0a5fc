"""The segmentation node as users run it: a real process, real rclpy, DDS on loopback."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from ros_helpers import NodeProcess, Probe, diagnostic_values, image_message, wait_for

pytestmark = [pytest.mark.ros, pytest.mark.slow]

NODE = "/clustvit"
INPUT = "/camera/image_raw"
EXPECTED_DIAGNOSTIC_KEYS = {
    "model", "device", "input_size", "inference_size", "tokens_in", "tokens_after_merge", "merged_fraction",
    "merge_threshold", "output_rate_hz", "frames_received", "frames_processed", "frames_dropped",
    "frames_rejected", "last_error",
} | {f"{stage}_ms_{stat}" for stage in ("decode", "preprocess", "inference", "postprocess", "publish")
     for stat in ("mean", "p95")}


@pytest.fixture(scope="module")
def ros():
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float32, UInt32
    probe = Probe()
    probe.listen(Image, f"{NODE}/labels")
    probe.listen(Image, f"{NODE}/overlay")
    probe.listen(UInt32, f"{NODE}/token_count")
    probe.listen(Float32, f"{NODE}/latency_ms")
    probe.listen(DiagnosticArray, f"{NODE}/frame_stats")
    probe.listen(DiagnosticArray, "/diagnostics")
    yield probe
    probe.close()


@pytest.fixture(scope="module")
def network(node_model):
    """What the node's model makes of a 480x360 frame: its network size (h, w) and token count."""
    from clustvit_ros.inference.engine import inference_shape
    from clustvit_ros.model import read_metadata
    height, width = inference_shape(360, 480, max(read_metadata(node_model)[0].input_size))
    return {"shape": (height, width), "tokens": -(-height // 16) * -(-width // 16)}


@pytest.fixture(scope="module")
def node(ros, node_model):
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "cpu",
                                           "diagnostic_period": 0.5}, {"image": INPUT}, name="segment")
    from sensor_msgs.msg import Image
    camera = ros.publisher(Image, INPUT)
    assert wait_for(lambda: camera.get_subscription_count() > 0, 60), process.log()
    yield process, camera
    assert process.stop() == 0, process.log()


def _send_and_wait(ros, camera, message, topic=f"{NODE}/labels", timeout=30.0, resend_every=1.0):
    """Publish one frame and wait for the output with its stamp.

    A copy resent while the first is still being segmented is segmented too: tests that
    count on the node being idle once the output arrives resend rarely.
    """
    stamp = (message.header.stamp.sec, message.header.stamp.nanosec)

    def arrived():
        return [m for m in ros.received(topic) if (m.header.stamp.sec, m.header.stamp.nanosec) == stamp]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        camera.publish(message)  # best-effort input: resend until it gets through
        if wait_for(lambda: bool(arrived()), resend_every):
            return arrived()[0]
    raise AssertionError(f"no {topic} for frame stamped {stamp}")


def _latest_diagnostic(ros, newer_than: float = 0.0):
    with ros.lock:
        entries = [(t, m) for t, m in ros.messages["/diagnostics"] if t > newer_than]
    for _, array in reversed(entries):
        for status in array.status:
            if status.name.startswith("clustvit"):
                return status
    return None


def _fresh_diagnostic(ros, timeout: float = 10.0):
    """The first /diagnostics status of the node published from now on."""
    since = time.monotonic()
    assert wait_for(lambda: _latest_diagnostic(ros, since) is not None, timeout), "no fresh diagnostics"
    return _latest_diagnostic(ros, since)


def test_labels_overlay_and_stats_carry_the_input_header(ros, node, network, street_frames):
    _, camera = node
    frame = street_frames[0]
    message = image_message(frame, "bgr8", stamp_ns=1_700_000_000_123_456_789, frame_id="front_camera")
    labels = _send_and_wait(ros, camera, message)
    assert (labels.width, labels.height, labels.encoding) == (480, 360, "mono8")
    assert labels.header.frame_id == "front_camera"
    classes = np.frombuffer(labels.data, np.uint8)
    assert classes.size == 480 * 360 and classes.max() < 11
    overlay = _send_and_wait(ros, camera, message, topic=f"{NODE}/overlay")
    assert (overlay.width, overlay.height, overlay.encoding, overlay.header.frame_id) == (
        480, 360, "bgr8", "front_camera")
    stats = _send_and_wait(ros, camera, message, topic=f"{NODE}/frame_stats")
    values = diagnostic_values(stats.status[0])
    tokens = network["tokens"]
    assert int(values["tokens_in"]) == tokens and 0 < int(values["tokens_after_merge"]) <= tokens
    assert wait_for(lambda: ros.received(f"{NODE}/token_count") and ros.received(f"{NODE}/latency_ms"), 10)
    assert 0 < ros.received(f"{NODE}/token_count")[-1].data <= tokens
    assert ros.received(f"{NODE}/latency_ms")[-1].data > 0


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_supported_encodings(ros, node, street_frames, encoding):
    _, camera = node
    frame = cv2.resize(street_frames[1], (320, 240))
    stamp = 1_000_000_000 * (10 + ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"].index(encoding))
    labels = _send_and_wait(ros, camera, image_message(frame, encoding, stamp_ns=stamp))
    assert (labels.width, labels.height) == (320, 240)
    assert np.frombuffer(labels.data, np.uint8).max() < 11


def test_diagnostics_report_the_pipeline(ros, node, network, street_frames):
    _, camera = node
    for index in range(3):
        _send_and_wait(ros, camera, image_message(street_frames[index], stamp_ns=(100 + index) * 10 ** 9))
    status = _fresh_diagnostic(ros)
    values = diagnostic_values(status)
    assert EXPECTED_DIAGNOSTIC_KEYS <= set(values), EXPECTED_DIAGNOSTIC_KEYS - set(values)
    assert status.level == b"\x00", status.message  # OK
    assert values["device"].startswith("cpu") and values["model"].endswith(".safetensors")
    height, width = network["shape"]
    assert values["input_size"] == "480x360" and values["inference_size"] == f"{width}x{height}"
    assert int(values["frames_processed"]) >= 3 and float(values["inference_ms_mean"]) > 0


def test_parameters_take_effect_on_the_next_frame(ros, node, network, street_frames):
    _, camera = node
    frame = street_frames[2]
    try:
        assert ros.set_parameters(NODE, merge_threshold=1.0)[0].successful
        stats = _send_and_wait(ros, camera, image_message(frame, stamp_ns=200 * 10 ** 9), f"{NODE}/frame_stats")
        assert diagnostic_values(stats.status[0])["tokens_after_merge"] == str(network["tokens"])  # none merged
        assert ros.set_parameters(NODE, merge_threshold=0.0)[0].successful
        stats = _send_and_wait(ros, camera, image_message(frame, stamp_ns=201 * 10 ** 9), f"{NODE}/frame_stats")
        assert int(diagnostic_values(stats.status[0])["tokens_after_merge"]) <= 5  # all merged: <= k clusters
        assert ros.set_parameters(NODE, labels_at_input_resolution=False)[0].successful
        # A frame of another size than the network's (small on the wire: best-effort DDS drops big ones).
        small = cv2.resize(frame, (320, 240))
        labels = _send_and_wait(ros, camera, image_message(small, stamp_ns=202 * 10 ** 9))
        from clustvit_ros.inference.engine import inference_shape
        long_side = max(network["shape"])
        assert (labels.height, labels.width) == inference_shape(240, 320, long_side) != (240, 320)
    finally:
        ros.set_parameters(NODE, merge_threshold=0.3, labels_at_input_resolution=True)


@pytest.mark.parametrize("values, reason", [
    ({"merge_threshold": 1.5}, "out of range"),
    ({"merge_threshold": -0.1}, "out of range"),
    ({"overlay_alpha": 2.0}, "out of range"),
    ({"target_latency_ms": -5.0}, "out of range"),
    ({"merge_threshold": "high"}, "wrong parameter type"),
    ({"device": "cuda"}, "read-only"),
    ({"model_path": "/tmp/other.safetensors"}, "read-only"),
    ({"class_names": ["a"]}, "read-only"),
])
def test_invalid_parameters_are_rejected_and_the_old_value_stays(ros, node, values, reason):
    name = next(iter(values))
    before = ros.get_parameters(NODE, name)
    result = ros.set_parameters(NODE, **values)[0]
    assert not result.successful
    assert reason in result.reason.lower(), result.reason
    assert ros.get_parameters(NODE, name) == before


def _bad_frames(good):
    from sensor_msgs.msg import Image
    unknown = image_message(good)
    unknown.encoding = "32FC1"
    short = image_message(good)
    short.data = short.data[: len(short.data) // 2]
    bad_step = image_message(good)
    bad_step.step = 10
    empty = Image(height=0, width=0, encoding="bgr8", step=0, data=b"")
    return [("unsupported encoding '32FC1'", unknown), ("data has", short), ("step 10", bad_step),
            ("empty image", empty)]


def test_bad_frames_are_reported_skipped_and_survived(ros, node, street_frames):
    process, camera = node
    good = cv2.resize(street_frames[3], (320, 240))
    for index, (reason, message) in enumerate(_bad_frames(good)):
        sent = time.monotonic()
        message.header.stamp.sec = 300 + index
        camera.publish(message)

        def reported():
            status = _latest_diagnostic(ros, sent)
            return status is not None and status.level == b"\x02" and reason in diagnostic_values(status)["last_error"]
        assert wait_for(reported, 30), f"no ERROR diagnostic for {reason}"
        # The node lives on and processes the next good frame.
        _send_and_wait(ros, camera, image_message(good, stamp_ns=(400 + index) * 10 ** 9))
        assert process.process.poll() is None
    assert int(diagnostic_values(_fresh_diagnostic(ros))["frames_rejected"]) >= 4


def test_flood_keeps_latency_bounded_and_counts_drops(ros, node, street_frames):
    _, camera = node
    _send_and_wait(ros, camera, image_message(street_frames[4], stamp_ns=500 * 10 ** 9))
    status = _fresh_diagnostic(ros)
    inference_ms = float(diagnostic_values(status)["inference_ms_mean"])
    dropped_before = int(diagnostic_values(status)["frames_dropped"])
    ros.clear()
    period = inference_ms / 1000.0 / 10.0  # 10x the model's rate
    end = time.monotonic() + 6.0
    index = 0
    while time.monotonic() < end:
        camera.publish(image_message(street_frames[index % len(street_frames)],
                                     stamp_ns=(100_000 + index) * 10 ** 9))  # a stamp range of its own
        index += 1
        time.sleep(period)
    time.sleep(0.5)  # let the last frame finish
    values = diagnostic_values(_fresh_diagnostic(ros))
    latencies = [m.data for m in ros.received(f"{NODE}/latency_ms")]
    assert len(latencies) >= 10 and index > 5 * len(latencies)
    assert int(values["frames_dropped"]) - dropped_before > index // 2
    # Bounded: the newest frame waits at most one inference, so latency never piles up.
    half = len(latencies) // 2
    assert np.median(latencies[half:]) < 1.5 * np.median(latencies[:half]) + 20
    assert max(latencies) < 4 * float(values["inference_ms_p95"]) + 50


def test_target_latency_moves_the_threshold_and_settles(ros, node, street_frames):
    _, camera = node

    def run(frames: int, start_stamp: int) -> tuple[list, list]:
        latencies, thresholds = [], []
        for index in range(frames):
            stamp = start_stamp + index
            stats = _send_and_wait(ros, camera, image_message(street_frames[stamp % 6], stamp_ns=stamp * 10 ** 9),
                                   f"{NODE}/frame_stats", resend_every=10.0)
            values = diagnostic_values(stats.status[0])
            latencies.append(float(values["latency_ms"]))
            thresholds.append(float(values["merge_threshold"]))
        return latencies, thresholds

    try:
        # Both ends measured turn about, so that a burst of load on a shared machine lands on
        # both: measured one after the other, a slow spell during the unmerged frames once put
        # the target above what threshold 1 costs, and the controller rightly never moved.
        unmerged, merged = [], []
        for index in range(8):
            for threshold, latencies, stamps in ((1.0, unmerged, 600), (0.0, merged, 648)):
                ros.set_parameters(NODE, merge_threshold=threshold)
                latencies += run(1, stamps + index)[0]  # 648 = 600 + 8 * 6: the same frame at both ends
        target = 0.5 * (np.median(unmerged) + np.median(merged))
        ros.set_parameters(NODE, merge_threshold=1.0, target_latency_ms=float(target))
        latencies, thresholds = run(40, 720)
        assert thresholds[0] == 1.0 and min(thresholds) < 1.0  # over budget at threshold 1: it moved
        assert max(np.abs(np.diff(thresholds))) <= 0.05 + 1e-4  # in bounded steps
        # Held on average, or, where the machine slowed down after the target was measured (a
        # training run beside this test did so, 1.4x), merging as far as it can. Whether it also
        # settles is the controller's unit test (test_runtime): here CPU-bound neighbours on a
        # 2-core machine swing latency by half, and the controller rightly follows them.
        held = np.mean(latencies[-10:]) < 1.3 * target
        assert held or max(thresholds[-10:]) <= 0.1, (target, latencies[-10:], thresholds[-10:])
        # Out of reach: the most merging, in steps of 0.05 whatever the noise; then generous: none.
        ros.set_parameters(NODE, merge_threshold=1.0, target_latency_ms=1.0)
        _, thresholds = run(22, 760)
        assert thresholds[:21] == pytest.approx([1.0 - 0.05 * step for step in range(21)], abs=1e-3)
        assert thresholds[-1] == 0.0
        generous = ros.set_parameters(NODE, target_latency_ms=10000.0)  # the most the parameter allows
        assert all(result.successful for result in generous)
        _, thresholds = run(22, 782)
        assert thresholds[0] == 0.0 and thresholds[-1] == 1.0
        ros.set_parameters(NODE, merge_threshold=0.6, target_latency_ms=1.0)
        ros.set_parameters(NODE, target_latency_ms=0.0)
        _, after = run(2, 804)
        assert after == [0.6, 0.6]  # budget off: back to the operator's threshold
    finally:
        ros.set_parameters(NODE, merge_threshold=0.3, target_latency_ms=0.0)


def test_a_threshold_set_under_a_budget_is_not_overwritten_by_a_frame_in_flight(ros, node, street_frames):
    """The operator's new threshold is what the next frame runs with, every time.

    Under a budget the inference thread steps the threshold after each frame while the
    executor thread may be applying a new one; the step of a frame that started before the
    change must not land on top of it. Setting it straight after each frame's stats arrive
    aims at that window (the frame's overlay and camera_info are still being published).
    """
    _, camera = node
    try:
        ros.set_parameters(NODE, target_latency_ms=1.0)  # unreachable: every frame steps the threshold down
        for index in range(12):
            setting = 0.9 if index % 2 == 0 else 0.8
            ros.set_parameters(NODE, merge_threshold=setting)
            frame = image_message(street_frames[index % 6], stamp_ns=(900 + index) * 10 ** 9)
            stats = _send_and_wait(ros, camera, frame, f"{NODE}/frame_stats", resend_every=10.0)
            assert float(diagnostic_values(stats.status[0])["merge_threshold"]) == setting, index
    finally:
        ros.set_parameters(NODE, merge_threshold=0.3, target_latency_ms=0.0)


def _error_reported(ros, node_name: str, since: float, reason: str) -> bool:
    with ros.lock:
        arrays = [m for t, m in ros.messages["/diagnostics"] if t > since]
    return any(s.name.startswith(node_name) and s.level == b"\x02" and reason in diagnostic_values(s)["last_error"]
               for a in arrays for s in a.status)


def test_8k_frame_is_rejected_over_reliable_transport(ros, node_model, street_frames):
    """A 100 MB raw frame needs reliable QoS to arrive at all; the node refuses it, then carries on."""
    from sensor_msgs.msg import Image
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "cpu", "diagnostic_period": 0.5,
                                           # REP 2003: the input's QoS overridden by the standard parameter
                                           f"qos_overrides.{INPUT}_8k.subscription.reliability": "reliable"},
                          {"image": INPUT + "_8k", "__node": "clustvit_8k"}, name="8k")
    try:
        camera = ros.publisher(Image, INPUT + "_8k")
        assert wait_for(lambda: camera.get_subscription_count() > 0, 60), process.log()
        ros.listen(Image, "/clustvit_8k/labels")
        sent = time.monotonic()
        eight_k = image_message(np.zeros((4320, 7680, 3), np.uint8), stamp_ns=950 * 10 ** 9)
        camera.publish(eight_k)
        assert wait_for(lambda: _error_reported(ros, "clustvit_8k", sent, "7680x4320 image exceeds max_input_pixels"),
                        60), process.log()
        del eight_k
        _send_and_wait(ros, camera, image_message(street_frames[6], stamp_ns=951 * 10 ** 9), "/clustvit_8k/labels")
    finally:
        assert process.stop() == 0, process.log()


def test_compressed_transport_and_corrupt_jpeg(ros, node_model, street_frames):
    from sensor_msgs.msg import CompressedImage
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "cpu", "input_transport": "compressed",
                                           "diagnostic_period": 0.5},
                          {"image": INPUT, "__node": "clustvit_jpeg"}, name="jpeg")
    try:
        camera = ros.publisher(CompressedImage, INPUT + "/compressed")
        assert wait_for(lambda: camera.get_subscription_count() > 0, 60), process.log()
        from sensor_msgs.msg import Image
        ros.listen(Image, "/clustvit_jpeg/labels")
        ok, jpeg = cv2.imencode(".jpg", street_frames[5])
        message = CompressedImage(format="jpeg", data=jpeg.tobytes())
        message.header.stamp.sec = 900
        labels = _send_and_wait(ros, camera, message, topic="/clustvit_jpeg/labels")
        assert (labels.width, labels.height) == (480, 360)
        corrupt = CompressedImage(format="jpeg", data=jpeg.tobytes()[:200] + b"\x00" * 500)
        corrupt.header.stamp.sec = 901
        sent = time.monotonic()
        camera.publish(corrupt)
        assert wait_for(lambda: _error_reported(ros, "clustvit_jpeg", sent, "cannot decode compressed image"), 30)
        message.header.stamp.sec = 902
        _send_and_wait(ros, camera, message, topic="/clustvit_jpeg/labels")
        # An 8K JPEG is small on the wire but decodes past max_input_pixels: refused too.
        ok, big = cv2.imencode(".jpg", np.zeros((4320, 7680, 3), np.uint8))
        huge = CompressedImage(format="jpeg", data=big.tobytes())
        huge.header.stamp.sec = 903
        sent = time.monotonic()
        camera.publish(huge)
        assert wait_for(lambda: _error_reported(ros, "clustvit_jpeg", sent, "exceeds max_input_pixels"), 30)
        message.header.stamp.sec = 904
        _send_and_wait(ros, camera, message, topic="/clustvit_jpeg/labels")
    finally:
        assert process.stop() == 0, process.log()


def test_bad_model_file_stops_startup_naming_the_file(tmp_path):
    broken = tmp_path / "broken_model.safetensors"
    broken.write_bytes(b"definitely not a model")
    process = NodeProcess("segment_node", {"model_path": broken}, name="broken")
    assert process.wait(120) == 1
    log = process.log()
    assert "broken_model.safetensors" in log and "cannot load model" in log and "Traceback" not in log
    process = NodeProcess("segment_node", {"model_path": tmp_path / "missing.safetensors"}, name="missing")
    assert process.wait(120) == 1 and "missing.safetensors: no such file" in process.log()


def test_unknown_device_stops_startup_with_a_reason(node_model):
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "tpu"}, name="tpu")
    assert process.wait(120) == 1
    assert "device 'tpu': expected auto, cpu, cuda or cuda:N" in process.log()


def test_peer_strategy_is_selectable_with_its_knob(ros, node_model, network, street_frames):
    from sensor_msgs.msg import Image
    process = NodeProcess("segment_node", {"model_path": node_model, "device": "cpu", "merge_strategy": "tome"},
                          {"image": INPUT + "_tome", "__node": "clustvit_tome"}, name="tome")
    try:
        camera = ros.publisher(Image, INPUT + "_tome")
        assert wait_for(lambda: camera.get_subscription_count() > 0, 60), process.log()
        from diagnostic_msgs.msg import DiagnosticArray
        ros.listen(DiagnosticArray, "/clustvit_tome/frame_stats")
        frame = street_frames[7]
        first = _send_and_wait(ros, camera, image_message(frame, stamp_ns=1000 * 10 ** 9),
                               "/clustvit_tome/frame_stats")
        default_tokens = int(diagnostic_values(first.status[0])["tokens_after_merge"])
        assert default_tokens < network["tokens"]  # ToMe's default ratio merges
        assert ros.set_parameters("/clustvit_tome", strategy_knob=0.3)[0].successful
        second = _send_and_wait(ros, camera, image_message(frame, stamp_ns=1001 * 10 ** 9),
                                "/clustvit_tome/frame_stats")
        assert int(diagnostic_values(second.status[0])["tokens_after_merge"]) < default_tokens
        rejected = ros.set_parameters("/clustvit_tome", strategy_knob=0.9)[0]
        assert not rejected.successful and "out of range" in rejected.reason
        # The latency budget steers any strategy's knob: ToMe's ratio goes up (more merging) when over budget.
        assert ros.set_parameters("/clustvit_tome", strategy_knob=0.05, target_latency_ms=1.0)[0].successful
        third = _send_and_wait(ros, camera, image_message(frame, stamp_ns=1002 * 10 ** 9),
                               "/clustvit_tome/frame_stats")
        fourth = _send_and_wait(ros, camera, image_message(frame, stamp_ns=1003 * 10 ** 9),
                                "/clustvit_tome/frame_stats")
        ratio = [float(diagnostic_values(m.status[0])["knob"].split("=")[1]) for m in (third, fourth)]
        assert ratio[0] == pytest.approx(0.05) and ratio[1] > ratio[0]
        assert ros.set_parameters("/clustvit_tome", target_latency_ms=0.0)[0].successful
        assert not ros.set_parameters("/clustvit_tome", merge_threshold=0.5)[0].successful  # not declared
    finally:
        assert process.stop() == 0, process.log()


def test_unknown_or_unusable_strategy_stops_startup(node_model, tmp_path, backbone_file):
    process = NodeProcess("segment_node", {"model_path": node_model, "merge_strategy": "magic"}, name="magic")
    assert process.wait(120) == 1 and "merge_strategy: unknown strategy 'magic'" in process.log()
    from clustvit_ros.model import ModelConfig, build_model, save_checkpoint
    plain = save_checkpoint(build_model(ModelConfig(clusters=0)), tmp_path / "plain.safetensors")
    process = NodeProcess("segment_node", {"model_path": plain, "merge_strategy": "clustvit"}, name="plain")
    assert process.wait(120) == 1 and "needs a model trained with a cluster module" in process.log()
