"""A plain Vision Transformer (pre-norm, class token, learned position embedding)."""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, img_size: int, patch: int, dim: int, depth: int, heads: int,
                 num_classes: int, in_chans: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        if img_size % patch:
            raise ValueError(f"img_size {img_size} is not a multiple of patch {patch}")
        tokens = (img_size // patch) ** 2
        self.patch = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(num_classes: int = 10, img_size: int = 32) -> ViT:
    """A small ViT for 32x32 inputs: patch 4, dim 192, depth 6, 3 heads (2.7M parameters)."""
    return ViT(img_size, 4, 192, 6, 3, num_classes)


def vit_small(num_classes: int = 1000, img_size: int = 224) -> ViT:
    """ViT-S/16: patch 16, dim 384, depth 12, 6 heads (22M parameters)."""
    return ViT(img_size, 16, 384, 12, 6, num_classes)


def vit_base(num_classes: int = 1000, img_size: int = 224) -> ViT:
    """ViT-B/16: patch 16, dim 768, depth 12, 12 heads (86.6M parameters)."""
    return ViT(img_size, 16, 768, 12, 12, num_classes)
