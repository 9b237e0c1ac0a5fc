"""The inference thread's guard and watchdog, on a real SegmentNode in this process (real rclpy).

Failures are injected into the engine: an exception of any type is that frame's
failure, a thread that ends anyway is reported and restarted, and frames that
wait while nothing is handled turn /diagnostics to ERROR.
"""
from __future__ import annotations

import threading
import time

import cv2
import pytest

from ros_helpers import image_message, wait_for

pytestmark = [pytest.mark.ros, pytest.mark.slow]


@pytest.fixture
def node(node_model, monkeypatch):
    import rclpy
    from rclpy.parameter import Parameter
    from clustvit_ros.ros import diagnostics, segment_node
    monkeypatch.setattr(diagnostics, "STALL_AFTER_S", 0.5)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = segment_node.SegmentNode(context=context, parameter_overrides=[
        Parameter("model_path", value=str(node_model)), Parameter("device", value="cpu")])
    published = []
    node.pipeline.diagnostics_pub.publish = published.append  # read what would go out
    node.published_diagnostics = published
    yield node
    node.destroy_node()
    rclpy.shutdown(context=context)


def _status(node):
    node.pipeline.publish_diagnostics()
    return node.published_diagnostics[-1].status[0]


def _send(node, message):
    pipeline = node.pipeline
    pipeline._on_frame(pipeline.cameras[0], message, None)


def _counts(node):
    return node.pipeline.cameras[0].counters.snapshot()


def _frame(street_frames, second: int):
    return image_message(cv2.resize(street_frames[0], (96, 64)), stamp_ns=second * 10 ** 9)


def test_frames_waiting_on_a_stuck_inference_turn_diagnostics_to_error(node, street_frames):
    release = threading.Event()
    original = node.pipeline.engine.segment_batch

    def stuck(*args, **kwargs):
        release.wait(30)
        return original(*args, **kwargs)
    node.pipeline.engine.segment_batch = stuck
    _send(node, _frame(street_frames, 1))
    time.sleep(1.0)
    status = _status(node)
    assert status.level == b"\x02" and "none was handled" in status.message
    release.set()
    assert wait_for(lambda: _counts(node)["processed"] == 1, 30)
    assert _status(node).level != b"\x02"


def test_any_exception_is_the_frame_failure_and_the_thread_goes_on(node, street_frames):
    calls = []
    original = node.pipeline.engine.segment_batch

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("simulated: out of memory on this frame")
        return original(*args, **kwargs)
    node.pipeline.engine.segment_batch = flaky
    _send(node, _frame(street_frames, 2))
    assert wait_for(lambda: _counts(node)["failed"] == 1, 30)
    assert "MemoryError" in _counts(node)["last_error"]
    _send(node, _frame(street_frames, 3))
    assert wait_for(lambda: _counts(node)["processed"] == 1, 30)
    assert node.pipeline._worker.is_alive()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_ended_inference_thread_is_reported_and_restarted(node, street_frames):
    original = node.pipeline.engine.segment_batch
    calls = []

    def ends_the_thread(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SystemExit  # not an Exception: the per-frame guard does not catch it
        return original(*args, **kwargs)
    node.pipeline.engine.segment_batch = ends_the_thread
    _send(node, _frame(street_frames, 4))
    assert wait_for(lambda: not node.pipeline._worker.is_alive(), 30)
    status = _status(node)
    assert status.level == b"\x02" and "inference thread stopped; restarted" in status.message
    _send(node, _frame(street_frames, 5))
    assert wait_for(lambda: _counts(node)["processed"] == 1, 30)
