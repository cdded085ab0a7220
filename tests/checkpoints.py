"""Tiny random BLIP-2 checkpoints in the exact Hugging Face layout, written by `transformers` at test time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

Q = 4  # query tokens in the tiny checkpoints
OPT_IMAGE_TOKEN = 95
T5_IMAGE_TOKEN = 97
VOCAB = 99


def tiny_config(lm: str = "opt", *, image_size: int = 28, cross_attention_frequency: int = 2,
                word_embed_proj_dim: int | None = None, t5_d_kv: int = 6, vision_eps: float = 1e-6,
                legacy: bool = False, do_layer_norm_before: bool = True,
                num_query_tokens: int = Q, image_token_index: int | None = None, **text_overrides) -> dict:
    """A small Blip2Config dict with non-default shapes everywhere."""
    vision = dict(hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=14, layer_norm_eps=vision_eps)
    qformer = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=44,
                   cross_attention_frequency=cross_attention_frequency)
    if lm == "opt":
        text = dict(model_type="opt", vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, ffn_dim=60,
                    num_attention_heads=4, max_position_embeddings=64, eos_token_id=50, bos_token_id=2,
                    pad_token_id=1, do_layer_norm_before=do_layer_norm_before)
        if word_embed_proj_dim is not None:
            text["word_embed_proj_dim"] = word_embed_proj_dim
        image_token = OPT_IMAGE_TOKEN
    else:
        # d_kv * num_heads (24) differs from d_model (36), as the issue asks.
        text = dict(model_type="t5", vocab_size=VOCAB, d_model=36, d_kv=t5_d_kv, d_ff=50, num_layers=2,
                    num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                    decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
        image_token = T5_IMAGE_TOKEN
    text.update(text_overrides)
    cfg = dict(model_type="blip-2", vision_config=vision, qformer_config=qformer, text_config=text,
               num_query_tokens=num_query_tokens)
    if not legacy:
        cfg["image_token_index"] = image_token if image_token_index is None else image_token_index
    return cfg


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace transformers' near-zero init with weights that make every path matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name and "shared" not in name and "embed_tokens" not in name:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def write_checkpoint(directory: Path, cfg: dict, *, fmt: str = "safetensors", seed: int = 0,
                     flan: bool | None = None, flan_form: str = "4.x") -> Path:
    """Save a random Blip2ForConditionalGeneration with `transformers`.

    fmt: "safetensors" (one file), "sharded" (several safetensors shards and an index), "bin"
    (pytorch_model.bin) or "bin-sharded". A Flan-style T5 gets an untied lm_head and
    tie_word_embeddings false, like blip2-flan-t5-xl. A legacy config (no image_token_index) is
    saved from a model made with one, then stripped, like blip2-opt-2.7b-coco.

    flan_form: how the config says that a Flan-style T5's head is its own: "4.x" as the released
    blip2-flan-t5-xl (tie_word_embeddings false), "5.x" as transformers 5 writes it
    (tie_word_embeddings true, scale_decoder_outputs false, the separate lm_head stored).
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    if flan is None:
        flan = cfg["text_config"]["model_type"] == "t5"
    legacy = "image_token_index" not in cfg
    if flan and flan_form == "5.x":
        cfg = {**cfg, "text_config": {**cfg["text_config"], "tie_word_embeddings": True,
                                      "scale_decoder_outputs": False, "dense_act_fn": "gelu"}}
    hf_cfg = Blip2Config(**{**cfg, "image_token_index": cfg.get("image_token_index", VOCAB - 1)})
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(hf_cfg).eval()
    _randomize(model, seed)
    if flan:
        lm = model.language_model
        lm.lm_head.weight = torch.nn.Parameter(0.5 * torch.randn(lm.lm_head.weight.shape))
    directory.mkdir(parents=True, exist_ok=True)
    if fmt in ("safetensors", "sharded"):
        model.save_pretrained(directory, max_shard_size="20KB" if fmt == "sharded" else "10GB")
    else:
        _save_bin(model, directory, sharded=fmt == "bin-sharded")
    config_path = directory / "config.json"
    raw = json.loads(config_path.read_text())
    if legacy:
        raw.pop("image_token_index", None)
        raw.pop("image_token_id", None)
    if flan and flan_form == "4.x":
        raw["text_config"]["tie_word_embeddings"] = False
        raw["text_config"]["dense_act_fn"] = "gelu"
        raw["text_config"].pop("scale_decoder_outputs", None)
    config_path.write_text(json.dumps(raw, indent=2))
    return directory


