"""One system (ours, transformers, vLLM) measured in one fresh process. The parent runs this file by
path (runpy), not `import blip2.apps.bench`: importing the package would import blip2 (and torch)
before the clock of the first answer starts for every system alike. So it imports nothing of blip2's
at the top, and nothing relative."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable

import torch


def status_bytes(field: str) -> int:
    """A /proc/self/status memory figure (VmRSS: resident set, VmHWM: its peak) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _open_images(files: list[str]) -> list:
    from PIL import Image

    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
    return images


class _Ours:
    """blip2.load + Blip2.generate (file in, text out) + Blip2.encode_images."""

    quantize: str | None = None
    quantize_vision = True
    quantize_language = True

    def __init__(self, path: str, dtype: str, device: str = "cpu"):
        import blip2

        start = time.perf_counter()
        self.model = blip2.load(path, dtype=dtype, device=device, quantize=self.quantize,
                                quantize_vision=self.quantize_vision, quantize_language=self.quantize_language)
        self.load_s = time.perf_counter() - start

    def answer(self, files: list[str], prompt: str, new_tokens: int) -> list[list[int]]:
        results = self.model.generate(files, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1)
        return [r.token_ids for r in results]

    def pixels(self, file: str) -> torch.Tensor:
        return self.model.pixel_values([file])

    def encode(self, pixels: torch.Tensor) -> None:
        self.model.encode_images(pixels)


class _Transformers:
    """Blip2Processor (PIL backend, as LAVIS) + Blip2ForConditionalGeneration, as its model card uses them."""

    def __init__(self, path: str, dtype: str, device: str = "cpu"):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.dtype = getattr(torch, dtype)
        start = time.perf_counter()
        self.processor = transformers.Blip2Processor.from_pretrained(path, backend="pil")
        self.device = device
        self.model = transformers.Blip2ForConditionalGeneration.from_pretrained(path, dtype=self.dtype).to(device).eval()
        self.load_s = time.perf_counter() - start

    def answer(self, files: list[str], prompt: str, new_tokens: int) -> list[list[int]]:
        inputs = self.processor(images=_open_images(files), text=[prompt] * len(files), return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, num_beams=1)
        # OPT's output repeats the input ids; T5's starts with the decoder start token.
        new = out[:, inputs["input_ids"].shape[1]:] if self.model.config.use_decoder_only_language_model else out[:, 1:]
        self.processor.batch_decode(new, skip_special_tokens=True)
        return new.tolist()

    def pixels(self, file: str) -> torch.Tensor:
        pixels = self.processor.image_processor(_open_images([file]), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def encode(self, pixels: torch.Tensor) -> None:
        with torch.inference_mode():
            self.model.get_image_features(pixel_values=pixels)


class _VLLM:
    """vLLM's offline LLM.generate (written to its documented API; not installed where this was written)."""

    def __init__(self, path: str, dtype: str, device: str = "cpu"):
        from vllm import LLM, SamplingParams

        self.sampling = SamplingParams
        start = time.perf_counter()
        self.llm = LLM(model=path, dtype=dtype, seed=0, limit_mm_per_prompt={"image": 1})
        self.load_s = time.perf_counter() - start

    def answer(self, files: list[str], prompt: str, new_tokens: int) -> list[list[int]]:
        params = self.sampling(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)
        requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in _open_images(files)]
        return [list(o.outputs[0].token_ids) for o in self.llm.generate(requests, params, use_tqdm=False)]

    pixels = encode = None  # vLLM has no separate image-encoding call


def _quantized(mode: str, part: str) -> type:
    return type(f"_Ours_{mode}_{part}", (_Ours,), {"quantize": mode, "quantize_vision": part != "lm",
                                                   "quantize_language": part != "vision"})


# ours-int8, ours-int4: quantized everywhere (blip2.load's default); ours-int8-lm, ours-int4-lm: the
# language model only (quantize_vision=False); ours-int8-vision, ours-int4-vision: the vision side only.
SYSTEMS = {"ours": _Ours, "transformers": _Transformers, "vllm": _VLLM,
            **{f"ours-{m}{'' if part == 'all' else '-' + part}": _quantized(m, part)
               for m in ("int8", "int4") for part in ("all", "lm", "vision")}}


def worker(spec_json: str) -> None:
    """Measure one system in this (fresh) process; print the results as one JSON line on stdout.

    Order: load (time, peak RSS); the first answer, also the warm-up of one-image requests; then each
    measurement after one warm-up (unless spec["warm_up"] is false; the batches share one, at the
    first size), `timed` times (`timed_batches` for the batches). Every request gets images not seen
    before in this process.
    """
    spec = json.loads(spec_json)
    name, prompt, n = spec["system"], spec["prompt"], spec["new_tokens"]
    images = iter(spec["images"])
    log = lambda message: print(f"    {name}: {message}", file=sys.stderr, flush=True)  # noqa: E731
    system = SYSTEMS[name](spec["path"], spec["dtype"], spec.get("device", "cpu"))
    out = {"system": name, "load_s": system.load_s, "load_rss_gb": status_bytes("VmHWM") / 1e9}
    log(f"loaded in {system.load_s:.1f} s")
    if spec["load_only"]:
        print(json.dumps(out))
        return

    def answer(batch: int, new_tokens: int) -> list[list[int]]:
        ids = system.answer([next(images) for _ in range(batch)], prompt, new_tokens)
        if len(ids) != batch or any(len(row) != new_tokens for row in ids):
            raise RuntimeError(f"{name} returned {[len(r) for r in ids]} new tokens, not {batch} x {new_tokens}")
        return ids

    def timed(fn: Callable[[], object], repeats: int, warm_up: bool = spec["warm_up"]) -> list[float]:
        if warm_up:
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if spec.get("device", "cpu").startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times

    out["tokens"] = answer(1, n)[0]
    out["first_answer_s"] = time.time() - spec["spawn_time"]
    log(f"first answer {out['first_answer_s']:.1f} s after the process started")
    out["e2e_s"] = timed(lambda: answer(1, n), spec["timed"], warm_up=False)
    out["e2e1_s"] = timed(lambda: answer(1, 1), spec["timed"])
    log(f"one image: {statistics.median(out['e2e_s']):.2f} s for {n} tokens, "
        f"{statistics.median(out['e2e1_s']):.2f} s for 1")
    if system.encode is not None:
        pixels = iter([system.pixels(next(images)) for _ in range(spec["timed"] + spec["warm_up"])])
        out["encode_s"] = timed(lambda: system.encode(next(pixels)), spec["timed"])
        log(f"image encoding {statistics.median(out['encode_s']):.2f} s")
    for b in spec["batches"]:  # on a CPU one warm-up for all batch sizes: a call of 32 images takes minutes
        first = b == spec["batches"][0] or spec.get("warm_each", False)
        out[f"b{b}_s"] = timed(lambda: answer(b, n), spec["timed_batches"], spec["warm_up"] and first)
        log(f"batch {b}: {b / statistics.median(out[f'b{b}_s']):.2f} images/s")
    out["peak_rss_gb"] = status_bytes("VmHWM") / 1e9
    print(json.dumps(out))


