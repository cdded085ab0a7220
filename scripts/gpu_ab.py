"""A/B measurements on a GPU, in one process, for choices the profile (scripts/gpu_profile.py) raised:

- preparing a large batch of images and encoding it (the library's path, `Blip2.image_queries` of
  `ImageProcessor.stream`): on threads or on forked worker processes (the main thread must win the
  GIL to feed the GPU); and encoding the prepared batch at once or in chunks of GPU_ENCODE_BATCH;
- the decoding step at batch 1 to 256: attention through torch's fused kernel (SDPA) or, for a
  single query, as two batched products (`layers.single_query_attention`, float32 scores; and the
  same with half-precision scores), with each one's logits error; the kernels of a batch-256 step.

    python scripts/gpu_ab.py --model ~/.cache/blip2/bench/opt-2.7b [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blip2  # noqa: E402
import blip2.layers as layers  # noqa: E402
from blip2.api import GPU_ENCODE_BATCH  # noqa: E402
from blip2.bench import PROMPT, write_images  # noqa: E402
from blip2.generation import GenerationConfig  # noqa: E402
from blip2.opt import OPTSession  # noqa: E402
from gpu_profile import kernel_profile, timer  # noqa: E402  (scripts/ is on the path: this file's folder)


def _half_scores(q, k, v, mask):
    """single_query_attention with the scores rounded to q's dtype (a plain half-precision product)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batches", default="1,8,16,32,64,128,256")
    parser.add_argument("--images", type=Path, default=Path("/tmp/blip2-profile-images"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cuda = args.device == "cuda"
    seconds = timer(cuda, 3)

    out: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    m = blip2.load(args.model, dtype=args.dtype, device=args.device)
    files = write_images(args.images, max(batches))

    # Images: prepared on threads or processes and encoded as they come; encoding alone, at once or in chunks.
    def prepare_and_encode(processes):
        m._queries.clear()
        return m.image_queries(m.image_processor.stream(files, processes=processes))

    for processes in (False, True):
        name = "processes" if processes else "threads"
        out[f"prep_{name}_s"] = seconds(lambda: list(m.image_processor.stream(files, processes=processes)))
        out[f"prep_encode_{name}_s"] = seconds(lambda: prepare_and_encode(processes))
    px = m.pixel_values(files).to(args.device)
    out["encode_at_once_s"] = seconds(lambda: m.encode_images(px))
    out["encode_in_chunks_s"] = seconds(lambda: [m.encode_images(c) for c in px.split(GPU_ENCODE_BATCH)])
    print(json.dumps(out), flush=True)

    # The decoding step: attention through SDPA or as two products (float32 or half-precision scores).
    gen = GenerationConfig(max_new_tokens=20, min_new_tokens=20)
    default_rows, products = layers.SINGLE_QUERY_ROWS, layers.single_query_attention
    variants = {"sdpa": (10**9, products), "products": (0, products), "products_half_scores": (0, _half_scores)}
    for batch in batches:
        queries = m.encode_images(px[:batch])
        tokens = m.tokenizer([PROMPT] * batch, max_length=m.max_prompt_tokens(gen))
        ids, mask = tokens.input_ids.to(args.device), tokens.attention_mask.to(args.device)
        for variant, (rows, fn) in variants.items():
            layers.SINGLE_QUERY_ROWS, layers.single_query_attention = rows, fn
            m.model.language_model.__dict__.pop("_kept_graphs", None)
            with torch.inference_mode():
                embeds, full = m.model.embed_inputs(queries, ids, mask)
                s = OPTSession(m.model.language_model, embeds, full, 1, 60)
                tok = s.prefill().argmax(-1)
                logits = s.step(tok).double()
                if variant == "sdpa":
                    baseline = logits
                out[f"b{batch}_step_logits_rel_err_{variant}"] = float((logits - baseline).norm() / baseline.norm())
                out[f"b{batch}_step_ms_{variant}"] = 1e3 * seconds(lambda: s.step(tok), repeat=20)
        print(json.dumps({k: v for k, v in out.items() if k.startswith(f"b{batch}_step")}), flush=True)
    layers.SINGLE_QUERY_ROWS, layers.single_query_attention = default_rows, products
    # The kernels of an eager step at the largest batch, as the library runs it.
    with torch.inference_mode():
        if cuda:
            s = OPTSession(m.model.language_model, embeds, full, 1, 60)
            tok = s.prefill().argmax(-1)
            out[f"b{batch}_kernels"] = kernel_profile(lambda: s._step(tok), steps=3)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
