"""BLIP-2: vision encoder -> Q-Former -> projection -> language model (OPT or T5).

Module and parameter names follow the Hugging Face checkpoint keys, so loading is a direct mapping.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Blip2Config
from .opt import OPTForCausalLM, causal_mask, positions_from_mask
from .qformer import QFormer
from .t5 import T5ForConditionalGeneration
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

    # What belongs to the model, read by the loader, the quantizer and the dtype plan: each part
    # declares its own, under its name here.
    @property
    def tied_weights(self) -> dict[str, str]:
        return _prefixed(self.language_model.tied_weights, "language_model.")

    @property
    def checkpoint_aliases(self) -> dict[str, str]:
        return _prefixed(getattr(self.language_model, "checkpoint_aliases", {}), "language_model.")

    @property
    def checkpoint_ignored(self) -> list[str]:
        return [f"language_model.{k}" for k in getattr(self.language_model, "checkpoint_ignored", ())]

    def untie(self, name: str) -> None:
        """Give a tied weight its own tensor (a checkpoint stores it with other values)."""
        if name not in self.tied_weights:
            raise ValueError(f"{name} is not tied")
        self.config.text.tie_word_embeddings = False  # the only tie BLIP-2 has: the head to the embedding

    def quantizable(self) -> dict[str, str]:
        """Every layer weight-only quantization may replace -> its role (quant.formats.ROLES)."""
        parts = {"language_model": self.language_model, "vision_model": self.vision_model, "qformer": self.qformer}
        return {f"{prefix}.{name}": role for prefix, part in parts.items() for name, role in part.quantizable().items()}

    def float16_kept_in_float32(self) -> set[str]:
        """Parameters the reference keeps in float32 when the model is float16: the query tokens and
        the Q-Former (the image's only path to the language model), and what the language model keeps."""
        names = {"query_tokens", *(f"qformer.{name}" for name, _ in self.qformer.named_parameters())}
        lm = getattr(self.language_model, "float16_kept_in_float32", list)
        return names | {f"language_model.{name}" for name in lm()}

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

    def forward(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """Logits with the meaning and shape of the reference Blip2ForConditionalGeneration.forward.

        OPT: [B, L, vocab] over the whole input (image slots included). T5: [B, T, vocab] over
        decoder_input_ids (default: the decoder start token alone). queries: the images'
        encode_images output, when already computed (pixel_values is then not used).
        """
        if queries is None:
            queries = self.encode_images(pixel_values)
        embeds, mask = self.embed_inputs(queries, input_ids, attention_mask)
        lm = self.language_model
        if not self.config.is_encoder_decoder:
            hidden = lm(embeds, positions_from_mask(mask), causal_mask(mask))
            return lm.lm_head(hidden)
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((embeds.shape[0], 1), self.config.text.decoder_start_token_id,
                                           dtype=torch.long, device=embeds.device)
        encoded = lm.encode(embeds, mask)
        return lm.lm_head(lm.decode(decoder_input_ids, lm.cross_kv(encoded), mask))


def _prefixed(names: dict[str, str], prefix: str) -> dict[str, str]:
    return {f"{prefix}{k}": f"{prefix}{v}" for k, v in names.items()}
