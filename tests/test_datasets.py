"""Dataset jobs (`blip2 caption ... --output`): every format, bad images as records, resume after
SIGKILL with exactly the records of an uninterrupted run, shards, sidecars, inputs, Ray."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blip2
from blip2.apps.cli import main
from checkpoints import full_checkpoint

SETTINGS = ["--beams", "1", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def ckpt(ckpt_root):
    path, _ = full_checkpoint(ckpt_root / "datasets-opt", "opt", seed=71)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    with blip2.load(ckpt) as m:
        yield m


def write_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = root / ("sub" if i % 4 == 0 else "") / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24 + i % 9, 30 + i % 7, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def bomb() -> bytes:
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", 100000, 100000)  # IHDR claims 10^10 pixels
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """11 good images (some in a subdirectory) and 4 bad ones."""
    root = tmp_path_factory.mktemp("collection")
    good = write_images(root, 11)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
    (root / "truncated.png").write_bytes(good[1].read_bytes()[:70])
    (root / "notes.png").write_text("a text file with an image's name")
    (root / "bomb.png").write_bytes(bomb())
    return root, good


def read_records(output: Path) -> list[dict]:
    """The records of any output format, as JSONL holds them."""
    if output.suffix == ".jsonl":
        return [json.loads(line) for line in output.read_text().splitlines()]
    if output.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(output).to_pylist()
        return [{**r, "settings": json.loads(r["settings"])} for r in rows]
    import webdataset as wds

    shards = sorted(str(p) for p in output.glob("*.tar"))
    return [json.loads(s["json"]) for s in wds.WebDataset(shards, shardshuffle=False)]


def by_key(records: list[dict]) -> dict[str, dict]:
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)), "a record written twice"
    return {r["key"]: {k: v for k, v in r.items() if k != "seconds"} for r in records}


@pytest.mark.parametrize("fmt", ["out.jsonl", "out.parquet", "shards"])
def test_every_good_image_captioned_every_bad_one_recorded(ckpt, model, collection, tmp_path, fmt, capsys):
    root, good = collection
    output = tmp_path / fmt
    extra = ["--format", "webdataset"] if fmt == "shards" else []
    code = main(["caption", str(root), "--recursive", "--model", str(ckpt), "--output", str(output), *extra,
                 "--batch-size", "4", *SETTINGS])
    assert code == 1  # some images failed
    assert "11 captioned, 4 failed" in capsys.readouterr().err
    records = read_records(output)
    assert len(records) == 15
    for r in records:
        if Path(r["source"]).name.startswith("img"):
            assert r["error"] is None
            assert r["caption"] == model.caption(r["source"], num_beams=1, max_new_tokens=6)
            assert r["settings"]["num_beams"] == 1 and r["model"] == str(ckpt) and r["prompt"] == ""
        else:
            assert r["caption"] is None and r["source"] in r["error"], r
    if fmt == "out.parquet":
        import pyarrow.parquet as pq

        from blip2.data.outputs import parquet_schema

        assert pq.read_schema(next(output.glob("*.parquet"))).equals(parquet_schema())
    if fmt == "shards":
        import webdataset as wds

        samples = list(wds.WebDataset(sorted(str(p) for p in output.glob("*.tar")), shardshuffle=False))
        ok = [s for s in samples if "txt" in s]
        assert len(ok) == 11
        for s in ok:
            meta = json.loads(s["json"])
            assert s["txt"].decode() == meta["caption"]
            image = s.get("jpg") or s.get("png")
            assert image == Path(meta["source"]).read_bytes()


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blip2.apps.cli", "caption", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def size(output: Path) -> int:
    if output.is_file():
        return output.stat().st_size
    return sum(p.stat().st_size for p in output.glob("*") if not p.name.endswith(".tmp")) if output.exists() else 0


@pytest.mark.parametrize("fmt", ["out.jsonl", "out.parquet", "shards"])
def test_killed_job_resumes_to_exactly_the_uninterrupted_records(ckpt, tmp_path, fmt, capsys):
    root = tmp_path / "images"
    write_images(root, 60, seed=3)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    common = [str(root), "--recursive", "--model", str(ckpt), "--batch-size", "3", *SETTINGS]
    extra = ["--format", "webdataset"] if fmt == "shards" else []
    # parts of 7 records (and a commit every batch after 0 s) put kills between, during and inside commits
    parts = ["--per-part", "7", "--commit-seconds", "0"] if fmt != "out.jsonl" else []
    whole = tmp_path / "whole" / fmt
    assert main(["caption", *common, "--output", str(whole), *extra, *parts]) == 1
    expected = by_key(read_records(whole))

    output = tmp_path / "killed" / fmt
    kills = 0
    for grown in (1, 3000, 7000):  # kill once the output has grown past these sizes
        proc = run_cli([*common, "--output", str(output), *extra, *parts])
        while size(output) < grown and proc.poll() is None:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
    assert kills >= 2
    main(["caption", *common, "--output", str(output), *extra, *parts])  # 1 if the broken image was left
    assert "already done" in capsys.readouterr().err
    assert by_key(read_records(output)) == expected
    assert not list(output.parent.rglob("*.tmp"))


def test_partial_line_and_unfinished_parts_are_redone(ckpt, collection, tmp_path):
    root, _ = collection
    common = [str(root), "--recursive", "--model", str(ckpt), *SETTINGS]
    jsonl = tmp_path / "a.jsonl"
    main(["caption", *common, "--output", str(jsonl)])
    expected = by_key(read_records(jsonl))
    lines = jsonl.read_bytes().splitlines(keepends=True)
    jsonl.write_bytes(b"".join(lines[:5]) + lines[5][:17])  # a crash in the middle of a line
    main(["caption", *common, "--output", str(jsonl)])
    assert by_key(read_records(jsonl)) == expected

    parquet = tmp_path / "b.parquet"
    main(["caption", *common, "--output", str(parquet), "--per-part", "4"])
    expected = by_key(read_records(parquet))
    parts = sorted(parquet.glob("*.parquet"))
    parts[1].rename(parts[1].with_name(parts[1].name + ".tmp"))  # written but not yet renamed
    main(["caption", *common, "--output", str(parquet), "--per-part", "4"])
    assert by_key(read_records(parquet)) == expected and not list(parquet.glob("*.tmp"))


def test_shards_together_are_the_whole_run(ckpt, collection, tmp_path):
    root, _ = collection
    common = [str(root), "--recursive", "--model", str(ckpt), *SETTINGS]
    main(["caption", *common, "--output", str(tmp_path / "whole.jsonl")])
    for i in range(3):
        main(["caption", *common, "--output", str(tmp_path / "shared.parquet"), "--shard", f"{i}/3"])
    parts = sorted(p.name.split("-")[0] for p in (tmp_path / "shared.parquet").glob("*.parquet"))
    assert parts == ["s000of003", "s001of003", "s002of003"]
    assert by_key(read_records(tmp_path / "shared.parquet")) == by_key(read_records(tmp_path / "whole.jsonl"))


def test_sidecars_kept_unless_overwrite(ckpt, model, tmp_path, capsys):
    paths = write_images(tmp_path, 5, seed=5)
    mine = paths[2].with_suffix(".txt")
    mine.write_text("my own careful caption\n")
    main(["caption", str(tmp_path), "--recursive", "--model", str(ckpt), "--sidecar", ".txt", *SETTINGS])
    assert mine.read_text() == "my own careful caption\n"
    for p in paths:
        if p != paths[2]:
            assert p.with_suffix(".txt").read_text() == model.caption(str(p), num_beams=1, max_new_tokens=6) + "\n"
    assert "4 captioned, 0 failed, 1 already done" in capsys.readouterr().err
    main(["caption", str(tmp_path), "--recursive", "--model", str(ckpt), "--sidecar", "txt", "--overwrite", *SETTINGS])
    assert mine.read_text() == model.caption(str(paths[2]), num_beams=1, max_new_tokens=6) + "\n"


def test_list_files_tables_and_webdataset_inputs(ckpt, model, tmp_path):
    paths = write_images(tmp_path / "imgs", 6, seed=6)
    (tmp_path / "list.txt").write_text("# images\n" + "\n".join(str(p.relative_to(tmp_path)) for p in paths[:3]) + "\n")
    with open(tmp_path / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "where"], *[[i, str(p)] for i, p in enumerate(paths[3:])]])
    shard = tmp_path / "in.tar"
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(paths[:2]):
            tar.add(p, arcname=f"sample{i}.{p.suffix[1:]}")
        info = tarfile.TarInfo("sample0.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    out = tmp_path / "out.jsonl"
    main(["caption", str(tmp_path / "list.txt"), str(tmp_path / "table.csv"), str(shard), "--column", "where",
          "--model", str(ckpt), "--output", str(out), *SETTINGS])
    records = read_records(out)
    assert [r["source"] for r in records] == [str(p) for p in paths] + [f"{shard}#sample0.jpg", f"{shard}#sample1.png"]
    for r, p in zip(records, paths + paths[:2]):
        assert r["caption"] == model.caption(str(p), num_beams=1, max_new_tokens=6)
    r = subprocess.run([sys.executable, "-m", "blip2.apps.cli", "caption", str(tmp_path / "table.csv"), "--model",
                        str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 1 and "no image column: name one with --column (it has id, where)" in r.stderr


def test_questions_prompt_templates_and_several_captions(ckpt, model, collection, tmp_path):
    _, good = collection
    images = [str(p) for p in good[:3]]
    out = tmp_path / "qa.jsonl"
    main(["caption", *images, "--model", str(ckpt), "--output", str(out), "--question", "what is it?",
          "--question", "where is it?", "--max-new-tokens", "4"])
    for r, image in zip(read_records(out), images):
        assert r["questions"] == ["what is it?", "where is it?"]
        assert r["answers"] == model.ask(image, ["what is it?", "where is it?"], max_new_tokens=4)
    out = tmp_path / "named.jsonl"
    main(["caption", *images, "--model", str(ckpt), "--output", str(out), "--prompt", "a photo named {name}:",
          *SETTINGS])
    for r, image in zip(read_records(out), images):
        prompt = f"a photo named {Path(image).stem}:"
        assert r["prompt"] == prompt and r["caption"] == model.caption(image, prompt, num_beams=1, max_new_tokens=6)
    out = tmp_path / "many.jsonl"
    main(["caption", *images, "--model", str(ckpt), "--output", str(out), "--num-captions", "3", "--seed", "9",
          "--max-new-tokens", "5"])
    # one batch of three images, sampled with one random stream, as Blip2.generate samples a batch
    sampled = model.generate(images, "", do_sample=True, num_beams=1, num_return_sequences=3, seed=9, max_new_tokens=5)
    assert [r["captions"] for r in read_records(out)] == [[s.text for s in row] for row in sampled]


def test_ray_job_equals_the_local_job(ckpt, collection, tmp_path):
    """On a local Ray (2 CPUs): the --ray job's records, and Captioner over ray.data.read_images,
    equal the single-process job's."""
    ray = pytest.importorskip("ray")
    root, good = collection
    common = [str(root), "--recursive", "--model", str(ckpt), "--batch-size", "4", *SETTINGS]
    main(["caption", *common, "--output", str(tmp_path / "local.jsonl")])
    expected = by_key(read_records(tmp_path / "local.jsonl"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        main(["caption", *common, "--output", str(tmp_path / "ray.jsonl"), "--ray"])
        assert by_key(read_records(tmp_path / "ray.jsonl")) == expected

        from blip2.data import Captioner

        ds = ray.data.read_images([str(p) for p in good], include_paths=True, mode="RGB")
        ds = ds.map_batches(Captioner, fn_constructor_kwargs={"model": str(ckpt), "settings": {
            "num_beams": 1, "max_new_tokens": 6}}, compute=ray.data.ActorPoolStrategy(size=1), batch_size=4)
        rows = ds.take_all()
        captions = {os.path.basename(r["path"]): r["caption"] for r in rows}
        wanted = {p.name: expected[_key(p)]["caption"] for p in good}
        assert captions == wanted
    finally:
        ray.shutdown()


def _key(path: Path) -> str:
    from blip2.data.sources import Item

    return Item(str(path)).key
