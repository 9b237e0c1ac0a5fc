"""ClustViT segmentation model: timm ViT backbone + token reduction + head.

Data flow (``forward``): pad -> patch embed + interpolated position embedding
-> blocks under a token-reduction strategy (ClustViT merging by default) ->
final norm -> segmentation head -> logits upsampled to the input size.
The backbone is an unmodified timm ``VisionTransformer``, so timm checkpoints
load as-is; merging lives around the blocks, not inside copies of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from .clustering import ClusterHead, Regenerator
from .config import ModelConfig
from .heads import build_head, upsample_bilinear
from .reduction import ClusterMerging, NoReduction, ReductionStats, TokenReduction, run_blocks


@dataclass
class Features:
    tokens: torch.Tensor  # (B, N, D) normalised patch tokens on the full grid
    grid: tuple[int, int]  # (h, w) patch grid
    stats: ReductionStats
    cluster_logits: Optional[torch.Tensor] = None  # (B, N, k+1), when clustering ran


@dataclass
class Segmentation:
    logits: torch.Tensor  # (B, C, H, W) at the input image size
    stats: ReductionStats
    cluster_logits: Optional[torch.Tensor] = None


class ClustViT(nn.Module):
    """ViT semantic segmentation with a pluggable token-reduction strategy.

    ``reduction`` is a plain attribute (ToMe style): assign another strategy,
    or change its knob (``model.reduction.threshold = 0.7``), between calls.
    """

    def __init__(self, config: ModelConfig, drop_path_rate: float = 0.0):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = timm.create_model(
            config.arch, pretrained=False, num_classes=0, dynamic_img_size=True,
            drop_path_rate=drop_path_rate)
        embed_dim = self.backbone.embed_dim
        self.patch_size = self.backbone.patch_embed.patch_size[0]
        if not 0 <= config.injection_point < len(self.backbone.blocks):
            raise ValueError(f"injection_point {config.injection_point} outside 0.."
                             f"{len(self.backbone.blocks) - 1}")
        if config.clusters > 0:
            self.cluster_head: Optional[ClusterHead] = ClusterHead(embed_dim, config.clusters)
            self.regenerator: Optional[Regenerator] = Regenerator(embed_dim)
        else:
            self.cluster_head = None
            self.regenerator = None
        num_heads = self.backbone.blocks[0].attn.num_heads
        self.decode_head = build_head(config.head, embed_dim, config.num_classes, num_heads,
                                      num_layers=config.head_layers, drop_path=drop_path_rate)
        self.reduction: TokenReduction = (
            ClusterMerging(config.default_merge_threshold) if config.clusters > 0 else NoReduction())
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    # -- backbone -----------------------------------------------------------------
    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        return height + (-height) % p, width + (-width) % p

    def _position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.backbone.pos_embed
        resample = lambda: resample_abs_pos_embed(  # noqa: E731
            pos, new_size=list(grid), old_size=list(self.backbone.patch_embed.grid_size),
            num_prefix_tokens=self.backbone.num_prefix_tokens)
        if self.training or torch.is_grad_enabled():
            return resample()
        # Inference: bicubic resampling per frame is wasted work; cache per grid
        # size, keyed on the parameter's version so loaded weights invalidate it.
        key = (grid, pos.device, pos.dtype, pos._version)
        cached = self._pos_cache.get(key)
        if cached is None:
            self._pos_cache.clear()
            cached = self._pos_cache[key] = resample()
        return cached

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Padded images (B, 3, H, W), H and W multiples of the patch size -> (B, 1+N, D)."""
        x = self.backbone.patch_embed(images)  # (B, h, w, D)
        batch, h, w, dim = x.shape
        x = torch.cat([self.backbone.cls_token.expand(batch, -1, -1), x.reshape(batch, h * w, dim)], 1)
        x = self.backbone.pos_drop(x + self._position_embedding((h, w)))
        return self.backbone.norm_pre(x), (h, w)

    def forward_features(self, images: torch.Tensor,
                         reduction: Optional[TokenReduction] = None) -> Features:
        """Padded images -> normalised full-grid patch tokens and reduction stats."""
        x, grid = self.embed(images)
        x, state = run_blocks(self, x, grid, reduction or self.reduction)
        tokens = self.backbone.norm(x)[:, self.backbone.num_prefix_tokens:]
        return Features(tokens, grid, state.stats, state.cluster_logits)

    # -- head ---------------------------------------------------------------------
    def forward_head(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, N, D) -> logits (B, C, h, w) on the patch grid."""
        return self.decode_head(tokens, grid)

    def forward(self, images: torch.Tensor,
                reduction: Optional[TokenReduction] = None) -> Segmentation:
        """Normalised images (B, 3, H, W), any H and W -> logits (B, C, H, W)."""
        height, width = images.shape[-2:]
        padded_h, padded_w = self.padded_size(height, width)
        if (padded_h, padded_w) != (height, width):
            images = F.pad(images, (0, padded_w - width, 0, padded_h - height))
        strategy = reduction or self.reduction
        if self._decodes_merged(strategy):
            logits, stats, cluster_logits = self._forward_merged_head(images, strategy)
        else:
            features = self.forward_features(images, strategy)
            logits, stats, cluster_logits = (self.forward_head(features.tokens, features.grid), features.stats,
                                             features.cluster_logits)
        logits = upsample_bilinear(logits, (padded_h, padded_w))
        return Segmentation(logits[..., :height, :width], stats, cluster_logits)

    def _decodes_merged(self, strategy: TokenReduction) -> bool:
        """A model trained with ``head_on_merged`` decodes ClustViT's merged sequence (when it merges)."""
        return (self.config.head_on_merged and isinstance(strategy, ClusterMerging)
                and strategy.start_block(self) < self.depth)

    def _forward_merged_head(self, images: torch.Tensor, strategy: ClusterMerging):
        """The Segmenter decoder on [kept tokens, cluster representatives]; the regenerator then
        rebuilds every merged position's decoder state, and only the per-token mask product runs
        on the full grid. Returns (grid logits, stats, cluster logits)."""
        x, grid = self.embed(images)
        x, state = run_blocks(self, x, grid, strategy, restore=False)
        x = self.backbone.norm(x)
        key_mask = None if state.attn_mask is None else state.attn_mask[..., 1:]  # the class token is not decoded
        patch_states, class_states = self.decode_head.decode(x[:, 1:], key_mask)
        full = strategy.restore(self, F.pad(patch_states, (0, 0, 1, 0)), state)[:, 1:]
        return self.decode_head.masks(full, class_states, grid), state.stats, state.cluster_logits

    # -- weights ------------------------------------------------------------------
    def load_backbone(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Initialise the backbone from a timm-format ViT state dict.

        The classifier head is dropped; a position embedding of another grid is
        resampled to ours. Any other mismatch is an error naming ``source``.
        """
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        pos = state_dict.get("pos_embed")
        target = self.backbone.pos_embed
        if pos is not None and pos.shape != target.shape:
            prefix = self.backbone.num_prefix_tokens
            old = int(round((pos.shape[1] - prefix) ** 0.5))
            state_dict["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(self.backbone.patch_embed.grid_size), old_size=[old, old],
                num_prefix_tokens=prefix)
        problems = state_dict_mismatch(self.backbone.state_dict(), state_dict)
        if problems:
            raise ValueError(f"{source}: not a {self.config.arch} backbone: {problems}")
        self.backbone.load_state_dict(state_dict)


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What keeps ``found`` from loading strictly into ``expected`` ('' when nothing does)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
    details = []
    if missing:
        details.append(f"missing {len(missing)} weights (e.g. {missing[:3]})")
    if unexpected:
        details.append(f"unexpected {len(unexpected)} weights (e.g. {unexpected[:3]})")
    if wrong:
        details.append("shape mismatch " + ", ".join(
            f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:3]))
    return "; ".join(details)
