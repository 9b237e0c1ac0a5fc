"""The small interface every token-reduction strategy implements.

A strategy is a plain object (not a module: it owns no weights, so it can be
swapped on a loaded model at any time) that takes part in the backbone forward
in four steps::

    x = blocks[:start](x)                       # full token set
    x, state = strategy.reduce(model, x, grid)  # decide + reduce
    for i in start..depth-1:
        x = strategy.run_block(i, block_i, x, state)
    x = strategy.restore(model, x, state)       # back to the full token grid

Its runtime knob is a plain attribute that may change between calls. Learned
pieces a strategy needs (ClustViT's cluster head and regenerator) live on the
model, so they travel with the checkpoint.

Strategies see the model only through ``SegmentationBackbone``, the few things
they use of it; they never import the model class. ``KnobSpec`` and
``StrategySpec`` describe a strategy and its knob (name, range, default, which
way is faster): that description is what the engine, the node, the latency
controller and the CLI pass between them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch


class SegmentationBackbone(Protocol):
    """What a strategy may use of the model: its blocks and sizes, and its learned merging pieces."""

    backbone: Any  # timm VisionTransformer: .blocks
    config: Any  # ModelConfig: .injection_point, .clusters
    cluster_head: Optional[torch.nn.Module]
    regenerator: Optional[torch.nn.Module]
    training: bool

    @property
    def depth(self) -> int: ...


@dataclass(frozen=True)
class KnobSpec:
    """A strategy's runtime knob: attribute name, range, default, no-op value, sweep points.

    ``faster`` says which way reduces more tokens ("lower" or "higher" values):
    what a latency controller needs to steer any knob.
    """

    name: str
    low: float
    high: float
    default: float
    noop: float  # the value at which the strategy reproduces the plain ViT
    sweep: tuple[float, ...]
    integer: bool = False
    description: str = ""
    faster: str = "lower"

    def validate(self, value: float) -> float:
        """The value as the knob's type, or ValueError with the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name} must be a number in [{self.low:g}, {self.high:g}], got {value!r}")
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise ValueError(f"{self.name} must be in [{self.low:g}, {self.high:g}], got {value}")
        if self.integer and value != int(value):
            raise ValueError(f"{self.name} must be a whole number, got {value}")
        return int(value) if self.integer else float(value)

    def position(self, value: float) -> float:
        """0..1 along the knob, 0 = most reduction (fastest), 1 = least."""
        fraction = (value - self.low) / (self.high - self.low)
        return fraction if self.faster == "lower" else 1.0 - fraction

    def value_at(self, position: float) -> float:
        """Inverse of ``position`` (rounded for integer knobs)."""
        position = min(1.0, max(0.0, position))
        fraction = position if self.faster == "lower" else 1.0 - position
        value = self.low + fraction * (self.high - self.low)
        return int(round(value)) if self.integer else value


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: how to build it, its knob, and what it needs of the model."""

    name: str
    factory: Callable[[float], "TokenReduction"]
    knob: Optional[KnobSpec]
    summary: str
    needs_cluster_module: bool = False
    # The knob's default for a given model, when the model carries its own (ClustViT's threshold).
    model_default: Optional[Callable[[Any], float]] = None

    def default_knob(self, model: Any = None) -> Optional[float]:
        if self.knob is None:
            return None
        if self.model_default is not None and model is not None:
            return self.knob.validate(self.model_default(model))
        return self.knob.default


@dataclass
class ReductionStats:
    """Token counts of one forward pass, one entry per image of the batch."""

    tokens_in: int  # patch tokens per image (class token excluded)
    tokens_after: list[int]  # tokens in the last (most reduced) block, class token excluded
    merged_tokens: list[int]  # patch tokens absorbed into another token
    cluster_sizes: list[list[int]] = field(default_factory=list)  # clustvit: sizes of clusters 1..k

    @property
    def merged_fraction(self) -> list[float]:
        return [m / self.tokens_in for m in self.merged_tokens]

    @classmethod
    def unreduced(cls, batch: int, tokens_in: int) -> "ReductionStats":
        return cls(tokens_in, [tokens_in] * batch, [0] * batch)

    def as_dict(self, index: int = 0) -> dict[str, Any]:
        """Stats of one image as plain numbers (for logs, JSON and ROS messages)."""
        return {
            "tokens_in": self.tokens_in,
            "tokens_after_merge": self.tokens_after[index],
            "merged_tokens": self.merged_tokens[index],
            "merged_fraction": self.merged_fraction[index],
            "cluster_sizes": self.cluster_sizes[index] if self.cluster_sizes else [],
        }


@dataclass
class ReductionState:
    """What `reduce` hands to `run_block` and `restore`; strategies add their own fields."""

    stats: ReductionStats
    attn_mask: Optional[torch.Tensor] = None  # bool, True = attend; None keeps fused kernels
    cluster_logits: Optional[torch.Tensor] = None  # (B, N, k+1) for the training loss


class TokenReduction:
    """Base strategy: reduces nothing (the plain ViT)."""

    name = "none"
    knob: Optional[str] = None  # name of the runtime knob attribute, if any
    # Values a batch-1 forward reads back to the host (each would drain a GPU stream):
    # only what a data-dependent sequence length needs.
    host_reads = 0

    def start_block(self, model: SegmentationBackbone) -> int:
        """Index of the first block that runs on the reduced set (depth = never)."""
        return model.depth

    def reduce(self, model: SegmentationBackbone, x: torch.Tensor,
               grid: tuple[int, int]) -> tuple[torch.Tensor, ReductionState]:
        return x, ReductionState(ReductionStats.unreduced(x.shape[0], x.shape[1] - 1))

    def run_block(self, index: int, block: torch.nn.Module, x: torch.Tensor,
                  state: ReductionState) -> torch.Tensor:
        if state.attn_mask is None:
            return block(x)  # timm's own forward, fused kernels
        return block(x, attn_mask=state.attn_mask)

    def run_reduced(self, model: SegmentationBackbone, start: int, x: torch.Tensor,
                    state: ReductionState) -> torch.Tensor:
        """Blocks ``start``.. on the reduced sequence: one ``run_block`` each (a subclass may replay them)."""
        blocks = model.backbone.blocks
        for index in range(start, len(blocks)):
            x = self.run_block(index, blocks[index], x, state)
        return x

    def restore(self, model: SegmentationBackbone, x: torch.Tensor, state: ReductionState) -> torch.Tensor:
        return x

    def describe(self) -> dict[str, Any]:
        knob = {self.knob: getattr(self, self.knob)} if self.knob else {}
        return {"strategy": self.name, **knob}


class NoReduction(TokenReduction):
    """The plain ViT: every block sees every token."""


def run_blocks(model: SegmentationBackbone, x: torch.Tensor, grid: tuple[int, int],
               reduction: TokenReduction, restore: bool = True) -> tuple[torch.Tensor, ReductionState]:
    """Run the backbone blocks on embedded tokens (B, 1+N, D) under a strategy.

    Returns full-resolution tokens (B, 1+N, D) and the state (stats, aux outputs);
    with ``restore=False`` the reduced sequence instead, for a head that decodes it.
    """
    blocks = model.backbone.blocks
    start = min(reduction.start_block(model), len(blocks))
    for block in blocks[:start]:
        x = block(x)
    if start == len(blocks):
        return x, ReductionState(ReductionStats.unreduced(x.shape[0], x.shape[1] - 1))
    x, state = reduction.reduce(model, x, grid)
    x = reduction.run_reduced(model, start, x, state)
    return (reduction.restore(model, x, state) if restore else x), state
