"""A GPT-2-style decoder stack (pre-norm blocks, causal attention) on given hidden states.

Attention projections are ``nn.Linear`` layers and attention runs through
``F.scaled_dot_product_attention``, so every weight matrix goes through ``F.linear`` (which
``ssam_kernels.sparse_ascent`` routes). There is no embedding or language-model head: the
benchmarks feed hidden states ``[batch, tokens, dim]`` directly.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPTStack(nn.Module):
    """``depth`` GPT-2 blocks of width ``dim`` and a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        if x.dim() != 3 or x.shape[-1] != self.norm.normalized_shape[0]:
            raise ValueError(f"x must be [batch, tokens, {self.norm.normalized_shape[0]}], got {tuple(x.shape)}")
        return self.norm(self.blocks(x))


def gpt2_small_stack() -> GPTStack:
    """The 12 blocks of GPT-2 small: dim 768, 12 heads (85M parameters, no embeddings)."""
    return GPTStack(768, 12, 12)
