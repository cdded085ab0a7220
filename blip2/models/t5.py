"""T5 encoder-decoder (the language model of blip2-flan-t5-*): RMS norm, relative position buckets,
unscaled attention, gated or plain FFN.

Module and parameter names follow the checkpoint keys under `language_model.`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import T5Config
from .layers import ACT, KVCache, attention, cpu_rms_norm, embedding, linear_names


class T5LayerNorm(nn.Module):
    """RMS norm; the variance is always accumulated in float32, as in the reference."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = cpu_rms_norm(x, self.weight, self.eps)  # bfloat16 or float32 on a CPU: one pass
        if fused is not None:
            return fused
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """Map key-minus-query distances to T5's log-spaced buckets."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(relative < max_exact, relative, large)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool = False, bidirectional: bool = True):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
            self.bidirectional = bidirectional
            self.num_buckets = cfg.relative_attention_num_buckets
            self.max_distance = cfg.relative_attention_max_distance

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def position_bias(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """Learned bias from bucketed relative positions: [1, heads, q, k] for query_pos [q], or
        [rows, heads, q, k] for query_pos [rows, q] (each row at a position of its own)."""
        buckets = relative_position_bucket(key_pos - query_pos[..., None], self.bidirectional,
                                           self.num_buckets, self.max_distance)
        bias = self.relative_attention_bias(buckets).movedim(-1, -3)
        return bias if query_pos.dim() == 2 else bias[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over x, or cross-attention over given kv; `bias` holds position bias plus mask."""
        b, n, _ = x.shape
        q = self.heads(self.q(x))
        if kv is None:
            k, v = self.heads(self.k(x)), self.heads(self.v(x))
            if cache is not None:
                k, v = cache.update(layer, cache_pos, k, v)
        else:
            k, v = kv
        out = attention(q, k, v, bias)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class DenseReluDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.is_gated_act
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = ACT[cfg.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        # wo may be kept in float32 while the rest is float16 (the reference's overflow guard); a
        # quantized wo (integer weight) casts its input itself.
        if self.wo.weight.is_floating_point():
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class SelfAttentionBlock(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, relative_bias, bidirectional)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class CrossAttentionBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class FFBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = DenseReluDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _clamp(x + self.DenseReluDense(self.layer_norm(x)))


def _clamp(x: torch.Tensor) -> torch.Tensor:
    # The reference clamps float16 activations below the float16 maximum so T5 does not overflow to inf.
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, first: bool, decoder: bool):
        super().__init__()
        layers = [SelfAttentionBlock(cfg, relative_bias=first, bidirectional=not decoder)]
        if decoder:
            layers.append(CrossAttentionBlock(cfg))
        layers.append(FFBlock(cfg))
        self.layer = nn.ModuleList(layers)


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        n = cfg.num_decoder_layers if decoder else cfg.num_layers
        self.block = nn.ModuleList(T5Block(cfg, i == 0, decoder) for i in range(n))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def bias(self, query_pos: torch.Tensor, key_pos: torch.Tensor, keep: torch.Tensor, dtype) -> torch.Tensor:
        """Position bias of the first block plus the mask (keep: boolean, broadcastable to [B, 1, q, k])."""
        bias = self.block[0].layer[0].SelfAttention.position_bias(query_pos, key_pos).to(dtype)
        return bias + torch.zeros_like(keep, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


class T5ForConditionalGeneration(nn.Module):
    """Flan-T5: the encoder reads [image queries + prompt]; the decoder writes the answer."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(cfg, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    # Keys a checkpoint may hold that are copies of one of our parameters, or feed none: the encoder's
    # and decoder's embed_tokens are the shared embedding; the decoder's cross-attention never has a
    # position bias, though some checkpoints store one.
    checkpoint_aliases = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    checkpoint_ignored = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

    @property
    def tied_weights(self) -> dict[str, str]:
        """Original T5 ties lm_head to the embedding; Flan-T5 has its own (see load_weights)."""
        return {"lm_head.weight": "shared.weight"} if self.config.tie_word_embeddings else {}

    def quantizable(self) -> dict[str, str]:
        """Layer name -> role (see quant.formats.ROLES): every Linear of the encoder and decoder
        blocks; the embedding and a head of its own, whose errors go straight into the logits, in int8."""
        roles = {**dict.fromkeys(linear_names(self.encoder.block, "encoder.block."), "text"),
                 **dict.fromkeys(linear_names(self.decoder.block, "decoder.block."), "text"), "shared": "text-int8"}
        if not self.config.tie_word_embeddings:
            roles["lm_head"] = "text-int8"
        return roles

    def float16_kept_in_float32(self) -> list[str]:
        """Parameters the reference keeps in float32 when the rest is float16: each FFN's `wo`, whose
        outputs overflow float16."""
        return [f"{stack}.{name}" for stack in ("encoder", "decoder") for name, _ in getattr(self, stack).named_parameters()
                if ".DenseReluDense.wo." in f".{name}"]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.shared(input_ids)

    def encode(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder hidden states [B, S, d_model] for embeds [B, S, d_model] with 0/1 padding mask [B, S]."""
        n = embeds.shape[1]
        pos = torch.arange(n, device=embeds.device)
        keep = attention_mask.bool()[:, None, None, :]
        bias = self.encoder.bias(pos, pos, keep, embeds.dtype)
        x = embeds
        for block in self.encoder.block:
            attn, ff = block.layer
            x = _clamp(x + attn.SelfAttention(attn.layer_norm(x), bias))
            x = ff(x)
        return self.encoder.final_layer_norm(x)

    def cross_kv(self, encoder_out: torch.Tensor) -> KVCache:
        """Every decoder layer's cross-attention keys and values, computed once per encoded input."""
        cfg = self.config
        b, s, _ = encoder_out.shape
        cache = KVCache(cfg.num_decoder_layers, b, cfg.num_heads, s, cfg.d_kv, encoder_out.dtype, encoder_out.device)
        for i, block in enumerate(self.decoder.block):
            att = block.layer[1].EncDecAttention
            cache.k[i] = att.heads(att.k(encoder_out))
            cache.v[i] = att.heads(att.v(encoder_out))
        return cache

    def prompt(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's pass, a function of its inputs alone (so a CUDA graph can replay it): the
        encoder, then every decoder layer's cross-attention keys and values."""
        cross = self.cross_kv(self.encode(embeds, attention_mask))
        return cross.k, cross.v

    def decode(self, decoder_input_ids: torch.Tensor, cross: KVCache, encoder_mask: torch.Tensor,
               cache: KVCache | None = None, start: int | torch.Tensor = 0) -> torch.Tensor:
        """Decoder hidden states for decoder_input_ids [B, T] at positions start..start+T-1, ready for lm_head.

        Without a cache, the ids are the whole decoder prefix; with one, earlier positions are read from
        it. `start` may be a one-element tensor (a decoding step of one token, captured in a CUDA graph),
        or [B, 1], each row's own position (a step of a continuous batch).
        """
        x = self.shared(decoder_input_ids)
        t = x.shape[1]
        qpos = start if isinstance(start, torch.Tensor) else torch.arange(start, start + t, device=x.device)
        kpos = torch.arange(cache.max_len if cache is not None else t, device=x.device)
        self_bias = self.decoder.bias(qpos, kpos, (kpos <= qpos[..., None]).unsqueeze(-3), x.dtype)
        cross_bias = torch.zeros_like(encoder_mask[:, None, None, :], dtype=x.dtype).masked_fill(
            ~encoder_mask.bool()[:, None, None, :], torch.finfo(x.dtype).min)
        for i, block in enumerate(self.decoder.block):
            sa, ca, ff = block.layer
            x = _clamp(x + sa.SelfAttention(sa.layer_norm(x), self_bias, cache=cache, layer=i, cache_pos=qpos))
            x = _clamp(x + ca.EncDecAttention(ca.layer_norm(x), cross_bias, kv=(cross.k[i], cross.v[i])))
            x = ff(x)
        x = self.decoder.final_layer_norm(x)
        if self.config.scale_decoder_outputs:
            x = x * self.config.d_model ** -0.5
        return x

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_decoder_layers, batch, cfg.num_heads, max_len, cfg.d_kv, dtype, device)
