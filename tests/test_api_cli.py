"""The user-facing API and CLI on tiny checkpoints with real tokenizer and processor files."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import blip2
from blip2.inputs.prompts import render_chat
from blip2.apps.cli import main
from blip2.quant.packed import kernel_for
from checkpoints import full_checkpoint, legacy_copy, reference

PROMPTS = ["a photo of", "Question: what is on the left? Answer:", ""]


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30 + 7 * i, 41, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module", params=["opt", "t5"])
def ckpt(request, ckpt_root):
    path, cfg = full_checkpoint(ckpt_root / f"api-{request.param}", request.param, seed=31)
    return request.param, path, cfg, blip2.load(path)


def _reference_texts(path, lm, images, prompts, **settings):
    from transformers import Blip2Processor

    processor = Blip2Processor.from_pretrained(path)
    processor.tokenizer.padding_side = "left" if lm == "opt" else "right"
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = reference(path).generate(**inputs, **settings)
    new = out[:, inputs["input_ids"].shape[1]:] if lm == "opt" else out
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


@pytest.mark.parametrize("settings", [dict(num_beams=1), dict(num_beams=4, length_penalty=-1.0)])
def test_generate_text_equals_reference_pipeline(ckpt, settings):
    """Files in, text out: our preprocessing, tokenisation, generation and decoding against the reference's."""
    lm, path, cfg, model = ckpt
    images = _images(3)
    results = model.generate(images, PROMPTS, max_new_tokens=12, **settings)
    eos = cfg["text_config"]["eos_token_id"]
    expected = _reference_texts(path, lm, images, PROMPTS, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                pad_token_id=cfg["text_config"]["pad_token_id"], **settings)
    assert [r.text for r in results] == expected
    assert all(isinstance(r.score, float) and r.token_ids for r in results)


def test_legacy_copy_gives_same_captions(ckpt, ckpt_root):
    lm, path, cfg, model = ckpt
    legacy = legacy_copy(path, ckpt_root / f"api-legacy-{lm}", lm)
    assert not (legacy / "processor_config.json").exists()
    assert "<image>" not in (legacy / "tokenizer.json").read_text()
    old = blip2.load(legacy)
    assert old.config.image_token_index is None
    images = _images(2)
    assert old.caption(images, num_beams=3, max_new_tokens=8) == model.caption(images, num_beams=3, max_new_tokens=8)


def test_caption_ask_chat_shapes_and_defaults(ckpt):
    _, _, _, model = ckpt
    img = _images(1)[0]
    assert isinstance(model.caption(img), str)
    assert isinstance(model.caption([img, img]), list) and len(model.caption([img, img])) == 2
    assert model.caption(img, num_beams=1, max_new_tokens=5) == model.generate(img, "", max_new_tokens=5)[0].text
    answers = model.ask(img, ["what is it?", "where?"])
    assert isinstance(answers, list) and len(answers) == 2
    prompt = "Question: what is it? " + ("Answer:" if model.kind == "opt" else "Short answer:")
    assert model.ask(img, "what is it?") == model.generate(img, prompt, num_beams=5, max_new_tokens=10,
                                                          length_penalty=-1.0)[0].text
    reply = model.chat(img, [{"role": "user", "content": "hi"}])
    assert reply == model.generate(img, "Question: hi Answer:", num_beams=5, max_new_tokens=30)[0].text
    many = model.generate(img, "a", num_beams=3, num_return_sequences=2, max_new_tokens=4)
    assert len(many) == 1 and len(many[0]) == 2 and many[0][0].score >= many[0][1].score


def _count_encodes(model, monkeypatch) -> list[int]:
    """Empty the model's query cache and record the batch size of every encode_images call from now on."""
    model._queries.clear()
    calls = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda px: calls.append(len(px)) or original(px))
    return calls


def test_same_image_is_encoded_once(ckpt, monkeypatch):
    _, _, _, model = ckpt
    calls = _count_encodes(model, monkeypatch)
    img = _images(1)[0]
    model.ask(img, ["one?", "two?", "three?"])
    model.chat(img, [{"role": "user", "content": "hi"}])
    assert calls == [1]


def test_new_images_are_encoded_together_in_batches(ckpt, monkeypatch):
    _, _, _, model = ckpt
    original = model.encode_images
    calls = _count_encodes(model, monkeypatch)
    monkeypatch.setattr(blip2.engine.pipeline, "ENCODE_BATCH", 2)
    images = _images(3)
    px = model.pixel_values([images[0], images[1], images[0], images[2]])
    queries = model.image_queries(px)
    assert calls == [2, 1]  # three distinct images, two at a time
    assert torch.equal(queries[0], queries[2])
    alone = original(px[3:])
    assert torch.allclose(queries[3], alone[0], atol=1e-5)


def test_streamed_resized_images_give_the_normalised_queries(ckpt):
    """The generation path streams uint8 resized images and normalises them where the model runs:
    the same pixels, hence the same queries, as the normalised batch."""
    _, _, _, model = ckpt
    images = _images(3)
    rows = list(model.images(images))
    assert all(r.dtype == torch.uint8 for r in rows)
    px = model.pixel_values(images)
    assert torch.equal(model.image_processor.normalize(torch.stack(rows)), px)
    model._queries.clear()
    streamed = model.image_queries(iter(rows))
    model._queries.clear()
    assert torch.equal(streamed, model.image_queries(px))


