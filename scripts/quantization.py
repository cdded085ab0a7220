"""Memory, decode speed and quality of each precision and quantization mode, one fresh process per mode.

    python scripts/quantization.py report --model ~/.cache/blip2/bench/opt-2.7b \
        --modes float32,bfloat16,int8,int4 [--reference float32] [--json out.json]
    python scripts/quantization.py probe --model DIR --dtype bfloat16 --quantize int4 [--logits out.pt]
    python scripts/quantization.py parts --model DIR [--mode int4] [--parts head,language,vision,qformer]
    python scripts/quantization.py products [--rows 1,2,3,4,5,8,16,32,64,128] [--dtype float32]
    python scripts/quantization.py floor --model DIR [--levels 0.0997,0.0975,0.0625,0.0532]

Memory: resident set size (VmRSS) right after `import torch, blip2`, right after `blip2.load`, and the
peak (VmHWM) over the whole load; the model's share is the difference. Speed: milliseconds per decoded
token, batch 1, the median of timed `session.step()` calls after a prefill (decoding reads every
weight once per token). Quality: logits teacher-forced over 256 text positions on fixed random inputs,
compared with a reference mode's (relative error of the whole logits tensor, top-1 agreement).
The functions are meant to be called from the benchmark as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blip2.apps.bench.worker import status_bytes

GiB = 2**30
POSITIONS = 256


def teacher_forced_inputs(config, positions: int = POSITIONS, seed: int = 0):
    """Fixed random inputs: one image and `positions` text positions whose logits are compared."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=g)
    q = config.num_query_tokens
    image = [config.image_token_index] * q if config.image_token_index is not None else []
    text = lambda n: _text_ids(config, n, g).tolist()  # noqa: E731
    if config.is_encoder_decoder:
        prompt = text(32) + [1]
        ids = torch.tensor([image + prompt])
        decoder = torch.tensor([[config.text.decoder_start_token_id]
                                + text(positions - 1)])
        return pixels, ids, decoder
    bos = config.text.bos_token_id if config.text.bos_token_id is not None else 2
    ids = torch.tensor([image + [bos] + text(positions - 1)])
    return pixels, ids, None


def _text_ids(config, n: int, g):
    """n random ordinary token ids (no special or image tokens)."""
    import torch

    ids = torch.randint(3, min(config.text.vocab_size, 32000), (n,), generator=g)
    return ids.masked_fill(ids == (config.image_token_index or -1), 3)


def teacher_forced_logits(model, positions: int = POSITIONS, seed: int = 0):
    """float32 logits [positions, vocab] of a loaded `blip2.Blip2` on teacher_forced_inputs."""
    pixels, ids, decoder = teacher_forced_inputs(model.config, positions, seed)
    logits = model.forward(pixels, ids, None, decoder)
    return logits[0, -positions:].float()


def compare(reference, logits) -> dict[str, float]:
    """Relative error of the whole logits tensor and top-1 agreement, against reference logits."""
    ref, out = reference.double(), logits.double()
    return {"relative_error": float((out - ref).norm() / ref.norm()),
            "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).double().mean())}


def decode_ms_per_token(model, steps: int = 16, prompt_tokens: int = 16, seed: int = 0) -> float:
    """Median milliseconds of one decoding step (batch 1, greedy) of a loaded `blip2.Blip2`."""
    import torch

    from blip2.engine.sessions import OPTSession, T5Session

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(1, cfg.num_query_tokens, cfg.text.hidden_size, generator=g).to(model.dtype)
    ids = _text_ids(cfg, prompt_tokens, g)[None]
    times = []
    with torch.inference_mode():
        embeds, mask = model.model.embed_inputs(queries, ids, torch.ones_like(ids))
        session_class = T5Session if cfg.is_encoder_decoder else OPTSession
        session = session_class(model.model.language_model, embeds, mask, 1, steps + 2, model.graphs)
        token = session.prefill().argmax(-1)
        for _ in range(steps + 1):
            start = time.perf_counter()
            token = session.step(token).argmax(-1)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])  # the first step warms up