def _save_bin(model, directory: Path, sharded: bool) -> None:
    from transformers import Blip2ForConditionalGeneration  # noqa: F401  (config.json comes from save_pretrained)

    model.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.text_config.model_type == "opt":
        state.pop("language_model.lm_head.weight", None)
    if not sharded:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def reference(directory: Path):
    """The reference model from transformers, float32, eval mode."""
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()


def opt_inputs(cfg: dict, prompts: list[list[int]], seed: int = 0):
    """Reference-processor layout for OPT: [image x Q][pad ...][BOS prompt], left padded."""
    n = cfg["num_query_tokens"]
    image_token = cfg.get("image_token_index", OPT_IMAGE_TOKEN)
    width = max(len(p) for p in prompts) + 1
    ids, mask = [], []
    for p in prompts:
        pad = width - 1 - len(p)
        ids.append([image_token] * n + [1] * pad + [2] + p)
        mask.append([1] * n + [0] * pad + [1] * (1 + len(p)))
    return torch.tensor(ids), torch.tensor(mask)


def t5_inputs(cfg: dict, prompts: list[list[int]]):
    """Reference-processor layout for T5: [image x Q][prompt </s>][pad ...], right padded."""
    n = cfg["num_query_tokens"]
    image_token = cfg.get("image_token_index", T5_IMAGE_TOKEN)
    width = max(len(p) for p in prompts) + 1
    ids, mask = [], []
    for p in prompts:
        pad = width - 1 - len(p)
        ids.append([image_token] * n + p + [1] + [0] * pad)
        mask.append([1] * (n + len(p) + 1) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask)


def pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


def full_checkpoint(directory: Path, lm: str, *, image_size: int = 28, seed: int = 0,
                    **overrides) -> tuple[Path, dict]:
    """A tiny checkpoint with real tokenizer and processor files, as the hub's: the vocabulary is the
    tokenizer's, and the end of sequence is OPT's "\n" token (as in blip2-opt-2.7b) or T5's </s>."""
    from text_fixtures import make_processor_files

    info = make_processor_files(directory, lm, image_size=image_size, num_query_tokens=Q,
                                with_image_token=True)
    text = dict(vocab_size=info.vocab_size + 3, pad_token_id=info.pad_id)
    if lm == "opt":
        from tokenizers import Tokenizer

        text.update(eos_token_id=Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id("\u010a"),
                    bos_token_id=info.bos_id)
    else:
        text.update(eos_token_id=info.eos_id, num_decoder_layers=2)
    text.update(overrides)
    cfg = tiny_config(lm, image_size=image_size, image_token_index=info.image_token_id, **text)
    write_checkpoint(directory, cfg, seed=seed)
    return directory, cfg


def legacy_copy(src: Path, dst: Path, lm: str) -> Path:
    """The same weights in the legacy layout of blip2-opt-2.7b-coco: no image_token_index in config.json,
    no processor_config.json, a tokenizer without "<image>"."""
    import shutil

    from text_fixtures import make_processor_files

    shutil.copytree(src, dst)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    raw = json.loads((src / "config.json").read_text())
    make_processor_files(dst, lm, image_size=raw["vision_config"]["image_size"], with_image_token=False)
    (dst / "processor_config.json").unlink(missing_ok=True)
    raw.pop("image_token_index", None)
    raw.pop("image_token_id", None)
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    return dst


_LOAD_MEMORY = """
import json, sys, blip2
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
kwargs = json.loads(sys.argv[3])
blip2.load(sys.argv[2], **kwargs)  # first load pays fixed costs (lazy imports, allocator setup)
before = status("VmRSS")
model = blip2.load(sys.argv[1], **kwargs)
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS")}))
"""


def load_memory(path: Path, warm: Path, **load_kwargs) -> dict[str, int]:
    """Resident memory in bytes, in a fresh process, of blip2.load(path, **load_kwargs) after loading
    `warm` the same way: "before" and "after" the load (VmRSS) and the process's "peak" (VmHWM)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _LOAD_MEMORY, str(path), str(warm), json.dumps(load_kwargs)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)

