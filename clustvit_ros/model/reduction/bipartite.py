"""Bipartite soft matching (ToMe) as pure tensor functions, plus merging and restoring.

Every merge step is described by one tensor, ``index`` (B, T): the slot in the
merged sequence that each current patch token goes to. The class token is never
merged (it stays in front, outside ``index``). ``merge_wavg`` applies an index
as a size-weighted mean, so any merge (ToMe's pairs, ALGM's 2x2 windows) is the
same operation; composing the indices of all steps (``compose``) gives the
source map with which ``unmerge`` puts every original patch back on the grid.

A slot may receive no token (batched adaptive merging: an image merged fewer
tokens than the batch's padded layout allows). Its size is 0, so the
proportional-attention bias log(size) = -inf masks it as a key: padding and
proportional attention are one mechanism.

Reference: Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .base import ReductionState


class Matching(NamedTuple):
    """Each A token's most similar B token; A and B alternate over the (valid) tokens."""

    best: torch.Tensor  # (B, nA) cosine similarity of the best edge; -inf where no A token
    dst: torch.Tensor  # (B, nA) index of that B token within B
    num_b: int  # B slots
    # Padded batches only (None: every token is real, A = even and B = odd positions):
    is_a: Optional[torch.Tensor] = None  # (B, T) bool
    is_b: Optional[torch.Tensor] = None  # (B, T) bool
    a_rank: Optional[torch.Tensor] = None  # (B, T) rank of each A token within A
    b_rank: Optional[torch.Tensor] = None  # (B, T) rank of each B token within B


def match_alternate(metric: torch.Tensor, valid: Optional[torch.Tensor] = None) -> Matching:
    """Split tokens (B, T, C) alternately into A and B; each A token picks its best B (cosine).

    ``valid`` (B, T) marks real tokens of a padded batch: A and B then alternate
    over the real tokens only, so every image is split as it would be alone, and
    padding is never matched. ``None`` is the static-shape fast path.
    """
    batch, num_tokens, _ = metric.shape
    metric = F.normalize(metric, dim=-1)
    num_a, num_b = (num_tokens + 1) // 2, num_tokens // 2
    if num_b == 0:  # a single token has nothing to merge with
        return Matching(metric.new_full((batch, num_a), float("-inf")),
                        torch.zeros(batch, num_a, dtype=torch.long, device=metric.device), 0)
    if valid is None:
        best, dst = (metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)).max(-1)
        return Matching(best, dst, num_b)
    parity = (valid.long().cumsum(1) - 1) % 2
    is_a, is_b = valid & (parity == 0), valid & (parity == 1)
    # A stable sort puts a set's members first, in sequence order; the tail is filler.
    a_order = torch.argsort((~is_a).to(torch.uint8), dim=1, stable=True)[:, :num_a]
    b_order = torch.argsort((~is_b).to(torch.uint8), dim=1, stable=True)[:, :num_b]
    dim = metric.shape[-1]
    a = metric.gather(1, a_order.unsqueeze(-1).expand(-1, -1, dim))
    b = metric.gather(1, b_order.unsqueeze(-1).expand(-1, -1, dim))
    scores = (a @ b.transpose(1, 2)).masked_fill(~is_b.gather(1, b_order).unsqueeze(1), float("-inf"))
    best, dst = scores.max(-1)
    best = best.masked_fill(~is_a.gather(1, a_order), float("-inf"))
    return Matching(best, dst, num_b, is_a, is_b, _ranks(a_order, num_tokens), _ranks(b_order, num_tokens))


