"""Where a dataset job's records go: JSONL, Parquet parts, WebDataset shards or sidecar text files.

Each output knows which images it already holds (`done()`), so running a killed job again finishes
the rest: nothing is committed but whole records, a partial last line or an unfinished part file is
dropped on resume and its images redone, and no image is written twice.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

from .sources import Item

# A record's fields, in order. `settings` is a JSON object (a JSON string in Parquet).
FIELDS = ("key", "source", "caption", "captions", "questions", "answers", "prompt", "model", "settings",
          "seconds", "error")


def parquet_schema():
    import pyarrow as pa

    text, texts = pa.string(), pa.list_(pa.string())
    return pa.schema([("key", text), ("source", text), ("caption", text), ("captions", texts), ("questions", texts),
                      ("answers", texts), ("prompt", text), ("model", text), ("settings", text),
                      ("seconds", pa.float64()), ("error", text)])


class Output:
    """Records in, committed whole. `wants_bytes`: the output stores the image files themselves."""

    wants_bytes = False

    def done(self, items: list[Item]) -> set[str]:
        """The keys of the images already written (of `items`)."""
        return set()

    def write(self, records: list[dict], images: list[bytes | None] | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Commit what is buffered."""


class JsonlOutput(Output):
    """One JSON object a line, appended a chunk at a time (one write, then fsync); on resume a last
    line without its newline is cut off."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        if self.path.parent != Path():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if overwrite else 0), 0o644)

    def done(self, items):
        keys = set()
        with open(self.path, "rb") as f:
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) < len(data):  # the last line was cut by a crash: its images are redone
            os.ftruncate(self.fd, len(whole))
        for line in whole.splitlines():
            try:
                keys.add(json.loads(line)["key"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{self.path} has a line that is not one of this job's records; "
                                 "write to a new file or pass --overwrite") from None
        return keys

    def write(self, records, images=None):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8", "surrogateescape")
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            os.ftruncate(self.fd, end)
            raise OSError(f"cannot write to {self.path}: {e.strerror or e}") from None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Parts(Output):
    """A directory of part files, each written under a temporary name and renamed when whole: every
    `per_part` records, or sooner once `seconds` have passed since the last commit, so that a crash
    loses at most that much work. Part names carry the shard (`tag`), so shards can share a directory."""

    suffix = ""

    def __init__(self, path, tag: str, overwrite: bool, per_part: int, seconds: float):
        self.dir, self.tag, self.per_part, self.seconds = Path(path), tag, per_part, seconds
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.iterdir():
            if p.name.endswith(".tmp") or (overwrite and p.suffix == self.suffix and p.name.startswith(f"{tag}-")):
                p.unlink()
        self.buffer: list[tuple[dict, bytes | None]] = []
        self.last = time.monotonic()

    def _parts(self) -> list[Path]:
        return sorted(self.dir.glob(f"*{self.suffix}"))

    def write(self, records, images=None):
        self.buffer += zip(records, images or [None] * len(records))
        if len(self.buffer) >= self.per_part or time.monotonic() - self.last >= self.seconds:
            self.close()

    def close(self):
        while self.buffer:
            chunk, self.buffer = self.buffer[: self.per_part], self.buffer[self.per_part:]
            mine = [p for p in self._parts() if p.name.startswith(f"{self.tag}-")]
            number = 1 + max((int(p.name[len(self.tag) + 1:].split(".")[0]) for p in mine), default=-1)
            final = self.dir / f"{self.tag}-{number:06d}{self.suffix}"
            tmp = final.with_name(final.name + ".tmp")
            self._write_part(tmp, chunk)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        self.last = time.monotonic()

    def _write_part(self, path: Path, chunk: list[tuple[dict, bytes | None]]) -> None:
        raise NotImplementedError


class ParquetOutput(_Parts):
    suffix = ".parquet"

    def done(self, items):
        import pyarrow.parquet as pq

        return {k for p in self._parts() for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()}

    def _write_part(self, path, chunk):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{**r, "settings": json.dumps(r["settings"])} for r, _ in chunk]
        pq.write_table(pa.Table.from_pylist(rows, schema=parquet_schema()), path)


class WebDatasetOutput(_Parts):
    """Shards of samples `{key}.{jpg|png|...}` (the image file as it was), `{key}.txt` (the caption,
    captions or answers, one a line) and `{key}.json` (the record); an image that failed has its
    .json alone."""

    suffix = ".tar"
    wants_bytes = True

    def done(self, items):
        keys = set()
        for p in self._parts():
            with tarfile.open(p) as tar:
                keys.update(m.name.split(".", 1)[0] for m in tar.getmembers())
        return keys

    def _write_part(self, path, chunk):
        import webdataset as wds

        with open(path, "wb") as f, wds.TarWriter(f) as sink:
            for record, image in chunk:
                sample = {"__key__": record["key"], "json": json.dumps(record, ensure_ascii=False).encode()}
                if record["error"] is None:
                    sample["txt"] = text_of(record).encode()
                    if image is not None:
                        sample[_extension(record["source"], image)] = image
                sink.write(sample)


class SidecarOutput(Output):
    """A text file beside each image (`photo.jpg` -> `photo.txt`), written under a temporary name and
    renamed; an image that already has one is skipped unless `overwrite`."""

    def __init__(self, suffix: str, overwrite: bool):
        self.suffix, self.overwrite = suffix if suffix.startswith(".") else f".{suffix}", overwrite

    def path(self, item: Item) -> Path:
        if item.is_url() or item.is_member():
            raise ValueError(f"{item.source}: sidecar files need image files on disk")
        return Path(item.source).with_suffix(self.suffix)

    def done(self, items):
        if self.overwrite:
            return set()
        return {item.key for item in items if not (item.is_url() or item.is_member()) and self.path(item).exists()}

    def write(self, records, images=None):
        for r in records:
            if r["error"] is None:
                path = self.path(Item(r["source"]))
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(text_of(r) + "\n", encoding="utf-8")
                os.replace(tmp, path)


class StdoutOutput(Output):
    """JSON lines on stdout (no resume)."""

    def write(self, records, images=None):
        for r in records:
            print(json.dumps(r, ensure_ascii=False), file=sys.stdout, flush=True)


def text_of(record: dict) -> str:
    """A record's text: its caption, its captions or its answers, one a line."""
    if record["answers"] is not None:
        return "\n".join(record["answers"])
    if record["captions"] is not None:
        return "\n".join(record["captions"])
    return record["caption"] or ""


