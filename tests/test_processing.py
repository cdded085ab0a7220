"""Image preprocessing and prompt tokenisation, checked against transformers (the reference).

Run: cd /work/main && python -m pytest tests/test_processing.py -q
"""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from text_fixtures import make_opt_tokenizer, make_processor_files, make_t5_tokenizer

import blip2.inputs.image_stream as image_stream
from blip2.inputs.image_stream import ImageStream
from blip2.inputs.images import CLIP_MEAN, CLIP_STD, ImageError, ImageProcessor, load_image
from blip2.inputs.tokenizer import PromptTokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, Blip2Processor  # noqa: E402  (test-only oracle)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # noqa: E402

N_QUERY = 4  # small stand-in for the checkpoints' 32 query tokens
PROMPTS = [
    "a photo of",
    "Question: what is in the image? Answer:",
    "",
    "It's  a cat!\n  The end ",
    "Question: how many dogs are there? Short answer:",
]


# ----------------------------------------------------------------------------------------------
# images

def _rng_image(h: int, w: int, channels: int = 3, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze())


def _mode_images() -> dict[str, Image.Image]:
    rgb = _rng_image(37, 53)
    rgba = _rng_image(40, 30, 4, seed=1)
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 3
    return {
        "RGB": rgb,
        "RGBA": rgba,
        "L": rgb.convert("L"),
        "LA": rgba.convert("LA"),
        "P": rgb.convert("P"),
        "P-transparency": palette_transparent,
        "CMYK": rgb.convert("CMYK"),
        "tiny-1x2": _rng_image(1, 2, seed=2),
        "wide-600x900": _rng_image(600, 900, seed=3),
        "exact-size-224": _rng_image(224, 224, seed=4),
    }


def _reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    ref = BlipImageProcessorPil(size={"height": size, "width": size})
    return ref(image, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("size", [224, 364, 56])
@pytest.mark.parametrize("mode", list(_mode_images()))
def test_pixels_equal_reference_pil_processor_bit_for_bit(mode: str, size: int) -> None:
    image = _mode_images()[mode]
    ours = _pixels(ImageProcessor(size=size), image)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, size, size)
    assert torch.equal(ours, _reference_pixels(image, size))


def test_batch_of_mixed_images_equals_reference_batch() -> None:
    images = list(_mode_images().values())
    ref = BlipImageProcessorPil(size={"height": 224, "width": 224})(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(_pixels(ImageProcessor(), images), ref)


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    # Deliberate difference: the reference's convert("RGB") clips 16-bit values at 255.
    levels = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint16)
    image16 = Image.fromarray(levels * 257)
    assert image16.mode == "I;16"
    as8bit = Image.fromarray(levels.astype(np.uint8))
    expected = _reference_pixels(as8bit, 224)
    assert torch.equal(_pixels(ImageProcessor(), image16), expected)
    assert torch.equal(_pixels(ImageProcessor(), Image.fromarray((levels * 257).astype(np.int32))), expected)  # mode "I"
    assert not torch.equal(_reference_pixels(image16, 224), expected)


def test_float_mode_image_in_unit_range_is_scaled() -> None:
    levels = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    image_f = Image.fromarray(levels.astype(np.float32) / 255.0)
    assert image_f.mode == "F"
    assert np.array_equal(np.asarray(load_image(image_f))[..., 0], levels)


def test_all_input_kinds_give_the_same_tensor_as_the_path(tmp_path: Path) -> None:
    image = _rng_image(45, 61, seed=5)
    path = tmp_path / "img.png"
    image.save(path)
    array = np.asarray(image)
    expected = _pixels(ImageProcessor(), str(path))
    assert torch.equal(expected, _reference_pixels(Image.open(path), 224))
    for source in (
        path,
        path.read_bytes(),
        Image.open(path),
        array,
        array.astype(np.float64) / 255.0,
        torch.from_numpy(array.copy()).permute(2, 0, 1),  # channels-first uint8
        torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0,
    ):
        assert torch.equal(_pixels(ImageProcessor(), source), expected), type(source)
    gray = np.asarray(image.convert("L"))
    assert torch.equal(_pixels(ImageProcessor(), gray), _reference_pixels(image.convert("L"), 224))
    assert torch.equal(_pixels(ImageProcessor(), np.stack([array, array])), torch.cat([expected, expected]))


