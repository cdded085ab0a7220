"""blip2: a fast, faithful BLIP-2 in PyTorch."""

import os

# Large CPU tensors (the weights) on transparent huge pages: torch then asks the kernel for 2 MB pages
# for allocations of 2 MB and more, so loading faults in 512 times fewer pages (1-2 s of a 9 s bfloat16
# load, the same resident memory; measured). Read by torch at its first large allocation, so it takes
# effect unless one was made before blip2 was imported; THP_MEM_ALLOC_ENABLE=0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .api import Blip2, load  # noqa: E402
from .config import Blip2Config, ConfigError  # noqa: E402
from .weights import WeightsError  # noqa: E402

__all__ = ["Blip2", "Blip2Config", "ConfigError", "WeightsError", "load"]
__version__ = "0.1.0"
