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
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reduction import ReductionState, ReductionStats, TokenReduction
from . import KnobSpec, StrategySpec, register
from .bipartite import bipartite_soft_matching, compose, merge_wavg, size_bias, unmerge

if TYPE_CHECKING:  # pragma: no cover
    from ..clustvit import ClustViT


def attention_with_keys(attn: nn.Module, x: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` forward with an additive key bias; also returns the keys averaged over heads.

    The keys are ToMe's matching metric: they come free with attention.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, -1))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), k.mean(1)


def mlp_half(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Second residual branch of a timm ``Block``."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


@dataclass
class MergeState(ReductionState):
    ratio: float = 0.0  # the knob, fixed for this forward pass
    size: Optional[torch.Tensor] = None  # (B, 1+T) original patches per token (None: all 1)
    source: Optional[torch.Tensor] = None  # (B, N) current slot of every original patch
    bias: Optional[torch.Tensor] = None  # (B, 1, 1, 1+T) log(size) for proportional attention


class ToMe(TokenReduction):
    """Token Merging with unmerge. Knob: ``ratio`` in [0, 0.5], fraction of current tokens merged per block."""

    name = "tome"
    knob = "ratio"

    def __init__(self, ratio: float = 0.1):
        self.ratio = ratio

    def start_block(self, model: "ClustViT") -> int:
        return model.depth if self.ratio <= 0 else model.config.injection_point

    def reduce(self, model: "ClustViT", x: torch.Tensor,
               grid: tuple[int, int]) -> tuple[torch.Tensor, MergeState]:
        batch, num_tokens = x.shape[0], x.shape[1] - 1
        stats = ReductionStats.unreduced(batch, num_tokens)
        return x, MergeState(stats=stats, ratio=min(max(self.ratio, 0.0), 0.5))

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor,
                  state: ReductionState) -> torch.Tensor:
        assert isinstance(state, MergeState)
        x_attn, keys = attention_with_keys(block.attn, block.norm1(x), state.bias)
        x = x + block.drop_path1(block.ls1(x_attn))
        tokens = x.shape[1] - 1
        # Same count for every image: static shapes, no padding, no host read-back.
        r = math.floor(state.ratio * tokens + 1e-9)
        if r > 0:
            merge_index, length = bipartite_soft_matching(keys[:, 1:], r)
            size = state.size if state.size is not None else x.new_ones(x.shape[:2])
            x, state.size = merge_wavg(x, size, merge_index, length)
            state.source = compose(state.source, merge_index)
            state.bias = size_bias(state.size)
            stats = state.stats
            stats.tokens_after = [length] * x.shape[0]
            stats.merged_tokens = [stats.tokens_in - length] * x.shape[0]
        return mlp_half(block, x)

    def restore(self, model: "ClustViT", x: torch.Tensor, state: ReductionState) -> torch.Tensor:
        assert isinstance(state, MergeState)
        return x if state.source is None else unmerge(x, state.source)


register(StrategySpec(
    "tome", lambda value: ToMe(value),
    KnobSpec("ratio", 0.0, 0.5, 0.1, 0.0, (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3),
             description="fraction of the current patch tokens merged in each block from the "
                         "injection point on (ToMe bipartite matching on keys)"),
    "ToMe: bipartite merging in every block from the injection point, unmerged before the head"))
