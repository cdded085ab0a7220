"""A/B measurements on a GPU, in one process, for choices the profile (scripts/gpu_profile.py) raised:

- preparing a large batch of images: threads (4, 8, 16) or 16 processes, alone and interleaved with
  encoding (the main thread must win the GIL to feed the GPU);
- the decoding step at batch 1 and 256: scaled-dot-product attention through cuDNN (torch's default
  on Hopper) or not, with the boolean mask or a float one built once per step; attention for a
  single query as two batched products; q/k/v as one product; and the kernels of a step at batch 256.

    python scripts/gpu_ab.py --model ~/.cache/blip2/bench/opt-2.7b [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blip2  # noqa: E402
import blip2.processing as processing  # noqa: E402
from blip2.bench import PROMPT, write_images  # noqa: E402
from blip2.generation import GenerationConfig  # noqa: E402
from blip2.opt import OPTAttention, OPTSession  # noqa: E402
from blip2.processing import ImageProcessor, load_image  # noqa: E402
from gpu_profile import kernel_profile, timer  # noqa: E402  (scripts/ is on the path: this file's folder)


def _resized(path: str):  # runs in the worker processes
    return ImageProcessor().resized(load_image(path)).numpy()


def _float_mask_step(self, tokens):
    """OPTSession._step with one additive float mask per step instead of the boolean one per layer."""
    self.valid.index_fill_(1, self.slot, True)
    bias = torch.zeros(self.valid.shape, dtype=self.cache.k.dtype, device=self.valid.device)
    bias = bias.masked_fill_(~self.valid, float("-inf"))[:, None, None, :]
    hidden = self.lm(self.lm.embed(tokens)[:, None], self.next_pos[:, None], bias, self.cache, self.slot)
    self.next_pos += 1
    self.slot += 1
    return self.lm.lm_head(hidden[:, -1]).float()


def _attention(fused: bool, products: bool):
    """OPTAttention.forward with q/k/v as one product (fused) and/or, for a single query, attention
    as two batched products around a float32 softmax (products)."""

    def forward(self, x, mask, cache, layer, cache_pos):
        b, n, d = x.shape
        heads = lambda t: t.view(b, n, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        if fused:
            q, k, v = F.linear(x, *self._qkv).split(d, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = heads(q * self.scaling), heads(k), heads(v)
        if cache is not None:
            k, v = cache.update(layer, cache_pos, k, v)
        if products and n == 1:
            scores = torch.matmul(q, k.transpose(-1, -2)).float().masked_fill(~mask, float("-inf"))
            out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    return forward


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=Path, default=Path("/tmp/blip2-profile-images"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    seconds = timer(cuda, 3)

    out: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    m = blip2.load(args.model, dtype=args.dtype, device=args.device)
    files = write_images(args.images, args.batch)

    # Image preparation, alone and interleaved with encoding.
    def encode_stream(rows):
        m._queries.clear()
        return m.image_queries(rows)

    for threads in (16, 8, 4):
        pool = concurrent.futures.ThreadPoolExecutor(threads)
        processing._pool = lambda pool=pool: pool
        out[f"prep_threads{threads}_s"] = seconds(lambda: list(m.image_processor.stream(files)))
        out[f"prep_encode_threads{threads}_s"] = seconds(lambda: encode_stream(m.image_processor.stream(files)))
        print(json.dumps(out), flush=True)
    for start in ("spawn", "fork"):  # fork: from this process, model loaded and CUDA running
        began = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(16, mp_context=multiprocessing.get_context(start)) as procs:
            list(procs.map(abs, range(64)))
            out[f"pool_{start}16_start_s"] = time.perf_counter() - began
            for chunksize in (1, 4):
                rows = lambda: (torch.from_numpy(a) for a in procs.map(_resized, files, chunksize=chunksize))  # noqa: E731
                out[f"prep_{start}16_c{chunksize}_s"] = seconds(lambda: list(rows()))
                out[f"prep_encode_{start}16_c{chunksize}_s"] = seconds(lambda: encode_stream(rows()))
        print(json.dumps(out), flush=True)
    px = m.pixel_values(files).to(args.device)
    out["encode_only_s"] = seconds(lambda: m.encode_images(px))
    print(json.dumps(out), flush=True)

    # The decoding step: torch's attention kernels (with and without cuDNN, boolean or float mask),
    # attention as two batched products for a single query, and q/k/v fused into one product.
    gen = GenerationConfig(max_new_tokens=20, min_new_tokens=20)
    plain_step, plain_attention = OPTSession._step, OPTAttention.forward
    for layer in m.model.language_model.model.decoder.layers:
        a = layer.self_attn
        a._qkv = (torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                  torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if a.q_proj.bias is not None else None)
    variants = {  # name: (cuDNN, step, attention forward)
        "cudnn_boolmask": (True, plain_step, plain_attention),
        "cudnn_floatmask": (True, _float_mask_step, plain_attention),
        "nocudnn_boolmask": (False, plain_step, plain_attention),
        "nocudnn_floatmask": (False, _float_mask_step, plain_attention),
        "matmul_attention": (True, plain_step, _attention(fused=False, products=True)),
        "fused_qkv": (True, plain_step, _attention(fused=True, products=False)),
        "fused_qkv_matmul_attention": (True, plain_step, _attention(fused=True, products=True)),
    }
    for batch in (1, args.batch):
        queries = m.encode_images(px[:batch])
        tokens = m.tokenizer([PROMPT] * batch, max_length=m.max_prompt_tokens(gen))
        ids, mask = tokens.input_ids.to(args.device), tokens.attention_mask.to(args.device)
        for variant, (cudnn, step, attention) in variants.items():
            if cuda:
                torch.backends.cuda.enable_cudnn_sdp(cudnn)
            OPTSession._step, OPTAttention.forward = step, attention
            m.model.language_model.__dict__.pop("_kept_graphs", None)
            with torch.inference_mode():
                embeds, full = m.model.embed_inputs(queries, ids, mask)
                s = OPTSession(m.model.language_model, embeds, full, 1, 60)
                tok = s.prefill().argmax(-1)
                logits = s.step(tok).double()
                if variant == "cudnn_boolmask":
                    baseline = logits
                out[f"b{batch}_step_logits_rel_err_{variant}"] = float((logits - baseline).norm() / baseline.norm())
                out[f"b{batch}_step_ms_{variant}"] = 1e3 * seconds(lambda: s.step(tok), repeat=20)
                # Same tokens from every variant: the first 8 greedy ids of one image.
                out[f"b{batch}_ids_{variant}"] = m.model.generate(queries[:1], ids[:1], mask[:1], gen)[0][0].token_ids[:8]
            print(json.dumps({k: v for k, v in out.items() if k.startswith(f"b{batch}_step")}), flush=True)
        OPTSession._step, OPTAttention.forward = plain_step, plain_attention
        if cuda:
            torch.backends.cuda.enable_cudnn_sdp(True)
    # The kernels of an eager step at the large batch.
    with torch.inference_mode():
        if cuda:
            s = OPTSession(m.model.language_model, embeds, full, 1, 60)
            tok = s.prefill().argmax(-1)
            out[f"b{args.batch}_kernels"] = kernel_profile(lambda: s._step(tok), steps=3)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
