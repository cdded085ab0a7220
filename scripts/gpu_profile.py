"""Where the time goes in our engine on a GPU: the stages of one image and of a large batch, one
decoding step's kernels, and what torch.compile would change in a decoding step.

    python scripts/gpu_profile.py --model ~/.cache/blip2/bench/opt-2.7b --dtype float16 [--batch 256] \
        [--compile] [--json out.json]

Every stage is timed with the device synchronised, as the median of a few runs after a warm-up.
Prints one JSON object; --json saves it too. Also runs (slowly) on a CPU, for testing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import blip2
from blip2.apps.bench import PROMPT, write_images
from blip2.engine.generation import GenerationConfig
from blip2.engine.sessions import OPTSession, T5Session, generate


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd decoding step")
    parser.add_argument("--images", type=Path, default=Path("/tmp/blip2-profile-images"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seconds = timer(cuda, args.repeat)

    out: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    start = time.perf_counter()
    m = blip2.load(args.model, dtype=args.dtype, device=args.device)
    out["load_s"] = time.perf_counter() - start
    files = write_images(args.images, args.batch + 2 * args.repeat + 4)
    n = args.tokens
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
    fresh = iter(files)

    # One image, stage by stage.
    out["1_prep_s"] = seconds(lambda: m.pixel_values([files[0]]))
    px = m.pixel_values([files[0]])
    out["1_encode_s"] = seconds(lambda: m.encode_images(px))
    out["1_e2e_s"] = seconds(lambda: m.generate([next(fresh)], PROMPT, max_new_tokens=n, min_new_tokens=n))
    queries = m.encode_images(px)
    tokens = m.tokenizer([PROMPT], max_length=m.max_prompt_tokens(gen))
    ids, mask = tokens.input_ids.to(m.device), tokens.attention_mask.to(m.device)

    def session(max_new: int = n, queries=queries, ids=ids, mask=mask):
        embeds, full_mask = m.model.embed_inputs(queries, ids, mask)
        kind = T5Session if m.config.is_encoder_decoder else OPTSession
        return kind(m.model.language_model, embeds, full_mask, 1, max_new, m.graphs)

    with torch.inference_mode():
        out["1_generate_from_queries_s"] = seconds(lambda: generate(m.model, queries, ids, mask, gen, m.graphs))
        out["1_session_prefill_s"] = seconds(lambda: session().prefill())
        s = session(4 * n + 8)
        logits = s.prefill()
        tok = logits.argmax(-1)
        t0 = time.perf_counter(); s.step(tok); sync(); out["1_first_step_eager_s"] = time.perf_counter() - t0
        t0 = time.perf_counter(); s.step(tok); sync(); out["1_second_step_capture_s"] = time.perf_counter() - t0
        out["1_replayed_step_ms"] = 1e3 * seconds(lambda: s.step(tok), repeat=n)
        out["1_eager_step_ms"] = 1e3 * seconds(lambda: s._step(tok), repeat=n)
        if cuda:
            try:
                out["kernels"] = kernel_profile(lambda: s._step(tok), steps=3)
            except Exception as e:  # the profiler's event API moves between torch versions
                out["kernels"] = f"{type(e).__name__}: {e}"

    # A large batch: preparation alone, preparation overlapped with encoding, decoding from queries.
    batch = [next(fresh) for _ in range(args.batch)]
    out[f"{args.batch}_prep_s"] = seconds(lambda: m.pixel_values(batch), repeat=2)
    # A fresh query cache each time, so that every image is encoded.
    out[f"{args.batch}_prep_and_encode_s"] = seconds(
        lambda: (m._queries.clear(), m.image_queries(m.images(batch))), repeat=2)
    bpx = m.pixel_values(batch).to(m.device)
    out[f"{args.batch}_encode_s"] = seconds(lambda: m.encode_images(bpx), repeat=2)
    bpx = None  # the batch's pixels freed
    bq = m.image_queries(m.images(batch))
    bt = m.tokenizer([PROMPT] * args.batch, max_length=m.max_prompt_tokens(gen))
    bids, bmask = bt.input_ids.to(m.device), bt.attention_mask.to(m.device)
    with torch.inference_mode():
        out[f"{args.batch}_generate_from_queries_s"] = seconds(
            lambda: generate(m.model, bq, bids, bmask, gen, m.graphs), repeat=2)
        out[f"{args.batch}_session_prefill_s"] = seconds(lambda: session(n, bq, bids, bmask).prefill(), repeat=2)
        s = session(4 * n + 8, bq, bids, bmask)
        btok = s.prefill().argmax(-1)
        s.step(btok)
        out[f"{args.batch}_replayed_step_ms"] = 1e3 * seconds(lambda: s.step(btok), repeat=n)
    out[f"{args.batch}_e2e_s"] = seconds(
        lambda: (m._queries.clear(), m.generate(batch, PROMPT, max_new_tokens=n, min_new_tokens=n)), repeat=2)
    out[f"{args.batch}_images_per_s"] = args.batch / out[f"{args.batch}_e2e_s"]
    if cuda:
        out["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(out), flush=True)

    if args.compile:
        try:
            out["compile"] = compiled_step(m, session, tok, n, seconds, sync)
        except Exception as e:
            out["compile"] = f"{type(e).__name__}: {str(e)[:2000]}"
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def timer(cuda: bool, default_repeat: int):
    """seconds(fn, repeat, warm): the median time of `repeat` calls of fn after one warm-up call,
    with the device synchronised around each."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def seconds(fn, repeat: int = default_repeat, warm: bool = True) -> float:
        if warm:
            fn()
        times = []
        for _ in range(repeat):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return seconds


def kernel_profile(step, steps: int) -> dict[str, object]:
    """The kernels of `steps` eager decoding steps: per step, their count and summed time, and the
    names that take the most time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time_total if hasattr(e, "device_time_total")
                                                   else e.cuda_time_total)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    return {"kernels_per_step": len(kernels) / steps,
            "kernel_ms_per_step": sum(sum(v) for v in by_name.values()) / steps / 1e3,
            "top": [{"name": k, "count_per_step": len(v) / steps, "ms_per_step": sum(v) / steps / 1e3} for k, v in top]}


def compiled_step(m, session, tok, n, seconds, sync) -> dict[str, float]:
    """torch.compile (default mode: fused pointwise kernels, vendor GEMMs) of the language model's
    forward, used by a decoding step that our CUDA graph then captures: compile seconds and step ms."""
    lm = m.model.language_model
    plain = lm.forward if not m.config.is_encoder_decoder else lm.decode
    compiled = torch.compile(plain, dynamic=False)
    result: dict[str, float] = {}
    # Without this, the session would adopt the eager step's graph kept from the first session of the
    # same shapes and never call the compiled forward.
    m.graphs.steps.clear()
    with torch.inference_mode():
        s = session(4 * n + 8)
        s.prefill()
        if m.config.is_encoder_decoder:
            lm.decode = compiled
        else:
            lm.forward = compiled
        try:
            t0 = time.perf_counter(); s.step(tok); sync(); result["compile_s"] = time.perf_counter() - t0
            t0 = time.perf_counter(); s.step(tok); sync(); result["capture_s"] = time.perf_counter() - t0
            result["replayed_step_ms"] = 1e3 * seconds(lambda: s.step(tok), repeat=n)
            result["eager_step_ms"] = 1e3 * seconds(lambda: s._step(tok), repeat=n)
        finally:
            lm.__dict__.pop("forward", None)
            lm.__dict__.pop("decode", None)
    return result


if __name__ == "__main__":
    sys.exit(main())