def open_output(path: str | None, fmt: str | None, sidecar: str | None, *, overwrite: bool, tag: str,
                per_part: int, seconds: float) -> Output:
    """The output a job writes: `fmt` jsonl, parquet or webdataset (else from the path: .jsonl, a
    .parquet directory, else a directory of WebDataset shards), sidecar files, or stdout."""
    if sidecar is not None:
        if path is not None:
            raise ValueError("--sidecar writes beside the images; it takes no --output")
        return SidecarOutput(sidecar, overwrite)
    if path is None:
        return StdoutOutput()
    fmt = fmt or ("jsonl" if path.endswith(".jsonl") else "parquet" if path.rstrip("/").endswith(".parquet")
                  else "webdataset" if path.endswith("/") or Path(path).is_dir() else None)
    if fmt == "jsonl":
        return JsonlOutput(path, overwrite)
    if fmt == "parquet":
        return ParquetOutput(path, tag, overwrite, per_part, seconds)
    if fmt == "webdataset":
        return WebDatasetOutput(path, tag, overwrite, per_part, seconds)
    raise ValueError(f"cannot tell the format of --output {path!r}: end it in .jsonl or .parquet, or give --format")


def _extension(source: str, data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            kind = (img.format or "").lower()
    except Exception:  # noqa: BLE001 - the record says what was wrong with it
        kind = ""
    return {"jpeg": "jpg", "mpo": "jpg"}.get(kind, kind) or Path(source.split("#")[-1]).suffix.lstrip(".") or "bin"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