@pytest.mark.skipif(not image_stream._FORK, reason="worker processes are forked, which this platform cannot")
def _pixels(processor: ImageProcessor, images) -> torch.Tensor:
    """The model's input for one image or a batch (a list, or a 4-D array), through the image stream."""
    batch = isinstance(images, list) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)
    with ImageStream(processor) as stream:
        return processor.normalize(torch.stack(list(stream(list(images) if batch else [images]))))


def test_images_prepared_in_worker_processes_equal_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a process feeding a GPU does with a large batch of files: the same rows, in order; a bad
    # file's error names it, and the pool still serves the next batch.
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        _rng_image(40 + i, 50, seed=i).save(paths[-1])
    sources = [str(p) for p in paths[:3]] + [paths[3], paths[4].read_bytes()]
    stream = ImageStream(ImageProcessor(size=32), workers=2)
    threads = list(stream(sources))
    stream.close()
    in_processes = list(stream(sources, processes=True))
    assert stream._threads is None  # the processes did the work
    assert all(torch.equal(a, b) for a, b in zip(in_processes, threads, strict=True))
    # The workers' file: in /dev/shm only when it has room, and gone once the batch is read.
    assert image_stream._memory_dir(1 << 60) is None
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    monkeypatch.setattr(image_stream, "_memory_dir", lambda nbytes: str(meeting))
    assert all(torch.equal(a, b) for a, b in zip(stream(sources, processes=True), threads, strict=True))
    assert not list(meeting.iterdir())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png"):
        list(stream(sources[:2] + [tmp_path / "bad.png"], processes=True))
    again = list(stream(sources, processes=True))
    assert all(torch.equal(a, b) for a, b in zip(again, threads, strict=True))
    stream.close()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = _rng_image(20, 40, seed=6)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (20, 40)  # displayed as portrait
    assert np.array_equal(np.asarray(loaded), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))
    assert np.array_equal(np.asarray(loaded), np.asarray(ImageOps.exif_transpose(Image.open(path))))
    # bytes and PIL inputs carry the same EXIF and are turned the same way
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(loaded))
    assert np.array_equal(np.asarray(load_image(Image.open(path))), np.asarray(loaded))


@pytest.mark.parametrize(
    "config_file, nested",
    [("processor_config.json", True), ("preprocessor_config.json", False)],
)
def test_image_processor_from_dir_reads_hf_configs(tmp_path: Path, config_file: str, nested: bool) -> None:
    ref = BlipImageProcessorPil(size={"height": 364, "width": 364}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2] * 3)
    if nested:
        Blip2Processor(ref, AutoTokenizer.from_pretrained(_opt_dir(tmp_path)), num_query_tokens=4).save_pretrained(
            tmp_path
        )
    else:
        ref.save_pretrained(tmp_path)
    assert (tmp_path / config_file).is_file()
    ours = ImageProcessor.from_dir(tmp_path)
    assert (ours.size, ours.mean, ours.std, ours.resample) == (364, (0.5, 0.4, 0.3), (0.2,) * 3, 3)
    image = _rng_image(50, 70, seed=7)
    assert torch.equal(_pixels(ours, image), ref(image, return_tensors="pt")["pixel_values"])


def _opt_dir(tmp_path: Path) -> Path:
    make_opt_tokenizer(tmp_path / "tok", with_image_token=False)
    return tmp_path / "tok"


def test_image_processor_defaults_without_config(tmp_path: Path) -> None:
    ours = ImageProcessor.from_dir(tmp_path)
    assert (ours.size, ours.mean, ours.std) == (224, CLIP_MEAN, CLIP_STD)


