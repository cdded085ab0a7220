"""A/B measurements on a GPU, in one process, for choices the profile (scripts/gpu_profile.py) raised:

- preparing a large batch of images: threads (4, 8, 16) or 16 processes, alone and interleaved with
  encoding (the main thread must win the GIL to feed the GPU);
- the decoding step at batch 1 and 256: scaled-dot-product attention through cuDNN (torch's default
  on Hopper) or not, with the boolean mask or a float one built once per step; and the kernels of a
  step at batch 256.

    python scripts/gpu_ab.py --model ~/.cache/blip2/bench/opt-2.7b [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blip2  # noqa: E402
import blip2.processing as processing  # noqa: E402
from blip2.bench import PROMPT, write_images  # noqa: E402
from blip2.generation import GenerationConfig  # noqa: E402
from blip2.opt import OPTSession  # noqa: E402
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
    with concurrent.futures.ProcessPoolExecutor(16, mp_context=multiprocessing.get_context("spawn")) as procs:
        rows = lambda: (torch.from_numpy(a) for a in procs.map(_resized, files, chunksize=4))  # noqa: E731
        out["prep_processes16_s"] = seconds(lambda: list(rows()))
        out["prep_encode_processes16_s"] = seconds(lambda: encode_stream(rows()))
    px = m.pixel_values(files).to(args.device)
    out["encode_only_s"] = seconds(lambda: m.encode_images(px))
    print(json.dumps(out), flush=True)

    # The decoding step.
    gen = GenerationConfig(max_new_tokens=20, min_new_tokens=20)
    plain_step = OPTSession._step
    for batch in (1, args.batch):
        queries = m.encode_images(px[:batch])
        tokens = m.tokenizer([PROMPT] * batch, max_length=m.max_prompt_tokens(gen))
        ids, mask = tokens.input_ids.to(args.device), tokens.attention_mask.to(args.device)
        for cudnn in (True, False):
            for float_mask in (False, True):
                torch.backends.cuda.enable_cudnn_sdp(cudnn)
                OPTSession._step = _float_mask_step if float_mask else plain_step
                m.model.language_model.__dict__.pop("_kept_graphs", None)
                with torch.inference_mode():
                    embeds, full = m.model.embed_inputs(queries, ids, mask)
                    s = OPTSession(m.model.language_model, embeds, full, 1, 60)
                    tok = s.prefill().argmax(-1)
                    s.step(tok)
                    name = f"b{batch}_step_ms_{'cudnn' if cudnn else 'nocudnn'}_{'floatmask' if float_mask else 'boolmask'}"
                    out[name] = 1e3 * seconds(lambda: s.step(tok), repeat=20)
                    with torch.inference_mode():
                        # Same tokens from every variant: greedy ids of 20 steps.
                        out[name.replace("step_ms", "ids")] = m.model.generate(queries[:1], ids[:1], mask[:1], gen)[0][0].token_ids[:8]
                print(json.dumps({k: v for k, v in out.items() if k.startswith(f"b{batch}_step")}), flush=True)
        OPTSession._step = plain_step
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
