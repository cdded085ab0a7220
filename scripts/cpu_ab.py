"""In-process A/B on the CPU: the vision encoder's linears packed in oneDNN's layout (as blip2.load
does for bfloat16/float16) against plain nn.Linear, alternately, on the same weights and image.

    python scripts/cpu_ab.py --model ~/.cache/blip2/bench/opt-2.7b [--rounds 6]

Prints whether the two give identical query embeddings (bit-identical for one image; at batch 8, oneDNN
picks other blockings and they differ in rounding), then one line per encoding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import blip2
from blip2.apps.bench import write_images
from blip2.quant.packed import PackedLinear


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1, help="images encoded at once")
    parser.add_argument("--images", type=Path, default=Path("/tmp/blip2-profile-images"))
    args = parser.parse_args()
    m = blip2.load(args.model, dtype="bfloat16")
    px = m.pixel_values(write_images(args.images, args.batch))
    packed = {}
    for parent in m.model.vision_model.modules():
        for name, child in parent.named_children():
            if isinstance(child, PackedLinear):
                packed[parent, name] = child
    if not packed:
        print("no packed vision linears (not bfloat16/float16 on a CPU with oneDNN?)")
        return 1
    plain = {}
    for (parent, name), p in packed.items():  # unpack: the plain weight from the packed one
        linear = nn.Linear(p.in_features, p.out_features, p.bias is not None, dtype=torch.bfloat16)
        eye = torch.eye(p.in_features, dtype=torch.bfloat16)
        weight = torch.ops.mkldnn._linear_pointwise(eye, p.weight, None, "none", [], "").t().contiguous()
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = p.bias
        plain[parent, name] = linear

    def use(layers):
        for (parent, name), layer in layers.items():
            setattr(parent, name, layer)

    with torch.inference_mode():
        use(plain)
        a = m.model.encode_images(px)
        use(packed)
        b = m.model.encode_images(px)
        err = float((a.double() - b.double()).norm() / a.double().norm())
        print(f"identical: {torch.equal(a, b)} (relative difference {err:.2e})")
        for r in range(args.rounds):
            for label, layers in (("plain", plain), ("packed", packed)):
                use(layers)
                start = time.perf_counter()
                m.model.encode_images(px)
                print(f"round {r}: {label} {time.perf_counter() - start:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
