"""Hostile inputs and faults, through the API and the command line: bad images, URLs served on
127.0.0.1 that stall, trickle, redirect and flood, bad checkpoints, bad arguments, a fuzz of EXIF
bytes, full disks, symlink loops and a crashing parent. Each must end in the right result or a clear
one-line error naming the input: never a traceback, a hang, or a silent failure."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blip2
import blip2.apps.cli
from blip2.apps.caption_job import expand_images
from blip2.apps.cli import main
from blip2.inputs.images import ImageError, ImageWarning, load_image
from checkpoints import full_checkpoint

CLI = [sys.executable, "-m", "blip2.apps.cli"]


@pytest.fixture(scope="module")
def ckpt(ckpt_root):
    path, cfg = full_checkpoint(ckpt_root / "hostile-opt", "opt", seed=41)
    return path, blip2.load(path)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def _one_line_error(err: str, *names: str) -> str:
    """The single `blip2: error:` line of a failed command, which must name each of `names`."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("blip2: error:")]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# Images

def _jpeg_with_exif(fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    exif[0x010F] = "Camera"
    exif[0x0132] = "2024:01:01 00:00:00"
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buf, fmt, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("source, names", [
    (np.zeros((0, 0, 3), np.uint8), "shape=(0, 0, 3)"),
    (np.zeros((0, 5), np.uint8), "shape=(0, 5)"),
    (np.full((4, 4, 3), np.nan, np.float32), "finite"),
    (np.zeros((2, 2, 2, 2, 3), np.uint8), "shape"),
    (b"", "<0 bytes>"),
    (b"GIF89a" + b"\0" * 20, "<26 bytes>"),
    (None, "NoneType"),
    (42, "int"),
    ({"path": "x.png"}, "dict"),
    ("no/such/file.png", "no/such/file.png"),
    ("bad\0name.png", "bad"),
])
def test_bad_image_sources_raise_image_error_naming_them(source, names):
    with pytest.raises(ImageError) as e:
        load_image(source)
    assert names in str(e.value) and "\n" not in str(e.value)


def test_directory_is_named_as_a_directory(tmp_path, ckpt):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="is a directory"):
        ckpt[1].ask(str(tmp_path), "what?")


def test_malformed_exif_does_not_crash_and_its_orientation_still_counts(tmp_path):
    # A wrong-type tag: Pillow's exif_transpose raised struct.error rewriting the metadata, which
    # escaped and ended the whole run. The orientation tag itself is intact: the image is turned.
    data = bytearray(_jpeg_with_exif())
    data[data.find(b"Exif\0\0") + 17] = 0
    path = tmp_path / "bad-exif.jpg"
    path.write_bytes(bytes(data))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (12, 16)


