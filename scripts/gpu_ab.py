"""A/B measurements on a GPU, in one process, for choices the profile (scripts/gpu_profile.py) raised.
Sections (--only):

- `images`: preparing a large batch of images and encoding it (the library's path,
  `Blip2.image_queries` of its `ImageStream`, `Blip2.images`) on threads or on forked worker
  processes (the main thread must win the GIL to feed the GPU); encoding the prepared batch at once
  or in chunks;
- `stall`: when, preparing 256 images on processes and encoding them as they come, each chunk
  arrives and is handed to the GPU, with a cProfile of the main thread;
- `attention`: the decoding step at batch 1 to 256, attention through torch's fused kernel (SDPA)
  or, for a single query, as two batched products (`models.layers.single_query_attention`, float32
  scores; and with half-precision scores), with each one's logits error; the kernels of a batch-256
  step;
- `encoder`: the vision encoder's layers, eager or through torch.compile (fused layer norms,
  activation and residual adds around the vendor GEMMs), its compile time and outputs' difference,
  and the kernels of a chunk either way;
- `int8`: weight-only products of OPT-2.7b's shapes at 1-2048 rows: int8 as the library computes it
  (weight widened, scales on the float32 output), with the scales on a float16 output, that through
  torch.compile (default and, at few rows, max-autotune), against float16's product and int4's
  (tinygemm); and what unpacking an int4 weight from tinygemm's layout costs (for many rows);
- `int4`: int4 products of OPT-2.7b's and the vision encoder's shapes at 1-2048 rows: tinygemm
  against the weight widened to bfloat16 from tinygemm's layout for the GEMM (what the library does
  from `quant.linear.CUDA_INT4_GEMM_ROWS` rows on), that widening alone, and float16's product;
- `overlap`: encoding images on a second CUDA stream while a batch decodes on the first: whether
  the compute-bound encoder and the memory-bound decoding step overlap.

    python scripts/gpu_ab.py --model ~/.cache/blip2/bench/opt-2.7b [--only images,stall,...] [--json out.json]
    python scripts/gpu_ab.py --only int8,int4   # no model needed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import blip2
import blip2.models.layers as layers
from blip2.apps.bench import PROMPT, write_images
from blip2.engine.generation import GenerationConfig
from blip2.engine.pipeline import GPU_ENCODE_BATCH
from blip2.engine.sessions import OPTSession
from gpu_profile import kernel_profile, timer  # scripts/ is on the path: this file's folder


def _half_scores(q, k, v, mask):
    """single_query_attention with the scores rounded to q's dtype (a plain half-precision product)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def _vit_layer(x, ln1w, ln1b, qkvw, qkvb, pw, pb, ln2w, ln2b, f1w, f1b, f2w, f2b, heads: int, eps: float):
    """models.vision.VisionLayer.forward (GELU activation) as a function of its weights, so that one
    compiled graph serves every layer."""
    b, n, d = x.shape
    q, k, v = F.linear(F.layer_norm(x, (d,), ln1w, ln1b, eps), qkvw, qkvb).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    x = x + F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d), pw, pb)
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,), ln2w, ln2b, eps), f1w, f1b)), f2w, f2b)


def _layer_weights(layer) -> tuple:
    a, mlp = layer.self_attn, layer.mlp
    ps = (layer.layer_norm1.weight, layer.layer_norm1.bias, a.qkv.weight, a.qkv.bias, a.projection.weight,
          a.projection.bias, layer.layer_norm2.weight, layer.layer_norm2.bias, mlp.fc1.weight, mlp.fc1.bias,
          mlp.fc2.weight, mlp.fc2.bias)
    return tuple(p.detach() for p in ps)


def encoder_ab(m, px, seconds, cuda: bool) -> dict[str, object]:
    """The vision encoder's layers on one chunk: eager (as the library runs them) or compiled."""
    out: dict[str, object] = {}
    vm = m.model.vision_model
    cfg = m.config.vision
    weights = [_layer_weights(layer) for layer in vm.encoder.layers]
    with torch.inference_mode():
        x0 = vm.embeddings(px)

        def run(block):
            x = x0
            for w in weights:
                x = block(x, *w, cfg.num_attention_heads, cfg.layer_norm_eps)
            return x

        def library():
            x = x0
            for layer in vm.encoder.layers:
                x = layer(x)
            return x

        ref = library().double()
        out["eager_layers_s"] = seconds(library)
        out["functional_rel_err"] = float((run(_vit_layer).double() - ref).norm() / ref.norm())
        if cuda:
            out["eager_kernels"] = kernel_profile(library, steps=2)
        compiled = torch.compile(_vit_layer, dynamic=False)
        t0 = time.perf_counter()
        y = run(compiled)
        if cuda:
            torch.cuda.synchronize()
        out["compile_s"] = time.perf_counter() - t0
        out["compiled_rel_err"] = float((y.double() - ref).norm() / ref.norm())
        out["compiled_layers_s"] = seconds(lambda: run(compiled))
        if cuda:
            out["compiled_kernels"] = kernel_profile(lambda: run(compiled), steps=2)
    return out


