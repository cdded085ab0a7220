"""The benchmark's inputs: full-size random-weight checkpoints in the exact layout of the released
ones (config.json, float32 safetensors shards, tokenizer and processor files), written once and
cached, and JPEG files. Speed and memory do not depend on the weights' values."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import struct
import sys
from pathlib import Path

import torch

SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size ("5GB")
_MARKER = "blip2-bench-checkpoint.json"
_FORMAT = 1  # bump when the generator changes what it writes

_VISION = dict(model_type="blip_2_vision_model", hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
               num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
               qkv_bias=True)
_QFORMER = dict(model_type="blip_2_qformer", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12, cross_attention_frequency=2,
                encoder_hidden_size=1408, vocab_size=30522, max_position_embeddings=512)
_OPT = dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=50304, hidden_size=2560,
            num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32, max_position_embeddings=2048,
            word_embed_proj_dim=2560, do_layer_norm_before=True, activation_function="relu", bos_token_id=2,
            eos_token_id=50118, pad_token_id=1, enable_bias=True, tie_word_embeddings=True)
_T5 = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=32128, d_model=2048, d_kv=64,
           d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
           dense_act_fn="gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6,
           relative_attention_num_buckets=32, relative_attention_max_distance=128, decoder_start_token_id=0,
           eos_token_id=1, pad_token_id=0)


def _blip2_config(text: dict, image_token_index: int, decoder_only: bool) -> dict:
    return {"architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2", "torch_dtype": "float32",
            "num_query_tokens": 32, "image_token_index": image_token_index, "image_text_hidden_size": 256,
            "initializer_factor": 1.0, "initializer_range": 0.02, "use_decoder_only_language_model": decoder_only,
            "vision_config": dict(_VISION), "qformer_config": dict(_QFORMER), "text_config": dict(text)}


CONFIGS: dict[str, dict] = {
    "opt-2.7b": _blip2_config(_OPT, 50265, True),
    "flan-t5-xl": _blip2_config(_T5, 32100, False),
}


# Random checkpoints


def checkpoint_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor a saved checkpoint holds, in the reference model's order.

    Shapes come from the reference model built on the meta device (no memory). Tied copies are left
    out as save_pretrained does (OPT's lm_head, T5's encoder/decoder embed_tokens), except a T5
    lm_head whose config says it is not tied: Flan-T5 stores its own.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration  # oracle only, see module docstring

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(Blip2Config.from_dict(config))
    untied_head = config["text_config"].get("tie_word_embeddings", True) is False
    tied = {k for k in model.all_tied_weights_keys if not (untied_head and k.endswith("lm_head.weight"))}
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k not in tied]


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # Roughly like trained weights so activations stay finite in bf16: every 1-D weight here is a
    # (RMS/Layer)Norm scale.
    if key.endswith("bias"):
        return torch.zeros(shape)
    if key.endswith("weight") and len(shape) == 1:
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, 0.02, generator=gen)


def _plan_shards(shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Split tensors in order into shards of at most shard_bytes (a bigger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for key, shape in shapes:
        nbytes = 4 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    return shards


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple]], gen: torch.Generator) -> int:
    """Write one float32 safetensors file, making each tensor just before writing it.

    The header is known from the shapes alone, so only one tensor is ever in memory (the 515 MB
    embedding at most) instead of a whole shard plus its serialized copy.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in tensors:
        nbytes = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to 8-byte alignment
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape in tensors:
            f.write(_random_tensor(key, shape, gen).numpy().data)
    tmp.replace(path)
    return offset


