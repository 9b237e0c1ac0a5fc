"""The two halves of a timm ``Block``, for strategies that act between them.

ToMe and ALGM merge between a block's attention and its MLP, ToMe needs the
keys the attention computes, ClusTR pools keys and values before attending.
They all reuse the block's own modules through these few functions instead of
copying timm's forward: ``block_forward(block, x)`` equals ``block(x)``, and
``attention_half`` + ``mlp_half`` equal it as well (tested against timm).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Attention``'s q, k, v (B, H, L, hd), after its q/k norms, and the raw qkv rows (B, L, 3 H hd)."""
    batch, length, _ = x.shape
    qkv_rows = attn.qkv(x)
    q, k, v = qkv_rows.view(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v, qkv_rows


def attention_output(attn: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Heads (B, H, L, hd) back to tokens through the attention's norm, gate and projection."""
    batch, _, length, _ = out.shape
    out = out.transpose(1, 2).reshape(batch, length, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def attention(attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
              with_keys: bool = False):
    """timm ``Attention`` with an additive key bias (or boolean mask); ``with_keys`` also returns
    the keys averaged over heads (ToMe's matching metric, free with the attention)."""
    q, k, v, _ = project_qkv(attn, x)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scale)
    out = attention_output(attn, out, x)
    return (out, k.mean(1)) if with_keys else out


def attention_half(block: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """First residual branch of a timm ``Block``: x + attention(norm1(x))."""
    return x + block.drop_path1(block.ls1(attention(block.attn, block.norm1(x), bias)))


def mlp_half(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Second residual branch of a timm ``Block``: x + mlp(norm2(x))."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def block_forward(block: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A whole block under a key bias; without one, timm's own forward (its fused kernels)."""
    if bias is None:
        return block(x)
    return block(x, attn_mask=bias)
