"""ClusTR-style clustered attention: full queries, keys/values pooled into M clusters.

Re-implementation of the idea of Xie et al., "ClusTR: Exploring Efficient
Self-attention via Clustering for Vision Transformers" (2022), training-free,
on our backbone:

- In every block from ``model.config.injection_point`` on (so it reduces the
  same blocks as ClustViT), the patch keys are grouped into M content-based
  clusters by a few k-means steps, and keys and values are replaced by their
  cluster means. The class token stays its own (size-1) key.
- Clustering space: a token's key over all heads concatenated (the block's own
  ``qkv`` output), one assignment shared by the heads: keys are what the
  attention logits depend on, and one clustering per block is H times cheaper
  than one per head.
- k-means: deterministic init from a strided subset of the patch tokens
  (token floor((m + 1/2) N / M) for m = 0..M-1, spread over the raster grid),
  then ``iterations`` assignment steps with a centre update between them
  (default 2: a third step gained no accuracy worth half again the clustering
  cost, models/README.md); an empty cluster keeps its previous
  centre. Distances are matmuls (||c||^2 - 2 k.c).
- Attention: every query attends to [class key, M cluster keys] with a
  log(cluster size) bias, so a cluster counts as all its members
  (sum_c n_c exp(q.k_c) approximates sum_i exp(q.k_i)); an empty cluster gets
  log 0 = -inf and drops out. Everything else (norms, qkv, proj, layer scale,
  drop path, MLP) is the block's own modules, so the FFN is exactly timm's.
- Every token keeps its own output, so restore is the identity.

Knob ``clusters`` M (integer). M >= N is exact attention, so the block is
simply called (the plain ViT, bit for bit); the registry's no-op value 1024
covers CamVid's 23x30 = 690-token grid.

Stats, chosen for a fair "tokens" column: no token is merged away (every query,
projection and MLP still runs on all N tokens; only the attention's key/value
set shrinks), so tokens_after = N and merged_tokens = 0; the savings show in
FLOPs and latency. M is reported separately as ``key_clusters`` (ClusTRStats,
also in ``as_dict``); cluster sizes stay on the device (reading them back would
be a host sync per block).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .base import KnobSpec, ReductionState, ReductionStats, SegmentationBackbone, StrategySpec, TokenReduction
from .blocks import attention_output, mlp_half, project_qkv


@dataclass
class ClusTRStats(ReductionStats):
    key_clusters: list[int] = field(default_factory=list)  # M per image (keys/values per block)

    def as_dict(self, index: int = 0) -> dict[str, Any]:
        values = super().as_dict(index)
        clusters = self.key_clusters[index] if self.key_clusters else values["tokens_in"]
        values["key_clusters"] = clusters
        return values


@dataclass
class ClusTRState(ReductionState):
    clusters: int = 0  # M actually used; >= tokens means exact attention


def _segment_sum(values: torch.Tensor, flat_index: torch.Tensor, batch: int,
                 segments: int) -> torch.Tensor:
    """Sum (B, N, C) values into (B, segments, C); flat_index (B*N,) = index + b * segments.

    index_add on the flattened batch is several times faster on the CPU than
    scatter_add with an expanded (B, N, C) index.
    """
    channels = values.shape[-1]
    out = values.new_zeros(batch * segments, channels)
    out.index_add_(0, flat_index, values.reshape(-1, channels))
    return out.view(batch, segments, channels)


def _flat(assignment: torch.Tensor, segments: int) -> torch.Tensor:
    offsets = torch.arange(assignment.shape[0], device=assignment.device).unsqueeze(1) * segments
    return (assignment + offsets).reshape(-1)


def kmeans_assign(keys: torch.Tensor, clusters: int, iterations: int = 2) -> torch.Tensor:
    """k-means on (B, N, A) keys with a strided init; returns the assignment (B, N) in 0..M-1.

    Fixed shapes only (index_add for the updates, argmin for the assignment): no host sync.
    """
    batch, num_tokens, _ = keys.shape
    start = ((torch.arange(clusters, device=keys.device) * 2 + 1) * num_tokens) // (2 * clusters)
    centres = keys[:, start]  # (B, M, A)
    ones = keys.new_ones(batch * num_tokens, 1)
    assignment = None
    for step in range(max(1, iterations)):
        # argmin_c ||k - c||^2 = argmin_c (||c||^2 - 2 k.c): ||k||^2 is the same for every c.
        squared = (centres * centres).sum(-1).unsqueeze(1)
        cost = torch.baddbmm(squared, keys, centres.transpose(1, 2), alpha=-2)
        assignment = cost.argmin(-1)  # (B, N)
        if step + 1 < iterations:  # the last centres are not needed: the caller pools k and v
            flat = _flat(assignment, clusters)
            sums = _segment_sum(keys, flat, batch, clusters)
            counts = _segment_sum(ones, flat, batch, clusters)
            # An empty cluster keeps its old centre (it may win tokens back next step).
            centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return assignment


def clustered_block(block: torch.nn.Module, x: torch.Tensor, clusters: int, iterations: int = 2,
                    assignment: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One timm ``Block`` with clustered keys/values; x (B, 1+N, D) -> (B, 1+N, D).

    ``assignment`` (B, N) in 0..clusters-1 overrides k-means (tests: singletons = exact).
    """
    attn = block.attn
    batch, length, _ = x.shape
    num_tokens, heads, head_dim = length - 1, attn.num_heads, attn.head_dim
    width = heads * head_dim
    h = block.norm1(x)
    q, k, v, qkv_rows = project_qkv(attn, h)  # rows laid out (3, H, hd) per token
    if isinstance(attn.k_norm, torch.nn.Identity):
        # Patch keys and values are the last 2/3 of each qkv row: pool them without copies.
        patch_kv = qkv_rows[:, 1:, width:]  # (B, N, 2 H hd): keys then values, heads side by side
    else:
        patch_kv = torch.cat([k, v], dim=1)[:, :, 1:].permute(0, 2, 1, 3)
        patch_kv = patch_kv.reshape(batch, num_tokens, 2 * width)
    if assignment is None:
        assignment = kmeans_assign(patch_kv[..., :width], clusters, iterations)
    flat = _flat(assignment, clusters)
    sums = _segment_sum(patch_kv, flat, batch, clusters)
    sizes = _segment_sum(x.new_ones(batch * num_tokens, 1), flat, batch, clusters)  # (B, M, 1)
    means = (sums / sizes.clamp_min(1)).view(batch, clusters, 2, heads, head_dim)
    means = means.permute(2, 0, 3, 1, 4)  # (2, B, H, M, hd)
    keys_all = torch.cat([k[:, :, :1], means[0]], dim=2)  # (B, H, 1+M, hd)
    values_all = torch.cat([v[:, :, :1], means[1]], dim=2)
    # Size bias: a cluster of n keys weighs n; an empty one gets log 0 = -inf (never a whole
    # row: the class key is always there).
    bias = torch.cat([sizes.new_zeros(batch, 1), sizes[..., 0].log()], dim=1)
    bias = bias[:, None, None, :].to(q.dtype)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, keys_all, values_all, attn_mask=bias, dropout_p=dropout,
                                         scale=attn.scale)
    x = x + block.drop_path1(block.ls1(attention_output(attn, out, h)))
    return mlp_half(block, x)


