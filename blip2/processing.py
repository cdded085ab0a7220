"""Inputs of the model: images to normalised pixel tensors, prompts to token ids.

Both steps equal the reference (`transformers`' BlipImageProcessorPil and Blip2Processor) on the
files of a checkpoint directory, with these deliberate differences:

- `load_image` applies the EXIF orientation (as `PIL.ImageOps.exif_transpose`); the reference feeds
  the stored pixels, so a portrait phone photo reaches the model lying on its side.
- 16-bit and 32-bit images are scaled to 8 bits; the reference's `convert("RGB")` clips them
  at 255, which turns most of such an image white.
- OPT prompts are always padded on the left. The reference pads on `tokenizer.padding_side`, which
  the hub checkpoints leave at "right", and right-padded batches of a decoder-only model generate
  garbage. With left padding the layout is the reference's `[<image> x N][pad...][BOS prompt]`.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import functools
import io
import json
import math
import multiprocessing
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .config import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor


class ImageError(ValueError):
    """An input could not be turned into an image; the message names the input."""


class ImageWarning(UserWarning):
    """An image was used, but part of it could not be read (its EXIF orientation); names the input."""


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        return repr(text if len(text) <= 200 else text[:197] + "...")
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"<{type(source).__name__} shape={tuple(source.shape)} dtype={source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return f"<{type(source).__name__}>"


def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body of `url`, within `timeout` seconds in all (connecting, redirects, headers and body,
    like curl --max-time) and at most `max_bytes` bytes. The download runs on a thread of its own,
    which this one waits for: a server that trickles a byte at a time, or sends headers forever,
    cannot hold the caller (or Ctrl-C) past the deadline; the thread notices and stops at its next read."""
    done = threading.Event()
    result: list = []

    def download() -> None:
        try:
            result.append(_download(url, timeout, max_bytes, done))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            result.append(e)
        finally:
            done.set()

    threading.Thread(target=download, daemon=True, name="blip2-fetch").start()
    if not done.wait(timeout):
        done.set()  # tells the download to stop
        raise ImageError(f"cannot fetch image {url!r}: no complete answer within timeout={timeout:g} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _download(url: str, timeout: float, max_bytes: int, cancelled: threading.Event) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "blip2"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise ImageError(f"image URL {url!r} is {int(declared)} bytes, more than max_bytes={max_bytes}")
        data = bytearray()
        while len(data) <= max_bytes and not cancelled.is_set():
            chunk = response.read1(min(1 << 16, max_bytes + 1 - len(data)))
            if not chunk:
                break
            data += chunk
    if len(data) > max_bytes:
        raise ImageError(f"image URL {url!r} sent more than max_bytes={max_bytes} bytes")
    return bytes(data)


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map an image array of any numeric dtype onto 0..255."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("float pixel values must be finite")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise ValueError(f"float pixel values must lie in [0, 1] or [0, 255], got [{lo}, {hi}]")
        return np.round(a * 255.0 if hi <= 1.0 else a).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        # uint16/int16 arrays and PIL's "I;16" are 16-bit by type; wider ints ("I") are judged by range.
        sixteen = a.dtype.itemsize == 2 or hi > 255
        if lo < 0 or hi > 65535:
            raise ValueError(f"integer pixel values must lie in [0, 65535], got [{lo}, {hi}]")
        # x / 257 maps 0..65535 onto 0..255 exactly at both ends.
        return np.round(a / 257.0).astype(np.uint8) if sixteen else a.astype(np.uint8)
    raise ValueError(f"unsupported pixel dtype {a.dtype}")


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first, as torchvision tensors are
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {tuple(a.shape)}")
    return Image.fromarray(np.ascontiguousarray(_array_to_uint8(a)))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = Image.fromarray(_array_to_uint8(np.asarray(img)))
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        # As the reference: transparent pixels become white, not the black of a plain convert().
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


# The EXIF orientation tag's values and the transposition that shows each upright, as
# PIL.ImageOps.exif_transpose turns them (which would also rewrite the metadata: our images need none,
# and broken metadata made it raise).
_ORIENTATION = 0x0112
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}


