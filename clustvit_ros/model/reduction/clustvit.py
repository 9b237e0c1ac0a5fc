"""ClustViT's merging strategy: merge by the learned clusters, regenerate before the head.

The cluster head (on the model) scores every patch token at the injection point;
tokens of a cluster are replaced by their mean (one representative per
non-empty cluster), the remaining blocks run on [class token, kept tokens,
representatives], and the model's regenerator rebuilds every merged position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KnobSpec, ReductionState, ReductionStats, SegmentationBackbone, StrategySpec, TokenReduction


def assign_clusters(probabilities: torch.Tensor, threshold: Optional[float],
                    floors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Merge decision per token: 0 = keep, c in 1..k = merge into cluster c.

    With a threshold, a token merges into its most probable cluster c when
    p(c) >= threshold (thresholds >= 1 merge nothing). ``floors`` (k,) raise
    the threshold per cluster: p(c) >= max(threshold, floors[c]), so merging
    still only grows as the threshold falls. ``None`` is the paper's rule:
    argmax over all k+1 classes.
    """
    if threshold is None:
        return probabilities.argmax(-1)
    if threshold >= 1.0:
        return torch.zeros(probabilities.shape[:-1], dtype=torch.long, device=probabilities.device)
    best, cluster = probabilities[..., 1:].max(-1)
    if floors is None:
        needed = threshold
    else:
        needed = floors.to(device=best.device, dtype=best.dtype).clamp(min=threshold)[cluster]
    return torch.where(best >= needed, cluster + 1, torch.zeros_like(cluster))


@dataclass
class ClusterState(ReductionState):
    tokens_at_injection: Optional[torch.Tensor] = None  # (B, N, D) patch tokens before merging
    assignment: Optional[torch.Tensor] = None  # (B, N): 0 = kept, c = cluster c
    # batch-1 path
    order: Optional[torch.Tensor] = None  # (N,) kept tokens first, then clusters 1..k
    num_kept: int = 0
    num_representatives: int = 0
    slot: Optional[torch.Tensor] = None  # (M,) representative index of each merged token
    # batched path
    keep_index: Optional[torch.Tensor] = None  # (B, max_kept)


class ClusterMerging(TokenReduction):
    """ClustViT's strategy. Knob: ``threshold`` (0 merges all, >= 1 merges none).

    The model's ``config.cluster_floors`` (if any) raise the threshold per
    cluster (``assign_clusters``).

    ``assignment`` (B, N) overrides the learned decision (oracle clusters from
    ground truth, used to benchmark the speed path before any training).

    ``bucket``: batch 1 pads the reduced sequence up to a multiple of this length
    and masks the padding as keys, so a GPU sees a few fixed shapes (each can be
    captured once as a CUDA graph) instead of a new one per frame. The labels are
    those of the exact path.
    """

    name = "clustvit"
    knob = "threshold"
    host_reads = 1  # the reduced length

    def __init__(self, threshold: Optional[float] = 0.5,
                 assignment: Optional[torch.Tensor] = None, bucket: Optional[int] = None):
        self.threshold = threshold
        self.assignment = assignment
        self.bucket = bucket
        # The model's floors on the device they are used on, with the host values they were made
        # from: comparing those costs no device sync (the batch-1 path allows one per frame).
        self._floors: Optional[tuple[tuple[float, ...], torch.device, torch.Tensor]] = None

    def floors_for(self, model: SegmentationBackbone, device: torch.device) -> Optional[torch.Tensor]:
        """The model's per-cluster floors as a tensor on ``device`` (copied once, not every frame)."""
        floors = tuple(float(v) for v in (getattr(model.config, "cluster_floors", ()) or ()))
        if not floors:
            return None
        if self._floors is None or self._floors[:2] != (floors, device):
            self._floors = (floors, device, torch.tensor(floors, dtype=torch.float32, device=device))
        return self._floors[2]

    def start_block(self, model: SegmentationBackbone) -> int:
        if model.cluster_head is None:
            raise ValueError("this model has no cluster module (trained without merging); "
                             "use the 'none' strategy")
        merges_nothing = self.threshold is not None and self.threshold >= 1.0
        if merges_nothing and self.assignment is None and not model.training:
            return model.depth  # exactly the plain ViT path, cluster head skipped
        return model.config.injection_point

    def reduce(self, model: SegmentationBackbone, x: torch.Tensor,
               grid: tuple[int, int]) -> tuple[torch.Tensor, ClusterState]:
        patches = x[:, 1:]
        # The head runs even when decisions are given (oracle): training needs its
        # logits for the loss, and benchmarks must pay for it as a deployment would.
        logits = model.cluster_head(patches)
        if self.assignment is not None:
            assignment = self.assignment.to(x.device)
            if assignment.shape != patches.shape[:2]:
                raise ValueError(f"assignment shape {tuple(assignment.shape)} does not match "
                                 f"the token grid {tuple(patches.shape[:2])}")
        elif self.threshold is None:
            assignment = logits.argmax(-1)
        else:
            assignment = assign_clusters(logits.softmax(-1), self.threshold, self.floors_for(model, x.device))
        clusters = model.config.clusters
        if x.shape[0] == 1:
            x_reduced, state = _reduce_single(x, assignment[0], clusters)
            if self.bucket:
                x_reduced, state.attn_mask = pad_to_bucket(x_reduced, self.bucket)
        else:
            x_reduced, state = _reduce_batched(x, assignment, clusters)
        state.cluster_logits = logits
        state.assignment = assignment
        state.tokens_at_injection = patches
        return x_reduced, state

    def restore(self, model: SegmentationBackbone, x: torch.Tensor, state: ClusterState) -> torch.Tensor:
        if state.order is not None:
            return _restore_single(model.regenerator, x, state)
        return _restore_batched(model.regenerator, x, state)

    def describe(self) -> dict:
        return {"strategy": self.name, "threshold": self.threshold,
                "oracle": self.assignment is not None}


