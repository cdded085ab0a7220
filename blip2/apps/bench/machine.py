"""The machine's ceilings (memory bandwidth, matmul rate) and the floor they imply for each metric."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import struct
import time
from pathlib import Path
from typing import Callable

import torch


def measure_ceilings(dtype: str = "bfloat16", quick: bool = False, device: str = "cpu") -> dict[str, float]:
    """Memory read bandwidth (GB/s: summing a 2 GB float32 tensor) and matmul rate (GFLOP/s, 4096^3)
    in `dtype` and in float32, each the best of several tries, with torch's threads (all cores).

    matmul_gflops, the compute ceiling, is the faster of the two: on CPUs without AMX, oneDNN's
    bfloat16 kernels can be slower than float32 ones, and an engine may compute in either.
    """
    n = 1024 if quick else 4096
    out = {"bandwidth_gbs": memory_read_gbs(device, quick)}
    for name in dict.fromkeys([dtype, "float32"]):
        a, b = (torch.randn(n, n, device=device).to(getattr(torch, name)) for _ in range(2))
        # a @ b and a @ b.T (what nn.Linear computes) take different kernels: the faster one counts.
        seconds = min(_best(lambda: a @ b, 3, device), _best(lambda: torch.nn.functional.linear(a, b), 3, device))
        out[f"matmul_gflops_{name}"] = 2 * n**3 / seconds / 1e9
    out["matmul_gflops"] = max(out[f"matmul_gflops_{name}"] for name in (dtype, "float32"))
    return out


def memory_read_gbs(device: str = "cpu", quick: bool = False, tries: int = 5) -> float:
    """Memory read bandwidth in GB/s: summing a 2 GB float32 tensor (256 MB when quick), the best of
    `tries` after one untimed pass."""
    x = torch.ones((256 if quick else 2000) * 10**6 // 4, device=device)
    return x.nbytes / _best(x.sum, tries, device) / 1e9


def _best(fn: Callable[[], object], tries: int, device: str) -> float:
    """The fastest of `tries` timed calls of fn (after one untimed), waiting for the GPU on CUDA."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn = (lambda f=fn: (f(), sync()))
    fn()
    return min(seconds(fn) for _ in range(tries))


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of fn."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds() -> tuple[float, float]:
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


