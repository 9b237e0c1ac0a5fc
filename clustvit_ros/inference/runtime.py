"""Real-time plumbing for a perception node, free of ROS: newest-frame slots (one per
camera), rolling latency statistics, the latency-budget controller, transport-loss
counting, the knob shared by the operator and the controller, and the choice between
batched and one-by-one inference."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, Hashable, Optional, TypeVar

import numpy as np

from ..model.reduction import KnobSpec

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


class FrameSlots(Generic[T]):
    """One newest-item slot per key (camera), one consumer waiting on all of them.

    ``put`` never blocks and replaces (drops) an unprocessed item of the same
    key; ``take_all`` hands the consumer every pending item at once, so no key
    can starve another.
    """

    def __init__(self):
        self._items: dict[Hashable, T] = {}
        self._condition = threading.Condition()
        self._closed = False
        self.dropped: dict[Hashable, int] = {}

    def put(self, key: Hashable, item: T) -> bool:
        with self._condition:
            replaced = key in self._items
            if replaced:
                self.dropped[key] = self.dropped.get(key, 0) + 1
            self._items[key] = item
            self._condition.notify()
            return replaced

    def take_all(self, timeout: Optional[float] = None) -> dict[Hashable, T]:
        with self._condition:
            if not self._items and not self._closed:
                self._condition.wait(timeout)
            items, self._items = self._items, {}
            return items

    @property
    def pending(self) -> bool:
        return bool(self._items)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def reopen(self) -> None:
        with self._condition:
            self._closed = False
            self._items = {}

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass
class LatencyController:
    """Holds a latency budget by moving a strategy's knob, frame by frame.

    The controller works on the knob's position (0 = most reduction, fastest;
    1 = least: for ClustViT's threshold the position is the threshold itself),
    so it steers any monotone knob. It integrates the relative error of a
    smoothed latency: ``p += gain * (target - L) / target``, with a dead band so
    it settles instead of hunting, and a step limit so one outlier frame cannot
    swing it.
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

    def update(self, value: float, latency_ms: float, target_ms: float, knob: Optional[KnobSpec] = None) -> float:
        """The knob's new value after a frame that took ``latency_ms``.

        Without ``knob`` the value is taken as a position (a 0..1 threshold).
        """
        if target_ms <= 0:
            return value
        if self._average is None:
            self._average = latency_ms
        else:
            self._average += self.smoothing * (latency_ms - self._average)
        error = (target_ms - self._average) / target_ms  # > 0: headroom, reduce less
        if abs(error) <= self.dead_band:
            return value
        step = max(-self.max_step, min(self.max_step, self.gain * error))
        position = value if knob is None else knob.position(value)
        position = max(self.low, min(self.high, position + step))
        return position if knob is None else knob.value_at(position)


class BudgetedKnob:
    """A strategy's knob written from two threads: the operator's setting (the ROS executor)
    and the latency controller's step after each frame (the inference thread).

    Every setting, and every change of budget, starts a new generation; a step computed for a
    frame that began under an older generation is dropped. Without that, a frame still in
    flight when the operator sets a value steps from the value it ran with and overwrites
    the new one. ``engine`` is anything with ``knob`` and ``knob_value`` (SegmentationEngine).
    """

    def __init__(self, controller: Optional[LatencyController] = None):
        self.controller = controller or LatencyController()
        self._lock = threading.Lock()
        self._generation = 0

    def _renew(self) -> None:
        self._generation += 1
        self.controller.reset()  # the smoothed latency belongs to the old setting

    def set(self, engine, value: float) -> None:
        """The operator's setting: in force from the next frame; a budget starts from it."""
        with self._lock:
            engine.knob_value = value
            self._renew()

    def budget_changed(self, engine, target_ms: float, setting: Optional[float]) -> None:
        """A new budget; turning it off (0) returns to the operator's ``setting``."""
        with self._lock:
            self._renew()
            if target_ms == 0 and setting is not None:
                engine.knob_value = setting

    def begin(self, engine) -> tuple[int, Optional[float]]:
        """Before a frame: the generation it starts under and the knob value it runs with."""
        with self._lock:
            return self._generation, engine.knob_value

    def step(self, engine, begun: tuple[int, Optional[float]], latency_ms: float, target_ms: float) -> bool:
        """After a frame that took ``latency_ms``: the controller's step, unless a setting came in
        meanwhile. True when the step was applied."""
        generation, value = begun
        knob = engine.knob
        with self._lock:
            if generation != self._generation or target_ms <= 0 or knob is None or value is None:
                return False
            engine.knob_value = self.controller.update(value, latency_ms, target_ms, knob)
            return True


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


class TransportLosses:
    """Frames lost between a camera and us, from the publication sequence numbers DDS hands over.

    Each publisher (by gid) numbers its messages 1, 2, 3, ...; a gap is a frame
    that never arrived (dropped by best-effort QoS, an overrun reader queue, a
    too-large raw image). A new publisher starts its own count.
    """

    def __init__(self, window: int = 200, available: bool = True):
        self.available = available  # False: the middleware gives no sequence numbers (nothing is counted)
        self._last: dict[bytes, int] = {}
        self.lost = 0
        self.received = 0
        self._recent: deque = deque(maxlen=window)  # (lost before this frame)
        self._lock = threading.Lock()

    def record(self, publisher: Optional[bytes], sequence: Optional[int]) -> int:
        """Account one received message; returns the frames lost just before it."""
        with self._lock:
            self.received += 1
            gap = 0
            if publisher is not None and sequence:
                last = self._last.get(publisher)
                if last is not None and sequence > last + 1:
                    gap = sequence - last - 1
                if last is None or sequence > last:
                    self._last[publisher] = sequence
            self.lost += gap
            self._recent.append(gap)
            return gap

    def recent_fraction(self, minimum_frames: int = 20) -> Optional[float]:
        """Share of frames lost over the last window of received frames; None before ``minimum_frames``
        (one lost frame among the first few says nothing about a link)."""
        with self._lock:
            lost = sum(self._recent)
            received = len(self._recent)
        return lost / (lost + received) if received >= minimum_frames else None


class BatchChooser:
    """Decides, from measured times, whether k pending frames go through the network as one batch.

    Mostly picks the mode with the lower time per frame seen so far for that k;
    every ``explore_every``-th decision tries the other one, so the estimates
    follow the device (a GPU gains from batches, a busy CPU may not).
    """

    def __init__(self, explore_every: int = 20, smoothing: float = 0.2):
        self.explore_every = explore_every
        self.smoothing = smoothing
        self._per_frame: dict[tuple[int, bool], float] = {}
        self._decisions = 0

    def batched(self, frames: int) -> bool:
        if frames < 2:
            return False
        self._decisions += 1
        alone, together = self._per_frame.get((frames, False)), self._per_frame.get((frames, True))
        if alone is None or together is None:  # measure both first
            return together is None
        best = together < alone
        return (not best) if self._decisions % self.explore_every == 0 else best

    def record(self, frames: int, batched: bool, seconds: float) -> None:
        key = (frames, batched)
        per_frame = seconds / max(frames, 1)
        old = self._per_frame.get(key)
        self._per_frame[key] = per_frame if old is None else old + self.smoothing * (per_frame - old)

    def summary(self) -> dict[str, float]:
        return {f"{'batched' if b else 'sequential'}_{k}_ms_per_frame": 1e3 * v
                for (k, b), v in sorted(self._per_frame.items())}
