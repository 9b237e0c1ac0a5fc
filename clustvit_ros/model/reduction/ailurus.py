"""AiluRus: adaptive resolution with spatial-aware density-peak clustering.

Re-implementation of Li et al., "AiluRus: A Scalable ViT Framework for Dense
Prediction" (NeurIPS 2023), training-free, on our backbone:

1. Where: once, at ``model.config.injection_point`` (the layer where ClustViT
   merges), so both methods reduce the same number of blocks. The paper
   clusters at an early intermediate layer too (e.g. after layer 2 of
   Segmenter ViT-L).
2. Spatial-aware DPC-KNN (the paper's anchor selection; DPC-KNN as in
   TCFormer) on the patch tokens ``z`` at that layer. Spatial awareness, as we
   implement it: a neighbourhood constraint, every token only looks at the
   tokens in its (2r+1)x(2r+1) window on the patch grid (r = ``radius`` = 2),
   so density peaks are local and every image region gets anchors.

   - local density from the k = 5 nearest window neighbours in feature space:
     rho_i = exp(-mean_{j in kNN(i)} ||z_i - z_j||^2 / D);
   - delta_i = distance to the nearest window neighbour of higher density
     (ties go to the lower index); a local density peak gets the largest
     neighbour distance of the image, so peaks of every region rank first;
   - score = rho * delta, ranked in the log domain (same order, no underflow
     of exp() for far-apart tokens); the top M = round(ratio * N) are the
     representatives ("anchors").

   Cost: one N x N Gram matmul (2 N^2 D FLOPs: 0.18 GFLOPs at N = 690, seen
   by the FLOP counter) plus gathers over the N x 24 window entries.
3. Every other token joins its nearest anchor in feature space (the paper's
   "merge other tokens into their closest representative token"). Preferring
   the anchors inside a token's window instead cost accuracy (figures in
   models/README.md): a token at a region border joined a nearby anchor of
   other content. So the spatial
   awareness lives in the anchor choice only. The paper may also keep some
   tokens unmerged at full resolution, which makes the length data dependent;
   we keep exactly M tokens (a static length: batch 1 needs no host
   read-back, batches need no padding).
4. A representative becomes the mean of its members (all tokens have size 1 at
   the single merge point, so this is the size-weighted average). The remaining
   blocks run on [class token, M representatives] with proportional attention
   (as in ToMe): log(cluster size) is a float attention bias on each key, so a
   representative counts as all the tokens it stands for.
5. Restore: every position gets its representative's final token.

Knob ``ratio`` in (0, 1] (registry: 0.01..1): fraction of patch tokens kept as representatives;
1.0 skips everything (the plain ViT, bit for bit). Stats: tokens_after = M,
merged_tokens = N - M (every non-anchor is absorbed). Cluster sizes stay on the
device (``state.sizes``), not in the stats: reading them back would be a host
sync per frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from .base import KnobSpec, ReductionState, ReductionStats, SegmentationBackbone, StrategySpec, TokenReduction


@lru_cache(maxsize=16)
def _window(grid: tuple[int, int], radius: int, device: torch.device):
    """Per token: its window neighbours (N, W) (self excluded) and their validity."""
    h, w = grid
    ys = torch.arange(h, device=device)[:, None].expand(h, w).reshape(-1)
    xs = torch.arange(w, device=device)[None, :].expand(h, w).reshape(-1)
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if dy or dx]
    dy = torch.tensor([o[0] for o in offsets], device=device)
    dx = torch.tensor([o[1] for o in offsets], device=device)
    ny, nx = ys[:, None] + dy[None], xs[:, None] + dx[None]
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    neighbours = torch.where(valid, ny * w + nx, torch.arange(h * w, device=device)[:, None])
    return neighbours, valid


def spatial_dpc_knn(tokens: torch.Tensor, grid: tuple[int, int], num_anchors: int,
                    k: int = 5, radius: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial-aware DPC-KNN. tokens (B, N, D) on a row-major grid (h, w).

    Returns anchors (B, M) token indices and assignment (B, N) in 0..M-1
    (anchor m is assigned to itself). Fixed shapes throughout: no host sync.
    """
    batch, num_tokens, dim = tokens.shape
    # The grid is static per input size: build the window index once.
    with torch.inference_mode(False), torch.no_grad():
        neighbours, valid = _window(tuple(grid), radius, tokens.device)
    # One Gram matrix (a BLAS matmul, seen by the FLOP counter: the pairwise-distance
    # cost of DPC) serves both the window distances and the token-to-anchor distances;
    # gathering its entries is far cheaper on the CPU than gathering (N, W, D) features.
    gram = tokens @ tokens.transpose(1, 2)  # (B, N, N)
    norms = gram.diagonal(dim1=1, dim2=2)  # (B, N) squared norms
    near_dots = gram.gather(2, neighbours.expand(batch, -1, -1))  # (B, N, W)
    dist2 = (norms.unsqueeze(-1) + norms[:, neighbours] - 2 * near_dots).clamp_min(0) / dim
    dist2 = dist2.masked_fill(~valid, float("inf"))
    # Density: mean squared distance to the k nearest window neighbours (lower = denser).
    k_eff = min(k, neighbours.shape[1])
    nearest = dist2.topk(k_eff, dim=-1, largest=False).values
    finite = torch.isfinite(nearest)  # tiny grids: fewer than k valid neighbours
    spread = torch.where(finite, nearest, torch.zeros_like(nearest)).sum(-1)
    spread = spread / finite.sum(-1).clamp_min(1)
    # delta: distance to the nearest denser window neighbour (ties: lower index is denser).
    own = torch.arange(num_tokens, device=tokens.device)[:, None]
    spread_near = spread[:, neighbours]
    denser = valid & ((spread_near < spread.unsqueeze(-1))
                      | ((spread_near == spread.unsqueeze(-1)) & (neighbours < own)))
    to_denser = dist2.masked_fill(~denser, float("inf")).amin(-1)
    largest = torch.where(valid, dist2, torch.zeros_like(dist2)).amax(dim=(1, 2))  # (B,)
    delta2 = torch.where(torch.isfinite(to_denser), to_denser, largest.unsqueeze(-1))
    # log(rho * delta) = -spread + log(delta): the paper's score, ranked without exp underflow.
    score = -spread + 0.5 * torch.log(delta2)
    anchors = score.topk(num_anchors, dim=-1).indices.sort(dim=-1).values  # raster order
    # Assignment: the nearest anchor in feature space (||a||^2 - 2 z.a; ||z||^2 is common to a row).
    anchor_dots = gram.gather(2, anchors.unsqueeze(1).expand(-1, num_tokens, -1))  # (B, N, M)
    assignment = (norms.gather(1, anchors).unsqueeze(1) - 2 * anchor_dots).argmin(-1)
    # Anchors keep themselves even when a duplicate token ties with them.
    slots = torch.arange(num_anchors, device=tokens.device).expand(batch, -1)
    assignment = assignment.scatter(1, anchors, slots)
    return anchors, assignment


