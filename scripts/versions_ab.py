"""Two checkouts of blip2 against each other, in alternating fresh processes, on one model: load time,
one image end to end (20 tokens), decoding per token (from end-to-end times, and from the image's
queries alone), the prompt's pass and a batch of 8. Tells the code from the
machine's drift when a benchmark run comes out slower.

    python scripts/versions_ab.py --model ~/.cache/blip2/bench/opt-2.7b OLD_CHECKOUT NEW_CHECKOUT [--rounds 2] [--dtype D]

(make an old checkout with `git worktree add /tmp/old REV`; one from before blip2.apps and blip2.engine
existed works too.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

MEASURE = r"""
import statistics, sys, time
start = time.perf_counter()
import blip2
try:
    from blip2.apps.bench import PROMPT, write_images
    from blip2.engine.generation import GenerationConfig
    from blip2.engine.sessions import generate
except ImportError:  # a checkout from before blip2/ was split into models/, inputs/, quant/, engine/, apps/
    from blip2.bench import PROMPT, write_images
    from blip2.generation import GenerationConfig
    generate = None
m = blip2.load(sys.argv[1], dtype=sys.argv[3])
load = time.perf_counter() - start
files = iter(write_images(__import__("pathlib").Path(sys.argv[2]), 20))
def answer(n, k):
    t = time.perf_counter()
    m.generate([next(files) for _ in range(n)], PROMPT, max_new_tokens=k, min_new_tokens=k)
    return time.perf_counter() - t
answer(1, 2)
e20 = statistics.median(answer(1, 20) for _ in range(2))
e1 = statistics.median(answer(1, 1) for _ in range(2))
import torch
queries = m.encode_images(m.pixel_values([next(files)]))
ids = m.tokenizer([PROMPT], max_length=m.max_prompt_tokens(GenerationConfig(max_new_tokens=20)))
def from_queries(k):  # no image encoding: the prompt's pass, then k - 1 decoding steps
    t = time.perf_counter()
    with torch.inference_mode():
        gen = GenerationConfig(max_new_tokens=k, min_new_tokens=k)
        if generate is None:
            m.model.generate(queries, ids.input_ids, ids.attention_mask, gen)
        else:
            generate(m.model, queries, ids.input_ids, ids.attention_mask, gen, m.graphs)
    return time.perf_counter() - t
q1 = statistics.median(from_queries(1) for _ in range(2))
q20 = statistics.median(from_queries(20) for _ in range(2))
print(f"load {load:.1f} s, one image {e20:.2f} s, decode {1e3 * (e20 - e1) / 19:.0f} ms/token, "
      f"from the queries: prompt {q1:.2f} s, decode {1e3 * (q20 - q1) / 19:.0f} ms/token, "
      f"batch 8 {8 / answer(8, 20):.3f} images/s")
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--images", default="/tmp/blip2-ab-images")
    parser.add_argument("checkouts", nargs=2, type=Path)
    args = parser.parse_args()
    for r in range(args.rounds):
        for checkout in args.checkouts:
            env = dict(os.environ, PYTHONPATH=str(checkout.resolve()))
            out = subprocess.run([sys.executable, "-c", MEASURE, args.model, args.images, args.dtype], env=env,
                                 capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"failed: {out.stderr[-300:]}"
            print(f"round {r + 1}, {checkout}: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
