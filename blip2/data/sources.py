"""What a dataset job reads: files, directories, globs, URLs, list files, tables with a path or URL
column, and WebDataset tar shards, each image once, in a deterministic order, with a stable key."""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm"}
LIST_SUFFIXES = {".txt", ".lst"}
TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".parquet"}
# A table's column of images when --column is not given: the first of these it has.
COLUMNS = ("url", "path", "image", "image_url", "file", "filename", "source")


@dataclass(frozen=True)
class Item:
    """One image of a collection. `source` is a path, a URL, or `SHARD.tar#MEMBER` for a member of
    a WebDataset shard (read from `offset`, `size` bytes); `key` is 16 hex digits of its SHA-1, the
    same on every machine, which names it in outputs and decides its shard."""

    source: str
    offset: int = -1
    size: int = -1

    @functools.cached_property
    def key(self) -> str:
        return hashlib.sha1(self.source.encode("utf-8", "surrogateescape")).hexdigest()[:16]

    @property
    def name(self) -> str:
        """The file name without its suffix (for prompt templates)."""
        return Path(self.source.rsplit("#", 1)[-1].split("?", 1)[0]).stem

    @property
    def suffix(self) -> str:
        return Path(self.source.rsplit("#", 1)[-1].split("?", 1)[0]).suffix.lower()

    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    def is_member(self) -> bool:
        return self.offset >= 0

    def load(self) -> str | bytes:
        """What the image loader takes: the path or URL, or a shard member's bytes."""
        if not self.is_member():
            return self.source
        with open(self.source.rsplit("#", 1)[0], "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def list_items(args: list[str], *, recursive: bool = False, column: str | None = None) -> tuple[list[Item], list[str]]:
    """The images that `args` name, each once, in order; also one error line for each argument that
    names none. A list file (.txt, .lst) holds a path or URL a line (relative paths from the list's
    directory); a table (.csv, .tsv, .jsonl, .parquet) a column of them (`column`, else the first of
    COLUMNS); a .tar is a WebDataset shard, whose image members are read in place. `**` and
    `recursive` walks follow no links to directories, so a link to a parent cannot make them endless."""
    items: dict[str, Item] = {}
    seen: set[str] = set()  # real paths of the files found
    errors = []

    def add(item: Item) -> None:
        real = item.source if item.is_url() or item.is_member() else os.path.realpath(item.source)
        if real not in seen:
            seen.add(real)
            items.setdefault(item.source, item)

    for arg in args:
        path = Path(arg)
        suffix = path.suffix.lower()
        try:
            if arg.startswith(("http://", "https://")):
                found = [Item(arg)]
            elif path.is_dir():
                found = [Item(p) for p in _walk(path, recursive)]
                if not found:
                    errors.append(f"{arg}: directory has no image files")
            elif glob.has_magic(arg) and not path.exists():
                found = [Item(p) for p in _glob(arg)]
                if not found:
                    errors.append(f"{arg}: no file matches")
            elif path.is_file() and suffix in LIST_SUFFIXES:
                found = [Item(_relative(line, path)) for line in _lines(path)]
            elif path.is_file() and suffix in TABLE_SUFFIXES:
                found = [Item(_relative(value, path)) for value in _column(path, column)]
            elif path.is_file() and suffix == ".tar":
                found = list(_members(path))
            else:
                found = [Item(arg)]  # a missing file is reported by the image loader, per image
        except (OSError, ValueError, tarfile.TarError) as e:
            errors.append(f"{arg}: {e}")
            continue
        if not found and suffix in LIST_SUFFIXES | TABLE_SUFFIXES | {".tar"}:
            errors.append(f"{arg}: names no images")
        for item in found:
            add(item)
    return list(items.values()), errors


def in_shard(item: Item, shard: int, shards: int) -> bool:
    """Whether `item` belongs to shard `shard` of `shards` (by its key: no coordination needed)."""
    return int(item.key, 16) % shards == shard


def _walk(root: Path, recursive: bool) -> list[str]:
    if not recursive:
        return sorted(str(p) for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    found = []
    for directory, subdirs, files in os.walk(root):  # followlinks=False: no loops through links
        subdirs.sort()
        found += [os.path.join(directory, f) for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return [f for f in found if os.path.isfile(f)]


def _glob(pattern: str) -> list[str]:
    """The files matching `pattern`, sorted; pathlib's `**` does not follow links to directories."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    rest = str(Path(*parts[fixed:]))
    hidden = any(part.startswith(".") for part in parts[fixed:])  # as glob: hidden names only when asked for
    matches = (p for p in root.glob(rest)
               if p.is_file() and (hidden or not any(q.startswith(".") for q in p.relative_to(root).parts)))
    return sorted(str(p) for p in matches)


def _relative(value: str, listed_in: Path) -> str:
    if value.startswith(("http://", "https://")) or os.path.isabs(value):
        return value
    return str(listed_in.parent / value)


def _lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _column(path: Path, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        name = _pick(names, column, path)
        values = pq.read_table(path, columns=[name]).column(name).to_pylist()
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        name = _pick(sorted({k for r in rows for k in r}), column, path)
        values = [r.get(name) for r in rows]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            name = _pick(reader.fieldnames or [], column, path)
            values = [r.get(name) for r in reader]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def _pick(names: list[str], column: str | None, path: Path) -> str:
    if column is not None:
        if column not in names:
            raise ValueError(f"no column {column!r} (it has {', '.join(names) or 'none'})")
        return column
    for name in COLUMNS:
        if name in names:
            return name
    raise ValueError(f"no image column: name one with --column (it has {', '.join(names) or 'none'})")


def _members(path: Path):
    """A WebDataset shard's image members, in the shard's order, read in place."""
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                yield Item(f"{path}#{member.name}", member.offset_data, member.size)
