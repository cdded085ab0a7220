"""blip2: a fast, faithful BLIP-2 in PyTorch."""

from .api import Blip2, load
from .config import Blip2Config, ConfigError
from .weights import WeightsError

__all__ = ["Blip2", "Blip2Config", "ConfigError", "WeightsError", "load"]
__version__ = "0.1.0"