def _decode(img: Image.Image, name: str, problem: str | None = None) -> Image.Image:
    """`img` decoded in full, turned by its EXIF orientation, in RGB: `img` itself where it needs no
    change, else a new image. problem: what Pillow said of its metadata while opening it (`_quietly`)."""
    if img.width * img.height > Image.MAX_IMAGE_PIXELS:  # Pillow only warns up to twice that: refuse it here
        raise Image.DecompressionBombError(f"{img.width * img.height} pixels, more than MAX_IMAGE_PIXELS="
                                           f"{Image.MAX_IMAGE_PIXELS}")
    img.load()  # decode in full now, so a truncated file fails here rather than half-read
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image {name} has no pixels ({img.width}x{img.height})")
    try:
        turn, parsing = _quietly(lambda: _TURNS.get(img.getexif().get(_ORIENTATION)))  # tags parse lazily
        problem = problem or parsing
    except Exception as e:  # noqa: BLE001 - Pillow raises struct.error, KeyError, ... on malformed EXIF
        turn, problem = None, f"{type(e).__name__}: {e}; used without its orientation"
    if problem is not None:
        warnings.warn(f"image {name}: malformed EXIF metadata ({problem})", ImageWarning, stacklevel=4)
    if turn is not None:
        img = img.transpose(turn)
    return _to_rgb(img)


# Pillow reports malformed metadata as warnings that name no file: they are caught while one thread at
# a time parses (warnings.catch_warnings changes process-wide state) and said again with the image's name.
_PARSING = threading.Lock()


def _quietly(parse, *args, **kwargs) -> tuple:
    """parse(*args, **kwargs) with Pillow's warnings caught: its result, and the first warning's text (or None)."""
    with _PARSING, warnings.catch_warnings(record=True) as complaints:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            result = parse(*args, **kwargs)
        except Image.DecompressionBombWarning as e:
            raise Image.DecompressionBombError(str(e)) from None
    return result, str(complaints[0].message) if complaints else None


def load_image(source: ImageSource, *, timeout: float = 30.0, max_bytes: int = 50_000_000) -> Image.Image:
    """Open `source` as an RGB PIL image, decoded in full.

    `source` is a file path, an http(s) URL (fetched within `timeout` seconds in all and at most
    `max_bytes` bytes), encoded file bytes, a PIL image, or an array/tensor (HxW, HxWxC or CxHxW;
    uint8, 16-bit, or float in [0, 1], read as [0, 255] if any value exceeds 1). The EXIF
    orientation is applied: the one difference from the reference on ordinary photos. Raises
    `ImageError` naming the input on any failure, including truncated files and images over
    `PIL.Image.MAX_IMAGE_PIXELS` (decompression bombs).
    """
    return _with_image(source, lambda rgb, given: rgb.copy() if rgb is given else rgb, timeout, max_bytes)


