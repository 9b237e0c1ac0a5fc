"""ToMe for dense prediction: merge in every block from the injection point, unmerge at the end.

Token Merging (Bolya et al., ICLR 2023) with the unmerge step of ToMe for
Stable Diffusion / Segformer++ (arXiv 2405.14467): in each block from
``model.config.injection_point`` on, between its attention and its MLP (ToMe's
placement: the keys just computed, averaged over heads, are the metric), the
``ratio`` fraction of the current patch tokens is merged into their most
similar partner by bipartite soft matching. Sizes are tracked and attention is
proportional (key bias log(size)). After the last block every patch position
takes the final value of the token it was merged into, so the head sees the
full grid.

Why start at the injection point: ClustViT reduces from the same block, so
both methods pay for the same full-resolution early blocks and the knob
compares only how the later blocks are reduced. ``ratio`` = 0 runs the plain
ViT exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import KnobSpec, ReductionStats, SegmentationBackbone, StrategySpec, TokenReduction
from .bipartite import MergedTokens, bipartite_soft_matching
from .blocks import attention, mlp_half


@dataclass
class ToMeState(MergedTokens):
    ratio: float = 0.0  # the knob, fixed for this forward pass


class ToMe(TokenReduction):
    """Token Merging with unmerge. Knob: ``ratio`` in [0, 0.5], fraction of current tokens merged per block."""

    name = "tome"
    knob = "ratio"

    def __init__(self, ratio: float = 0.1):
        self.ratio = ratio

    def start_block(self, model: SegmentationBackbone) -> int:
        return model.depth if self.ratio <= 0 else model.config.injection_point

    def reduce(self, model: SegmentationBackbone, x: torch.Tensor,
               grid: tuple[int, int]) -> tuple[torch.Tensor, ToMeState]:
        batch, num_tokens = x.shape[0], x.shape[1] - 1
        stats = ReductionStats.unreduced(batch, num_tokens)
        return x, ToMeState(stats=stats, ratio=min(max(self.ratio, 0.0), 0.5))

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor, state: ToMeState) -> torch.Tensor:
        x_attn, keys = attention(block.attn, block.norm1(x), state.bias, with_keys=True)
        x = x + block.drop_path1(block.ls1(x_attn))
        # Same count for every image: static shapes, no padding, no host read-back.
        r = math.floor(state.ratio * (x.shape[1] - 1) + 1e-9)
        if r > 0:
            merge_index, length = bipartite_soft_matching(keys[:, 1:], r)
            x = state.merge(x, merge_index, length, [length] * x.shape[0])
        return mlp_half(block, x)

    def restore(self, model: SegmentationBackbone, x: torch.Tensor, state: ToMeState) -> torch.Tensor:
        return state.restore(x)


SPEC = StrategySpec(
    "tome", lambda value: ToMe(value),
    KnobSpec("ratio", 0.0, 0.5, 0.1, 0.0, (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3), faster="higher",
             description="fraction of the current patch tokens merged in each block from the "
                         "injection point on (ToMe bipartite matching on keys)"),
    "ToMe: bipartite merging in every block from the injection point, unmerged before the head")
