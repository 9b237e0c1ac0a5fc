"""ClustViT's learned pieces: the cluster head, the regenerator, and their training targets.

At the injection point a small MLP (``ClusterHead``) scores every patch token
over k+1 classes (0 = keep, 1..k = clusters); after the last block the
``Regenerator`` rebuilds every merged position from its own token at the
injection point and its cluster's final representative. They are modules of the
model (they travel with the checkpoint); the merging itself is the strategy in
``reduction/clustvit.py``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClusterHead(nn.Module):
    """Scores each patch token over k+1 classes: 0 = keep, 1..k = cluster id."""

    def __init__(self, embed_dim: int, clusters: int, hidden_ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_ratio * embed_dim)
        self.fc2 = nn.Linear(hidden_ratio * embed_dim, clusters + 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # In-place ReLU on the fresh hidden activation: saves a (N, 4D) allocation per frame.
        return self.fc2(torch.relu_(self.fc1(tokens)))


class Regenerator(nn.Module):
    """MLP(concat(own token at injection point, cluster representative)) -> token.

    The first layer is applied as two half-products so the representative half
    is computed once per cluster instead of once per merged token.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.fc1 = nn.Linear(2 * embed_dim, embed_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, own: torch.Tensor, representatives: torch.Tensor,
                slot: torch.Tensor) -> torch.Tensor:
        """own: (B, M, D); representatives: (B, R, D); slot: (B, M) index into R."""
        d = self.embed_dim
        own_part = F.linear(own, self.fc1.weight[:, :d])
        rep_part = F.linear(representatives, self.fc1.weight[:, d:], self.fc1.bias)
        if rep_part.shape[0] == 1:  # batch 1 (the robot's case): a row lookup, cheaper than gather
            rep_part = rep_part[0].index_select(0, slot[0]).unsqueeze(0)
        else:
            rep_part = rep_part.gather(1, slot.unsqueeze(-1).expand(-1, -1, d))
        return self.fc2(self.act(own_part + rep_part))


def homogeneous_patch_classes(masks: torch.Tensor, patch_size: int, ignore_index: int) -> tuple[torch.Tensor, int]:
    """Each patch's class when all its pixels carry that one (non-void) class, else a
    sentinel; (B, h*w) and the sentinel. Masks are padded with void to a multiple of
    the patch size, like images."""
    masks = masks.long()
    batch, height, width = masks.shape
    pad_h, pad_w = (-height) % patch_size, (-width) % patch_size
    if pad_h or pad_w:
        masks = F.pad(masks, (0, pad_w, 0, pad_h), value=ignore_index)
    h, w = masks.shape[1] // patch_size, masks.shape[2] // patch_size
    patches = masks.reshape(batch, h, patch_size, w, patch_size).permute(0, 1, 3, 2, 4)
    patches = patches.reshape(batch, h * w, patch_size * patch_size)
    low, high = patches.min(-1).values, patches.max(-1).values
    homogeneous = (low == high) & (low != ignore_index) & (low >= 0)
    sentinel = int(max(int(masks.max()), ignore_index, 0)) + 1
    return torch.where(homogeneous, low, torch.full_like(low, sentinel)), sentinel


def pseudo_cluster_targets(masks: torch.Tensor, clusters: int, patch_size: int = 16,
                           ignore_index: int = 255, fixed_classes: Sequence[int] = ()) -> torch.Tensor:
    """Cluster targets (B, h*w) in 0..k from ground-truth masks (B, H, W).

    By default (the paper's rule) a patch whose pixels all carry one (non-void)
    class, that class being among the image's k most frequent such classes
    (counted in homogeneous patches), gets the class's rank 1..k (1 = most
    frequent); every other patch gets 0. Ties in frequency go to the lower class id.

    With ``fixed_classes`` (k class ids) cluster i is always class
    ``fixed_classes[i - 1]``: a homogeneous patch of one of them gets its cluster,
    whatever else the image holds, and every other patch 0. The head then answers
    "which of these classes, or none" rather than "how frequent is my class in this
    image", which is what it got wrong on an unseen drive (models/README.md).
    """
    patch_class, sentinel = homogeneous_patch_classes(masks, patch_size, ignore_index)
    batch, num_values = patch_class.shape[0], sentinel
    rank = torch.zeros(batch, num_values + 1, dtype=torch.long, device=masks.device)
    if fixed_classes:
        if len(fixed_classes) != clusters:
            raise ValueError(f"fixed_classes names {len(fixed_classes)} classes for {clusters} clusters")
        ids = torch.tensor(list(fixed_classes), dtype=torch.long, device=masks.device)
        if ids.min() < 0 or ids.max() >= num_values or ids.unique().numel() != ids.numel():
            raise ValueError(f"fixed_classes must be {clusters} distinct class ids, got {list(fixed_classes)}")
        rank[:, ids] = torch.arange(1, clusters + 1, device=masks.device)
        return rank.gather(1, patch_class)
    counts = F.one_hot(patch_class, num_values + 1).sum(1)[:, :num_values]  # (B, V)
    # Stable descending sort: equal counts keep the lower class id first.
    order = torch.sort(counts, dim=1, descending=True, stable=True).indices[:, :clusters]
    top_counts = counts.gather(1, order)
    ranks = torch.arange(1, order.shape[1] + 1, device=masks.device).expand_as(order)
    rank.scatter_(1, order, torch.where(top_counts > 0, ranks, torch.zeros_like(ranks)))
    return rank.gather(1, patch_class)
