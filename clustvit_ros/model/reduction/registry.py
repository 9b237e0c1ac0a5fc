"""Every token-reduction strategy by name, with its knob (one explicit list, no import-order magic).

The CLI, the benchmark, the engine and the node offer strategies side by side
through this registry without knowing their internals.
"""
from __future__ import annotations

from typing import Optional

from . import ailurus, algm, clustr, clustvit, tome
from .base import NoReduction, StrategySpec, TokenReduction

NONE = StrategySpec("none", lambda _: NoReduction(), None, "plain ViT: every block sees every token")

STRATEGIES: dict[str, StrategySpec] = {spec.name: spec for spec in (
    NONE, clustvit.SPEC, tome.SPEC, algm.SPEC, ailurus.SPEC, clustr.SPEC)}


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def strategy_spec(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(STRATEGIES)}") from None


def make_strategy(name: str, knob: Optional[float] = None, model=None) -> TokenReduction:
    """A strategy with its knob at ``knob`` (default: the knob's default, or the model's own)."""
    spec = strategy_spec(name)
    if spec.knob is None:
        return spec.factory(0.0)
    return spec.factory(spec.knob.validate(spec.default_knob(model) if knob is None else knob))


def spec_of(strategy: TokenReduction) -> StrategySpec:
    """The registry entry of a strategy object."""
    return strategy_spec(strategy.name)