def _graphed_ms(fn, calls: int = 20) -> float:
    """Milliseconds per call of fn, `calls` of them captured in one CUDA graph and replayed (no launch cost)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[2] / calls


def _int8_out_scaled(x, w, s):
    return F.linear(x, w.to(x.dtype)) * s


def int8_ab(dtype: torch.dtype, device: str = "cuda") -> dict[str, object]:
    """Weight-only products of OPT-2.7b's shapes on CUDA, ms per product (graphed), per row count."""
    from blip2.quant.formats import Quantization
    from blip2.quant.linear import QuantizedLinear

    out: dict[str, object] = {}
    torch._dynamo.config.recompile_limit = 64  # one compilation per shape
    compiled = torch.compile(_int8_out_scaled, dynamic=False)
    # max-autotune may pick a Triton template that widens the int8 weight as it loads it (a fused
    # prologue); autotuning takes seconds per shape, so only for decoding's few rows.
    autotuned = torch.compile(_int8_out_scaled, dynamic=False, mode="max-autotune-no-cudagraphs")
    torch.manual_seed(0)
    for name, (n, k) in {"fc1": (10240, 2560), "fc2": (2560, 10240), "q": (2560, 2560)}.items():
        w = torch.randn(n, k, device=device) / k ** 0.5
        layers_ = {}
        for mode in ("int8", "int4"):
            ql = QuantizedLinear(k, n, False, Quantization(mode), dtype)
            ql.load_parameter("weight", w)
            layers_[mode] = ql
        q8, q4 = layers_["int8"], layers_["int4"]
        wh = w.to(dtype)
        if device == "cuda":
            # int4 for many rows: the whole weight back from tinygemm's layout, as the product of an
            # identity (what torchao does to unpack it), then cuBLAS; that unpacking's cost, once.
            eye = torch.eye(k, device=device, dtype=torch.bfloat16)
            unpack = lambda: torch.ops.aten._weight_int4pack_mm(  # noqa: E731
                eye, q4.weight, q4.q.group_size, q4.scales_and_zeros)
            try:
                with torch.inference_mode():
                    out[f"{name}_int4_unpack_ms"] = _graphed_ms(unpack, calls=5)
            except Exception as e:  # report and go on
                out[f"{name}_int4_unpack_ms"] = f"{type(e).__name__}: {str(e)[:300]}"
        for rows in (1, 16, 64, 256, 2048):
            x = torch.randn(rows, k, device=device, dtype=dtype)
            ref = F.linear(x.double(), q8.weight.double() * q8.scales.double()[:, None])
            variants = {
                "float": lambda: F.linear(x, wh),
                "int8_library": lambda: q8(x),
                "int8_out_scaled": lambda: _int8_out_scaled(x, q8.weight, q8.scales),
                **({"int8_autotuned": lambda: autotuned(x, q8.weight, q8.scales)} if rows <= 16 else {}),
                **({"int8_compiled": lambda: compiled(x, q8.weight, q8.scales)} if rows <= 256 else {}),
                "int4_library": lambda: q4(x),
            }
            row: dict[str, object] = {}
            with torch.inference_mode():
                for v, fn in variants.items():
                    try:
                        t0 = time.perf_counter()
                        y = fn()
                        if device == "cuda":
                            torch.cuda.synchronize()
                        first = time.perf_counter() - t0
                        row[f"{v}_ms"] = _graphed_ms(fn) if device == "cuda" else None
                        if v.startswith("int8"):
                            row[f"{v}_rel_err"] = float((y.double() - ref).norm() / ref.norm())
                        if first > 1:
                            row[f"{v}_first_call_s"] = first
                    except Exception as e:  # report and go on: the others still tell
                        row[v] = f"{type(e).__name__}: {str(e)[:300]}"
            out[f"{name}_rows{rows}"] = row
            print(json.dumps({f"{name}_rows{rows}": row}), flush=True)
    return out