def encode_image_ms(model, repeat: int = 2) -> float:
    """Milliseconds of encode_images for one image (vision encoder, Q-Former, projection), best of `repeat`."""
    import torch

    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.encode_images(pixels)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def probe(model_dir: str, dtype: str | None, quantize: str | None, vision: bool = True, logits: str | None = None,
          speed_steps: int = 16) -> dict:
    """Load once in this (fresh) process; memory right after loading, then decode speed and logits."""
    import torch

    import blip2

    baseline = status_bytes("VmRSS")
    model = blip2.load(model_dir, dtype=dtype, quantize=quantize, quantize_vision=vision)
    after, peak = status_bytes("VmRSS"), status_bytes("VmHWM")
    out = {"dtype": str(model.dtype).removeprefix("torch."), "quantize": quantize, "vision": vision,
           "threads": torch.get_num_threads(), "load_seconds": model.load_seconds,
           "rss_baseline_gib": baseline / GiB, "rss_after_load_gib": after / GiB, "rss_peak_gib": peak / GiB,
           "model_gib": (after - baseline) / GiB, "peak_over_final": peak / after}
    if speed_steps:
        out["decode_ms_per_token"] = decode_ms_per_token(model, speed_steps)
        out["encode_image_ms"] = encode_image_ms(model)
    if logits:
        torch.save(teacher_forced_logits(model), logits)
    # Weights mapped from the files (float32 on a CPU) are resident only once used: count them then.
    out["rss_in_use_gib"] = status_bytes("VmRSS") / GiB
    return out


def run_probe(model_dir: str, mode: str, logits: str | None = None, speed_steps: int = 16) -> dict:
    """probe() in a fresh process. mode: float32, bfloat16, float16, auto, int8, int4 (with dtype auto),
    int8-novision / int4-novision, or LABEL=DIR: the checkpoint in DIR (one `blip2 quantize` wrote)."""
    label = mode
    if "=" in mode:
        label, model_dir = mode.split("=", 1)
        mode = "auto"
    quantize, vision = (mode.split("-")[0], not mode.endswith("-novision")) if mode.startswith("int") else (None, True)
    cmd = [sys.executable, __file__, "probe", "--model", str(model_dir), "--speed-steps", str(speed_steps)]
    cmd += ["--quantize", quantize, "--dtype", "auto"] if quantize else ["--dtype", mode]
    if not vision:
        cmd.append("--no-quantize-vision")
    if logits:
        cmd += ["--logits", logits]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return {"mode": label, **json.loads(out.stdout.strip().splitlines()[-1])}


def report(model_dir: str, modes: list[str], reference: str | None, speed_steps: int = 16,
           logits_dir: str | None = None) -> list[dict]:
    """Every mode in its own process; quality against `reference` (one of the modes, run first, or
    its logits already in logits_dir)."""
    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = logits_dir or tmp
        done = reference is None or Path(f"{tmp}/{reference}.pt").exists()
        # The reference first (its logits are what the others compare with), unless they are kept
        # already and it is not one of the modes asked for.
        order = ([reference] if reference and (not done or reference in modes) else []) + modes
        for mode in dict.fromkeys(order):
            label = mode.split("=")[0]
            print(f"probing {label} ...", file=sys.stderr, flush=True)
            r = run_probe(model_dir, mode, logits=f"{tmp}/{label}.pt", speed_steps=speed_steps)
            if reference:
                r.update(compare(torch.load(f"{tmp}/{reference}.pt"), torch.load(f"{tmp}/{label}.pt")))
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    return results


