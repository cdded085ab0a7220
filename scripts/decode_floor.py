"""A decoding step against the memory's speed of the same minute, on the CPU.

    python scripts/decode_floor.py --model ~/.cache/blip2/bench/opt-2.7b [--rounds 6]

`blip2 bench run` divides each system's decoding time by a floor from the fastest memory read it
measured in the run; on a shared machine whose read rate moves by 2x from minute to minute that
mixes phases. Here each round measures the read rate as the benchmark does (summing a 2 GB float32
tensor; best of 3) just before and just after timing a decoded token (21 minus 1 greedy tokens, over
20), and prints the token's time over the weights it must read at that rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import blip2
from blip2.apps.bench.machine import memory_read_gbs, seconds, stored_shapes, work
from blip2.apps.bench.checkpoints import write_images


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    model = blip2.load(args.model, dtype=args.dtype)
    config = json.loads((args.model / "config.json").read_text())
    step_params = work(config, stored_shapes(args.model), 0)["step_params"]
    step_bytes = step_params * torch.empty(0, dtype=model.dtype).element_size()
    image = write_images(Path("/tmp/blip2-decode-floor"), 1)[0]
    prompt = "Question: how many dogs are in the picture? Answer:"
    answer = lambda n: seconds(lambda: model.generate(image, prompt, max_new_tokens=n, min_new_tokens=n))  # noqa: E731
    answer(2)
    ratios = []
    for _ in range(args.rounds):
        before = memory_read_gbs(tries=3)
        step = (answer(21) - answer(1)) / 20
        after = memory_read_gbs(tries=3)
        floor = step_bytes / ((before + after) / 2 * 1e9)
        ratios.append(step / floor)
        print(f"read {before:.1f} / {after:.1f} GB/s, token {step * 1e3:.1f} ms, floor {floor * 1e3:.1f} ms, "
              f"{ratios[-1]:.2f}x", flush=True)
    print(f"median: {statistics.median(ratios):.2f}x the floor of the moment "
          f"({step_bytes / 1e9:.2f} GB of weights a token)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