def int4_ab(device: str = "cuda") -> dict[str, object]:
    """int4 products on CUDA, ms per product (graphed), per row count: tinygemm, widened, float16."""
    from blip2.quant.formats import Quantization
    from blip2.quant.layouts import _dequantize_cuda_int4
    from blip2.quant.linear import QuantizedLinear

    if device != "cuda":
        return {"skipped": "tinygemm and its widening are CUDA only"}
    out: dict[str, object] = {}
    torch.manual_seed(0)
    shapes = {"fc1": (10240, 2560), "fc2": (2560, 10240), "q": (2560, 2560), "vision_fc2": (1408, 6144)}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device) / k ** 0.5
        q4 = QuantizedLinear(k, n, False, Quantization("int4"), torch.bfloat16)
        q4.load_parameter("weight", w)
        wh = w.half()
        widen = lambda: _dequantize_cuda_int4(q4.weight, q4.scales_and_zeros, 128, n, k, q4.cuda_band)  # noqa: E731
        with torch.inference_mode():
            out[f"{name}_widen_ms"] = _graphed_ms(widen, calls=5)
        for rows in (1, 16, 32, 64, 128, 256, 2048):
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            xh = x.half()
            variants = {"float16": lambda: F.linear(xh, wh),
                        "int4_kernel": lambda: torch.ops.aten._weight_int4pack_mm(x, q4.weight, 128, q4.scales_and_zeros),
                        "int4_widened": lambda: F.linear(x, widen())}
            row: dict[str, object] = {}
            with torch.inference_mode():
                for v, fn in variants.items():
                    row[f"{v}_ms"] = _graphed_ms(fn)
                kernel = variants["int4_kernel"]().double()
                row["widened_rel_err_vs_kernel"] = float((variants["int4_widened"]().double() - kernel).norm()
                                                         / kernel.norm())
            out[f"{name}_rows{rows}"] = row
            print(json.dumps({f"{name}_rows{rows}": row}), flush=True)
    return out


