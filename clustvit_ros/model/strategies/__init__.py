"""Token-reduction strategies selectable on one backbone, with their runtime knobs.

Every strategy implements ``TokenReduction`` (decide -> reduce -> run blocks ->
restore) and describes its knob here, so the CLI, the benchmark and the node can
offer them side by side without knowing their internals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..clustering import ClusterMerging
from ..reduction import NoReduction, TokenReduction


@dataclass(frozen=True)
class KnobSpec:
    """A strategy's runtime knob: attribute name, range, the value that disables it, sweep points."""

    name: str
    low: float
    high: float
    default: float
    noop: float  # the value at which the strategy reproduces the plain ViT
    sweep: tuple[float, ...]
    integer: bool = False
    description: str = ""

    def validate(self, value: float) -> float:
        if value != value or not self.low <= value <= self.high:
            raise ValueError(f"{self.name} must be in [{self.low:g}, {self.high:g}], got {value}")
        return int(value) if self.integer else float(value)


@dataclass(frozen=True)
class StrategySpec:
    name: str
    factory: Callable[[float], TokenReduction]
    knob: Optional[KnobSpec]
    summary: str
    needs_cluster_module: bool = False


_REGISTRY: dict[str, StrategySpec] = {}


def register(spec: StrategySpec) -> StrategySpec:
    _REGISTRY[spec.name] = spec
    return spec


def strategy_names() -> list[str]:
    return list(_REGISTRY)


def strategy_spec(name: str) -> StrategySpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(_REGISTRY)}") from None


def make_strategy(name: str, knob: Optional[float] = None) -> TokenReduction:
    """A strategy with its knob at ``knob`` (default: the knob's default)."""
    spec = strategy_spec(name)
    if spec.knob is None:
        return spec.factory(0.0)
    return spec.factory(spec.knob.validate(spec.knob.default if knob is None else knob))


register(StrategySpec("none", lambda _: NoReduction(), None, "plain ViT: every block sees every token"))
register(StrategySpec(
    "clustvit", lambda value: ClusterMerging(value),
    KnobSpec("threshold", 0.0, 1.0, 0.5, 1.0, (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
             description="merge a token into its most probable cluster c when p(c) >= threshold"),
    "ClustViT: learned clustering at the injection point, regeneration before the head",
    needs_cluster_module=True))


# Peer methods register themselves on import (each module calls ``register``).
from . import ailurus, tome, algm, clustr  # noqa: E402,F401