def test_unreadable_exif_is_one_warning_naming_the_image(tmp_path):
    data = bytearray(_jpeg_with_exif())
    tiff = data.find(b"II*\0")
    data[tiff + 35] = 0xFF  # a tag's value offset past the end: Pillow warns "Corrupt EXIF data"
    path = tmp_path / "odd-exif.jpg"
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(path).mode == "RGB"
    assert [w.category for w in caught] == [ImageWarning] and "odd-exif.jpg" in str(caught[0].message)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_fuzzed_exif_bytes_give_an_image_or_an_image_error(fmt):
    data = _jpeg_with_exif(fmt)
    start = max(data.find(b"II*\0"), data.find(b"MM\0*"))  # the EXIF block's TIFF header (78 bytes long)
    assert start >= 0
    outcomes = {"image": 0, "error": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pos in range(start, min(len(data), start + 90)):
            for value in (0x00, 0x01, 0x02, 0x05, 0x07, 0x80, 0xFF):
                mutated = bytearray(data)
                mutated[pos] = value
                try:
                    assert load_image(bytes(mutated)).mode == "RGB"
                    outcomes["image"] += 1
                except ImageError as e:
                    # only the image data may be too broken to use: its metadata is used or dropped
                    assert pos - start >= 70 and "bytes>" in str(e), (pos - start, str(e))
                    outcomes["error"] += 1
    assert outcomes["image"] > 0
    # Pillow's own warnings name no file: each is said again once, as an ImageWarning naming the input
    assert caught and all(w.category is ImageWarning and "bytes>" in str(w.message) for w in caught)


def test_failed_images_are_values_with_errors_return(ckpt, image, tmp_path):
    _, model = ckpt
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    sources = [str(image), str(tmp_path / "broken.png"), str(tmp_path / "missing.png"), str(image)]
    out = model.caption(sources, errors="return", num_beams=1, max_new_tokens=4)
    good = model.caption(str(image), num_beams=1, max_new_tokens=4)
    assert out[0] == out[3] == good
    assert isinstance(out[1], ImageError) and "broken.png" in str(out[1])
    assert isinstance(out[2], ImageError) and "missing.png" in str(out[2])
    # one image, several questions: every answer is the image's error
    answers = model.ask(str(tmp_path / "missing.png"), ["a?", "b?"], errors="return")
    assert all(isinstance(a, ImageError) for a in answers) and len(answers) == 2
    # every image failing: no generation at all, every result an error
    assert all(isinstance(a, ImageError) for a in model.caption(sources[1:3], errors="return"))
    with pytest.raises(ImageError, match="broken.png"):
        model.caption(sources, num_beams=1, max_new_tokens=4)


def test_pairs_after_a_failed_image_are_padded_as_if_it_had_never_been_asked(ckpt, image, tmp_path):
    _, model = ckpt
    long_question = "what is in this picture, and what colour is it, and where was it taken?"
    out = model.ask([str(tmp_path / "missing.png"), str(image)], [long_question, "what?"], errors="return",
                    num_beams=1)
    assert isinstance(out[0], ImageError)
    assert out[1] == model.ask(str(image), "what?", num_beams=1)


# ---------------------------------------------------------------------------------------------------
# URLs from a server on 127.0.0.1 that misbehaves in every way a real one can

class _Hostile(socketserver.BaseRequestHandler):
    png = b""

    def handle(self) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            request += chunk
        path = request.split(b" ")[1].decode()
        send = self.request.sendall
        try:
            if path == "/stall":
                time.sleep(30)
            elif path == "/trickle":  # a byte every 0.2 s of a body it says is 10 kB
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n")
                for _ in range(150):
                    send(b"x")
                    time.sleep(0.2)
            elif path == "/slow-headers":
                send(b"HTTP/1.1 200 OK\r\n")
                for i in range(150):
                    send(f"X-Slow-{i}: y\r\n".encode())
                    time.sleep(0.2)
            elif path == "/flood":  # no length, never ends
                send(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n")
                while True:
                    send(b"\0" * 65536)
            elif path == "/huge":
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
            elif path == "/loop":
                send(b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n")
            elif path == "/redirect":
                send(b"HTTP/1.1 301 Moved\r\nLocation: /img.png\r\nContent-Length: 0\r\n\r\n")
            elif path == "/img.png":
                send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.png) + self.png)
            elif path == "/html":
                body = b"<html>not an image</html>"
                send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            elif path == "/reset":
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            else:
                send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        except OSError:  # the client gave up, as it should
            pass


@pytest.fixture(scope="module")
def hostile_server(image):
    _Hostile.png = image.read_bytes()
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path, says", [
    ("/stall", "timeout"), ("/trickle", "timeout"), ("/slow-headers", "timeout"), ("/flood", "max_bytes"),
    ("/huge", "max_bytes"), ("/loop", "redirect"), ("/html", "not a readable image"), ("/nothing", "404"),
    ("/reset", "/reset"),
])
def test_misbehaving_servers_end_within_the_deadline_with_a_named_error(hostile_server, path, says):
    start = time.monotonic()
    with pytest.raises(ImageError) as e:
        load_image(hostile_server + path, timeout=1.5, max_bytes=1_000_000)
    assert time.monotonic() - start < 3.5, "the deadline is for the whole download"
    message = str(e.value)
    assert path in message and says in message and "\n" not in message


def test_redirect_is_followed(hostile_server, image):
    assert np.array_equal(np.asarray(load_image(hostile_server + "/redirect")), np.asarray(load_image(image)))


def test_cli_captions_the_good_urls_and_reports_the_bad(ckpt, hostile_server, capsys):
    path, model = ckpt
    urls = [hostile_server + "/img.png", hostile_server + "/html", hostile_server + "/nothing"]
    assert main(["caption", *urls, "--model", str(path), "--json", "--beams", "1", "--max-new-tokens", "4"]) == 1
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == urls
    assert rows[0]["caption"] == model.caption(hostile_server + "/img.png", num_beams=1, max_new_tokens=4)
    assert all("error" in r and r["path"] in r["error"] for r in rows[1:])
    assert err.splitlines()[-1] == "blip2: 1 captioned, 2 failed" and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------