def markdown(results: list[dict], reference: str | None) -> str:
    base = next((r["decode_ms_per_token"] for r in results if r["mode"] == "bfloat16"
                 and "decode_ms_per_token" in r), None)
    rows = ["| mode | model RSS (GiB) | RSS after load (GiB) | RSS in use (GiB) | peak / final | decode ms/token "
            f"| vs bfloat16 | encode ms/image | rel. logits error vs {reference or '–'} | top-1 agreement |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ms = r.get("decode_ms_per_token")
        speed = f"{ms:.0f} | {ms / base:.2f}×" if ms and base else (f"{ms:.0f} | –" if ms else "– | –")
        quality = f"{r['relative_error']:.4f} | {r['top1_agreement']:.3f}" if "relative_error" in r else "– | –"
        encode = f"{r['encode_image_ms']:.0f}" if "encode_image_ms" in r else "–"
        in_use = f"{r['rss_in_use_gib']:.2f}" if "rss_in_use_gib" in r else "–"
        rows.append(f"| {r['mode']} | {r['model_gib']:.2f} | {r['rss_after_load_gib']:.2f} | {in_use} | "
                    f"{r['peak_over_final']:.3f} | {speed} | {encode} | {quality} |")
    return "\n".join(rows)


PARTS = {"head": ("language_model.model.decoder.embed_tokens", "language_model.shared", "language_model.lm_head"),
         "language": ("language_model.",), "vision": ("vision_model.",), "qformer": ("qformer.",)}


def _unpacked(model_dir: str):
    """blip2.load in float32 with plain nn.Linear modules, whose weights can be swapped: a load given
    `trainable` packs no weight for oneDNN (and here leaves none trainable)."""
    import blip2

    return blip2.load(model_dir, dtype="float32", trainable=lambda name: False)


def parts_error(model_dir: str, mode: str = "int4", parts: tuple[str, ...] = tuple(PARTS)) -> list[dict]:
    """Which part's rounding moves the logits: each part's weights alone rounded to `mode` (the head
    always int8, the others in `mode` whatever the engine's choice for them) in an otherwise float32,
    unpacked model; logits against the float32 model's, and the layers' mean relative weight error."""
    import torch

    from blip2.quant.formats import Quantization, dequantize_weight, quantize_weight
    from blip2.quant.linear import targets

    q = Quantization(mode)
    torch.set_grad_enabled(False)
    reference = teacher_forced_logits(_unpacked(model_dir))
    head = PARTS["head"]
    results = []
    for part in parts:
        model = _unpacked(model_dir)
        names = [n for n in targets(model.model, q) if n.startswith(PARTS[part])
                 and (part == "head" or n not in head)]
        errors = []
        for name in names:
            module = model.model.get_submodule(name)
            lq = Quantization("int8") if name in head else q
            w = module.weight.data
            module.weight.data = dequantize_weight(quantize_weight(w, lq), lq)
            errors.append(float((module.weight.data - w).norm() / w.norm()))
        r = {"part": part, "layers": len(names), "weight_error": sum(errors) / len(errors),
             **compare(reference, teacher_forced_logits(model))}
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
        del model
    return results


# Relative error per weight of 4-bit codes for Gaussian weights: int4 rounded to nearest in groups of
# 128 (what the `parts` command measures on these weights), the best 16-level scalar quantizer
# (Lloyd-Max, 0.0095 of the variance), and the rate-distortion bound D = 2^(-2R) at R = 4 bits per
# weight and at the 4.25 bits int4 spends with its bfloat16 scale and zero per group of 128.
FLOOR_LEVELS = (0.0997, 0.0975, 0.0625, 0.0532)


def floor_error(model_dir: str, levels: tuple[float, ...] = FLOOR_LEVELS, seed: int = 0) -> list[dict]:
    """What int4 mode's logits error would be with an ideal code: every layer that int4 mode keeps at
    4 bits gets an independent Gaussian error of `level` times its weight's norm (the error of a
    code at that distortion that does not shape it by the inputs, as rounding does not), the int8
    layers (embedding, head, Q-Former) rounded as int4 mode rounds them; logits against float32."""
    import torch

    from blip2.quant.formats import Quantization, dequantize_weight, quantize_weight
    from blip2.quant.linear import targets

    q = Quantization("int4")
    torch.set_grad_enabled(False)
    reference = teacher_forced_logits(_unpacked(model_dir))
    results = []
    for level in levels:
        g = torch.Generator().manual_seed(seed)
        model = _unpacked(model_dir)
        layers = targets(model.model, q)
        for name, module in model.model.named_modules():  # the noise drawn in the model's module order
            if name not in layers:
                continue
            lq = layers[name]
            w = module.weight.data
            if lq.mode == "int8":
                module.weight.data = dequantize_weight(quantize_weight(w, lq), lq)
            else:
                noise = torch.randn(w.shape, generator=g)
                w.add_(noise, alpha=float(level * w.norm() / noise.norm()))
        r = {"level": level, **compare(reference, teacher_forced_logits(model))}
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
        del model
    return results


def qformer_precision(model_dir: str, dtype: str = "bfloat16", images: int = 8, new_tokens: int = 20) -> dict:
    """Does running the Q-Former in `dtype` rather than float32 (the rest of the model in `dtype`
    either way) change the outputs? Relative error of encode_images against the float32 model's, and
    agreement of greedy tokens with it, for each choice."""
    import torch

    import blip2
    import blip2.engine.pipeline as pipeline
    from blip2.engine.generation import GenerationConfig
    from blip2.engine.sessions import generate

    plan = pipeline.dtype_plan

    def load(qformer_float32: bool):
        # load() takes no per-parameter dtypes: for this experiment its dtype plan is swapped for one
        # that also keeps the Q-Former in float32, then put back.
        def patched(model, dt):
            dtype_of = plan(model, dt)
            keep = lambda n: qformer_float32 and (n == "query_tokens" or n.startswith("qformer."))  # noqa: E731
            return lambda n: torch.float32 if keep(n) else dtype_of(n)

        pipeline.dtype_plan = patched
        try:
            return blip2.load(model_dir, dtype=dtype if qformer_float32 is not None else "float32")
        finally:
            pipeline.dtype_plan = plan

    cfg = blip2.Blip2Config.from_file(model_dir)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(images, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.stack([_text_ids(cfg, 8, g) for _ in range(images)])
    if cfg.image_token_index is not None:
        ids = torch.cat([torch.full((images, cfg.num_query_tokens), cfg.image_token_index), ids], 1)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    out = {}
    for name, choice in (("float32", None), (f"{dtype} Q-Former", False), ("float32 Q-Former", True)):
        model = load(choice)
        with torch.inference_mode():
            queries = model.encode_images(pixels).float()
            tokens = [h[0].token_ids for h in generate(model.model, queries.to(model.dtype), ids, None, gen,
                                                       model.graphs)]
        out[name] = (queries, tokens)
        del model
    ref_q, ref_t = out.pop("float32")
    result = {}
    for name, (queries, tokens) in out.items():
        same = sum(a == b for x, y in zip(tokens, ref_t) for a, b in zip(x, y))
        result[name] = {"encode_images_relative_error": float((queries - ref_q).norm() / ref_q.norm()),
                        "greedy_token_agreement": same / sum(len(y) for y in ref_t),
                        "identical_sequences": sum(x == y for x, y in zip(tokens, ref_t)) / len(ref_t)}
    return result


# OPT-2.7b's decoder layer products (out, in): q/k/v/out_proj, fc1, fc2
PRODUCT_SHAPES = ((2560, 2560), (10240, 2560), (2560, 10240))


def products(rows: list[int], dtype: str = "float32", copies: int = 4) -> list[dict]:
    """Milliseconds for one random OPT-2.7b decoder layer's worth of quantized products (4 times each
    shape, distinct weights, so they come from memory as in decoding; float32 or bfloat16
    activations), per number of rows, through each CPU path a QuantizedLinear has: blip2's own
    product (quant/cpu_kernels.py, where built and chosen at load), torch's kernel, and the weight
    widened through the float GEMM, whatever the layer would choose for that many rows. Medians of 5
    runs (3 from 32 rows)."""
    import torch

    from blip2.quant.formats import Quantization
    from blip2.quant.linear import QuantizedLinear, Workspace

    dt = getattr(torch, dtype)
    out = []
    for mode in ("int8", "int4"):
        layers = []
        workspace = Workspace()  # shared, as a loaded model's layers share theirs
        for n, k in PRODUCT_SHAPES:
            for _ in range(copies):
                layer = QuantizedLinear(k, n, False, Quantization(mode), dt, workspace=workspace)
                layer.load_parameter("weight", torch.randn(n, k) * 0.02)
                layers.append(layer)
        for layer in layers:
            layer.finish_loading()
        weight_bytes = sum(layer.weight.numel() for layer in layers)
        # each path is one of the layer's kernels, called directly (its forward picks one by the rows);
        # an int8 weight in the pair layout has the one product that reads it
        if layers[0].few_rows == "pairs_product":
            paths = {"blip2": QuantizedLinear.pairs_product}
        else:
            paths = {"torch": QuantizedLinear.torch_kernel, "widened": QuantizedLinear.cpu_widened}
        if layers[0].few_rows == "own_product":
            paths["blip2"] = QuantizedLinear.own_product
        for m in rows:
            xs = {k: torch.randn(m, k).to(dt) for k in {k for _, k in PRODUCT_SHAPES}}
            row = {"mode": mode, "rows": m}
            for name, fn in paths.items():
                fn(layers[0], xs[layers[0].in_features])  # warm
                times = []
                for _ in range(5 if m < 32 else 3):
                    start = time.perf_counter()
                    for layer in layers:
                        fn(layer, xs[layer.in_features])
                    times.append(time.perf_counter() - start)
                row[name] = 1000 * statistics.median(times) / copies
            row["weight_gb_per_s"] = {name: weight_bytes / (row[name] * copies / 1000) / 1e9 for name in paths}
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", choices=["int8", "int4"])
    p.add_argument("--no-quantize-vision", action="store_true")
    p.add_argument("--logits")
    p.add_argument("--speed-steps", type=int, default=16)
    r = sub.add_parser("report")
    r.add_argument("--model", required=True)
    r.add_argument("--modes", default="float32,bfloat16,int8,int4")
    r.add_argument("--reference", default="float32", help="mode the others' logits are compared with ('' for none)")
    r.add_argument("--speed-steps", type=int, default=16)
    r.add_argument("--json")
    r.add_argument("--logits-dir", help="keep the logits here (and reuse the reference's when present)")
    qf = sub.add_parser("qformer", help="bfloat16 vs float32 Q-Former, the rest of the model in bfloat16")
    qf.add_argument("--model", required=True)
    qf.add_argument("--dtype", default="bfloat16")
    qf.add_argument("--images", type=int, default=8)
    pa = sub.add_parser("parts", help="each part's weights alone rounded, logits against float32")
    pa.add_argument("--model", required=True)
    pa.add_argument("--mode", choices=["int8", "int4"], default="int4")
    pa.add_argument("--parts", default=",".join(PARTS))
    fl = sub.add_parser("floor", help="int4 mode's logits error with an ideal code's error at each level")
    fl.add_argument("--model", required=True)
    fl.add_argument("--levels", default=",".join(map(str, FLOOR_LEVELS)))
    pr = sub.add_parser("products", help="ms per OPT-2.7b layer's quantized products, each CPU path, per rows")
    pr.add_argument("--rows", default="1,2,3,4,5,8,16,32,64,128")
    pr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if args.command == "products":
        results = products([int(r) for r in args.rows.split(",")], args.dtype)
        names = [n for n in ("blip2", "torch", "widened") if n in results[0]]
        print("| mode | rows | " + " | ".join(f"{n} (ms per layer)" for n in names) + " | "
              + " | ".join(f"{n} (weights, GB/s)" for n in names) + " |")
        print("|---|---|" + "---|" * 2 * len(names))
        for r in results:
            print(f"| {r['mode']} | {r['rows']} | " + " | ".join(f"{r[n]:.2f}" for n in names) + " | "
                  + " | ".join(f"{r['weight_gb_per_s'][n]:.1f}" for n in names) + " |")
        return 0
    if args.command == "parts":
        for r in parts_error(args.model, args.mode, tuple(args.parts.split(","))):
            print(f"| {r['part']} | {r['layers']} | {r['weight_error']:.4f} | {r['relative_error']:.4f} | "
                  f"{r['top1_agreement']:.3f} |")
        return 0
    if args.command == "floor":
        for r in floor_error(args.model, tuple(float(x) for x in args.levels.split(","))):
            print(f"| {r['level']:.4f} | {r['relative_error']:.4f} | {r['top1_agreement']:.3f} |")
        return 0
    if args.command == "qformer":
        print(json.dumps(qformer_precision(args.model, args.dtype, args.images), indent=2))
        return 0
    if args.command == "probe":
        print(json.dumps(probe(args.model, args.dtype, args.quantize, not args.no_quantize_vision, args.logits,
                               args.speed_steps)))
        return 0
    modes = args.modes.split(",")
    results = report(args.model, modes, args.reference or None, args.speed_steps, args.logits_dir)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(markdown(results, args.reference or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