# ----------------------------------------------------------------------------------------------
# image errors

def _assert_image_error(source: object, needle: str, **kwargs: object) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert isinstance(info.value, ValueError)
    return message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    _assert_image_error(tmp_path / "nope.jpg", "nope.jpg")
    _assert_image_error(str(tmp_path), str(tmp_path))  # a directory is not an image file


def test_non_image_input_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("not an image at all")
    _assert_image_error(path, "notes.jpg")
    _assert_image_error(b"hello world", "<11 bytes>")
    _assert_image_error(42, "int")
    _assert_image_error(np.full((4, 4), 300.0), "ndarray")  # floats beyond [0, 1] and [0, 255]
    _assert_image_error(np.zeros((5, 5, 2), np.uint8), "ndarray")  # two channels


def test_truncated_jpeg_is_rejected(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    _rng_image(64, 64, seed=8).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _assert_image_error(path, "cut.jpg")


def test_decompression_bomb_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn_zone, error_zone = tmp_path / "warn.png", tmp_path / "error.png"
    _rng_image(40, 40).save(warn_zone)  # 1600 px: PIL only warns
    _rng_image(100, 100).save(error_zone)  # 10000 px: PIL raises
    _assert_image_error(warn_zone, "warn.png")
    _assert_image_error(error_zone, "error.png")
    _assert_image_error(error_zone.read_bytes(), "bytes")


# ----------------------------------------------------------------------------------------------
# URLs, served on loopback only

class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/stream.png":  # no Content-Length: only the read cap can stop it
            body = (Path(self.directory) / "img.png").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif self.path == "/slow.png":
            time.sleep(1.0)
            self.send_error(500)
        else:
            super().do_GET()


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("www")
    _rng_image(30, 40, seed=9).save(root / "img.png")
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_url_loads_like_the_file(image_server) -> None:
    base, root = image_server
    expected = np.asarray(load_image(root / "img.png"))
    assert np.array_equal(np.asarray(load_image(f"{base}/img.png")), expected)
    assert np.array_equal(np.asarray(load_image(f"{base}/stream.png")), expected)


def test_url_failures_and_size_limit(image_server) -> None:
    base, root = image_server
    size = (root / "img.png").stat().st_size
    _assert_image_error(f"{base}/missing.png", "missing.png")
    assert "max_bytes" in _assert_image_error(f"{base}/img.png", "img.png", max_bytes=size - 1)
    assert "max_bytes" in _assert_image_error(f"{base}/stream.png", "stream.png", max_bytes=size - 1)
    _assert_image_error(f"{base}/slow.png", "slow.png", timeout=0.2)
    with socket_closed_port() as port:
        _assert_image_error(f"http://127.0.0.1:{port}/x.png", "x.png")


class socket_closed_port:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# prompts

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Processor files for OPT and T5, with the image token (new hub layout) and without (legacy)."""
    root = tmp_path_factory.mktemp("processors")
    dirs = {}
    for kind in ("opt", "t5"):
        for with_image in (True, False):
            name = f"{kind}-{'image' if with_image else 'legacy'}"
            make_processor_files(root / name, kind, 224, N_QUERY, with_image)
            dirs[name] = root / name
    return dirs


def _reference(directory: Path, kind: str) -> Blip2Processor:
    processor = Blip2Processor.from_pretrained(directory)
    if kind == "opt":
        processor.tokenizer.padding_side = "left"  # what batched OPT generation needs; we always do it
    return processor


def _reference_ids(directory: Path, kind: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    image = Image.new("RGB", (8, 8))
    out = _reference(directory, kind)(images=[image] * len(prompts), text=prompts, padding=True, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("name", ["opt-image", "opt-legacy", "t5-image", "t5-legacy"])
@pytest.mark.parametrize(
    "prompts", [PROMPTS[:1], PROMPTS, [""], ["", "a photo of"]], ids=["single", "batch", "empty", "empty-in-batch"]
)
def test_ids_and_mask_equal_reference_processor(checkpoints: dict[str, Path], name: str, prompts: list[str]) -> None:
    kind = name.split("-")[0]
    ours = PromptTokenizer.from_dir(checkpoints[name], kind)
    ids, mask = ours(prompts)
    ref_ids, ref_mask = _reference_ids(checkpoints[name], kind, prompts)
    assert ids.dtype == mask.dtype == torch.long
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


def test_layout_of_opt_batch_is_images_then_padding_then_bos(checkpoints: dict[str, Path]) -> None:
    ours = PromptTokenizer.from_dir(checkpoints["opt-image"], "opt")
    image_id = ours.image_token_id
    assert image_id == AutoTokenizer.from_pretrained(checkpoints["opt-image"]).convert_tokens_to_ids("<image>")
    ids, mask = ours(["a photo of", ""])
    short = ids[1].tolist()
    assert short[:N_QUERY] == [image_id] * N_QUERY and short[-1] == 2  # only BOS for the empty prompt
    assert set(short[N_QUERY:-1]) == {1} and mask[1].tolist() == [1] * N_QUERY + [0] * (len(short) - N_QUERY - 1) + [1]
    assert ids[0, N_QUERY] == 2 and mask[0].all()
    legacy = PromptTokenizer.from_dir(checkpoints["opt-legacy"], "opt")
    assert legacy.num_query_tokens == 0 and legacy([""]).input_ids.tolist() == [[2]]


def test_layout_of_t5_batch_is_images_then_text_eos_then_padding(checkpoints: dict[str, Path]) -> None:
    ours = PromptTokenizer.from_dir(checkpoints["t5-image"], "t5")
    ids, mask = ours(["a photo of", ""])
    assert ids[1].tolist()[: N_QUERY + 1] == [ours.image_token_id] * N_QUERY + [1]
    assert set(ids[1, N_QUERY + 1 :].tolist()) == {0} and mask[1].sum() == N_QUERY + 1
    assert ids[0, -1] == 1 and mask[0].all()


def test_opt_pads_left_even_where_the_reference_defaults_to_right(checkpoints: dict[str, Path]) -> None:
    reference = Blip2Processor.from_pretrained(checkpoints["opt-image"])
    assert reference.tokenizer.padding_side == "right"  # the hub configs leave it unset, as ours do
    ids, _ = PromptTokenizer.from_dir(checkpoints["opt-image"], "opt")(["a", "a photo of"])
    assert ids[0, N_QUERY] == 1  # padding right after the image slots


@pytest.mark.parametrize(
    "variant",
    [dict(legacy_files=True), dict(add_bos_token_in_config=None), dict(add_bos_token_in_config=False)],
    ids=["vocab-merges", "no-flag", "flag-false-ignored-with-tokenizer-json"],
)
def test_opt_tokenizer_file_variants_match_reference(tmp_path: Path, variant: dict) -> None:
    info = make_opt_tokenizer(tmp_path, **variant)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    ours = PromptTokenizer.from_dir(tmp_path, "opt")
    for prompt in PROMPTS + ["a <image> b </s> c <pad>", "Ċ\n\n  spaced   out  "]:
        assert ours.encode(prompt) == ref(prompt)["input_ids"], prompt
    assert ours.tokenizer.get_vocab_size() == len(ref) == info.vocab_size
    assert ours.tokenizer.token_to_id("<image>") == info.image_token_id


def test_vocab_merges_without_bos_flag_adds_no_bos(tmp_path: Path) -> None:
    make_opt_tokenizer(tmp_path, legacy_files=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = PromptTokenizer.from_dir(tmp_path, "opt")
    assert ours.encode("a photo") == AutoTokenizer.from_pretrained(tmp_path)("a photo")["input_ids"]
    assert ours.encode("a photo")[0] != 2


def test_processor_config_without_image_token_appends_one_like_reference(tmp_path: Path) -> None:
    info = make_opt_tokenizer(tmp_path, with_image_token=False)
    (tmp_path / "processor_config.json").write_text(json.dumps({"num_query_tokens": N_QUERY}))
    BlipImageProcessorPil().save_pretrained(tmp_path)
    ours = PromptTokenizer.from_dir(tmp_path, "opt")
    assert ours.image_token_id == info.vocab_size
    ids, mask = ours(PROMPTS)
    ref_ids, ref_mask = _reference_ids(tmp_path, "opt", PROMPTS)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


def test_explicit_overrides_from_model_config(checkpoints: dict[str, Path]) -> None:
    ours = PromptTokenizer.from_dir(checkpoints["opt-legacy"], "opt", image_token_id=7, num_query_tokens=3)
    assert ours(["x"]).input_ids[0, :3].tolist() == [7, 7, 7]


@pytest.mark.parametrize("name", ["opt-image", "t5-image"])
def test_decode_matches_reference(checkpoints: dict[str, Path], name: str) -> None:
    kind = name.split("-")[0]
    ours = PromptTokenizer.from_dir(checkpoints[name], kind)
    ref = _reference(checkpoints[name], kind)
    ids, _ = ours(PROMPTS)
    assert ours.batch_decode(ids) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(ids[1], skip_special_tokens=False) == ref.decode(ids[1], skip_special_tokens=False)
    assert ours.decode(ids[1].tolist()) == ref.decode(ids[1], skip_special_tokens=True)


def test_too_long_prompt_is_rejected_naming_it(checkpoints: dict[str, Path]) -> None:
    ours = PromptTokenizer.from_dir(checkpoints["opt-image"], "opt")
    prompt = "a photo of a woman sitting on the beach with her dog " * 4
    n = ours.count_tokens(prompt)
    assert ours(prompt, max_length=n).input_ids.shape == (1, N_QUERY + n)
    with pytest.raises(ValueError) as info:
        ours(["short", prompt], max_length=n - 1)
    message = str(info.value)
    assert prompt[:40] in message and prompt not in message  # named, cut to 60 characters
    assert str(n) in message and str(n - 1) in message


def test_prompt_with_image_token_is_rejected(checkpoints: dict[str, Path]) -> None:
    ours = PromptTokenizer.from_dir(checkpoints["opt-image"], "opt")
    with pytest.raises(ValueError, match="image token"):
        ours("look: <image>")


def test_t5_fixture_ids_look_like_flan_t5(tmp_path: Path) -> None:
    info = make_t5_tokenizer(tmp_path)
    assert (info.pad_id, info.eos_id, info.bos_id) == (0, 1, None)
    assert info.image_token_id == info.vocab_size - 1 and info.vocab_size < 600


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_decode_clean_up_setting_follows_reference(tmp_path: Path, kind: str) -> None:
    # transformers 5 honours clean_up_tokenization_spaces only for non-BPE tokenizers (T5, not OPT).
    (make_opt_tokenizer if kind == "opt" else make_t5_tokenizer)(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = PromptTokenizer.from_dir(tmp_path, kind)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    ids = ours.encode("It 's a cat . is it ? yes , it is !")
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_image_processor_rejects_settings_it_does_not_implement(tmp_path: Path) -> None:
    BlipImageProcessorPil(do_normalize=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do_normalize"):
        ImageProcessor.from_dir(tmp_path)


def test_batch_is_decoded_in_parallel_in_order_and_names_a_bad_image(tmp_path: Path) -> None:
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        _rng_image(40 + i, 50, seed=i).save(paths[-1])
    processor = ImageProcessor(size=32)
    batch = _pixels(processor, paths)
    assert torch.equal(batch, torch.stack([processor.preprocess(load_image(p)) for p in paths]))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png"):
        _pixels(processor, paths[:5] + [tmp_path / "bad.png"] + paths[5:])