# Bad checkpoints: one line naming the file and the field, from the API and the CLI

def _edit_json(name: str, edit):
    def apply(directory: Path) -> None:
        f = directory / name
        raw = json.loads(f.read_text())
        f.write_text(json.dumps(edit(raw)))
    return apply


def _set(section: str | None, key: str, value):
    def edit(raw):
        (raw[section] if section else raw)[key] = value
        return raw
    return edit


def _header_entry_a_string(directory: Path) -> None:
    f = directory / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["qformer.layernorm.weight"] = "oops"
    new = json.dumps(header).encode()
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


BAD_CHECKPOINTS = {
    "config-list": (lambda d: (d / "config.json").write_text("[]"), ["config.json", "JSON object"]),
    "config-null": (lambda d: (d / "config.json").write_text("null"), ["config.json", "JSON object"]),
    "text-config-string": (_edit_json("config.json", _set(None, "text_config", "opt")), ["text_config"]),
    "heads-zero": (_edit_json("config.json", _set("text_config", "num_attention_heads", 0)),
                   ["config.json", "num_attention_heads"]),
    "patch-zero": (_edit_json("config.json", _set("vision_config", "patch_size", 0)), ["patch_size"]),
    "hidden-abc": (_edit_json("config.json", _set("text_config", "hidden_size", "abc")), ["hidden_size"]),
    "queries-x": (_edit_json("config.json", _set(None, "num_query_tokens", "x")), ["num_query_tokens"]),
    "eos-outside": (_edit_json("config.json", _set("text_config", "eos_token_id", 10**6)), ["eos_token_id"]),
    "tokenizer-not-json": (lambda d: (d / "tokenizer.json").write_text("{{{"), ["tokenizer.json"]),
    "header-entry-string": (_header_entry_a_string, ["model.safetensors", "qformer.layernorm.weight"]),
    "processor-size-zero": (_edit_json("processor_config.json",
                                       lambda r: {**r, "image_processor": {**r["image_processor"], "size": 0}}),
                            ["processor_config.json", "size"]),
    "resample-99": (_edit_json("processor_config.json",
                               lambda r: {**r, "image_processor": {**r["image_processor"], "resample": 99}}),
                    ["processor_config.json", "resample"]),
    "std-zero": (_edit_json("processor_config.json",
                            lambda r: {**r, "image_processor": {**r["image_processor"], "image_std": [0, 0, 0]}}),
                 ["processor_config.json", "image_std"]),
    "processor-list": (lambda d: (d / "processor_config.json").write_text("[1]"), ["processor_config.json"]),
    "weights-truncated": (lambda d: os.truncate(d / "model.safetensors", 5000), ["model.safetensors"]),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_naming_file_and_field(ckpt, image, tmp_path, case, capsys):
    src, _ = ckpt
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    damage, names = BAD_CHECKPOINTS[case]
    damage(bad)
    with pytest.raises((blip2.ConfigError, blip2.WeightsError)) as e:
        blip2.load(bad)
    assert all(name in str(e.value) for name in names), str(e.value)
    assert main(["caption", str(image), "--model", str(bad)]) == 1
    _one_line_error(capsys.readouterr().err, *names)


# ---------------------------------------------------------------------------------------------------
# Bad arguments: refused before the model is loaded, naming the setting

@pytest.mark.parametrize("args, names", [
    (["--top-k", "-5"], ["top_k"]),
    (["--repetition-penalty", "nan"], ["repetition_penalty"]),
    (["--temperature", "nan", "--sample"], ["temperature"]),
    (["--seed", str(2**70)], ["seed"]),
    (["--beams", "0"], ["num_beams"]),
    (["--min-new-tokens", "5", "--max-new-tokens", "2"], ["min_new_tokens"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--dtype", "float8"], ["float8"]),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], ["cuda"]),
    (["--device", "tpu"], ["tpu"]),
])
def test_bad_settings_are_one_line_naming_them(ckpt, image, args, names, capsys, monkeypatch):
    path, _ = ckpt
    if args[0] not in ("--dtype", "--device"):
        monkeypatch.setattr(blip2.apps.cli, "load", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["caption", str(image), "--model", str(path), *args]) == 1
    _one_line_error(capsys.readouterr().err, *names)


def test_max_new_tokens_beyond_the_model_names_its_position_limit(ckpt, image, capsys):
    path, model = ckpt
    assert main(["caption", str(image), "--model", str(path), "--max-new-tokens", "1000000000"]) == 1
    line = _one_line_error(capsys.readouterr().err, "max_new_tokens=1000000000", "64 positions")
    assert "-999" not in line


@pytest.mark.parametrize("args", [["--batch-size", "-1"], ["--batch-size", "0"], ["--batch-size", "x"]])
def test_batch_size_must_be_positive(ckpt, image, args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["caption", str(image), "--model", str(ckpt[0]), *args])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_quantize_group_size_zero_is_refused(ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt[0]), str(tmp_path / "q"), "--int4", "--group-size", "0"]) == 1
    _one_line_error(capsys.readouterr().err, "group_size=0")
    assert not (tmp_path / "q").exists()


def test_cuda_without_cuda_is_a_clear_error_in_the_api(ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        blip2.load(ckpt[0], device="cuda")


def test_prompt_that_is_not_utf8_is_named(ckpt, image, capsys):
    path, model = ckpt
    bad = b"a photo \xff of".decode("utf-8", "surrogateescape")  # what argv holds for such bytes
    with pytest.raises(ValueError, match="not valid UTF-8"):
        model.caption(str(image), bad)
    assert main(["caption", str(image), "--model", str(path), "--prompt", bad]) == 1
    _one_line_error(capsys.readouterr().err, "not valid UTF-8")
    assert main(["ask", str(image), bad, "--model", str(path)]) == 1
    _one_line_error(capsys.readouterr().err, "not valid UTF-8")


@pytest.mark.parametrize("call, says", [
    (lambda m, img: m.chat(img, "hello"), "messages must be a list"),
    (lambda m, img: m.chat([img, img], [{"role": "user", "content": "hi"}]), "one image, got 2"),
    (lambda m, img: m.chat(img, [{"role": "user", "content": None}]), "messages[0].content"),
    (lambda m, img: m.chat(img, [{"role": "user", "content": 5}]), "messages[0].content"),
    (lambda m, img: m.chat(img, ["hi"]), "messages[0] must be a dict"),
    (lambda m, img: m.caption(img, num_beams="3"), "num_beams"),
    (lambda m, img: m.caption(img, max_new_tokens=2.5), "max_new_tokens"),
    (lambda m, img: m.ask(img, None), "questions must be a string"),
    (lambda m, img: m.ask(img, [1, 2]), "questions must be a string"),
    (lambda m, img: m.caption(img, prompt=None), "prompt must be a string"),
    (lambda m, img: m.caption(img, errors="ignore"), "errors must be"),
])
def test_api_argument_errors_name_the_argument(ckpt, image, call, says):
    with pytest.raises(ValueError) as e:
        call(ckpt[1], load_image(image))
    assert says in str(e.value)


def test_a_bad_chat_line_is_an_error_line_and_the_session_goes_on(ckpt, image):
    path, model = ckpt
    stdin = b"hello\n\xff\xfe what?\n/image nowhere.png\nhello\n"
    run = subprocess.run([*CLI, "chat", str(image), "--model", str(path), "--max-new-tokens", "3"], input=stdin,
                         capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    err = run.stderr.decode()
    assert run.returncode == 0 and "Traceback" not in err, err
    reply = model.chat(str(image), [{"role": "user", "content": "hello"}], max_new_tokens=3)
    second = model.chat(str(image), [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply},
                                     {"role": "user", "content": "hello"}], max_new_tokens=3)
    assert run.stdout.decode().splitlines() == [reply, second]
    assert "not valid" in err and "nowhere.png" in err


# ---------------------------------------------------------------------------------------------------
# Output: names cannot forge lines, a full disk leaves whole records, files are found once

def test_names_with_newlines_and_tabs_cannot_forge_lines_or_columns(ckpt, image, tmp_path, capsys):
    path, model = ckpt
    evil = [tmp_path / "two\nlines.png", tmp_path / "a\tcolumn.png", tmp_path / "back\\slash.png"]
    for f in evil:
        shutil.copy(image, f)
    assert main(["caption", *map(str, evil), "--model", str(path), "--beams", "1", "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.count("\t") == 1 for line in lines)
    assert lines[0].startswith(str(tmp_path / "two\\nlines.png") + "\t")
    assert lines[1].startswith(str(tmp_path / "a\\tcolumn.png") + "\t")
    assert lines[2].startswith(str(tmp_path / "back\\\\slash.png") + "\t")


def test_full_disk_leaves_only_whole_records_and_says_how_many(ckpt, image, tmp_path):
    import resource

    path, _ = ckpt
    files = [str(shutil.copy(image, tmp_path / f"{'x' * 60}{i}.png")) for i in range(8)]
    out = tmp_path / "out.jsonl"

    def small_disk() -> None:  # a file-size limit stands in for a full disk (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (700, 700))

    with open(out, "wb") as stdout:
        run = subprocess.run([*CLI, "caption", *files, "--model", str(path), "--json", "--beams", "1",
                              "--max-new-tokens", "3", "--batch-size", "3"], stdout=stdout,
                             stderr=subprocess.PIPE, preexec_fn=small_disk, timeout=120)
    err = run.stderr.decode()
    assert run.returncode == 1
    line = _one_line_error(err, "cannot write the output after")
    written = out.read_bytes()
    assert written.endswith(b"\n")
    records = [json.loads(r) for r in written.splitlines()]
    assert 0 < len(records) < 8 and f"after {len(records)} records" in line


def test_recursive_glob_does_not_follow_directory_links(ckpt, image, tmp_path, capsys):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    shutil.copy(image, root / "sub" / "a.png")
    os.symlink(root, root / "sub" / "up")  # a link to a parent: an endless walk if followed
    os.symlink(root, root / "again")
    os.symlink(root / "sub" / "a.png", root / "link.png")  # the same file under another name
    start = time.monotonic()
    found, errors = expand_images([str(root / "**" / "*.png"), str(root / "sub")])
    assert time.monotonic() - start < 5
    assert found == [str(root / "link.png")] and not errors


# ---------------------------------------------------------------------------------------------------
# Memory and processes

def _peak_rss_mb(args: list[str]) -> float:
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                                check=True, timeout=300).stdout)


def test_caption_memory_does_not_grow_with_batch_size_times_resolution(ckpt, tmp_path):
    # 8 photos of 4000 x 4000 (48 MB each decoded): a batch used to hold them all decoded at once.
    path, _ = ckpt
    y, x = np.mgrid[0:4000, 0:4000]
    big = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    files = []
    for i in range(8):
        files.append(str(tmp_path / f"big{i}.jpg"))
        big.save(files[-1], quality=70)
    del big, x, y
    run = [*CLI, "caption", *files, "--model", str(path), "--beams", "1", "--max-new-tokens", "2"]
    one = _peak_rss_mb([*run, "--batch-size", "1"])
    eight = _peak_rss_mb([*run, "--batch-size", "8"])
    print(f"peak RSS: batch 1 {one:.0f} MB, batch 8 {eight:.0f} MB")
    assert eight - one < 150, (one, eight)


_ORPHANS = """
import os, sys
from blip2.inputs.image_stream import ImageStream
from blip2.inputs.images import ImageProcessor
stream = ImageStream(ImageProcessor(size=8), workers=2)
rows = list(stream(sys.argv[1:], processes=True))
workers = [p.pid for p in stream._processes._processes.values()]
print(" ".join(map(str, workers)), flush=True)
os.kill(os.getpid(), 9)
"""


def test_killed_parent_leaves_no_image_workers(image):
    import psutil

    files = [str(image)] * 4
    run = subprocess.run([sys.executable, "-c", _ORPHANS, *files], capture_output=True, text=True, timeout=60)
    workers = [int(p) for p in run.stdout.split()]
    assert workers and run.returncode == -9, run.stderr
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers):
        assert time.monotonic() < deadline, "image workers outlived their parent"
        time.sleep(0.1)


def test_summary_counts_every_failure(ckpt, image, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"nope")
    args = ["caption", str(image), str(tmp_path / "bad.png"), str(tmp_path / "gone.png"), str(tmp_path / "*.tif"),
            "--model", str(ckpt[0]), "--beams", "1", "--max-new-tokens", "2"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == "blip2: 1 captioned, 3 failed"
    assert math.isfinite(len(err))