def _ranks(order: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of a (partial) permutation (B, K) of ``length`` positions; unlisted positions get 0."""
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return order.new_zeros(order.shape[0], length).scatter_(1, order, ranks)


def merge_plan(matching: Matching, merges: Union[int, torch.Tensor],
               fewest: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """Merge each image's ``merges`` most similar edges: returns ``index`` (B, T) and the new length.

    ``merges`` is an int (every image the same: static shapes) or a (B,) tensor
    whose minimum the caller passes as ``fewest`` (a host value: it sets the
    length). Layout after the merge, as in ToMe: unmerged A tokens (most similar
    first), then B. An A token merged in its image but not in all of the batch
    leaves its slot empty (size 0) there.
    """
    best, dst, num_b = matching.best, matching.dst, matching.num_b
    batch, num_a = best.shape
    if isinstance(merges, int):
        fewest = merges = min(merges, num_a if num_b else 0)
    elif fewest is None:  # reading the minimum here would be a hidden host sync
        raise ValueError("per-image merge counts need their minimum, `fewest`, from the caller")
    order = torch.argsort(best, dim=1, descending=True, stable=True)
    rank = _ranks(order, num_a)
    kept_a = num_a - fewest
    merged = rank < (merges if isinstance(merges, int) else merges.unsqueeze(1))
    index_a = torch.where(merged, kept_a + dst, rank - fewest)
    index_b = kept_a + torch.arange(num_b, device=best.device).expand(batch, -1)
    if matching.is_a is None:
        index = index_a.new_empty(batch, num_a + num_b)
        index[:, 0::2] = index_a
        index[:, 1::2] = index_b
    else:
        from_a = index_a.gather(1, matching.a_rank)
        from_b = index_b.gather(1, matching.b_rank)
        # Padding positions (in neither set) carry size 0: any slot will do.
        index = torch.where(matching.is_a, from_a, torch.where(matching.is_b, from_b, 0))
    return index, kept_a + num_b


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, int]:
    """ToMe: merge the ``r`` most similar A->B edges of every image (static shapes)."""
    return merge_plan(match_alternate(metric), r)


def merge_wavg(x: torch.Tensor, size: torch.Tensor, index: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of the tokens sent to each slot.

    x: (B, 1+T, D) with the class token first; size: (B, 1+T) tokens each one
    stands for (0 = empty slot); index: (B, T) slot of each patch token.
    Returns x (B, 1+length, D) and size (B, 1+length).
    """
    batch, _, dim = x.shape
    full = F.pad(index + 1, (1, 0))  # the class token keeps slot 0
    new_size = size.new_zeros(batch, 1 + length).scatter_add_(1, full, size)
    total = x.new_zeros(batch, 1 + length, dim).scatter_add_(
        1, full.unsqueeze(-1).expand(-1, -1, dim), x * size.unsqueeze(-1))
    # Sizes are whole numbers: clamping leaves real ones alone and turns an empty
    # slot into 0 / 1 = 0, never NaN, so it flows through the blocks harmlessly.
    return total / new_size.clamp(min=1).unsqueeze(-1), new_size


def compose(source: Optional[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Source map after one more merge: slot (B, N) of every original patch token."""
    return index if source is None else index.gather(1, source)


def unmerge(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Every original patch takes its merged token's value: (B, 1+T, D) -> (B, 1+N, D)."""
    patches = x[:, 1:].gather(1, source.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], patches], dim=1)


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention (ToMe): additive key bias log(size), (B, 1, 1, T); -inf masks empty slots."""
    return size.log()[:, None, None, :]


@dataclass
class MergedTokens(ReductionState):
    """The bookkeeping every merging strategy shares: token sizes, the source map, the attention bias.

    ``merge`` applies one merge step to the sequence; ``restore`` puts every
    original patch back on the grid. The stats follow each step.
    """

    size: Optional[torch.Tensor] = None  # (B, 1+T) original patches per token (None: all 1; 0 = empty slot)
    source: Optional[torch.Tensor] = None  # (B, N) current slot of every original patch
    bias: Optional[torch.Tensor] = None  # (B, 1, 1, 1+T) log(size): proportional attention

    def merge(self, x: torch.Tensor, index: torch.Tensor, length: int, tokens_after: list[int]) -> torch.Tensor:
        """Merge ``x`` (B, 1+T, D) by ``index`` into 1 + ``length`` slots; ``tokens_after``: real tokens per image."""
        size = self.size if self.size is not None else x.new_ones(x.shape[:2])
        x, self.size = merge_wavg(x, size, index, length)
        self.source = compose(self.source, index)
        self.bias = size_bias(self.size)
        self.stats.tokens_after = list(tokens_after)
        self.stats.merged_tokens = [self.stats.tokens_in - t for t in tokens_after]
        return x

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.source is None else unmerge(x, self.source)
