"""In-process A/B on the CPU: blip2's defaults on an AMX machine (oneDNN's packed bfloat16 products,
torch's flash attention in the image encoder) against everything on blip2's pair tiles (the language
model's products, quant/csrc/products_avx512.cpp; the image encoder's attention,
models/csrc/attention_avx512.cpp), the same checkpoint loaded twice in one process, measured
alternately so both see the same minutes of a shared machine.

    python scripts/kernels_ab.py --model ~/.cache/blip2/bench/opt-2.7b [--rounds 4]

blip2.load uses the pair tiles only on CPUs with AVX512-BF16 and VNNI and without AMX; this script
forces them on any CPU with AVX512-BF16 (AMX machines included), which is how to decide whether AMX
machines should take them too. Needs memory for two bfloat16 models (16 GB for opt-2.7b).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import blip2
import blip2.engine.pipeline as pipeline
import blip2.models.layers as layers
import blip2.models.vision as vision
from blip2.apps.bench.checkpoints import write_images
from blip2.apps.bench.machine import seconds
from blip2.native import cpu_flags
from blip2.quant import cpu_kernels


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if not {"avx512_bf16", "avx512_vnni"} <= cpu_flags():
        print("this CPU has no AVX512-BF16 and VNNI: the pair layout's products cannot run here")
        return 1
    cpu_kernels.pair_units = layers.pair_units = lambda: True  # also where AMX is present
    cpu_kernels.pairs_library.cache_clear()
    layers._image_attention_library.cache_clear()
    own_attention = vision.cpu_image_attention
    models = {}
    for kernel in ("onednn", "bf16"):
        pipeline.kernel_for = lambda dtype, kernel=kernel: kernel
        models[kernel] = blip2.load(args.model, dtype="bfloat16")
    image, *batch = write_images(Path("/tmp/blip2-kernels-ab"), 9)
    prompt = "Question: how many dogs are in the picture? Answer:"

    def use(m) -> None:  # the image attention of this model's side
        vision.cpu_image_attention = own_attention if m is models["bf16"] else lambda *a: None

    def answer(m, n: int) -> float:
        use(m)
        m.close()  # forget the image's queries: encoded again, as a new one would be
        return seconds(lambda: m.generate(image, prompt, max_new_tokens=n, min_new_tokens=n))

    results: dict[str, dict[str, list[float]]] = {k: {"image": [], "token": [], "batch8": []} for k in models}
    for m in models.values():
        answer(m, 2)
    for _ in range(args.rounds):
        for kernel, m in models.items():
            whole, first = answer(m, 20), answer(m, 1)
            use(m)
            m.close()
            eight = seconds(lambda: m.generate(batch, prompt, max_new_tokens=20, min_new_tokens=20))
            r = results[kernel]
            r["image"].append(whole)
            r["token"].append((whole - first) / 19)
            r["batch8"].append(8 / eight)
            print(f"{kernel:7s} one image {whole:.2f} s, a token {r['token'][-1] * 1e3:.0f} ms, "
                  f"batch 8 {r['batch8'][-1]:.3f} images/s", flush=True)
    for kernel, r in results.items():
        print(f"{kernel:7s} medians: one image {statistics.median(r['image']):.2f} s, a token "
              f"{statistics.median(r['token']) * 1e3:.0f} ms, batch 8 {statistics.median(r['batch8']):.3f} images/s")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
