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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .clustvit import ClustViT


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

    def start_block(self, model: "ClustViT") -> int:
        """Index of the first block that runs on the reduced set (depth = never)."""
        return model.depth

    def reduce(self, model: "ClustViT", x: torch.Tensor,
               grid: tuple[int, int]) -> tuple[torch.Tensor, ReductionState]:
        return x, ReductionState(ReductionStats.unreduced(x.shape[0], x.shape[1] - 1))

    def run_block(self, index: int, block: torch.nn.Module, x: torch.Tensor,
                  state: ReductionState) -> torch.Tensor:
        if state.attn_mask is None:
            return block(x)
        return block(x, attn_mask=state.attn_mask)

    def restore(self, model: "ClustViT", x: torch.Tensor, state: ReductionState) -> torch.Tensor:
        return x

    def describe(self) -> dict[str, Any]:
        knob = {self.knob: getattr(self, self.knob)} if self.knob else {}
        return {"strategy": self.name, **knob}


class NoReduction(TokenReduction):
    """The plain ViT: every block sees every token."""


def run_blocks(model: "ClustViT", x: torch.Tensor, grid: tuple[int, int],
               reduction: TokenReduction) -> tuple[torch.Tensor, ReductionState]:
    """Run the backbone blocks on embedded tokens (B, 1+N, D) under a strategy.

    Returns full-resolution tokens (B, 1+N, D) and the state (stats, aux outputs).
    """
    blocks = model.backbone.blocks
    start = min(reduction.start_block(model), len(blocks))
    for block in blocks[:start]:
        x = block(x)
    if start == len(blocks):
        return x, ReductionState(ReductionStats.unreduced(x.shape[0], x.shape[1] - 1))
    x, state = reduction.reduce(model, x, grid)
    for index in range(start, len(blocks)):
        x = reduction.run_block(index, blocks[index], x, state)
    return reduction.restore(model, x, state), state