def test_render_chat_alternates_question_and_answer():
    messages = [{"role": "user", "content": "what is this?"}, {"role": "assistant", "content": "a dog"},
                {"role": "user", "content": [{"type": "text", "text": "what color?"}]}]
    assert render_chat(messages) == "Question: what is this? Answer: a dog Question: what color? Answer:"
    with pytest.raises(ValueError, match="last chat message"):
        render_chat(messages[:2])
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "x"}])


def test_bad_inputs_name_the_problem(ckpt, tmp_path):
    _, _, _, model = ckpt
    with pytest.raises(ValueError, match="tokens long"):
        model.caption(_images(1)[0], "word " * 3000)
    with pytest.raises(blip2.ImageError, match="not found"):
        model.caption(str(tmp_path / "missing.jpg"))
    with pytest.raises(TypeError, match="unknown generation setting"):
        model.caption(_images(1)[0], beams=3)
    with pytest.raises(ValueError, match="2 images and 3 prompts"):
        model.generate(_images(2), ["a", "b", "c"])


def _write_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(_images(n)):
        img.save(folder / f"img{i}.png")
    return folder


def test_cli_caption_files_dirs_globs_and_failures(ckpt, tmp_path, capsys):
    _, path, _, model = ckpt
    folder = _write_images(tmp_path / "pics", 3)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    args = ["caption", str(folder), str(tmp_path / "pics" / "img0.png"), str(tmp_path / "*.jpg"),
            str(tmp_path / "empty"), "--model", str(path), "--json", "--beams", "2", "--max-new-tokens", "6",
            "--batch-size", "2"]
    assert main(args) == 1  # some inputs failed, the rest were captioned
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    # each file once (img0.png is named twice), the unreadable one as a record with its error
    assert [r["path"] for r in rows] == [str(folder / f"img{i}.png") for i in range(3)] + [str(tmp_path / "broken.jpg")]
    assert rows[0]["caption"] == model.caption(Image.open(folder / "img0.png"), num_beams=2, max_new_tokens=6)
    assert all(r["seconds"] >= 0 for r in rows[:3])
    assert "broken.jpg" in rows[3]["error"] and "caption" not in rows[3]
    assert "empty: directory has no image files" in err
    assert err.splitlines()[-1] == "blip2: 3 captioned, 2 failed"


def test_cli_caption_plain_text_exit_zero(ckpt, tmp_path, capsys):
    _, path, _, model = ckpt
    folder = _write_images(tmp_path / "one", 1)
    assert main(["caption", str(folder / "img0.png"), "--model", str(path), "--max-new-tokens", "5"]) == 0
    out, _ = capsys.readouterr()
    assert out == model.caption(Image.open(folder / "img0.png"), max_new_tokens=5) + "\n"


def test_cli_ask_and_chat(ckpt, tmp_path, capsys, monkeypatch):
    _, path, _, model = ckpt
    folder = _write_images(tmp_path / "q", 2)
    img0, img1 = str(folder / "img0.png"), str(folder / "img1.png")
    assert main(["ask", img0, "what is it?", "--model", str(path)]) == 0
    assert capsys.readouterr().out == model.ask(Image.open(img0), "what is it?") + "\n"
    script = f"hello\nand then?\n/reset\nhello\n/image {img1}\nhello\n/image nope.png\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", img0, "--model", str(path), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    a = model.chat(Image.open(img0), [{"role": "user", "content": "hello"}], max_new_tokens=4)
    b = model.chat(Image.open(img0), [{"role": "user", "content": "hello"}, {"role": "assistant", "content": a},
                                      {"role": "user", "content": "and then?"}], max_new_tokens=4)
    c = model.chat(Image.open(img1), [{"role": "user", "content": "hello"}], max_new_tokens=4)
    assert out.splitlines() == [a, b, a, c]
    assert "nope.png" in err


def test_cli_info_and_missing_model(ckpt, capsys, tmp_path):
    _, path, _, _ = ckpt
    assert main(["info", "--model", str(path)]) == 0
    float32 = capsys.readouterr().out
    assert "parameters" in float32
    # bfloat16 on a CPU packs weights in oneDNN's layout, which have no data pointer (this crashed).
    assert main(["info", "--model", str(path), "--dtype", "bfloat16"]) == 0
    bfloat16 = capsys.readouterr().out
    assert "GiB in memory" in bfloat16
    # which kernels the layers run on, as chosen at load for this CPU
    products = bfloat16.split("products: ")[1]
    assert "language model: " in products and "vision and Q-Former: " in products
    attention = bfloat16.split("attention: ")[1]
    assert "image encoder: " in attention and "decoding steps: " in attention
    if kernel_for(torch.bfloat16) == "bf16":  # the pair tiles: products and the image attention
        assert "language model: blip2 AVX-512 bfloat16" in products
        assert "image encoder: blip2 AVX-512" in attention
    assert main(["info", "--model", str(tmp_path / "nope")]) == 1
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_hub_id_resolves_from_cache_offline(ckpt, tmp_path, monkeypatch):
    _, path, _, _ = ckpt
    repo = tmp_path / "hub" / "models--Salesforce--blip2-tiny"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(path, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = blip2.load("Salesforce/blip2-tiny")
    assert model.path == snapshot
    with pytest.raises(OSError, match="pass a local checkpoint directory"):
        blip2.load("Salesforce/not-cached")