def _reduce_single(x: torch.Tensor, assignment: torch.Tensor,
                   clusters: int) -> tuple[torch.Tensor, ClusterState]:
    """Batch-1 path: no padding, no mask, one host sync (the reduced length).

    Everything after that sync stays on the device: no index lists are copied
    from the host, so a CUDA stream is never drained a second time.
    """
    cls_token, patches = x[:, :1], x[0, 1:]
    num_tokens = patches.shape[0]
    # scatter_add, not bincount: CUDA's bincount reads the max back to size its output.
    counts = torch.zeros(clusters + 1, dtype=torch.long, device=x.device).scatter_add_(
        0, assignment, torch.ones_like(assignment))
    counts_host = counts.tolist()  # the single sync: the sequence length depends on it
    num_kept = counts_host[0]
    num_nonempty = sum(1 for n in counts_host[1:] if n)
    order = torch.argsort(assignment, stable=True)  # kept first, original order within groups
    sums = patches.new_zeros(clusters + 1, patches.shape[1]).index_add_(0, assignment, patches)
    cluster_counts = counts[1:]
    means = sums[1:] / cluster_counts.clamp(min=1).unsqueeze(1).to(patches.dtype)
    # Non-empty clusters first (stable), so the first num_nonempty rows are the representatives.
    nonempty = cluster_counts > 0
    representatives = means[torch.argsort(~nonempty, stable=True)[:num_nonempty]]
    kept = patches.index_select(0, order[:num_kept])
    x_reduced = torch.cat([cls_token, kept.unsqueeze(0), representatives.unsqueeze(0)], dim=1)
    # Representative index of each merged token: rank of its cluster among non-empty ones.
    rank_among_nonempty = nonempty.long().cumsum(0) - 1
    slot = rank_among_nonempty[assignment[order[num_kept:]] - 1]
    stats = ReductionStats(num_tokens, [num_kept + num_nonempty], [num_tokens - num_kept],
                           [counts_host[1:]])
    state = ClusterState(stats=stats, order=order, num_kept=num_kept, num_representatives=num_nonempty, slot=slot)
    return x_reduced, state


