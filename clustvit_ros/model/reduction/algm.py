"""ALGM: Adaptive Local-then-Global token Merging (Norouzi et al., CVPR 2024, arXiv 2406.09936).

Two merge points, both between the attention and the MLP of a block, on the
tokens themselves as metric (as the authors' released code, tue-mps/algm-segmenter):

1. Local (CLAP), in the first block: the patch grid is cut into 2x2 windows;
   a window whose mean pairwise cosine similarity is >= ``tau`` becomes one
   token (its mean, size 4). Odd last rows/columns are not in any window.
2. Global (GBM), in block 5 (1-based; the paper's ViT-Ti/S/B setting): ToMe's
   bipartite matching over all tokens, merging every edge whose similarity
   reaches the image's own threshold mean(s) + std(s) / 5, s being the best-edge
   similarity of each A token (the released code's rule; the 5 is the layer).
   So the number of global merges adapts to the image, with no knob.

Tokens carry sizes with proportional attention (log(size) key bias, as ToMe;
the released code tracks sizes but its attention ignores them) and every
patch is restored through the source map before the head.

Knob ``tau`` in [0, 1] is the local threshold (the released configs use 0.88
to 0.955 per backbone and dataset; 0.9 for ViT-Ti). ``tau`` = 1 merges nothing,
in either stage, and runs the plain ViT exactly.

Token counts depend on the data, so each merge point reads one small count
vector back to the host (the new sequence length); nothing else syncs. In a
batch, images are padded to a common layout whose empty slots have size 0
(masked by the same log(size) bias), and A/B alternate over each image's real
tokens, so every image merges exactly as it would alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KnobSpec, ReductionStats, SegmentationBackbone, StrategySpec, TokenReduction
from .bipartite import MergedTokens, match_alternate, merge_plan
from .blocks import attention_half, block_forward, mlp_half

LOCAL_BLOCK = 0  # paper: layer 1 (1-based)
GLOBAL_BLOCK = 4  # paper: layer 5 (1-based) for ViT-Ti/S/B


def window_similarity(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean pairwise cosine similarity of every full 2x2 window: (B, N, D) -> (B, h//2 * w//2)."""
    batch, _, dim = patches.shape
    h, w = grid
    unit = F.normalize(patches, dim=-1).reshape(batch, h, w, dim)[:, :h // 2 * 2, :w // 2 * 2]
    windows = unit.reshape(batch, h // 2, 2, w // 2, 2, dim).transpose(2, 3).reshape(batch, -1, 4, dim)
    # sum_{i != j} <u_i, u_j> = |sum_i u_i|^2 - sum_i |u_i|^2: O(D) per window instead of a 4x4 Gram.
    total = windows.sum(2)
    return ((total * total).sum(-1) - (windows * windows).sum((2, 3))) / 12.0


def window_plan(merge: torch.Tensor, counts: list[int],
                grid: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """Merge index (B, N) for flagged windows ``merge`` (B, W) with per-image ``counts`` (host).

    Layout: one token per merged window (flagged windows in order), then the
    other tokens in grid order. Slots beyond an image's own counts stay empty.
    """
    batch, num_windows = merge.shape
    h, w = grid
    device = merge.device
    rows = torch.arange(h, device=device).unsqueeze(1)
    cols = torch.arange(w, device=device).unsqueeze(0)
    in_window = ((rows < h // 2 * 2) & (cols < w // 2 * 2)).flatten()
    window = ((rows // 2) * (w // 2) + cols // 2).flatten().clamp(max=max(num_windows - 1, 0))
    token_merged = merge[:, window] & in_window  # (B, N)
    window_order = torch.argsort((~merge).to(torch.uint8), dim=1, stable=True)
    window_rank = torch.empty_like(window_order).scatter_(
        1, window_order, torch.arange(num_windows, device=device).expand(batch, -1))
    token_order = torch.argsort(token_merged.to(torch.uint8), dim=1, stable=True)
    token_rank = torch.empty_like(token_order).scatter_(
        1, token_order, torch.arange(h * w, device=device).expand(batch, -1))
    most, fewest = max(counts), min(counts)
    index = torch.where(token_merged, window_rank[:, window], most + token_rank)
    return index, most + h * w - 4 * fewest


def adaptive_threshold(best: torch.Tensor, layer: int) -> torch.Tensor:
    """Per-image global threshold mean + std / layer over the finite best-edge similarities (B, nA) -> (B, 1).

    The rule of the released ALGM code (global_merge.py), with the 1-based
    ``layer`` of the global merge; std is the unbiased one, as there. Unlike
    there, statistics are per image, not pooled over the batch, so an image's
    merges never depend on the other images of a batch.
    """
    real = torch.isfinite(best)  # -inf marks A slots without a real token (padding)
    count = real.sum(1, keepdim=True)
    mean = torch.where(real, best, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    var = torch.where(real, (best - mean) ** 2, 0.0).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    return mean + var.sqrt() / layer


@dataclass
class ALGMState(MergedTokens):
    tau: float = 1.0  # the knob, fixed for this forward pass
    grid: tuple[int, int] = (0, 0)
    padded: bool = False  # some slots are empty (batched, unequal counts)
    tokens: list[int] = field(default_factory=list)  # real patch tokens per image


class ALGM(TokenReduction):
    """Adaptive local-then-global merging. Knob: ``tau`` in [0, 1], the local window threshold."""

    name = "algm"
    knob = "tau"
    host_reads = 2  # the new length after each of its two merges

    def __init__(self, tau: float = 0.9):
        self.tau = tau

    def start_block(self, model: SegmentationBackbone) -> int:
        return model.depth if self.tau >= 1.0 else LOCAL_BLOCK

    def reduce(self, model: SegmentationBackbone, x: torch.Tensor,
               grid: tuple[int, int]) -> tuple[torch.Tensor, ALGMState]:
        batch, num_tokens = x.shape[0], x.shape[1] - 1
        return x, ALGMState(stats=ReductionStats.unreduced(batch, num_tokens), tau=self.tau,
                            grid=grid, tokens=[num_tokens] * batch)

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor, state: ALGMState) -> torch.Tensor:
        merge = {LOCAL_BLOCK: self._merge_local, GLOBAL_BLOCK: self._merge_global}.get(index)
        if merge is None:
            return block_forward(block, x, state.bias)
        return mlp_half(block, merge(attention_half(block, x, state.bias), state))

    def _merge_local(self, x: torch.Tensor, state: ALGMState) -> torch.Tensor:
        flags = window_similarity(x[:, 1:], state.grid) >= state.tau
        counts = flags.sum(1).tolist()  # the one read-back here: the new length depends on it
        if not any(counts):
            return x
        merge_index, length = window_plan(flags, counts, state.grid)
        return self._merge(x, state, merge_index, length, [-3 * c for c in counts])

    def _merge_global(self, x: torch.Tensor, state: ALGMState) -> torch.Tensor:
        valid = state.size[:, 1:] > 0 if state.padded else None
        matching = match_alternate(x[:, 1:], valid)
        merges = (matching.best >= adaptive_threshold(matching.best, GLOBAL_BLOCK + 1)).sum(1)
        counts = merges.tolist()  # the one read-back here
        if not any(counts):
            return x
        merge_index, length = merge_plan(matching, merges, min(counts))
        return self._merge(x, state, merge_index, length, [-c for c in counts])

    @staticmethod
    def _merge(x: torch.Tensor, state: ALGMState, merge_index: torch.Tensor, length: int,
               removed: list[int]) -> torch.Tensor:
        state.tokens = [t + d for t, d in zip(state.tokens, removed)]
        state.padded = any(t != length for t in state.tokens)
        return state.merge(x, merge_index, length, state.tokens)

    def restore(self, model: SegmentationBackbone, x: torch.Tensor, state: ALGMState) -> torch.Tensor:
        return state.restore(x)


SPEC = StrategySpec(
    "algm", lambda value: ALGM(value),
    KnobSpec("tau", 0.0, 1.0, 0.9, 1.0, (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0),
             description="local 2x2 window merges when its mean cosine similarity >= tau "
                         "(first block); the global merge (block 5) sets its own threshold per image"),
    "ALGM: local 2x2 merging in the first block, adaptive global merging in block 5, unmerged "
    "before the head")