class ClusTR(TokenReduction):
    """Clustered keys/values from the injection point on (see the module docstring)."""

    name = "clustr"
    knob = "clusters"

    def __init__(self, clusters: int = 64, iterations: int = 2):
        self.clusters = clusters
        self.iterations = iterations

    def start_block(self, model: SegmentationBackbone) -> int:
        return model.config.injection_point

    def reduce(self, model: SegmentationBackbone, x: torch.Tensor,
               grid: tuple[int, int]) -> tuple[torch.Tensor, ClusTRState]:
        batch, num_tokens = x.shape[0], x.shape[1] - 1
        clusters = max(1, int(self.clusters))
        stats = ClusTRStats(num_tokens, [num_tokens] * batch, [0] * batch,
                            key_clusters=[min(clusters, num_tokens)] * batch)
        return x, ClusTRState(stats=stats, clusters=clusters)

    def run_block(self, index: int, block: torch.nn.Module, x: torch.Tensor,
                  state: ReductionState) -> torch.Tensor:
        assert isinstance(state, ClusTRState)
        if state.clusters >= x.shape[1] - 1:
            return block(x)  # as many clusters as tokens: exact attention, timm's own path
        return clustered_block(block, x, state.clusters, self.iterations)


SPEC = StrategySpec(
    "clustr", lambda value: ClusTR(int(value)),
    KnobSpec("clusters", 1, 1024, 64, 1024, (16, 32, 64, 128, 256, 1024), integer=True,
             description="key/value clusters per block after the injection point (k-means on "
                         "keys); >= tokens = exact attention"),
    "ClusTR: clustered keys/values (k-means, size-biased attention) from the injection point, "
    "full queries")
