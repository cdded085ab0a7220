"""Generated token ids equal the reference's generate on the same random checkpoints."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2.engine.generation import GenerationConfig
from blip2.engine.sessions import generate
from checkpoints import opt_inputs, pixels, reference, t5_inputs, tiny_config, write_checkpoint

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
SETTINGS = [
    dict(),
    dict(num_beams=2),
    dict(num_beams=3, length_penalty=-1.0),
    dict(num_beams=4, length_penalty=2.0, min_new_tokens=6),
    dict(num_beams=5, repetition_penalty=1.5),
    dict(num_beams=5, num_return_sequences=3, early_stopping=True),
    dict(num_beams=3, early_stopping="never", no_repeat_ngram_size=2),
    dict(min_new_tokens=8, repetition_penalty=1.3),
    dict(no_repeat_ngram_size=2),
]


@pytest.fixture(scope="module", params=["opt", "t5"])
def models(request, ckpt_root):
    # The reference's generate cannot run a T5 whose decoder has more layers than its encoder (its cache
    # is sized by the encoder), so the generation checkpoints keep them equal.
    extra = dict(num_decoder_layers=2) if request.param == "t5" else dict(cross_attention_frequency=1)
    cfg = tiny_config(request.param, **extra)
    path = write_checkpoint(ckpt_root / f"gen-{request.param}", cfg, seed=21)
    return cfg, reference(path), blip2.load(path)


def _inputs(cfg):
    if cfg["text_config"]["model_type"] == "opt":
        return opt_inputs(cfg, PROMPTS)
    return t5_inputs(cfg, PROMPTS)


def _reference_new_tokens(ref, cfg, px, ids, mask, **settings):
    text = cfg["text_config"]
    with torch.no_grad():
        out = ref.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"], **settings)
    return out[:, ids.shape[1]:] if text["model_type"] == "opt" else out[:, 1:]


def _ours(model, px, ids, mask, **settings):
    with torch.inference_mode():
        queries = model.model.encode_images(px)
        return generate(model.model, queries, ids, mask, GenerationConfig.make(**{"max_new_tokens": 10, **settings}))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "greedy")
def test_new_token_ids_equal_reference(models, settings):
    cfg, ref, ours = models
    ids, mask = _inputs(cfg)
    px = pixels(ids.shape[0], 28, seed=3)
    expected = _reference_new_tokens(ref, cfg, px, ids, mask, **settings)
    got = [seq.token_ids for row in _ours(ours, px, ids, mask, **settings) for seq in row]
    pad = cfg["text_config"]["pad_token_id"]
    assert len(got) == expected.shape[0]
    for row, seq in zip(expected.tolist(), got):
        assert row[: len(seq)] == seq
        assert all(t == pad for t in row[len(seq):])


def test_eos_stops_and_is_kept(models):
    cfg, _, ours = models
    ids, mask = _inputs(cfg)
    px = pixels(ids.shape[0], 28, seed=3)
    eos = cfg["text_config"]["eos_token_id"]
    base = _ours(ours, px, ids, mask)
    first = base[0][0].token_ids[0]
    # Make the first greedy token the end-of-sequence id: generation must stop right there.
    ours.model.config.text.eos_token_id = first
    try:
        seq = _ours(ours, px, ids, mask)[0][0]
        assert seq.token_ids == [first] and seq.finished
    finally:
        ours.model.config.text.eos_token_id = eos


def test_sampling_reproducible_with_seed_and_top_k_1_is_greedy(models):
    cfg, _, ours = models
    ids, mask = _inputs(cfg)
    px = pixels(ids.shape[0], 28, seed=5)
    a = _ours(ours, px, ids, mask, do_sample=True, seed=7, temperature=1.5, top_p=0.9)
    b = _ours(ours, px, ids, mask, do_sample=True, seed=7, temperature=1.5, top_p=0.9)
    assert [s.token_ids for r in a for s in r] == [s.token_ids for r in b for s in r]
    greedy = _ours(ours, px, ids, mask)
    top1 = _ours(ours, px, ids, mask, do_sample=True, seed=1, top_k=1)
    assert [s.token_ids for r in greedy for s in r] == [s.token_ids for r in top1 for s in r]


def test_sampled_first_tokens_follow_the_warped_distribution(models):
    cfg, _, ours = models
    ids, mask = _inputs(cfg)
    ids, mask = ids[:1], mask[:1]
    px = pixels(1, 28, seed=6)
    n = 4000
    settings = dict(do_sample=True, seed=11, temperature=2.0, top_k=8, max_new_tokens=1)
    gen = GenerationConfig.make(**settings)
    with torch.inference_mode():
        queries = ours.model.encode_images(px)
        embeds, m = ours.model.embed_inputs(queries, ids, mask)
        if cfg["text_config"]["model_type"] == "opt":
            from blip2.engine.sessions import OPTSession as Session
        else:
            from blip2.engine.sessions import T5Session as Session
        logits = Session(ours.model.language_model, embeds, m, 1, 1).prefill()
        probs = (logits / 2.0).softmax(-1)[0]
        top = probs.topk(8)
        expected = torch.zeros_like(probs)
        expected[top.indices] = top.values / top.values.sum()
        rows = generate(ours.model, queries, ids, mask, GenerationConfig.make(gen, num_return_sequences=n))[0]
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in rows]), minlength=probs.numel()).float()
    assert set(counts.nonzero()[:, 0].tolist()) <= set(top.indices.tolist())
    total_variation = 0.5 * (counts / n - expected).abs().sum()
    assert total_variation < 0.04  # ~4 standard errors for 8 outcomes and 4000 draws
