"""CUDA checks for a lent GPU: our engine against transformers on the GPU, on small random checkpoints.

    python scripts/cuda_check.py [--dir /tmp/cuda-check]

For OPT and Flan-T5: float32 logits (relative error), greedy and 3-beam new token ids against the
reference's `generate`, both on CUDA (three times each: captured, then kept CUDA graphs); the
graphed vision encoder against the eager one; the prompt's pass through its CUDA graph against
the eager pass; normalisation on the GPU against the CPU's; then float16 (OPT) / bfloat16 (T5) and int8 / int4 weight-only
generation running end to end on CUDA (int4 also with every product widened from tinygemm's layout,
against tinygemm's tokens); GPTQ's codes on CUDA against the CPU's; int4 weights of full-size shapes
unpacked from tinygemm's layout (the codes exactly) and their widened product against tinygemm's.
Prints one JSON line per check; exits 1 if a parity check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import blip2  # noqa: E402
import blip2.quantize  # noqa: E402
import blip2.layers as layers  # noqa: E402
from blip2.generation import GenerationConfig  # noqa: E402
from blip2.opt import OPTSession  # noqa: E402
from blip2.t5 import T5Session  # noqa: E402
from checkpoints import opt_inputs, pixels, reference, rel_err, t5_inputs, tiny_config, write_checkpoint  # noqa: E402


@contextlib.contextmanager
def _attention(model, products: bool):
    """Every decoding step's attention as two products (or as the library chooses), on fresh decoding
    graphs: a kept graph records the attention it was captured with."""
    default = layers.SINGLE_QUERY_ROWS
    layers.SINGLE_QUERY_ROWS = 0 if products else default
    model.model.language_model.__dict__.pop("_kept_graphs", None)
    try:
        yield
    finally:
        layers.SINGLE_QUERY_ROWS = default
        model.model.language_model.__dict__.pop("_kept_graphs", None)


def _prompt_state(model, queries, ids, mask, graphed: bool) -> tuple[torch.Tensor, ...]:
    """What a session's prompt pass leaves (8 new tokens' room, as the checks' generate calls)."""
    positions = layers.GRAPHED_PROMPT_POSITIONS if graphed else 0
    with mock.patch.object(layers, "GRAPHED_PROMPT_POSITIONS", positions), torch.inference_mode():
        lm = model.model.language_model
        embeds, full = model.model.embed_inputs(queries, ids, mask)
        if model.config.is_encoder_decoder:
            s = T5Session(lm, embeds, full, 1, 8)
            return s.cross.k, s.cross.v
        s = OPTSession(lm, embeds, full, 1, 8)
        return s.prefill(), s.cache.k, s.cache.v


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cuda-check"))
    args = parser.parse_args()
    ok = True
    for lm in ("opt", "t5"):
        # widths the int4 kernel takes (multiples of 128 in, 16 out)
        text = dict(hidden_size=128, ffn_dim=256, num_attention_heads=4) if lm == "opt" else \
            dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_decoder_layers=2)
        cfg = tiny_config(lm, **text)
        cfg["vision_config"].update(hidden_size=128, intermediate_size=256, num_attention_heads=4)
        path = write_checkpoint(args.dir / lm, cfg, seed=3)
        ids, mask = (opt_inputs if lm == "opt" else t5_inputs)(cfg, [[5, 6, 7, 8], [9, 10]])
        px = pixels(2, 28)
        ref = reference(path).cuda()
        ours = blip2.load(path, device="cuda")
        dec = None if lm == "opt" else torch.tensor([[0, 4, 5], [0, 6, 7]])
        with torch.inference_mode():
            r = ref(pixel_values=px.cuda(), input_ids=ids.cuda(), attention_mask=mask.cuda(),
                    decoder_input_ids=None if dec is None else dec.cuda()).logits
        o = ours.forward(px, ids, mask, dec)
        err = rel_err(o, r)
        results = {"check": f"{lm} float32 logits on cuda", "relative_error": err, "ok": err < 1e-4}
        print(json.dumps(results), flush=True)
        ok &= results["ok"]
        for beams in (1, 3):
            with torch.inference_mode():
                out = ref.generate(pixel_values=px.cuda(), input_ids=ids.cuda(), attention_mask=mask.cuda(),
                                   num_beams=beams, do_sample=False, max_new_tokens=8, min_new_tokens=8)
            new = out[:, ids.shape[1]:] if lm == "opt" else out[:, 1:]
            # Three times: the first captures the decoding graph (and runs the encoder eagerly), the
            # next ones reuse the kept graph (and capture, then replay, the encoder's). Then again
            # with every decoding step's attention as two products (what large batches take).
            for products, how in ((False, ""), (True, ", single-query attention as products")):
                same = []
                with _attention(ours, products):
                    for _ in range(3):
                        with torch.inference_mode():
                            mine = ours.model.generate(ours.encode_images(px), ids.cuda(), mask.cuda(),
                                                       GenerationConfig(num_beams=beams, max_new_tokens=8, min_new_tokens=8))
                        same.append([h[0].token_ids for h in mine] == new.tolist())
                print(json.dumps({"check": f"{lm} {beams}-beam token ids on cuda (fresh, kept graph, kept graph{how})",
                                  "ok": all(same), "each": same}), flush=True)
                ok &= all(same)
        # The graphed vision encoder: 3 images padded to 4, against the eager module on the same 4.
        px3 = pixels(3, 28)
        eager = ours.model.encode_images(torch.cat([px3, px3[:1] * 0]).cuda())[:3]
        graphed = [ours.encode_images(px3) for _ in range(3)][-1]
        same = torch.equal(graphed, eager)
        print(json.dumps({"check": f"{lm} graphed vision encoder equals eager", "ok": same,
                          "relative_error": rel_err(graphed, eager)}), flush=True)
        ok &= same
        # The prompt's pass through its kept CUDA graph (captured by the second generate above) gives
        # the eager pass's bits: OPT's logits and cache, T5's cross-attention keys and values.
        queries = ours.encode_images(px)
        eager = _prompt_state(ours, queries, ids.cuda(), mask.cuda(), graphed=False)
        graphed = [_prompt_state(ours, queries, ids.cuda(), mask.cuda(), graphed=True) for _ in range(3)]
        same = [all(torch.equal(a, b) for a, b in zip(eager, g)) for g in graphed]
        print(json.dumps({"check": f"{lm} prompt pass through CUDA graphs equals eager", "ok": all(same),
                          "each": same}), flush=True)
        ok &= all(same)
        # Images normalised on the GPU give the CPU's bits.
        resized = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
        norm = ours.image_processor
        same = torch.equal(norm.normalize(resized.cuda()).cpu(), norm.normalize(resized))
        print(json.dumps({"check": f"{lm} normalisation on cuda equals cpu", "ok": same}), flush=True)
        ok &= same
        half = "float16" if lm == "opt" else "bfloat16"
        for quantize in (None, "int8", "int4"):
            try:
                m = blip2.load(path, dtype=half, device="cuda", quantize=quantize)
                with torch.inference_mode():
                    res = m.model.generate(m.encode_images(px), ids.cuda(), mask.cuda(), GenerationConfig(max_new_tokens=8))
                    with _attention(m, products=True):
                        products = m.model.generate(m.encode_images(px), ids.cuda(), mask.cuda(), GenerationConfig(max_new_tokens=8))
                tokens = [h[0].token_ids for h in res]
                extra = {}
                if quantize == "int4":  # a fresh model whose int4 products all widen the weight
                    with mock.patch.object(blip2.quantize, "CUDA_INT4_GEMM_ROWS", 1), torch.inference_mode():
                        m = blip2.load(path, dtype=half, device="cuda", quantize=quantize)
                        widened = m.model.generate(m.encode_images(px), ids.cuda(), mask.cuda(),
                                                   GenerationConfig(max_new_tokens=8))
                    extra["same_tokens_with_every_product_widened"] = tokens == [h[0].token_ids for h in widened]
                print(json.dumps({"check": f"{lm} {half} {quantize or 'unquantized'} generate on cuda", "tokens": tokens,
                                  "same_tokens_with_products_attention": tokens == [h[0].token_ids for h in products],
                                  **extra, "ok": True}), flush=True)
            except Exception as e:  # report and go on: these paths had never run on a GPU
                print(json.dumps({"check": f"{lm} {half} {quantize} generate on cuda", "ok": False,
                                  "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
                ok = False
    # GPTQ on the GPU (blip2 quantize --calibrate --device cuda): the CPU's codes, but for rounding ties.
    from blip2.gptq import gptq_weight
    from blip2.quantize import Quantization

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) / 512 ** 0.5
    x = torch.randn(2048, 512, generator=g) @ (torch.randn(512, 512, generator=g) / 512 ** 0.5)
    for mode in ("int8", "int4"):
        cpu = gptq_weight(w, x.T @ x, Quantization(mode))
        gpu = gptq_weight(w.cuda(), (x.T @ x).cuda(), Quantization(mode))
        agree = float((cpu["weight"] == gpu["weight"].cpu()).float().mean())
        print(json.dumps({"check": f"GPTQ {mode} on cuda equals cpu", "agreement": agree, "ok": agree > 0.99}),
              flush=True)
        ok &= agree > 0.99
    # int4 products of many rows widen the weight from tinygemm's layout: the tile order read off
    # torch's packing op, the codes unpacked exactly, the product as the kernel's (full-size shapes:
    # OPT-2.7b's fc1 and fc2, the vision encoder's qkv and fc2, Flan-T5-xl's wi).
    from blip2.quantize import QuantizedLinear, _nibbles, _pack_int4, _unpack_tiles, cuda_int4_band, quantize_weight

    for n, k in ((10240, 2560), (2560, 10240), (4224, 1408), (1408, 6144), (5120, 2048)):
        w = torch.randn(n, k, generator=g) * 0.02
        portable = quantize_weight(w, Quantization("int4"))["weight"]
        codes = _nibbles(portable).view(n, k)
        band = cuda_int4_band(k, "cuda:0")
        exact = band is not None and torch.equal(_unpack_tiles(_pack_int4(portable.cuda()), band, n, k).cpu(), codes)
        layer = QuantizedLinear(k, n, False, Quantization("int4"), torch.bfloat16)
        layer.load_parameter("weight", w.cuda())
        x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            kernel = torch.ops.aten._weight_int4pack_mm(x, layer.weight, 128, layer.scales_and_zeros).float()
            error = rel_err(layer(x).float(), kernel)
        good = exact and error < 1e-2
        print(json.dumps({"check": f"int4 {n}x{k} widened from the kernel's layout", "codes_exact": exact,
                          "relative_error_vs_kernel": error, "ok": good}), flush=True)
        ok &= good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
