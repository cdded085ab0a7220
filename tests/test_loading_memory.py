"""Loading a float32 checkpoint as bfloat16 never holds a float32 copy of the model."""

from __future__ import annotations

import sys

import pytest

from checkpoints import load_memory, tiny_config, write_checkpoint

MiB = 2**20

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bfloat16_load_peak_is_bfloat16_model_plus_one_tensor(tmp_path):
    # ~70 M parameters: 280 MiB in float32, 140 MiB in bfloat16; the largest tensor is 80 MiB in float32.
    cfg = tiny_config("opt", vocab_size=20480, hidden_size=1024, num_hidden_layers=4, ffn_dim=4096,
                      num_attention_heads=8)
    path = write_checkpoint(tmp_path / "big", cfg, fmt="sharded", seed=0)
    tiny = write_checkpoint(tmp_path / "tiny", tiny_config("opt"), seed=0)
    m = load_memory(path, tiny, dtype="bfloat16")
    params = sum(v for v in _sizes(path).values())
    bf16 = params * 2
    largest_fp32 = max(_sizes(path).values()) * 4
    grown = m["peak"] - m["before"]
    assert grown < bf16 + largest_fp32 + 48 * MiB, (grown / MiB, bf16 / MiB)
    assert grown < params * 4  # far below a float32 copy


def _sizes(path) -> dict[str, int]:
    """Element count of every stored tensor."""
    from math import prod

    from safetensors import safe_open

    sizes = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            sizes.update({k: prod(f.get_slice(k).get_shape()) for k in f.keys()})
    return sizes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_float32_weights_are_mapped_from_the_file_not_copied(tmp_path):
    import torch

    import blip2

    path = write_checkpoint(tmp_path / "f32", tiny_config("opt"), seed=1)
    # Weights that stay as stored (here the Q-Former's; the language model's and vision encoder's
    # linears are packed for oneDNN where it can) are the file's pages.
    fc1 = lambda m: m.model.qformer.encoder.layer[0].intermediate_query.dense.weight  # noqa: E731
    m = blip2.load(path, dtype="float32")
    w = fc1(m)
    regions = [line.split() for line in open("/proc/self/maps")]
    holding = [r for r in regions if int(r[0].split("-")[0], 16) <= w.data_ptr() < int(r[0].split("-")[1], 16)]
    assert holding and holding[0][-1].endswith(".safetensors"), holding
    original = w.clone()
    with torch.no_grad():
        w.add_(1.0)  # a private map: the file is not written
    assert torch.equal(fc1(blip2.load(path, dtype="float32")), original)