def pad_to_bucket(x: torch.Tensor, bucket: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(1, L, D) -> (1, L', D) with L' the next multiple of ``bucket``, and the key mask (True = real)."""
    length = x.shape[1]
    padded = -(-length // bucket) * bucket
    if padded == length:
        return x, None
    mask = torch.arange(padded, device=x.device) < length
    return torch.nn.functional.pad(x, (0, 0, 0, padded - length)), mask.view(1, 1, 1, padded)


def _restore_single(regenerator: nn.Module, x: torch.Tensor, state: ClusterState) -> torch.Tensor:
    num_kept, order = state.num_kept, state.order
    kept_positions, merged_positions = order[:num_kept], order[num_kept:]
    representatives = x[:, 1 + num_kept:1 + num_kept + state.num_representatives]  # not the bucket's padding
    own = state.tokens_at_injection[:, merged_positions]
    regenerated = regenerator(own, representatives, state.slot.unsqueeze(0))
    # Write both groups straight into the output grid (positions are offset by the class token).
    # Under autocast the regenerator's output is in the autocast dtype, the blocks' in another:
    # the grid takes the wider of the two, so neither write loses precision.
    out = x.new_empty(1, 1 + order.numel(), x.shape[-1], dtype=torch.promote_types(x.dtype, regenerated.dtype))
    out[:, 0] = x[:, 0]
    out[:, 1 + kept_positions] = x[:, 1:1 + num_kept].to(out.dtype)
    out[:, 1 + merged_positions] = regenerated.to(out.dtype)
    return out


def _reduce_batched(x: torch.Tensor, assignment: torch.Tensor,
                    clusters: int) -> tuple[torch.Tensor, ClusterState]:
    """Batched path: kept tokens padded to the batch maximum, masked in attention."""
    cls_token, patches = x[:, :1], x[:, 1:]
    batch, num_tokens, dim = patches.shape
    counts = torch.zeros(batch, clusters + 1, dtype=torch.long, device=x.device).scatter_add_(
        1, assignment, torch.ones_like(assignment))  # integer: exact for any token count
    one_hot = F.one_hot(assignment, clusters + 1).to(patches.dtype)  # (B, N, k+1)
    sums = one_hot.transpose(1, 2) @ patches
    representatives = sums[:, 1:] / counts[:, 1:].clamp(min=1).unsqueeze(-1).to(patches.dtype)
    counts_host = counts.tolist()  # the one sync: padded length and stats
    max_kept = max(c[0] for c in counts_host)
    num_kept = counts[:, 0]
    order = torch.argsort(assignment, dim=1, stable=True)
    keep_index = order[:, :max_kept]
    kept = patches.gather(1, keep_index.unsqueeze(-1).expand(-1, -1, dim))
    attn_mask = None
    if any(c[0] < max_kept or not all(c[1:]) for c in counts_host):
        padding = torch.arange(max_kept, device=x.device).unsqueeze(0) >= num_kept.unsqueeze(1)
        empty = counts[:, 1:] == 0
        ignored = torch.cat([torch.zeros_like(padding[:, :1]), padding, empty], dim=1)
        attn_mask = (~ignored)[:, None, None, :]
    x_reduced = torch.cat([cls_token, kept, representatives], dim=1)
    stats = ReductionStats(
        num_tokens,
        [c[0] + sum(1 for n in c[1:] if n) for c in counts_host],
        [num_tokens - c[0] for c in counts_host],
        [c[1:] for c in counts_host])
    return x_reduced, ClusterState(stats=stats, attn_mask=attn_mask, keep_index=keep_index)


def _restore_batched(regenerator: nn.Module, x: torch.Tensor, state: ClusterState) -> torch.Tensor:
    patches_in = state.tokens_at_injection
    batch, num_tokens, dim = patches_in.shape
    max_kept = state.keep_index.shape[1]
    kept = x[:, 1:1 + max_kept]
    representatives = x[:, 1 + max_kept:]
    # Padding slots scatter into merged positions; the regenerated tokens overwrite them.
    full = kept.new_zeros(batch, num_tokens, dim).scatter(
        1, state.keep_index.unsqueeze(-1).expand(-1, -1, dim), kept)
    merged = state.assignment > 0
    slot = (state.assignment - 1).clamp(min=0)
    regenerated = regenerator(patches_in, representatives, slot)
    full = torch.where(merged.unsqueeze(-1), regenerated, full)
    return torch.cat([x[:, :1], full], dim=1)


SPEC = StrategySpec(
    "clustvit", lambda value: ClusterMerging(value),
    KnobSpec("threshold", 0.0, 1.0, 0.5, 1.0, (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
             description="merge a token into its most probable cluster c when p(c) >= threshold; "
                         "0 merges all, 1 merges none (plain ViT)"),
    "ClustViT: learned clustering at the injection point, regeneration before the head",
    needs_cluster_module=True,
    model_default=lambda model: model.config.default_merge_threshold)
