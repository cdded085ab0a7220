"""Caption files, directories, globs and URLs: each file once, failures as records, whole lines out."""

from __future__ import annotations

import json
import os
import stat
import sys
import time

from ..data.sources import list_items


def expand_images(args: list[str]) -> tuple[list[str], list[str]]:
    """Files, directories (their image files, sorted), glob patterns, URLs and list files to a list of
    inputs, each file once; also the errors for arguments that name nothing (see list_items)."""
    items, errors = list_items(args)
    return [item.source for item in items], errors


class Progress:
    """A one-line progress bar on stderr, shown only when stderr is a terminal or many items are queued."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.show = total > 1 and sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        if self.show:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            width = 30
            filled = int(width * self.done / self.total)
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:.2f} images/s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.show:
            print(file=sys.stderr)


def caption_files(model, paths: list[str], prompt: str, settings: dict, *, batch_size: int = 8,
                  as_json: bool = False, out=None, report, failed_before: int = 0) -> tuple[int, int]:
    """Caption `paths` in batches, writing one record per image to `out` (default stdout): a JSON
    object (path, caption, seconds; or path and error) with `as_json`, else `PATH<TAB>caption` (the
    bare caption for a single image), names escaped. An image that fails is reported through
    `report(message)` (text) or as its record (JSON) and the rest go on. The run ends, however it
    ends, with a summary line on stderr ("98 captioned, 2 failed", counting `failed_before` inputs that
    named nothing). Returns (captioned, failed).

    Paths go to the model as they are: each is decoded and resized on a worker as its turn comes,
    through the same image stream every other caller uses, so memory holds one full-size image per
    worker, whatever the batch size."""
    out = Records(sys.stdout if out is None else out)
    captioned, failed = 0, failed_before
    progress = Progress(len(paths))
    try:
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            t = time.perf_counter()
            captions = model.caption(batch, prompt, errors="return", **settings)
            seconds = (time.perf_counter() - t) / len(batch)
            for name, caption in zip(batch, captions):
                if isinstance(caption, Exception):
                    failed += 1
                    if as_json:
                        out.write(json.dumps({"path": name, "error": str(caption)}))
                    else:
                        report(str(caption))
                elif as_json:
                    captioned += 1
                    out.write(json.dumps({"path": name, "caption": caption, "seconds": round(seconds, 3)}))
                else:
                    captioned += 1
                    out.write(f"{_escaped(name)}\t{_escaped(caption)}" if len(paths) > 1 else caption)
            progress.update(len(batch))
    finally:
        progress.close()
        if len(paths) > 1 or failed:
            print(f"blip2: {captioned} captioned, {failed} failed", file=sys.stderr, flush=True)
    return captioned, failed


def _escaped(name: str) -> str:
    """A file name (or caption) for a line of tab-separated output: backslash, tab, newline and
    carriage return escaped, so that no name can add a column or a line."""
    return name.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class OutputError(OSError):
    """The results could not be written (disk full, file too large, ...)."""


class Records:
    """Whole lines to a stream: a line that cannot be written entirely (a full disk) is taken back
    where the stream is a file, so the output ends with the last complete record."""

    def __init__(self, stream):
        self.stream, self.written = stream, 0
        try:
            self.fd = stream.fileno()
            self.start = os.lseek(self.fd, 0, os.SEEK_CUR) if stat.S_ISREG(os.fstat(self.fd).st_mode) else None
        except (AttributeError, OSError, ValueError):  # not a real file (a test's capture, a StringIO)
            self.fd = self.start = None

    def write(self, line: str) -> None:
        if self.fd is None:
            print(line, file=self.stream, flush=True)
            self.written += 1
            return
        data = (line + "\n").encode("utf-8", "surrogateescape")  # file names as the system gave them
        self.stream.flush()
        at = os.lseek(self.fd, 0, os.SEEK_END) if self.start is not None else None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except BrokenPipeError:
            raise
        except OSError as e:
            if at is not None:
                os.ftruncate(self.fd, at)
            raise OutputError(f"cannot write the output after {self.written} records: {e.strerror or e}") from None
        self.written += 1
