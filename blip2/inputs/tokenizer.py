"""Prompts to the language model's input ids, laid out as the reference Blip2Processor does.

OPT prompts are always padded on the left. The reference pads on `tokenizer.padding_side`, which
the hub checkpoints leave at "right", and right-padded batches of a decoder-only model generate
garbage. With left padding the layout is the reference's `[<image> x N][pad...][BOS prompt]`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ..config import ConfigError, read_settings

# T5 has relative positions and no hard limit; the released tokenizer's model_max_length is 512.
T5_MAX_PROMPT = 512

class TokenBatch(NamedTuple):
    """Language-model input of a batch of prompts."""

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, 0 on padding


def _token_text(token: object) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    return token.get("content") if isinstance(token, dict) else token  # type: ignore[return-value]


class PromptTokenizer:
    """Prompts to the language model's input ids, laid out as the reference Blip2Processor does.

    With image placeholders (checkpoints whose processor has `num_query_tokens`) each row starts
    with `num_query_tokens` copies of `image_token_id`, which the model overwrites with the
    projected queries; without them (legacy checkpoints) the model prepends the queries itself.
    OPT's tokenizer puts BOS `</s>` before the prompt; T5's appends `</s>`.
    """

    def __init__(self, tokenizer: Tokenizer, kind: str, *, pad_id: int, image_token_id: int | None = None,
                 num_query_tokens: int | None = None, clean_up_spaces: bool = False) -> None:
        if kind not in ("opt", "t5"):
            raise ValueError(f"kind must be 'opt' or 't5', got {kind!r}")
        if num_query_tokens and image_token_id is None:
            raise ValueError("num_query_tokens needs an image_token_id")
        self.tokenizer, self.kind, self.pad_id = tokenizer, kind, pad_id
        self.image_token_id = image_token_id
        self.num_query_tokens = num_query_tokens or 0
        self.padding_side = "left" if kind == "opt" else "right"
        self.clean_up_spaces = clean_up_spaces
        # A tokenizer.json may carry padding/truncation settings; we pad and check lengths ourselves.
        tokenizer.no_padding()
        tokenizer.no_truncation()

    @classmethod
    def from_dir(cls, path: str | os.PathLike, kind: str, *, image_token_id: int | None = None,
                 num_query_tokens: int | None = None) -> PromptTokenizer:
        """Load tokenizer.json (or GPT-2 style vocab.json + merges.txt) and the processor settings.

        `num_query_tokens` defaults to processor_config.json's (absent on legacy checkpoints: no
        placeholders); `image_token_id` to the tokenizer's "<image>", appended if missing as the
        reference does. Pass the model config's values to override both.
        """
        directory = Path(path)
        config = read_settings(directory / "special_tokens_map.json") | read_settings(directory / "tokenizer_config.json")
        if (directory / "tokenizer.json").is_file():
            # transformers 5 takes tokenizer.json's post-processor as is and ignores
            # add_bos_token/add_eos_token from tokenizer_config.json in this case.
            try:
                tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own Exception type
                raise ConfigError(f"{directory / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            tokenizer = cls._byte_level_bpe(directory, config)
        else:
            raise FileNotFoundError(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt")
        # Named special tokens are matched whole in the text, as the reference adds them as special tokens.
        specials = [_token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        known = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        missing = [t for t in specials if t and t not in known]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        pad_text = _token_text(config.get("pad_token")) or "<pad>"
        pad_id = tokenizer.token_to_id(pad_text)
        if pad_id is None:
            raise ConfigError(f"{directory}: pad token {pad_text!r} is not in the vocabulary")
        if num_query_tokens is None:
            num_query_tokens = read_settings(directory / "processor_config.json").get("num_query_tokens")
        if image_token_id is None and num_query_tokens:
            # Blip2Processor appends "<image>" to the vocabulary when the tokenizer lacks it.
            tokenizer.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
            image_token_id = tokenizer.token_to_id("<image>")
        # transformers 5 skips the clean-up for BPE models even when the config asks for it.
        clean_up = config.get("clean_up_tokenization_spaces", False) and not isinstance(tokenizer.model, models.BPE)
        return cls(tokenizer, kind, pad_id=pad_id, image_token_id=image_token_id,
                   num_query_tokens=num_query_tokens, clean_up_spaces=bool(clean_up))

    @staticmethod
    def _byte_level_bpe(directory: Path, config: dict) -> Tokenizer:
        """The GPT-2 tokenizer the reference builds from vocab.json + merges.txt."""
        bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
        tokenizer = Tokenizer(bpe)
        prefix = bool(config.get("add_prefix_space", False))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
        tokenizer.decoder = decoders.ByteLevel()
        for index, entry in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            flags = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
            tokenizer.add_tokens([AddedToken(entry["content"], **flags)])
            if tokenizer.token_to_id(entry["content"]) != int(index):
                raise ConfigError(f"{directory}: added token {entry['content']!r} should have id {index}")
        # Without tokenizer.json these flags decide the specials (GPT2Tokenizer defaults: neither).
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        template, used = "$A", []
        if config.get("add_bos_token", False) and bos:
            template, used = f"{bos} {template}", [bos]
        if config.get("add_eos_token", False) and eos:
            template, used = f"{template} {eos}", used + [eos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, bpe.token_to_id(t)) for t in dict.fromkeys(used)]
        )
        return tokenizer

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt with the tokenizer's special tokens, without image placeholders."""
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def count_tokens(self, prompt: str) -> int:
        """Length of `encode(prompt)`: what `max_length` in `__call__` is checked against."""
        return len(self.encode(prompt))

    def __call__(self, prompts: str | Sequence[str], *, max_length: int | None = None) -> TokenBatch:
        """Tokenise one prompt or a batch, padded to the longest (OPT on the left, T5 on the right).

        Raises ValueError when a prompt has more than `max_length` tokens (image placeholders not counted).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        for prompt in prompts:
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 (argv, stdin)
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                raise ValueError(f"prompt {short!r} is not valid UTF-8 text (at character {e.start})") from None
        rows = [e.ids for e in self.tokenizer.encode_batch(list(prompts), add_special_tokens=True)]
        for prompt, ids in zip(prompts, rows, strict=True):
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            if max_length is not None and len(ids) > max_length:
                raise ValueError(f"prompt {short!r} is {len(ids)} tokens long, more than max_length={max_length}")
            if self.image_token_id is not None and self.image_token_id in ids:
                # A stray placeholder would make the model find more image slots than queries.
                raise ValueError(f"prompt {short!r} contains the image token (id {self.image_token_id})")
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            span = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[i, span], mask[i, span] = torch.tensor(ids, dtype=torch.long), 1
        # The placeholders go in front of everything, padding included, as in the reference.
        head = torch.full((len(rows), self.num_query_tokens), self.image_token_id or 0, dtype=torch.long)
        return TokenBatch(torch.cat([head, input_ids], 1), torch.cat([torch.ones_like(head), mask], 1))

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Ids to text (special tokens, image placeholders included, dropped by default)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:  # the reference's clean_up_tokenization, for non-BPE tokenizers
            for before in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):
                text = text.replace(before, before.strip() if before != " ' " else "'")
        return text

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        """`decode` for each row."""
        return [self.decode(row, skip_special_tokens) for row in sequences]
