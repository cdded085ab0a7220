"""Images prepared ahead of the model: decoded and resized in parallel, in order, errors as values."""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import dataclasses
import functools
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from .images import ImageError, ImageProcessor, ImageSource, Resized, _with_image

# Files, URLs and encoded bytes are cheap to send to a worker process; decoded images are not.
_SENDABLE = (str, os.PathLike, bytes, bytearray)


class ImageStream:
    """Images decoded and resized ahead of their consumer, in order: each [3, size, size] uint8
    (`processor.normalize` makes it the model's input). Decoding runs on a thread pool (PIL decodes
    and resizes mostly without the GIL), so a caller encodes the first images while the rest are
    being prepared; each worker holds one decoded image at a time, whatever its resolution. The
    pools are made on first use and are this object's: `close()` ends them.

    `processes=True`: files, URLs and encoded bytes of a batch of at least one per core go to worker
    processes instead (forked, on Linux), for a process feeding a GPU, whose threads share one GIL
    with the thread that launches the GPU's work (256 images on an H100 host with 16 cores: prepared
    and encoded in 0.75 s instead of 1.01; docs/log.md).
    """

    def __init__(self, processor: ImageProcessor, workers: int | None = None):
        self.processor = processor
        self.workers = workers or min(32, _cores())
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._processes: concurrent.futures.ProcessPoolExecutor | None = None

    def __call__(self, images: Sequence[ImageSource], *, processes: bool = False,
                 errors: str = "raise") -> Iterator[torch.Tensor]:
        """The images' rows, in order. errors: "raise": a failing image's ImageError is raised when
        its turn comes; "return": it is yielded in the image's place, and the rest go on."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if len(images) == 1:
            rows = iter([_resized_or_error(self.processor, images[0])])
        elif processes and _FORK and len(images) >= self.workers and all(isinstance(i, _SENDABLE) for i in images):
            rows = self._in_processes(images)
        else:
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="blip2-images")
            rows = self._threads.map(functools.partial(_resized_or_error, self.processor), images)
        return rows if errors == "return" else _raising(rows)

    def close(self) -> None:
        """End the worker threads and processes (a later call makes new ones)."""
        for pool in (self._threads, self._processes):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._threads = self._processes = None

    def __enter__(self) -> ImageStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _in_processes(self, images: Sequence[ImageSource]) -> Iterator[torch.Tensor | ImageError]:
        # Workers write their images into one file in memory (/dev/shm) and send back only their
        # index: through the pool's pipes, a thread of this process read and unpickled the pixels
        # (38 MB for 256 images, 0.11 s) under the GIL that the thread feeding the GPU needs (256
        # images prepared and encoded on an H100 host: 0.65 -> 0.58 s).
        size = self.processor.size
        shape, nbytes = (3, size, size), 3 * size * size
        if self._processes is None:
            # Forked, as torch's DataLoader forks its workers: spawn and forkserver would import the
            # caller's main module again in every worker. The workers only run PIL and numpy, never CUDA.
            self._processes = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("fork"),
                initializer=_exit_with_parent, initargs=(os.getpid(),))
        with tempfile.NamedTemporaryFile(dir=_memory_dir(nbytes * len(images)), prefix="blip2-images-") as buffer:
            buffer.truncate(nbytes * len(images))
            # the processor without its device tensors, which are not the workers' to have
            work = functools.partial(_resize_into, dataclasses.replace(self.processor, _constants={}), buffer.name)
            try:
                for i in self._processes.map(work, range(len(images)), images, chunksize=4):
                    if isinstance(i, ImageError):
                        yield i
                        continue
                    row = torch.empty(shape, dtype=torch.uint8)
                    os.preadv(buffer.fileno(), [row.numpy()], i * nbytes)
                    yield row
            except concurrent.futures.process.BrokenProcessPool:
                self._processes = None  # a worker died (killed, out of memory): the next batch gets a new pool
                raise


def _resized_or_error(processor: ImageProcessor, image: ImageSource) -> torch.Tensor | ImageError:
    if isinstance(image, Resized):
        if image.pixels.shape != (3, processor.size, processor.size) or image.pixels.dtype != torch.uint8:
            return ImageError(f"a Resized image must be uint8 [3, {processor.size}, {processor.size}], "
                              f"got {image.pixels.dtype} {list(image.pixels.shape)}")
        return image.pixels
    try:
        return _with_image(image, lambda rgb, _: processor.resized(rgb))
    except ImageError as e:
        return e


def _raising(rows: Iterator[torch.Tensor | ImageError]) -> Iterator[torch.Tensor]:
    for row in rows:
        if isinstance(row, ImageError):
            raise row
        yield row


def _resize_into(processor: ImageProcessor, path: str, i: int, image: ImageSource) -> int | ImageError:
    """In a worker process: image i resized, written at its place in the batch's file (or its error)."""
    row = _resized_or_error(processor, image)
    if isinstance(row, ImageError):
        return row
    row = row.numpy()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, row, i * row.nbytes)
    finally:
        os.close(fd)
    return i


def _memory_dir(nbytes: int) -> str | None:
    """/dev/shm when it has room for twice `nbytes` (a container's is often 64 MB), else the
    temporary directory (on disk, but in the page cache for as long as a batch lasts)."""
    try:
        free = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if free.f_bavail * free.f_frsize >= 2 * nbytes else None


_FORK = "fork" in multiprocessing.get_all_start_methods()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _exit_with_parent(parent: int) -> None:
    """In a worker: leave as soon as the process that started the pool is gone. A parent killed by a
    signal (or a crash) never shuts its pool down, and its workers would otherwise live on, holding
    its stdout open. (PR_SET_PDEATHSIG would follow the thread that forked, which may be short-lived.)"""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="blip2-parent-watch").start()
