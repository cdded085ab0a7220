"""Images: any source (file, URL, bytes, PIL image, array) to an RGB image, resized and normalised.

Equal to the reference (`transformers`' BlipImageProcessorPil) on the files of a checkpoint
directory, with these deliberate differences:

- `load_image` applies the EXIF orientation (as `PIL.ImageOps.exif_transpose`); the reference feeds
  the stored pixels, so a portrait phone photo reaches the model lying on its side.
- 16-bit and 32-bit images are scaled to 8 bits; the reference's `convert("RGB")` clips them
  at 255, which turns most of such an image white.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import ConfigError, matches, read_settings
from .errors import ImageError
from .urls import UrlPolicy, fetch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)



@dataclass(frozen=True)
class Resized:
    """An image already decoded and resized by this model's processor: [3, size, size] uint8, used
    as it is (a dataset job prepares the next batch's images while the model answers this one)."""

    pixels: torch.Tensor


ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor | Resized


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


def load_image(source: ImageSource, *, timeout: float = 30.0, max_bytes: int = 50_000_000,
               policy: UrlPolicy | None = None) -> Image.Image:
    """Open `source` as an RGB PIL image, decoded in full.

    `source` is a file path, an http(s) URL (fetched within `timeout` seconds in all and at most
    `max_bytes` bytes), encoded file bytes, a PIL image, or an array/tensor (HxW, HxWxC or CxHxW;
    uint8, 16-bit, or float in [0, 1], read as [0, 255] if any value exceeds 1). The EXIF
    orientation is applied: the one difference from the reference on ordinary photos. Raises
    `ImageError` naming the input on any failure, including truncated files and images over
    `PIL.Image.MAX_IMAGE_PIXELS` (decompression bombs).

    `policy`, for strings from untrusted clients: every string is then a URL, fetched as `policy`
    allows (its own timeout and max_bytes; a plain path is refused, a file:// URL read only under
    its allowed_local_path).
    """
    return _with_image(source, lambda rgb, given: rgb.copy() if rgb is given else rgb, timeout, max_bytes, policy)


def _with_image(source: ImageSource, use, timeout: float = 30.0, max_bytes: int = 50_000_000,
                policy: UrlPolicy | None = None):
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
        if isinstance(source, str) and (policy is not None or source.startswith(("http://", "https://"))):
            source = fetch(source, policy or UrlPolicy(timeout=timeout, max_bytes=max_bytes))
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
    # mean and std as tensors, per device: made once, since a tensor built from Python numbers on a
    # GPU is a copy that waits for all queued work (it stalled a 256-image batch for 0.27 s)
    _constants: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ImageProcessor:
        """Read a checkpoint's image-processor settings; defaults (224, CLIP) when it has none."""
        directory = Path(path)
        # Same priority as the reference: the dict nested in processor_config.json, then the flat file.
        where = directory / "processor_config.json"
        config = read_settings(where).get("image_processor")
        if config is None and (directory / "preprocessor_config.json").is_file():
            where = directory / "preprocessor_config.json"
            config = read_settings(where)
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
            "size": (matches(size, "int") and 1 <= size <= 4096, "an integer from 1 to 4096"),
            "resample": (matches(resample, "int") and resample in set(Image.Resampling), "one of PIL's filters 0-5"),
            "rescale_factor": (matches(settings["rescale_factor"], "float") and settings["rescale_factor"] > 0,
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
        if pixels.device not in self._constants:
            self._constants[pixels.device] = tuple(torch.tensor(v, dtype=torch.float32, device=pixels.device)[:, None, None]
                                                   for v in (self.mean, self.std))
        mean, std = self._constants[pixels.device]
        x = (pixels.double() * self.rescale_factor).float()
        return (x - mean) / std

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image to the model's [3, size, size] float32 input."""
        return self.normalize(self.resized(image))


def _is_triple(values) -> bool:
    return isinstance(values, (list, tuple)) and len(values) == 3 and all(matches(v, "float") for v in values)
