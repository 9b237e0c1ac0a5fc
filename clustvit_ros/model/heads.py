"""Segmentation heads that turn a full-resolution token map into class logits."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block


def tokens_to_grid(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) per-token values -> contiguous (B, C, h, w).

    Contiguous matters: the transposed view is channels-last in memory, and
    bilinear upsampling of that layout on the CPU costs ~3x more.
    """
    return values.transpose(1, 2).reshape(values.shape[0], -1, grid[0], grid[1]).contiguous()


class LinearHead(nn.Module):
    """Per-token linear classifier (a 1x1 convolution on the token grid)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens: (B, N, D) patch tokens -> logits (B, C, h, w) on the patch grid."""
        return tokens_to_grid(self.classifier(tokens), grid)


class SegmenterHead(nn.Module):
    """Segmenter's mask-transformer decoder (Strudel et al., ICCV 2021).

    Learnable class embeddings attend jointly with the patch tokens for a few
    transformer layers; each class mask is the cosine similarity between the
    projected patch tokens and that class's embedding.
    """

    def __init__(self, embed_dim: int, num_classes: int, num_layers: int = 2,
                 num_heads: int = 3, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.input_proj = nn.Linear(embed_dim, embed_dim)
        self.class_embed = nn.Parameter(torch.randn(1, num_classes, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.patch_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.class_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens: (B, N, D) patch tokens -> logits (B, C, h, w) on the patch grid."""
        batch, num_patches = tokens.shape[:2]
        x = self.input_proj(tokens)
        x = torch.cat([x, self.class_embed.expand(batch, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        patches = F.normalize(self.patch_proj(x[:, :num_patches]), dim=-1)
        classes = F.normalize(self.class_proj(x[:, num_patches:]), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, C)
        return tokens_to_grid(masks, grid)


def build_head(kind: str, embed_dim: int, num_classes: int, num_heads: int,
               num_layers: int = 2, drop_path: float = 0.0) -> nn.Module:
    if kind == "segmenter":
        return SegmenterHead(embed_dim, num_classes, num_layers=num_layers,
                             num_heads=num_heads, drop_path=drop_path)
    if kind == "linear":
        return LinearHead(embed_dim, num_classes)
    raise ValueError(f"unknown head {kind!r}; expected 'segmenter' or 'linear'")
