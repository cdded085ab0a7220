"""Dataset jobs on Ray Data, for collections that outgrow one machine.

    import ray
    from blip2.data import Captioner

    ds = ray.data.read_images("s3://bucket/images/", include_paths=True)
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={"model": "Salesforce/blip2-opt-2.7b", "dtype": "bfloat16"},
                        compute=ray.data.ActorPoolStrategy(size=4), batch_size=16, num_gpus=1)
    ds.write_parquet("s3://bucket/captions/")
"""

from __future__ import annotations

import json

import numpy as np

from ..engine.pipeline import load
from ..hub import DEFAULT_MODEL
from ..inputs.images import ImageError
from .job import Task, records
from .outputs import FIELDS, Output
from .sources import Item


class Captioner:
    """A `map_batches` callable: loads the model once per actor, then turns each batch's images into
    records (FIELDS columns; `settings` as a JSON string), keeping the batch's other columns.

    The images are the `image` column (arrays, as `ray.data.read_images` gives them; their source is
    the `path` column when there is one), or else the `source` column: paths or URLs every worker
    can read, or WebDataset members (with `offset` and `size`). Settings: those of `Task` and of
    `blip2.load` (model, dtype, device, quantize)."""

    def __init__(self, model: str = DEFAULT_MODEL, *, dtype: str | None = None, device: str | None = None,
                 quantize: str | None = None, prompt: str = "", questions: tuple[str, ...] = (),
                 num_captions: int = 1, settings: dict | None = None):
        self.task = Task(prompt, tuple(questions), num_captions, dict(settings or {}))
        self.task.check()
        self.name = model
        self.model = load(model, dtype=dtype, device=device, quantize=quantize)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" in batch:
            images = list(batch["image"])
            sources = [str(p) for p in batch["path"]] if "path" in batch else [f"row {i}" for i in range(len(images))]
            items = [Item(s) for s in sources]
        else:
            offsets, sizes = batch.get("offset"), batch.get("size")
            items = [Item(str(s), int(offsets[i]) if offsets is not None else -1,
                          int(sizes[i]) if sizes is not None else -1) for i, s in enumerate(batch["source"])]
            images = [_load(item) for item in items]
        made = records(self.model, items, images, self.task, self.name)
        out = {k: v for k, v in batch.items() if k not in ("image", *FIELDS)}
        for name in FIELDS:
            values = [json.dumps(r[name]) if name == "settings" else r[name] for r in made]
            out[name] = np.array(values, dtype=object)
        return out


def run(items: list[Item], output: Output, task: Task, *, load_kwargs: dict, address: str | None,
        actors: int, batch_size: int, gpus_per_actor: float = 0, report=None) -> tuple[int, int, int]:
    """The dataset job on a Ray cluster (`address`, else RAY_ADDRESS, else a local one): the items
    `output` does not hold yet go to `actors` Captioner actors; their records come back here and are
    written through `output`, committed and resumable as in a local job. Returns (answered, failed,
    already done)."""
    import ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    done = output.done(items)
    todo = [it for it in items if it.key not in done]
    answered = failed = 0
    if todo:
        ds = ray.data.from_items([{"source": it.source, "offset": it.offset, "size": it.size} for it in todo])
        ds = ds.map_batches(Captioner, fn_constructor_kwargs=dict(load_kwargs, prompt=task.prompt,
                                                                  questions=task.questions,
                                                                  num_captions=task.num_captions,
                                                                  settings=task.settings),
                            compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size,
                            num_gpus=gpus_per_actor)
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            made = [{name: _plain(batch[name][i], name) for name in FIELDS} for i in range(len(batch["key"]))]
            output.write(made)
            for r in made:
                if r["error"] is not None and report is not None:
                    report(r["error"])
            bad = sum(r["error"] is not None for r in made)
            answered, failed = answered + len(made) - bad, failed + bad
    output.close()
    return answered, failed, len(items) - len(todo)


def _load(item: Item):
    try:
        return item.load()
    except OSError as e:
        return ImageError(f"cannot read image {item.source!r}: {e.strerror or e}")


def _plain(value, name: str):
    """A record field as it came back from Ray (numpy values) as plain Python."""
    if name == "settings":
        return json.loads(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and np.isnan(value) else value  # Ray's form of a missing value
