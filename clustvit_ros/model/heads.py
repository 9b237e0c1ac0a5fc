"""Segmentation heads that turn a full-resolution token map into class logits."""
from __future__ import annotations

from typing import Optional

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


def _bilinear_matrix(size_in: int, size_out: int, device, dtype) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D linear interpolation, half-pixel centres
    (``align_corners=False``), edges clamped: torch's bilinear rule, one axis."""
    scale = size_in / size_out
    source = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = source - low
    rows = torch.arange(size_out)
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.to(device=device, dtype=dtype)


_BILINEAR_CACHE: dict[tuple, torch.Tensor] = {}


def upsample_bilinear(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W), equal to ``F.interpolate(mode="bilinear",
    align_corners=False)`` but as two small matrix products per axis.

    Why: on the CPU the separable form is several times faster than the
    interpolation kernel for a 16x upsample of a few class maps, and that cost
    is paid on every frame, merged or not (the model card has the figures).
    """
    height, width = size
    matrices = []
    for size_in, size_out in ((logits.shape[-2], height), (logits.shape[-1], width)):
        key = (size_in, size_out, logits.device, logits.dtype)
        matrix = _BILINEAR_CACHE.get(key)
        if matrix is None:
            if len(_BILINEAR_CACHE) > 64:  # many input sizes (e.g. training crops): bound the cache
                _BILINEAR_CACHE.clear()
            # A normal tensor even under inference_mode, so a later training step may use it.
            with torch.inference_mode(False):
                matrix = _bilinear_matrix(size_in, size_out, logits.device, logits.dtype)
            _BILINEAR_CACHE[key] = matrix
        matrices.append(matrix)
    rows, columns = matrices
    return rows @ (logits @ columns.T)


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
        return self.masks(*self.decode(tokens), grid)

    def decode(self, tokens: torch.Tensor,
               key_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer part: (B, L, D) tokens -> their states and the class states, (B, L, D), (B, C, D).

        ``L`` need not be the grid: ClustViT may decode its merged sequence and
        regenerate the patch states afterwards. ``key_mask`` (B, 1, 1, L) marks
        real tokens (padded batches).
        """
        batch, length = tokens.shape[:2]
        x = self.input_proj(tokens)
        x = torch.cat([x, self.class_embed.expand(batch, -1, -1)], dim=1)
        mask = None
        if key_mask is not None:
            mask = torch.cat([key_mask, key_mask.new_ones(batch, 1, 1, self.num_classes)], dim=-1)
        for block in self.blocks:
            x = block(x) if mask is None else block(x, attn_mask=mask)
        x = self.norm(x)
        return x[:, :length], x[:, length:]

    def masks(self, patch_states: torch.Tensor, class_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Per-patch class masks: cosine similarity of projected patch and class states -> (B, C, h, w)."""
        patches = F.normalize(self.patch_proj(patch_states), dim=-1)
        classes = F.normalize(self.class_proj(class_states), dim=-1)
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