def _spec_hash(config: dict, shard_bytes: int, seed: int) -> str:
    spec = {"config": config, "shard_bytes": shard_bytes, "seed": seed, "format": _FORMAT}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _is_complete(out_dir: Path, spec_hash: str) -> bool:
    try:
        marker = json.loads((out_dir / _MARKER).read_text())
        json.loads((out_dir / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    if marker.get("spec_hash") != spec_hash:
        return False
    return all((out_dir / name).is_file() and (out_dir / name).stat().st_size == size
               for name, size in marker["files"].items())


def write_checkpoint(config: dict, out_dir: str | Path, shard_bytes: int = SHARD_BYTES, *, seed: int = 0) -> Path:
    """Write a random-weight checkpoint for a BLIP-2 config dict (weights, configs, tokenizer and
    processor files), keeping whatever of it out_dir already holds complete."""
    out_dir = Path(out_dir).expanduser()
    spec_hash = _spec_hash(config, shard_bytes, seed)
    if not _is_complete(out_dir, spec_hash):
        _write_weights(config, out_dir, shard_bytes, seed, spec_hash)
    _write_processor_files(config, out_dir)
    return out_dir


def _write_weights(config: dict, out_dir: Path, shard_bytes: int, seed: int, spec_hash: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _MARKER).unlink(missing_ok=True)
    for stale in out_dir.glob("model-*.safetensors*"):
        stale.unlink()

    shards = _plan_shards(checkpoint_shapes(config), shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    files: dict[str, int] = {}
    total = 0
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        print(f"writing {out_dir / name} ({len(tensors)} tensors)", file=sys.stderr)
        total += _write_safetensors(out_dir / name, tensors, gen)
        files[name] = (out_dir / name).stat().st_size
        weight_map.update((key, name) for key, _ in tensors)

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    text = config["text_config"]
    generation = {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
                  if k in text}
    for name, content in [("model.safetensors.index.json", index), ("config.json", config),
                          ("generation_config.json", generation)]:
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
        files[name] = (out_dir / name).stat().st_size
    # The marker goes last: its presence means everything above was written completely.
    (out_dir / _MARKER).write_text(json.dumps({"spec_hash": spec_hash, "files": files}, indent=2) + "\n")


def make_random_checkpoint(kind: str, out_dir: str | Path, *, seed: int = 0, quick: bool = False) -> Path:
    """Write a full-size random BLIP-2 checkpoint ("opt-2.7b" or "flan-t5-xl") unless out_dir has it.

    Same files, key names, shapes and float32 dtype as the released Salesforce checkpoints;
    weights are N(0, 0.02), norm scales one, biases zero. Peak memory stays around one tensor.
    quick: the same layout and code paths with every model part two layers deep and narrow.
    """
    if kind not in CONFIGS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(CONFIGS)})")
    return write_checkpoint(quick_config(kind) if quick else CONFIGS[kind], out_dir, SHARD_BYTES, seed=seed)


def quick_config(kind: str) -> dict:
    """The full-size config shrunk for --quick: two layers everywhere, narrow widths; image size, query
    count, vocabulary and special token ids unchanged, so every code path is the full-size one."""
    config = copy.deepcopy(CONFIGS[kind])
    config["vision_config"].update(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2)
    config["qformer_config"].update(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=2, encoder_hidden_size=128)
    if kind == "opt-2.7b":
        config["text_config"].update(hidden_size=256, word_embed_proj_dim=256, ffn_dim=1024, num_hidden_layers=2,
                                     num_attention_heads=4)
    else:
        config["text_config"].update(d_model=256, d_kv=64, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4)
    return config


# Tokenizer, processor and image files

PROMPT = "Question: how many dogs are in the picture? Answer:"
_CORPUS = [PROMPT, "a photo of a dog on the beach", "two dogs and a cat are playing in the green park",
           "Question: what is in the picture? Short answer: a woman with her dog"]


def _bench_tokenizer(config: dict):
    """A byte-level BPE tokenizer with the released one's special ids and "<image>" at image_token_index.

    Trained on a few sentences, so the benchmark prompt splits into words as GPT-2's tokenizer splits it
    (13 ids with OPT's BOS); the vocabulary is padded with unused entries up to the image token, as
    large as the released tokenizers'.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    t5 = not config["use_decoder_only_language_model"]
    specials = ["<pad>", "</s>", "<unk>"] if t5 else ["<s>", "<pad>", "</s>", "<unk>"]
    image_id = config["image_token_index"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(vocab_size=min(image_id, 400), special_tokens=specials,
                                                             show_progress=False))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), image_id)})
    tok = Tokenizer.from_str(json.dumps(data))
    eos = specials.index("</s>")
    # OPT puts BOS "</s>" in front of the prompt, T5 appends "</s>" (REFERENCE.md).
    template = "$A </s>" if t5 else "</s> $A"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", eos)])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    assert tok.token_to_id("<image>") == image_id, "the tokenizer must put <image> at image_token_index"
    names = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>") if t5 else \
        dict(bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>")
    return tok, names


def _write_processor_files(config: dict, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json and processor_config.json as Blip2Processor saves them."""
    try:
        tokenizer = json.loads((out_dir / "tokenizer.json").read_text())
        image_ids = [t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<image>"]
        if image_ids == [config["image_token_index"]] and (out_dir / "processor_config.json").is_file():
            return
    except (OSError, ValueError, KeyError):
        pass
    from transformers import Blip2Processor, TokenizersBackend  # oracle only, see module docstring
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok, names = _bench_tokenizer(config)
    size = config["vision_config"]["image_size"]
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": size, "width": size}),
                               TokenizersBackend(tokenizer_object=tok, **names),
                               num_query_tokens=config["num_query_tokens"])
    processor.save_pretrained(out_dir)


def write_images(directory: Path, count: int, seed: int = 0) -> list[str]:
    """`count` distinct 640x480 JPEG photos-alike (smooth colour fields plus grain), made once.

    Distinct files, so that no system can answer a timed request from a cache of an earlier image.
    """
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"image-{seed}-{i:03d}.jpg"
        if not path.is_file():
            rng = np.random.default_rng([seed, i])
            base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
            pixels = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (480, 640, 3), dtype=np.int16)
            tmp = path.with_suffix(".tmp")
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=90)
            tmp.replace(path)
        paths.append(str(path))
    return paths


