"""Real-time plumbing for a perception node, free of ROS: a newest-frame slot,
rolling latency statistics, and the latency-budget controller."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar

import numpy as np

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds at most one pending item; a newer item replaces (drops) the older one.

    The producer (the subscription callback) never blocks; the consumer (the
    inference thread) always gets the newest item, so latency cannot grow
    when frames arrive faster than they are processed.
    """

    def __init__(self):
        self._item: Optional[T] = None
        self._condition = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> bool:
        """Store ``item``; True when it replaced an unprocessed one (a drop)."""
        with self._condition:
            replaced = self._item is not None
            if replaced:
                self.dropped += 1
            self._item = item
            self._condition.notify()
            return replaced

    def take(self, timeout: Optional[float] = None) -> Optional[T]:
        """The pending item (waiting up to ``timeout``), or None when closed or timed out."""
        with self._condition:
            if self._item is None and not self._closed:
                self._condition.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> bool:
        """An item is waiting to be taken."""
        return self._item is not None


class RollingStats:
    """Mean and 95th percentile of the last ``window`` values of several named series."""

    def __init__(self, window: int = 100):
        self.window = window
        self._series: dict[str, deque] = {}
        self._lock = threading.Lock()

    def add(self, **values: float) -> None:
        with self._lock:
            for name, value in values.items():
                self._series.setdefault(name, deque(maxlen=self.window)).append(float(value))

    def summary(self) -> dict[str, tuple[float, float]]:
        """name -> (mean, p95) over the window."""
        with self._lock:
            data = {name: np.asarray(values) for name, values in self._series.items() if values}
        return {name: (float(v.mean()), float(np.percentile(v, 95))) for name, v in data.items()}

    def median(self, name: str) -> Optional[float]:
        with self._lock:
            values = list(self._series.get(name, ()))
        return float(np.median(values)) if values else None


@dataclass
class LatencyController:
    """Holds a latency budget by moving the merge threshold, frame by frame.

    Lower thresholds merge more tokens and run faster. The controller integrates
    the relative error of a smoothed latency: ``t += gain * (target - L) / target``,
    with a dead band so it settles instead of hunting, and a step limit so one
    outlier frame cannot swing it.
    """

    gain: float = 0.15
    smoothing: float = 0.3  # weight of the newest frame in the latency average
    dead_band: float = 0.04  # relative error tolerated without correction
    max_step: float = 0.05
    low: float = 0.0
    high: float = 1.0
    _average: Optional[float] = field(default=None, repr=False)

    def reset(self) -> None:
        self._average = None

    def update(self, threshold: float, latency_ms: float, target_ms: float) -> float:
        """New threshold after a frame that took ``latency_ms``."""
        if target_ms <= 0:
            return threshold
        if self._average is None:
            self._average = latency_ms
        else:
            self._average += self.smoothing * (latency_ms - self._average)
        error = (target_ms - self._average) / target_ms  # > 0: headroom, merge less
        if abs(error) <= self.dead_band:
            return threshold
        step = max(-self.max_step, min(self.max_step, self.gain * error))
        return max(self.low, min(self.high, threshold + step))


@dataclass
class FrameCounters:
    received: int = 0
    processed: int = 0
    rejected: int = 0
    failed: int = 0
    last_error: str = ""
    last_error_time: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str, error: Optional[str] = None, now: float = 0.0) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)
            if error is not None:
                self.last_error, self.last_error_time = error, now

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"received": self.received, "processed": self.processed, "rejected": self.rejected,
                    "failed": self.failed, "last_error": self.last_error,
                    "last_error_time": self.last_error_time}
