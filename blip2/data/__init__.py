"""Dataset jobs: collections of images in, records out (JSONL, Parquet, WebDataset, sidecars),
resumable and sharded; `Captioner` for Ray Data."""

from .job import Task, run
from .ray import Captioner
from .sources import Item, list_items

__all__ = ["Captioner", "Item", "Task", "list_items", "run"]
