"""Newest-frame slot, rolling statistics and the latency controller (no ROS)."""
from __future__ import annotations

import threading

import numpy as np

from clustvit_ros.inference.runtime import LatencyController, LatestSlot, RollingStats


def test_slot_keeps_the_newest_and_counts_drops():
    slot = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True and slot.put(3) is True
    assert slot.dropped == 2
    assert slot.take() == 3 and slot.take(timeout=0.01) is None


def test_slot_wakes_a_waiting_consumer_and_closes():
    slot = LatestSlot()
    got = []
    consumer = threading.Thread(target=lambda: got.append(slot.take(timeout=5)))
    consumer.start()
    slot.put("frame")
    consumer.join(2)
    assert got == ["frame"]
    closer = threading.Thread(target=lambda: got.append(slot.take(timeout=5)))
    closer.start()
    slot.close()
    closer.join(2)
    assert got == ["frame", None] and slot.closed


def test_rolling_stats_window():
    stats = RollingStats(window=100)
    for value in range(200):
        stats.add(total=value)
    mean, p95 = stats.summary()["total"]
    assert mean == np.mean(range(100, 200)) and p95 == np.percentile(range(100, 200), 95)
    assert stats.median("total") == 149.5 and stats.median("missing") is None


def _plant(threshold: float, rng) -> float:
    """Latency (ms) of a model whose cost falls steeply around threshold 0.5, with 5 % noise."""
    merged = 1.0 / (1.0 + np.exp((threshold - 0.5) * 12.0))  # fraction merged
    return (40.0 + 50.0 * (1.0 - merged)) * rng.normal(1.0, 0.05)


def test_controller_converges_to_the_budget_without_oscillating():
    rng = np.random.default_rng(0)
    controller = LatencyController()
    threshold, history = 1.0, []
    for _ in range(150):
        latency = _plant(threshold, rng)
        threshold = controller.update(threshold, latency, target_ms=65.0)
        history.append((threshold, latency))
    thresholds = np.array([t for t, _ in history[-50:]])
    latencies = np.array([latency for _, latency in history[-50:]])
    assert abs(latencies.mean() - 65.0) < 0.06 * 65.0  # holds the budget on average
    assert thresholds.std() < 0.03  # settled, not hunting
    assert np.abs(np.diff(thresholds)).max() <= controller.max_step + 1e-9


def test_controller_saturates_when_the_budget_is_out_of_reach():
    rng = np.random.default_rng(1)
    controller = LatencyController()
    threshold = 0.5
    for _ in range(100):
        threshold = controller.update(threshold, _plant(threshold, rng), target_ms=10.0)
    assert threshold == 0.0  # merges everything it can
    for _ in range(100):
        threshold = controller.update(threshold, _plant(threshold, rng), target_ms=500.0)
    assert threshold == 1.0  # budget is generous: full accuracy
    assert controller.update(0.3, 100.0, target_ms=0.0) == 0.3  # 0 = off
