"""Q-Former: a BERT-style post-LN encoder whose learned queries cross-attend to the image features.

Module and parameter names follow the checkpoint keys under `qformer.`. Only the query path is
computed here (what captioning, VQA and chat use); the text FFN of retrieval checkpoints
(`use_qformer_text_input`) is loaded so such checkpoints load exactly, and is not used by generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QFormerConfig
from .layers import activated, linear_names


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_size: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_size, cfg.hidden_size)
        self.value = nn.Linear(kv_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        heads = lambda t: t.view(b, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(context)), heads(self.value(context)))
        return out.transpose(1, 2).reshape(b, n, d)


class ResidualLayerNorm(nn.Module):
    """BERT's post-LN output block: LayerNorm(dense(x) + residual)."""

    def __init__(self, cfg: QFormerConfig, in_size: int):
        super().__init__()
        self.dense = nn.Linear(in_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_size: int):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, kv_size)
        self.output = ResidualLayerNorm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x, context), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = cfg.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activated(self.dense, self.act, x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        if index % cfg.cross_attention_frequency == 0:
            self.crossattention = Attention(cfg, cfg.encoder_hidden_size)
        if cfg.use_qformer_text_input:
            self.intermediate = Intermediate(cfg)
            self.output = ResidualLayerNorm(cfg, cfg.intermediate_size)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = ResidualLayerNorm(cfg, cfg.intermediate_size)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(queries, queries)
        if hasattr(self, "crossattention"):
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class QFormer(nn.Module):
    """queries [B, Q, hidden] attending to image features [B, N, encoder_hidden] -> [B, Q, hidden]."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = QFormerEncoder(cfg)

    def quantizable(self) -> dict[str, str]:
        """Layer name -> role (see quant.formats.ROLES): every Linear of its layers, in int8: the 32
        queries are all the language model sees of the image."""
        return dict.fromkeys(linear_names(self.encoder.layer, "encoder.layer."), "image-int8")

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.layernorm(queries)
        for layer in self.encoder.layer:
            x = layer(x, image)
        return x
