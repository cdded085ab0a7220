"""Logits and image embeddings equal the reference (transformers) on the same random checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip2
from checkpoints import opt_inputs, pixels, reference, rel_err, t5_inputs, tiny_config, write_checkpoint

TOL = 1e-4
OPT_PROMPTS = [[5, 6, 7, 8], [9], [10, 11]]
T5_PROMPTS = [[5, 6, 7], [8], [12, 13, 14, 15]]
DECODER_IDS = torch.tensor([[0, 5, 9, 3], [0, 7, 3, 3], [0, 1, 2, 40]])

CASES = {
    "opt": dict(lm="opt"),
    "opt-proj-dim-caf1-size42": dict(lm="opt", word_embed_proj_dim=24, cross_attention_frequency=1, image_size=42),
    "opt-post-ln-eps1e-5": dict(lm="opt", do_layer_norm_before=False, word_embed_proj_dim=20, vision_eps=1e-5),
    "t5-flan-caf1-size42": dict(lm="t5", cross_attention_frequency=1, image_size=42),
    "t5-flan-5.x-config": dict(lm="t5", flan_form="5.x"),
    "t5-tied-relu-caf3": dict(lm="t5", cross_attention_frequency=3, feed_forward_proj="relu", t5_d_kv=10),
}


def _reference_logits(ref, cfg, px, ids, mask, dec=None, **kw):
    with torch.no_grad():
        if dec is None:
            return ref(pixel_values=px, input_ids=ids, attention_mask=mask, **kw).logits
        return ref(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **kw).logits


def _inputs(cfg):
    if cfg["text_config"]["model_type"] == "opt":
        ids, mask = opt_inputs(cfg, OPT_PROMPTS)
        return ids, mask, None
    ids, mask = t5_inputs(cfg, T5_PROMPTS)
    return ids, mask, DECODER_IDS


@pytest.fixture(scope="module", params=list(CASES))
def case(request, ckpt_root):
    opts = dict(CASES[request.param])
    lm, form = opts.pop("lm"), opts.pop("flan_form", "4.x")
    cfg = tiny_config(lm, **opts)
    if lm == "t5" and opts.get("feed_forward_proj") == "relu":  # original-T5 style: tied head, rescaled output
        path = write_checkpoint(ckpt_root / request.param, cfg, flan=False)
    else:
        path = write_checkpoint(ckpt_root / request.param, cfg, flan_form=form)
    return cfg, path, reference(path), blip2.load(path)


def test_logits_match_reference_batched_with_padding(case):
    cfg, _, ref, ours = case
    size = cfg["vision_config"]["image_size"]
    ids, mask, dec = _inputs(cfg)
    px = pixels(ids.shape[0], size)
    expected = _reference_logits(ref, cfg, px, ids, mask, dec)
    got = ours.forward(px, ids, mask, dec)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < TOL


def test_image_embeddings_match_reference(case):
    cfg, _, ref, ours = case
    px = pixels(2, cfg["vision_config"]["image_size"], seed=1)
    with torch.no_grad():
        expected = ref.get_image_features(px).pooler_output
    got = ours.encode_images(px)
    assert got.shape == (2, cfg["num_query_tokens"], expected.shape[-1])
    assert rel_err(got, expected) < TOL


def test_other_image_size_interpolates_positions_like_reference(case):
    cfg, _, ref, ours = case
    size = cfg["vision_config"]["image_size"] + 14
    ids, mask, dec = _inputs(cfg)
    px = pixels(ids.shape[0], size, seed=2)
    expected = _reference_logits(ref, cfg, px, ids, mask, dec, interpolate_pos_encoding=True)
    assert rel_err(ours.forward(px, ids, mask, dec), expected) < TOL


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_legacy_checkpoint_prepends_queries(lm, ckpt_root):
    """A legacy config (no image_token_index, like blip2-opt-2.7b-coco) gives the new layout's logits."""
    new = write_checkpoint(ckpt_root / f"legacy-src-{lm}", tiny_config(lm), seed=3)
    legacy_cfg = tiny_config(lm, legacy=True)
    old = write_checkpoint(ckpt_root / f"legacy-{lm}", legacy_cfg, seed=3)
    assert "image_token_index" not in json.loads((old / "config.json").read_text())
    cfg = tiny_config(lm)
    ids, mask, dec = _inputs(cfg)
    q = cfg["num_query_tokens"]
    px = pixels(ids.shape[0], 28, seed=4)
    expected = _reference_logits(reference(new), cfg, px, ids, mask, dec)
    legacy_model = blip2.load(old)
    assert legacy_model.config.image_token_index is None
    got = legacy_model.forward(px, ids[:, q:], mask[:, q:], dec)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < TOL


@pytest.mark.parametrize("fmt", ["sharded", "bin", "bin-sharded"])
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_every_weight_format_matches_reference(fmt, lm, ckpt_root):
    cfg = tiny_config(lm)
    path = write_checkpoint(ckpt_root / f"{fmt}-{lm}", cfg, fmt=fmt, seed=5)
    if fmt == "sharded":
        assert len(list(path.glob("model-*.safetensors"))) > 1
    ids, mask, dec = _inputs(cfg)
    px = pixels(ids.shape[0], 28, seed=6)
    expected = _reference_logits(reference(path), cfg, px, ids, mask, dec)
    assert rel_err(blip2.load(path).forward(px, ids, mask, dec), expected) < TOL


def test_lavis_q_bias_v_bias_form_loads(ckpt_root):
    cfg = tiny_config("opt")
    path = write_checkpoint(ckpt_root / "lavis", cfg, seed=7)
    expected = blip2.load(path).encode_images(pixels(1, 28))
    state = load_file(path / "model.safetensors")
    for key in [k for k in state if k.endswith("self_attn.qkv.bias")]:
        q, _, v = state.pop(key).chunk(3)
        prefix = key[: -len("qkv.bias")]
        state[prefix + "q_bias"], state[prefix + "v_bias"] = q.clone(), v.clone()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    # The stored K bias is random here, real ones are zero; a K bias shifts every score of a query
    # equally, so dropping it changes only rounding.
    assert rel_err(blip2.load(path).encode_images(pixels(1, 28)), expected) < 1e-6


def test_bfloat16_close_to_reference_bfloat16(ckpt_root):
    from transformers import Blip2ForConditionalGeneration

    cfg = tiny_config("opt")
    path = write_checkpoint(ckpt_root / "bf16", cfg, seed=8)
    ref = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = blip2.load(path, dtype="bfloat16")
    assert {p.dtype for p in ours.model.parameters()} == {torch.bfloat16}
    ids, mask, _ = _inputs(cfg)
    px = pixels(ids.shape[0], 28)
    assert rel_err(ours.forward(px, ids, mask), _reference_logits(ref, cfg, px, ids, mask)) < 2e-2


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_float16_keeps_qformer_and_t5_wo_in_float32_like_reference(lm, ckpt_root):
    path = write_checkpoint(ckpt_root / f"fp16-{lm}", tiny_config(lm), seed=9)
    model = blip2.load(path, dtype=torch.float16, force_float16=lm == "t5").model  # T5 refuses float16 unless forced
    assert model.query_tokens.dtype == torch.float32
    assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
    assert model.vision_model.post_layernorm.weight.dtype == torch.float16
    if lm == "t5":
        wo = model.language_model.encoder.block[0].layer[1].DenseReluDense.wo.weight
        assert wo.dtype == torch.float32
        assert model.language_model.shared.weight.dtype == torch.float16
