"""Small pieces shared by every model part: activations."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # The reference's "gelu_new" is written out, not F.gelu(approximate="tanh"): same formula, kept
    # literal so rounding matches.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
}


class KVCache:
    """Preallocated keys and values for every layer: [layers, batch, heads, max_len, head_dim].

    Written in place at the positions being computed, so decoding allocates nothing per step and
    beam search reorders rows in place.
    """

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, H, len(pos), D] at positions `pos`; return this layer's whole cache."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding batch rows `rows` (one input's prefill shared by its beams)."""
        new = KVCache.__new__(KVCache)
        new.k, new.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        return new

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (beam search), in place."""
        self.k.copy_(self.k.index_select(1, rows))
        self.v.copy_(self.v.index_select(1, rows))
