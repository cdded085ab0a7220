"""BLIP-2: vision encoder -> Q-Former -> projection -> language model (OPT or T5).

Module and parameter names follow the Hugging Face checkpoint keys, so loading is a direct mapping.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Blip2Config
from .generation import GenerationConfig, Hypothesis, generate
from .opt import OPTForCausalLM, OPTSession, causal_mask, positions_from_mask
from .qformer import QFormer
from .t5 import T5ForConditionalGeneration, T5Session
from .vision import VisionModel


class Blip2Model(nn.Module):
    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionModel(cfg.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer.hidden_size))
        self.qformer = QFormer(cfg.qformer)
        self.language_projection = nn.Linear(cfg.qformer.hidden_size, cfg.text.hidden_size)
        lm_class = T5ForConditionalGeneration if cfg.is_encoder_decoder else OPTForCausalLM
        self.language_model = lm_class(cfg.text)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> projected query embeddings [B, num_query_tokens, lm_hidden]."""
        image = self.vision_model(pixel_values)
        # The Q-Former may be kept in float32 while the rest is float16 (as the reference does): cast in and out.
        qdtype = self.query_tokens.dtype
        queries = self.qformer(self.query_tokens.expand(image.shape[0], -1, -1), image.to(qdtype))
        return self.language_projection(queries.to(self.language_projection.weight.dtype))

    def embed_inputs(self, queries: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Language-model input embeddings and mask with the image queries in place.

        Where input_ids carry `num_query_tokens` image placeholders per row (the reference processor's
        layout), the queries replace them. Where they carry none (legacy checkpoints without an image
        token, or raw prompts), the queries are prepended and the mask grows to match.
        """
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n = cfg.num_query_tokens
        if cfg.image_token_index is not None:
            slots = input_ids == cfg.image_token_index
            counts = slots.sum(1)
        else:
            counts = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        if bool((counts == 0).all()):
            b = input_ids.shape[0]
            input_ids = torch.cat([input_ids.new_zeros(b, n), input_ids], 1)
            attention_mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], 1)
            slots = torch.zeros_like(input_ids, dtype=torch.bool)
            slots[:, :n] = True
        elif not bool((counts == n).all()):
            raise ValueError(f"each row of input_ids must hold {n} image placeholder ids "
                             f"({cfg.image_token_index}) or none; got {counts.tolist()}")
        embeds = self.language_model.embed(input_ids.masked_fill(slots, 0))
        # masked_scatter, as the reference: the queries fill the placeholder slots in order.
        embeds = embeds.masked_scatter(slots[..., None], queries.to(embeds.dtype))
        return embeds, attention_mask

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits with the meaning and shape of the reference Blip2ForConditionalGeneration.forward.

        OPT: [B, L, vocab] over the whole input (image slots included). T5: [B, T, vocab] over
        decoder_input_ids (default: the decoder start token alone).
        """
        embeds, mask = self.embed_inputs(self.encode_images(pixel_values), input_ids, attention_mask)
        lm = self.language_model
        if not self.config.is_encoder_decoder:
            hidden = lm(embeds, positions_from_mask(mask), causal_mask(mask))
            return lm.lm_head(hidden)
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((embeds.shape[0], 1), self.config.text.decoder_start_token_id,
                                           dtype=torch.long, device=embeds.device)
        encoded = lm.encode(embeds, mask)
        return lm.lm_head(lm.decode(decoder_input_ids, lm.cross_kv(encoded), mask))

    def generate(self, queries: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 gen: GenerationConfig) -> list[list[Hypothesis]]:
        """New tokens for each input: `gen.num_return_sequences` sequences per row of input_ids, best first.

        queries: encode_images' output, one row per input (repeat an image's row to ask it several things).
        """
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, mask = self.embed_inputs(queries, input_ids, attention_mask)
        copies = gen.num_beams if gen.num_beams > 1 else gen.num_return_sequences
        lm = self.language_model
        if cfg.is_encoder_decoder:
            session = T5Session(lm, embeds, mask, copies, gen.max_new_tokens)
            history = torch.full((input_ids.shape[0], 1), cfg.text.decoder_start_token_id, device=input_ids.device)
            ignore = None
        else:
            session = OPTSession(lm, embeds, mask, copies, gen.max_new_tokens)
            # The reference's processors see its input_ids; its repetition penalty skips leading padding.
            history = input_ids
            ignore = attention_mask.cumsum(1) == 0
        pad = cfg.text.pad_token_id if cfg.text.pad_token_id is not None else cfg.eos_token_ids[0]
        return generate(session, history, gen, cfg.eos_token_ids, pad, ignore)