def _with_image(source: ImageSource, use, timeout: float = 30.0, max_bytes: int = 50_000_000):
    """use(rgb, given) for `source` as an RGB image (load_image's), while the file it came from is
    open; `given` is the PIL image opened or passed in, which `rgb` may be. Every error, `use`'s
    included, is an ImageError naming the source. Nothing is copied that `use` does not copy: the
    image workers resize straight from the decoded file."""
    name = _describe(source)
    try:
        if isinstance(source, Image.Image):
            return use(_decode(source, name), source)
        if isinstance(source, (np.ndarray, torch.Tensor)):
            array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
            img = _from_array(array)
            return use(_decode(img, name), None)
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            source = _fetch(source, timeout, max_bytes)
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            source = Path(source).expanduser()
            if source.is_dir():
                raise ImageError(f"{name} is a directory, not an image file")
            if not source.is_file():
                raise ImageError(f"image file not found: {name}")
        else:
            raise ImageError(f"cannot load an image from {name} (give a path, URL, bytes, PIL image or array)")
        img, problem = _quietly(Image.open, source)
        with img:
            return use(_decode(img, name, problem), img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name} is too large (decompression bomb check): {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not a readable image: {name}") from None
    except (urllib.error.URLError, HTTPException, TimeoutError) as e:
        if isinstance(e, urllib.error.HTTPError):
            e.close()  # it holds the connection open
        raise ImageError(f"cannot fetch image {name}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - no decoder's own exception may escape: one bad image is one error
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"cannot decode image {name}: {reason}") from None


@dataclass(frozen=True)
class ImageProcessor:
    """Resize to size x size (PIL bicubic, no crop), scale by 1/255, normalise with mean/std."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ImageProcessor:
        """Read a checkpoint's image-processor settings; defaults (224, CLIP) when it has none."""
        directory = Path(path)
        # Same priority as the reference: the dict nested in processor_config.json, then the flat file.
        where = directory / "processor_config.json"
        config = _read_json(where).get("image_processor")
        if config is None and (directory / "preprocessor_config.json").is_file():
            where = directory / "preprocessor_config.json"
            config = _read_json(where)
        if config is None:
            return cls()
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: image processor settings must be a JSON object, got {type(config).__name__}")
        for flag in ("do_resize", "do_rescale", "do_normalize"):  # True in every BLIP-2 checkpoint
            if not config.get(flag, True):
                raise ConfigError(f"{where}: unsupported image processor setting {flag}=false")
        size = config.get("size", 224)
        if isinstance(size, dict):
            if size.get("height") is None or size.get("height") != size.get("width"):
                raise ConfigError(f"{where}: only square image sizes are supported, got size={size}")
            size = size["height"]
        resample = config.get("resample", Image.Resampling.BICUBIC)
        settings = dict(size=size, mean=config.get("image_mean", CLIP_MEAN), std=config.get("image_std", CLIP_STD),
                        resample=resample, rescale_factor=config.get("rescale_factor", 1 / 255))
        checks = {  # setting: (valid, what it must be)
            "size": (_is_int(size) and 1 <= size <= 4096, "an integer from 1 to 4096"),
            "resample": (_is_int(resample) and resample in set(Image.Resampling), "one of PIL's filters 0-5"),
            "rescale_factor": (_is_number(settings["rescale_factor"]) and settings["rescale_factor"] > 0,
                               "a positive number"),
            "image_mean": (_is_triple(settings["mean"]), "three finite numbers"),
            "image_std": (_is_triple(settings["std"]) and min(settings["std"]) > 0, "three positive numbers"),
        }
        for name, (valid, must) in checks.items():
            if not valid:
                raise ConfigError(f"{where}: {name}={config.get(name, settings.get(name))!r} must be {must}")
        settings["mean"], settings["std"] = tuple(settings["mean"]), tuple(settings["std"])
        return cls(**settings)

    def resized(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image to [3, size, size] uint8, resized as the reference does (PIL, `resample`)."""
        image = image.resize((self.size, self.size), resample=self.resample)
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, size, size], on any device, to the model's float32 input with the
        reference's arithmetic: scaled in float64, rounded to float32, then normalised in float32
        (IEEE operations, so a GPU gives the same bits as the CPU)."""
        x = (pixels.double() * self.rescale_factor).float()
        return (x - _per_channel(self.mean, pixels.device)) / _per_channel(self.std, pixels.device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image to the model's [3, size, size] float32 input."""
        return self.normalize(self.resized(image))

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> torch.Tensor:
        """Images (anything `load_image` takes, or a list of them) to a [B, 3, size, size] tensor."""
        is_batch = isinstance(images, (list, tuple))
        is_batch = is_batch or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)
        batch = list(images) if is_batch else [images]
        if not batch:
            raise ValueError("no images given")
        return self.normalize(torch.stack(list(self.stream(batch))))

    def stream(self, images: Sequence[ImageSource], *, processes: bool = False,
               errors: str = "raise") -> Iterator[torch.Tensor]:
        """Each image resized, [3, size, size] uint8 (`normalize` makes it the model's input), in
        order, prepared ahead of the consumer on a thread pool (PIL decodes and resizes mostly
        without the GIL), so a caller can encode the first images while the rest are being prepared.
        Each worker holds one decoded image at a time, whatever the source resolution.

        errors: "raise": a failing image's ImageError is raised when its turn comes; "return": it is
        yielded in the image's place, and the rest of the batch goes on.

        processes: files, URLs and encoded bytes of a batch of at least one per core go to worker
        processes instead (forked once, on Linux). For a process feeding a GPU: its threads share
        one GIL with the thread that launches the GPU's work (256 images on an H100 host with 16
        cores: prepared and encoded in 0.75 s instead of 1.01, BENCHMARKS.md).
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if len(images) == 1:
            rows = iter([_resized_or_error(self, images[0])])
        elif processes and _FORK and len(images) >= _cores() and all(isinstance(i, _SENDABLE) for i in images):
            rows = self._in_processes(images)
        else:
            rows = _pool().map(functools.partial(_resized_or_error, self), images)
        return rows if errors == "return" else _raising(rows)

    def _in_processes(self, images: Sequence[ImageSource]) -> Iterator[torch.Tensor]:
        # Workers write their images into one file in memory (/dev/shm) and send back only their
        # index: through the pool's pipes, a thread of this process read and unpickled the pixels
        # (38 MB for 256 images, 0.11 s) under the GIL that the thread feeding the GPU needs. 256
        # images prepared and encoded on an H100 host: 0.65 -> 0.58 s (BENCHMARKS.md, GPU run 5).
        shape = (3, self.size, self.size)
        nbytes = 3 * self.size * self.size
        with tempfile.NamedTemporaryFile(dir=_memory_dir(nbytes * len(images)), prefix="blip2-images-") as buffer:
            buffer.truncate(nbytes * len(images))
            work = functools.partial(_resize_into, self, buffer.name)
            try:
                for i in _process_pool().map(work, range(len(images)), images, chunksize=4):
                    if isinstance(i, ImageError):
                        yield i
                        continue
                    row = torch.empty(shape, dtype=torch.uint8)
                    os.preadv(buffer.fileno(), [row.numpy()], i * nbytes)
                    yield row
            except concurrent.futures.process.BrokenProcessPool:
                _process_pool.cache_clear()  # a worker died (killed, out of memory): the next batch gets a new pool
                raise


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_triple(values) -> bool:
    return isinstance(values, (list, tuple)) and len(values) == 3 and all(_is_number(v) for v in values)


def _resized_or_error(processor: ImageProcessor, image: ImageSource) -> torch.Tensor | ImageError:
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


@functools.cache
def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Made once per device: a tensor built from Python numbers on a GPU is a copy that waits for
    # all queued work (the last chunk's encoding), which stalled a 256-image batch for 0.27 s.
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None, None]


def _memory_dir(nbytes: int) -> str | None:
    """/dev/shm when it has room for twice `nbytes` (a container's is often 64 MB), else the
    temporary directory (on disk, but in the page cache for as long as a batch lasts)."""
    try:
        free = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if free.f_bavail * free.f_frsize >= 2 * nbytes else None


_SENDABLE = (str, os.PathLike, bytes, bytearray)  # cheap to send to a worker; decoded images are not
_FORK = "fork" in multiprocessing.get_all_start_methods()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(min(32, _cores()), thread_name_prefix="blip2-images")


@functools.cache
def _process_pool() -> concurrent.futures.ProcessPoolExecutor:
    # Forked, as torch's DataLoader forks its workers: spawn and forkserver would import the
    # caller's main module again in every worker. The workers only run PIL and numpy, never CUDA.
    return concurrent.futures.ProcessPoolExecutor(min(32, _cores()), mp_context=multiprocessing.get_context("fork"),
                                                  initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent: int) -> None:
    """In a worker: leave as soon as the process that started the pool is gone. A parent killed by a
    signal (or a crash) never shuts its pool down, and its workers would otherwise live on, holding
    its stdout open. (PR_SET_PDEATHSIG would follow the thread that forked, which may be short-lived.)"""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="blip2-parent-watch").start()


class TokenBatch(NamedTuple):
    """Language-model input of a batch of prompts."""

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, 0 on padding


def _read_json(path: Path) -> dict:
    """A JSON object from a checkpoint's settings file, {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    return raw


def _token_text(token: object) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    return token.get("content") if isinstance(token, dict) else token  # type: ignore[return-value]


class PromptTokenizer:
    """Prompts to the language model's input ids, laid out as the reference Blip2Processor does.

    With image placeholders (checkpoints whose processor has `num_query_tokens`) each row starts
    with `num_query_tokens` copies of `image_token_id`, which the model overwrites with the
    projected queries; without them (legacy checkpoints) the model prepends the queries itself.
    OPT's tokenizer puts BOS `</s>` before the prompt; T5's appends `</s>`.
    """

    def __init__(self, tokenizer: Tokenizer, kind: str, *, pad_id: int, image_token_id: int | None = None,
                 num_query_tokens: int | None = None, clean_up_spaces: bool = False) -> None:
        if kind not in ("opt", "t5"):
            raise ValueError(f"kind must be 'opt' or 't5', got {kind!r}")
        if num_query_tokens and image_token_id is None:
            raise ValueError("num_query_tokens needs an image_token_id")
        self.tokenizer, self.kind, self.pad_id = tokenizer, kind, pad_id
        self.image_token_id = image_token_id
        self.num_query_tokens = num_query_tokens or 0
        self.padding_side = "left" if kind == "opt" else "right"
        self.clean_up_spaces = clean_up_spaces
        # A tokenizer.json may carry padding/truncation settings; we pad and check lengths ourselves.
        tokenizer.no_padding()
        tokenizer.no_truncation()

    @classmethod
    def from_dir(cls, path: str | os.PathLike, kind: str, *, image_token_id: int | None = None,
                 num_query_tokens: int | None = None) -> PromptTokenizer:
        """Load tokenizer.json (or GPT-2 style vocab.json + merges.txt) and the processor settings.

        `num_query_tokens` defaults to processor_config.json's (absent on legacy checkpoints: no
        placeholders); `image_token_id` to the tokenizer's "<image>", appended if missing as the
        reference does. Pass the model config's values to override both.
        """
        directory = Path(path)
        config = _read_json(directory / "special_tokens_map.json") | _read_json(directory / "tokenizer_config.json")
        if (directory / "tokenizer.json").is_file():
            # transformers 5 takes tokenizer.json's post-processor as is and ignores
            # add_bos_token/add_eos_token from tokenizer_config.json in this case.
            try:
                tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own Exception type
                raise ConfigError(f"{directory / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            tokenizer = cls._byte_level_bpe(directory, config)
        else:
            raise FileNotFoundError(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt")
        # Named special tokens are matched whole in the text, as the reference adds them as special tokens.
        specials = [_token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        known = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        missing = [t for t in specials if t and t not in known]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        pad_text = _token_text(config.get("pad_token")) or "<pad>"
        pad_id = tokenizer.token_to_id(pad_text)
        if pad_id is None:
            raise ConfigError(f"{directory}: pad token {pad_text!r} is not in the vocabulary")
        if num_query_tokens is None:
            num_query_tokens = _read_json(directory / "processor_config.json").get("num_query_tokens")
        if image_token_id is None and num_query_tokens:
            # Blip2Processor appends "<image>" to the vocabulary when the tokenizer lacks it.
            tokenizer.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
            image_token_id = tokenizer.token_to_id("<image>")
        # transformers 5 skips the clean-up for BPE models even when the config asks for it.
        clean_up = config.get("clean_up_tokenization_spaces", False) and not isinstance(tokenizer.model, models.BPE)
        return cls(tokenizer, kind, pad_id=pad_id, image_token_id=image_token_id,
                   num_query_tokens=num_query_tokens, clean_up_spaces=bool(clean_up))

    @staticmethod
    def _byte_level_bpe(directory: Path, config: dict) -> Tokenizer:
        """The GPT-2 tokenizer the reference builds from vocab.json + merges.txt."""
        bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
        tokenizer = Tokenizer(bpe)
        prefix = bool(config.get("add_prefix_space", False))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
        tokenizer.decoder = decoders.ByteLevel()
        for index, entry in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            flags = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
            tokenizer.add_tokens([AddedToken(entry["content"], **flags)])
            if tokenizer.token_to_id(entry["content"]) != int(index):
                raise ConfigError(f"{directory}: added token {entry['content']!r} should have id {index}")
        # Without tokenizer.json these flags decide the specials (GPT2Tokenizer defaults: neither).
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        template, used = "$A", []
        if config.get("add_bos_token", False) and bos:
            template, used = f"{bos} {template}", [bos]
        if config.get("add_eos_token", False) and eos:
            template, used = f"{template} {eos}", used + [eos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, bpe.token_to_id(t)) for t in dict.fromkeys(used)]
        )
        return tokenizer

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt with the tokenizer's special tokens, without image placeholders."""
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def count_tokens(self, prompt: str) -> int:
        """Length of `encode(prompt)`: what `max_length` in `__call__` is checked against."""
        return len(self.encode(prompt))

    def __call__(self, prompts: str | Sequence[str], *, max_length: int | None = None) -> TokenBatch:
        """Tokenise one prompt or a batch, padded to the longest (OPT on the left, T5 on the right).

        Raises ValueError when a prompt has more than `max_length` tokens (image placeholders not counted).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        for prompt in prompts:
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 (argv, stdin)
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                raise ValueError(f"prompt {short!r} is not valid UTF-8 text (at character {e.start})") from None
        rows = [e.ids for e in self.tokenizer.encode_batch(list(prompts), add_special_tokens=True)]
        for prompt, ids in zip(prompts, rows, strict=True):
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            if max_length is not None and len(ids) > max_length:
                raise ValueError(f"prompt {short!r} is {len(ids)} tokens long, more than max_length={max_length}")
            if self.image_token_id is not None and self.image_token_id in ids:
                # A stray placeholder would make the model find more image slots than queries.
                raise ValueError(f"prompt {short!r} contains the image token (id {self.image_token_id})")
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            span = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[i, span], mask[i, span] = torch.tensor(ids, dtype=torch.long), 1
        # The placeholders go in front of everything, padding included, as in the reference.
        head = torch.full((len(rows), self.num_query_tokens), self.image_token_id or 0, dtype=torch.long)
        return TokenBatch(torch.cat([head, input_ids], 1), torch.cat([torch.ones_like(head), mask], 1))

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Ids to text (special tokens, image placeholders included, dropped by default)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:  # the reference's clean_up_tokenization, for non-BPE tokenizers
            for before in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):
                text = text.replace(before, before.strip() if before != " ' " else "'")
        return text

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        """`decode` for each row."""
        return [self.decode(row, skip_special_tokens) for row in sequences]
