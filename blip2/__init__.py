"""blip2: a fast, faithful BLIP-2 in PyTorch: `blip2.load(...)` returns a `Blip2` that captions,
answers questions about images and chats about them."""

from .checkpoint import WeightsError
from .config import Blip2Config, ConfigError
from .engine.pipeline import Blip2, Result, load
from .inputs.images import ImageError, load_image

__all__ = ["Blip2", "Blip2Config", "ConfigError", "ImageError", "Result", "WeightsError", "load", "load_image"]
__version__ = "0.1.0"