def overlap_ab(m, px, seconds, batch: int = 256, steps: int = 20) -> dict[str, object]:
    """Encoding 4 chunks of images on a side stream while `steps` decoding steps of a `batch` batch
    replay on the main one, against each alone."""
    out: dict[str, object] = {}
    gen = GenerationConfig(max_new_tokens=20, min_new_tokens=20)
    with torch.inference_mode():
        queries = m.encode_images(px[:batch])
        tokens = m.tokenizer([PROMPT] * batch, max_length=m.max_prompt_tokens(gen))
        ids, mask = tokens.input_ids.to(m.device), tokens.attention_mask.to(m.device)
        embeds, full = m.model.embed_inputs(queries, ids, mask)
        s = OPTSession(m.model.language_model, embeds, full, 1, steps + 4, m.graphs)
        tok = s.prefill().argmax(-1)
        start_slot, start_pos = int(s.slot), s.next_pos.clone()

        def decode():
            s.slot.fill_(start_slot)  # back to the first new position: each run decodes the same steps
            s.next_pos.copy_(start_pos)
            s.valid[:, start_slot:] = False
            for _ in range(steps):
                s.step(tok)

        chunks = px[:4 * GPU_ENCODE_BATCH].split(GPU_ENCODE_BATCH)
        encode = lambda: [m.encode_images(c) for c in chunks]  # noqa: E731
        out["decode_s"] = seconds(decode)
        out["encode_s"] = seconds(encode)
        out["sequential_s"] = out["decode_s"] + out["encode_s"]
        for name, prio in (("side_stream", 0), ("side_stream_decode_high_priority", -1)) if px.is_cuda else ():
            side = torch.cuda.Stream()
            main = torch.cuda.Stream(priority=prio) if prio else torch.cuda.current_stream()

            def both():
                here = torch.cuda.current_stream()
                side.wait_stream(here)
                main.wait_stream(here)
                with torch.cuda.stream(side):
                    encode()
                with torch.cuda.stream(main):
                    decode()
                here.wait_stream(side)
                here.wait_stream(main)

            out[f"both_{name}_s"] = seconds(both)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, help="a checkpoint directory (every section but int8 and int4)")
    parser.add_argument("--batches", default="1,8,16,32,64,128,256")
    parser.add_argument("--images", type=Path, default=Path("/tmp/blip2-profile-images"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--only", default="images,attention,encoder,int8,int4,overlap,stall")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    only = set(args.only.split(","))
    if args.model is None and only - {"int8", "int4"}:
        parser.error(f"--model is needed for {', '.join(sorted(only - {'int8', 'int4'}))}")
    cuda = args.device == "cuda"
    seconds = timer(cuda, 3)

    out: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}

    def save() -> None:
        print(json.dumps(out, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")

    if "int8" in only:  # no model needed: first, so that a later failure keeps it
        out["int8"] = int8_ab(getattr(torch, args.dtype), args.device)
        save()
    if "int4" in only:  # no model needed either
        out["int4"] = int4_ab(args.device)
        save()
    if not only - {"int8", "int4"}:
        return 0
    m = blip2.load(args.model, dtype=args.dtype, device=args.device)
    files = write_images(args.images, max(batches))
    px = m.pixel_values(files).to(args.device)
    if "encoder" in only:
        out["encoder"] = encoder_ab(m, px[:GPU_ENCODE_BATCH], seconds, cuda)
        save()
    if "overlap" in only:
        out["overlap"] = overlap_ab(m, px, seconds, batch=max(batches))
        save()

    if cuda and "stall" in only:
        out["stall"] = stall_ab(m, files, seconds)
        save()
    if "images" in only:
        images_ab(m, files, px, seconds, out)
        save()
    if "attention" in only:
        attention_ab(m, px, batches, seconds, cuda, args.device, out)
    save()
    return 0


def images_ab(m, files, px, seconds, out) -> None:
    # Images: prepared on threads or processes and encoded as they come; encoding alone, at once or in chunks.
    def prepare_and_encode(processes):
        m._queries.clear()
        return m.image_queries(m.images(files, processes=processes))

    for processes in (False, True):
        name = "processes" if processes else "threads"
        out[f"prep_{name}_s"] = seconds(lambda: list(m.images(files, processes=processes)))
        out[f"prep_encode_{name}_s"] = seconds(lambda: prepare_and_encode(processes))
    out["encode_at_once_s"] = seconds(lambda: m.encode_images(px))
    out["encode_in_chunks_s"] = seconds(lambda: [m.encode_images(c) for c in px.split(GPU_ENCODE_BATCH)])


def stall_ab(m, files, seconds) -> dict[str, object]:
    """Why preparing 256 images on processes and encoding them as they come takes longer than the
    slower of the two: when each chunk of images arrives and is handed to the GPU (host time spent in
    the call), a cProfile of the main thread, and two variants (no pinned memory, chunks of 64)."""
    import cProfile
    import io
    import pstats

    import blip2.engine.pipeline as pipeline

    out: dict[str, object] = {}
    arrivals: list[float] = []
    calls: list[tuple[float, float]] = []
    start = [0.0]
    encode = m.encode_images

    def timed_encode(pixels):
        t0 = time.perf_counter()
        result = encode(pixels)
        calls.append((round(t0 - start[0], 4), round(time.perf_counter() - t0, 4)))
        return result

    def stream():
        for i, row in enumerate(m.images(files, processes=True)):
            if i % 32 == 31:
                arrivals.append(round(time.perf_counter() - start[0], 4))
            yield row

    def prepare_and_encode():
        m._queries.clear()
        start[0] = time.perf_counter()
        return m.image_queries(stream())

    prepare_and_encode(), prepare_and_encode()
    out["prep_encode_s"] = seconds(prepare_and_encode)
    m.encode_images = timed_encode
    arrivals.clear()
    prepare_and_encode()
    torch.cuda.synchronize()
    out["done_s"] = time.perf_counter() - start[0]
    out["chunk_arrivals_s"], out["encode_calls_start_and_host_s"] = arrivals, calls
    del m.encode_images
    profile = cProfile.Profile()
    profile.enable()
    prepare_and_encode()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(20)
    out["cprofile_tottime"] = text.getvalue()[-5000:]
    pin = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self: self
    try:
        out["no_pinned_memory_s"] = seconds(prepare_and_encode)
    finally:
        torch.Tensor.pin_memory = pin
    # The chunk size is no parameter of the library: the pipeline module's constant is patched for
    # this experiment, then put back.
    chunk = pipeline.GPU_ENCODE_BATCH
    pipeline.GPU_ENCODE_BATCH = 64
    try:
        prepare_and_encode(), prepare_and_encode()
        out["chunks_of_64_s"] = seconds(prepare_and_encode)
    finally:
        pipeline.GPU_ENCODE_BATCH = chunk
    return out


def attention_ab(m, px, batches, seconds, cuda, device, out) -> None:
    # The decoding step: attention through SDPA or as two products (float32 or half-precision scores).
    gen = GenerationConfig(max_new_tokens=20, min_new_tokens=20)
    # Which attention runs is no parameter of the library: models.layers' threshold and product are
    # patched for this experiment, then put back.
    default_rows, products = layers.SINGLE_QUERY_ROWS, layers.single_query_attention
    variants = {"sdpa": (10**9, products), "products": (0, products), "products_half_scores": (0, _half_scores)}
    for batch in batches:
        queries = m.encode_images(px[:batch])
        tokens = m.tokenizer([PROMPT] * batch, max_length=m.max_prompt_tokens(gen))
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        for variant, (rows, fn) in variants.items():
            layers.SINGLE_QUERY_ROWS, layers.single_query_attention = rows, fn
            m.graphs.steps.clear()  # the decoding step captured again, with this variant
            with torch.inference_mode():
                embeds, full = m.model.embed_inputs(queries, ids, mask)
                s = OPTSession(m.model.language_model, embeds, full, 1, 60, m.graphs)
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
            s = OPTSession(m.model.language_model, embeds, full, 1, 60, m.graphs)
            tok = s.prefill().argmax(-1)
            out[f"b{batch}_kernels"] = kernel_profile(lambda: s._step(tok), steps=3)


if __name__ == "__main__":
    sys.exit(main())
