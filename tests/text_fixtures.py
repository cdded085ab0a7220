"""Tiny tokenizers and processor files made at test time, in the exact Hugging Face layout.

The released BLIP-2 checkpoints ship an OPT byte-level BPE tokenizer (``<s>``=0, ``<pad>``=1,
``</s>``=2, ``<unk>``=3, BOS ``</s>`` put in front of every prompt) or a Flan-T5 one (``<pad>``=0,
``</s>``=1, ``<unk>``=2, ``</s>`` appended), plus ``<image>`` at the end of the vocabulary on the
newer checkpoints. These helpers train look-alikes of a few hundred tokens with the ``tokenizers``
library and let ``transformers`` (test-only) write the files, so what our loader reads is exactly
what the reference writes and reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "a photo of a woman sitting on the beach with her dog",
    "Question: what is in the image? Answer: a cat",
    "Question: how many people are there? Short answer: two",
    "a man riding a bike down the street next to a bus",
    "two dogs playing with a ball in the green grass",
    "a plate of food with broccoli, rice and meat on a table",
    "the sun is setting over the ocean and the sky is orange",
    "a group of children are playing football in the park",
    "an airplane flying in the blue sky above the clouds",
    "a red car parked in front of a white house",
    "what color is the train? yellow. where is the clock? on the tower.",
    "It's a small kitchen with a stove, a sink and a window.",
    "The quick brown fox jumps over the lazy dog!\nA new line starts here.",
    "people walking on a busy city street at night with lights",
    "a bowl of fruit: apples, bananas and oranges",
    "a cat sleeping on a laptop keyboard on a desk",
    "Describe the picture in detail. There is a horse in a field.",
    "a baseball player swinging a bat at a ball during a game",
]


@dataclass(frozen=True)
class TokenizerInfo:
    """Ids a test needs to build a matching model config."""

    vocab_size: int  # rows the LM embedding needs: base vocabulary plus added tokens
    image_token_id: int | None
    pad_id: int
    eos_id: int
    bos_id: int | None


def _corpus(repeat: int = 3) -> list[str]:
    return CORPUS * repeat


def _wrap_and_save(tok: Tokenizer, out: Path, **special: str) -> object:
    """Wrap a `tokenizers.Tokenizer` in transformers' fast tokenizer and let it write the files."""
    from transformers import TokenizersBackend  # test-only oracle

    hf = TokenizersBackend(tokenizer_object=tok, **special)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    return hf


def _add_image_token(out: Path) -> None:
    """Add ``<image>`` the way the hub checkpoints have it: a special added token at the end."""
    from transformers import AddedToken, AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out)
    hf.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    hf.save_pretrained(out)


def _info(out: Path, pad: str, eos: str, bos: str | None) -> TokenizerInfo:
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    return TokenizerInfo(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        image_token_id=tok.token_to_id("<image>"),
        pad_id=tok.token_to_id(pad),
        eos_id=tok.token_to_id(eos),
        bos_id=tok.token_to_id(bos) if bos else None,
    )


def make_opt_tokenizer(
    directory: str | Path,
    with_image_token: bool = True,
    *,
    vocab_size: int = 420,
    add_bos_token_in_config: bool | None = True,
    legacy_files: bool = False,
) -> TokenizerInfo:
    """Write an OPT-style byte-level BPE tokenizer to `directory`.

    ``add_bos_token_in_config`` mirrors the real ``tokenizer_config.json`` (``"add_bos_token": true``);
    with None the flag is left out and only the TemplateProcessing in tokenizer.json adds the BOS;
    with False the flag wins over tokenizer.json and no BOS is added. ``legacy_files`` also
    writes ``vocab.json``/``merges.txt`` and removes ``tokenizer.json`` (the old GPT-2 layout).
    """
    out = Path(directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # includes "Ċ", the newline byte
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    # The real OPT tokenizer.json puts "</s>" (its BOS) in front of every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    _wrap_and_save(tok, out, bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>")
    if with_image_token:
        _add_image_token(out)
    if add_bos_token_in_config is not None:
        # transformers 5 does not write this flag, but the hub's OPT tokenizer_config.json has it,
        # and when present it overrides the post-processor of tokenizer.json.
        _update_config(out, add_bos_token=add_bos_token_in_config)
    info = _info(out, "<pad>", "</s>", "</s>")
    if legacy_files:
        _write_vocab_and_merges(out)
    return info


def _write_vocab_and_merges(out: Path) -> None:
    """Replace tokenizer.json by GPT-2 style vocab.json + merges.txt (the pre-tokenizers layout)."""
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer.json").unlink()
    # Without tokenizer.json the added tokens (specials, "<image>") live in tokenizer_config.json,
    # as in the checkpoints saved by transformers 4.
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in data["added_tokens"]
    }
    _update_config(out, tokenizer_class="GPT2Tokenizer", added_tokens_decoder=added)


def _update_config(out: Path, **entries: object) -> None:
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(entries)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def make_t5_tokenizer(directory: str | Path, with_image_token: bool = True, *, vocab_size: int = 300) -> TokenizerInfo:
    """Write a Flan-T5-style Unigram tokenizer (Metaspace, ``</s>`` appended) to `directory`."""
    out = Path(directory)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    assert [tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    _wrap_and_save(tok, out, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if with_image_token:
        _add_image_token(out)
    return _info(out, "<pad>", "</s>", None)


def make_processor_files(
    directory: str | Path,
    kind: str,
    image_size: int = 224,
    num_query_tokens: int = 32,
    with_image_token: bool = True,
) -> TokenizerInfo:
    """Write tokenizer + image processor (+ processor config) files as transformers does.

    With the image token this is the layout of the newer hub checkpoints (``processor_config.json``
    with ``num_query_tokens``); without it, that of the legacy blip2-opt-2.7b-coco one: tokenizer and
    ``preprocessor_config.json`` only, so the reference inserts no image placeholders.
    """
    from transformers import AutoTokenizer, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    out = Path(directory)
    if kind == "opt":
        info = make_opt_tokenizer(out, with_image_token)
    elif kind == "t5":
        info = make_t5_tokenizer(out, with_image_token)
    else:
        raise ValueError(f"kind must be 'opt' or 't5', got {kind!r}")
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    if with_image_token:
        tokenizer = AutoTokenizer.from_pretrained(out)
        Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens).save_pretrained(out)
    else:
        image_processor.save_pretrained(out)
    return info