@dataclass
class AiluRusState(ReductionState):
    identity: bool = False  # M >= N: nothing to reduce
    anchors: Optional[torch.Tensor] = None  # (B, M) token index of each representative
    assignment: Optional[torch.Tensor] = None  # (B, N) representative of each token
    sizes: Optional[torch.Tensor] = None  # (B, M) tokens per representative (float, on device)


class AiluRus(TokenReduction):
    """AiluRus (see the module docstring). Knob: ``ratio`` of representatives, 1.0 = off."""

    name = "ailurus"
    knob = "ratio"

    def __init__(self, ratio: float = 0.3, k: int = 5, radius: int = 2):
        self.ratio = ratio
        self.k = k
        self.radius = radius

    def start_block(self, model: SegmentationBackbone) -> int:
        if self.ratio >= 1.0:
            return model.depth  # the plain ViT path, clustering skipped
        return model.config.injection_point

    def num_anchors(self, num_tokens: int) -> int:
        return max(1, min(num_tokens, round(self.ratio * num_tokens)))

    def reduce(self, model: SegmentationBackbone, x: torch.Tensor,
               grid: tuple[int, int]) -> tuple[torch.Tensor, AiluRusState]:
        batch, num_tokens = x.shape[0], x.shape[1] - 1
        anchors_count = self.num_anchors(num_tokens)
        if anchors_count >= num_tokens:
            return x, AiluRusState(ReductionStats.unreduced(batch, num_tokens), identity=True)
        patches = x[:, 1:]
        anchors, assignment = spatial_dpc_knn(patches, grid, anchors_count, self.k, self.radius)
        # Sums per representative: one index_add over the flattened batch (on the CPU much
        # faster than scatter_add with an expanded (B, N, D) index).
        dim = patches.shape[-1]
        offsets = torch.arange(batch, device=x.device).unsqueeze(1) * anchors_count
        flat = (assignment + offsets).reshape(-1)
        sizes = patches.new_zeros(batch * anchors_count).index_add_(
            0, flat, patches.new_ones(batch * num_tokens)).view(batch, anchors_count)
        sums = patches.new_zeros(batch * anchors_count, dim).index_add_(
            0, flat, patches.reshape(-1, dim)).view(batch, anchors_count, dim)
        representatives = sums / sizes.unsqueeze(-1)  # every anchor has itself: sizes >= 1
        # Proportional attention: key j counts as sizes[j] tokens (class token: 1 -> bias 0).
        bias = torch.cat([sizes.new_zeros(batch, 1), sizes.log()], dim=1)[:, None, None, :]
        stats = ReductionStats(num_tokens, [anchors_count] * batch,
                               [num_tokens - anchors_count] * batch)
        state = AiluRusState(stats=stats, attn_mask=bias, anchors=anchors,
                             assignment=assignment, sizes=sizes)
        return torch.cat([x[:, :1], representatives], dim=1), state

    def restore(self, model: SegmentationBackbone, x: torch.Tensor, state: ReductionState) -> torch.Tensor:
        assert isinstance(state, AiluRusState)
        if state.identity:
            return x
        index = state.assignment.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.cat([x[:, :1], x[:, 1:].gather(1, index)], dim=1)


SPEC = StrategySpec(
    "ailurus", lambda value: AiluRus(value),
    KnobSpec("ratio", 0.01, 1.0, 0.3, 1.0, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
             description="fraction of patch tokens kept as representatives (spatial-aware "
                         "DPC-KNN anchors) after the injection point; 1 = plain ViT"),
    "AiluRus: spatial-aware density-peak clustering at the injection point, "
    "proportional attention, representatives copied back before the head")
