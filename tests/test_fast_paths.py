"""Optimised paths give the plain path's results."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2.layers import PackedLinear, can_pack
from checkpoints import opt_inputs, pixels, t5_inputs, tiny_config, write_checkpoint

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")), reason="no oneDNN")


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_packed_linears_equal_plain_linears(lm, ckpt_root, monkeypatch):
    cfg = tiny_config(lm, num_decoder_layers=2) if lm == "t5" else tiny_config(lm)
    path = write_checkpoint(ckpt_root / f"packed-{lm}", cfg, seed=41)
    packed = blip2.load(path, dtype="bfloat16")
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    # OPT's head is tied to its embedding and stays plain; Flan-T5's is its own and is packed.
    assert isinstance(packed.model.language_model.lm_head, PackedLinear) == (lm == "t5")
    monkeypatch.setattr(blip2.api, "can_pack", lambda *a: False)
    plain = blip2.load(path, dtype="bfloat16")
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    ids, mask = (opt_inputs if lm == "opt" else t5_inputs)(cfg, [[5, 6, 7], [8]])
    dec = None if lm == "opt" else torch.tensor([[0, 4, 5], [0, 6, 7]])
    px = pixels(2, 28)
    assert torch.equal(packed.forward(px, ids, mask, dec), plain.forward(px, ids, mask, dec))
    with torch.inference_mode():
        q = packed.model.encode_images(px)
        gen = blip2.generation.GenerationConfig(num_beams=3, max_new_tokens=6)
        a = packed.model.generate(q, ids, mask, gen)
        b = plain.model.generate(plain.model.encode_images(px), ids, mask, gen)
    assert [s.token_ids for r in a for s in r] == [s.token_ids for r in b for s in r]
