"""OPT decoder (the language model of blip2-opt-*): learned positions, ReLU FFN, pre- or post-LN.

Module and parameter names follow the checkpoint keys under `language_model.`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import OPTConfig
from .layers import KVCache, activated, attention, embedding, linear_names

# OPT's learned position table has two extra rows in front (a fairseq legacy); position p reads row p + 2.
POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.scaling = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
        bias = cfg.enable_bias
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, layer: int,
                cache_pos: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        heads = lambda t: t.view(b, n, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        # The reference scales q before the product (not the scores): same order here for the same rounding.
        q = heads(self.q_proj(x) * self.scaling)
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        if cache is not None:
            k, v = cache.update(layer, cache_pos, k, v)
        out = attention(q, k, v, mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class OPTLayer(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.pre_ln = cfg.do_layer_norm_before
        self.act = cfg.activation_function
        affine = cfg.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)

    def forward(self, x, mask, cache, layer, cache_pos):
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache, layer, cache_pos)
            return x + self.fc2(activated(self.fc1, self.act, self.final_layer_norm(x)))
        x = self.self_attn_layer_norm(x + self.self_attn(x, mask, cache, layer, cache_pos))
        return self.final_layer_norm(x + self.fc2(activated(self.fc1, self.act, x)))


class OPTDecoder(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.word_embed_proj_dim)
        self.embed_positions = embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False)
            self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False)
        if cfg.final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)
        self.layers = nn.ModuleList(OPTLayer(cfg) for _ in range(cfg.num_hidden_layers))


class OPTModel(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTForCausalLM(nn.Module):
    """OPT language model over input embeddings (text embeddings with the image queries scattered in)."""

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.config = cfg
        self.model = OPTModel(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)

    @property
    def tied_weights(self) -> dict[str, str]:
        """lm_head shares the token embedding (OPT's usual tie; see load_weights)."""
        return {"lm_head.weight": "model.decoder.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def quantizable(self) -> dict[str, str]:
        """Layer name -> role (see quant.formats.ROLES): every Linear of the decoder layers; the token
        embedding and a head of its own, whose errors go straight into the logits, in int8."""
        roles = dict.fromkeys(linear_names(self.model.decoder.layers, "model.decoder.layers."), "text")
        roles["model.decoder.embed_tokens"] = "text-int8"
        if not self.config.tie_word_embeddings:
            roles["lm_head"] = "text-int8"
        return roles

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.embed_tokens(input_ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states before lm_head, [B, L, word_embed_proj_dim].

        embeds [B, L, word_embed_proj_dim]; positions [B, L] (0-based; -1 for padding, as the reference
        computes them from the cumulative attention mask); mask: boolean [B, 1, L, keys], True where a
        query may attend; cache/cache_pos: write this step's keys and values at cache_pos.
        """
        dec = self.model.decoder
        if hasattr(dec, "project_in"):
            embeds = dec.project_in(embeds)
        x = embeds + dec.embed_positions(positions + POSITION_OFFSET)
        for i, layer in enumerate(dec.layers):
            x = layer(x, mask, cache, i, cache_pos)
        if hasattr(dec, "final_layer_norm"):
            x = dec.final_layer_norm(x)
        if hasattr(dec, "project_out"):
            x = dec.project_out(x)
        return x

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len,
                       cfg.hidden_size // cfg.num_attention_heads, dtype, device)

    def prompt(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
        """The prompt's pass, a function of its inputs alone (so a CUDA graph can replay it): the logits
        (float32) after each row's last position, and a new cache of mask.shape[-1] positions holding the
        prompt's keys and values."""
        cache = self.new_cache(embeds.shape[0], mask.shape[-1], embeds.dtype, embeds.device)
        hidden = self(embeds, positions, mask, cache, torch.arange(embeds.shape[1], device=embeds.device))
        return self.lm_head(hidden[:, -1]).float(), cache.k, cache.v


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 padding mask -> boolean [B, 1, L, L]: causal, and padded keys hidden."""
    n = attention_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as the reference derives them: cumulative count of real tokens, -1 on padding."""
    return (attention_mask.long().cumsum(1) * attention_mask.long() - 1)
