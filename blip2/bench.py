"""Benchmarks: full-size random checkpoints, and load time / peak memory against transformers.

The checkpoints have the exact layout of Salesforce/blip2-opt-2.7b and blip2-flan-t5-xl
(config.json, float32 safetensors shards, model.safetensors.index.json) but random weights, so
memory and speed can be measured without downloading 15 GB. transformers is only the oracle for
key names and shapes and the competitor in the benchmark: it is imported inside functions or in
child processes, never by this module.

    python -m blip2.bench make --model opt-2.7b
    python -m blip2.bench load --model opt-2.7b --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import time
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
    """Write a random-weight checkpoint for a BLIP-2 config dict, or keep the one already there."""
    out_dir = Path(out_dir).expanduser()
    spec_hash = _spec_hash(config, shard_bytes, seed)
    if _is_complete(out_dir, spec_hash):
        return out_dir
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
    return out_dir


def make_random_checkpoint(kind: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a full-size random BLIP-2 checkpoint ("opt-2.7b" or "flan-t5-xl") unless out_dir has it.

    Same files, key names, shapes and float32 dtype as the released Salesforce checkpoints;
    weights are N(0, 0.02), norm scales one, biases zero. Peak memory stays around one tensor.
    """
    if kind not in CONFIGS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(CONFIGS)})")
    return _write_checkpoint(CONFIGS[kind], out_dir, SHARD_BYTES, seed=seed)


# ---------------------------------------------------------------------------------------------------
# Load benchmark

# Runs in a fresh interpreter so that peak RSS (VmHWM) belongs to one load alone. Imports happen
# before the clock starts; their memory is part of the peak, as it is for any user.
_LOAD_SCRIPT = """
import json, sys, threading, time
import torch
system, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if system == "ours":
    import blip2
    load = lambda: blip2.load(path, dtype=dtype)
else:
    from transformers import Blip2ForConditionalGeneration
    load = lambda: Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
peak_anon, done = [0.0], threading.Event()
def sample_anon():  # VmHWM also counts mmapped checkpoint pages, which the kernel can drop
    while not done.wait(0.005):
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
threading.Thread(target=sample_anon, daemon=True).start()
before = status("VmRSS")
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
done.set()
print(json.dumps({"seconds": seconds, "peak_rss_gb": status("VmHWM"), "final_rss_gb": status("VmRSS"),
                  "start_rss_gb": before, "peak_anon_gb": max(peak_anon[0], status("RssAnon"))}))
"""

SYSTEMS = ("ours", "transformers")


def measure_load(system: str, path: str | Path, dtype: str = "bfloat16") -> dict[str, float]:
    """Load a checkpoint in a fresh process; return seconds, peak_rss_gb, final_rss_gb (GB = 1e9 bytes).

    system is "ours" (blip2.load) or "transformers" (Blip2ForConditionalGeneration.from_pretrained).
    seconds is the load call alone; the RSS figures are the whole process's, imports included.
    peak_rss_gb (VmHWM) counts mmapped checkpoint pages too; peak_anon_gb, sampled every 5 ms,
    is the anonymous memory alone (what the model itself holds).
    """
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")
    env = dict(os.environ)
    # The child must import this checkout's blip2, wherever the caller's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, system, str(path), dtype],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
        raise RuntimeError(f"{system} load exited with {proc.returncode}{killed}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _default_dir() -> Path:
    return Path(os.environ.get("BLIP2_BENCH_DIR", "~/.cache/blip2/bench")).expanduser()


_COLUMNS = {"seconds": "load s", "peak_rss_gb": "peak RSS GB", "peak_anon_gb": "peak anon GB",
            "final_rss_gb": "final RSS GB"}


def _load_table(results: dict[str, list[dict]]) -> str:
    medians = {s: {c: statistics.median(r[c] for r in runs) for c in _COLUMNS} for s, runs in results.items()}
    rows = [["system", *_COLUMNS.values(), "runs"]]
    rows += [[s, *(f"{m[c]:.2f}" for c in _COLUMNS), str(len(results[s]))] for s, m in medians.items()]
    if set(SYSTEMS) <= medians.keys():
        ours, ref = medians["ours"], medians["transformers"]
        rows.append(["ours/transformers", *(f"{ours[c] / ref[c]:.2f}" for c in _COLUMNS), ""])
    return "\n".join(f"{r[0]:<18}" + "".join(f"{v:>14}" for v in r[1:]) for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("make", "write the random checkpoint"), ("load", "benchmark load time and memory")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", choices=sorted(CONFIGS), default="opt-2.7b")
        p.add_argument("--dir", type=Path, default=None,
                       help="cache root; the checkpoint goes in DIR/MODEL (default $BLIP2_BENCH_DIR or "
                            "~/.cache/blip2/bench)")
    load = sub.choices["load"]
    load.add_argument("--repeat", type=lambda v: max(1, int(v)), default=3)
    load.add_argument("--dtype", default="bfloat16")
    load.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, run alternately")
    args = parser.parse_args(argv)
    systems = args.systems.split(",") if args.command == "load" else []
    if not set(systems) <= set(SYSTEMS):
        parser.error(f"--systems takes a comma-separated subset of {', '.join(SYSTEMS)}")

    out_dir = (args.dir.expanduser() if args.dir else _default_dir()) / args.model
    start = time.perf_counter()
    make_random_checkpoint(args.model, out_dir)
    print(f"checkpoint ready in {out_dir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if args.command == "make":
        print(out_dir)
        return 0

    results: dict[str, list[dict]] = {s: [] for s in systems}
    for i in range(args.repeat):
        for system in systems:  # alternate so drift (page cache, other load) hits both alike
            try:
                r = measure_load(system, out_dir, args.dtype)
            except RuntimeError as e:
                print(e, file=sys.stderr)
                return 1
            print(f"[{i + 1}/{args.repeat}] {system}: {json.dumps(r)}", file=sys.stderr)
            results[system].append(r)
    print(f"{args.model} load, dtype {args.dtype}, medians of {args.repeat}")
    print(_load_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
