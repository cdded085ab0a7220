"""A dataset job: caption (or question) a collection in batches, images prepared ahead of the model,
records committed as they are made, resumable, one shard of n."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
import time
from dataclasses import dataclass, field

from ..engine.generation import GenerationConfig
from ..inputs.images import ImageError, Resized
from ..inputs.prompts import CAPTION, VQA
from ..inputs.urls import UrlPolicy, fetch
from .outputs import FIELDS, Output
from .sources import Item, in_shard


@dataclass(frozen=True)
class Task:
    """What to ask of each image. prompt: the text a caption continues, where `{name}` is the file's
    name without suffix; questions: answered each (the VQA prompt and settings), instead of a
    caption; num_captions: captions per image, sampled; settings: generation overrides."""

    prompt: str = ""
    questions: tuple[str, ...] = ()
    num_captions: int = 1
    settings: dict = field(default_factory=dict)

    def generation(self) -> GenerationConfig:
        base = GenerationConfig(**(VQA if self.questions else CAPTION))
        if self.num_captions > 1:
            base = GenerationConfig.make(base, do_sample=True, num_beams=1, num_return_sequences=self.num_captions)
        return GenerationConfig.make(base, **self.settings)

    def check(self) -> None:
        """Errors in the task's settings and template, before any model is loaded."""
        self.generation()
        try:
            self.prompt.format(name="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt template {self.prompt!r}: only {{name}} can be filled in ({e})") from None


def records(model, items: list[Item], images: list, task: Task, model_name: str) -> list[dict]:
    """One record per item: its answers for the images that could be read (`images[i]`: anything
    the model takes, or the ImageError it failed with), its error for the others."""
    gen = task.generation()
    settings = dataclasses.asdict(gen)
    good = [i for i, image in enumerate(images) if not isinstance(image, ImageError)]
    start = time.perf_counter()
    results: dict[int, object] = {}
    if good and task.questions:
        q = len(task.questions)
        answers = model.ask([images[i] for i in good for _ in range(q)], list(task.questions) * len(good),
                            errors="return", **settings)
        results = {i: answers[j * q:(j + 1) * q] for j, i in enumerate(good)}
    elif good:
        prompts = [task.prompt.format(name=items[i].name) for i in good]
        out = model.generate([images[i] for i in good], prompts, errors="return", **settings)
        results = dict(zip(good, out))
    seconds = round((time.perf_counter() - start) / max(len(good), 1), 4)
    made = []
    for i, item in enumerate(items):
        r = dict.fromkeys(FIELDS)
        r.update(key=item.key, source=item.source, model=model_name, settings=settings)
        result = results.get(i, images[i])
        error = result if isinstance(result, ImageError) else next(
            (a for a in result if isinstance(a, ImageError)), None) if isinstance(result, list) else None
        if error is not None:
            r["error"] = str(error)
        elif task.questions:
            r.update(questions=list(task.questions), answers=list(result), seconds=seconds)
        else:
            r.update(prompt=task.prompt.format(name=item.name), seconds=seconds)
            if task.num_captions > 1:
                r["captions"] = [x.text for x in result]
            else:
                r["caption"] = result.text
        made.append(r)
    return made


def run(model, items: list[Item], output: Output, task: Task, *, model_name: str, batch_size: int = 8,
        shard: tuple[int, int] = (0, 1), report=None) -> tuple[int, int, int]:
    """Answer every item of this shard that `output` does not hold yet, `batch_size` images at a
    time: the next batch's images are read and resized on worker threads while the model answers
    this one, and each batch's records are handed to `output` as soon as they are made. A progress
    bar (images/s, ETA, errors) goes to stderr when it is a terminal. Returns (answered, failed,
    already done); report(message) hears of each failed image."""
    from tqdm import tqdm

    mine = [it for it in items if in_shard(it, *shard)]
    done = output.done(mine)
    todo = [it for it in mine if it.key not in done]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    answered = failed = 0
    bar = tqdm(total=len(todo), unit="img", file=sys.stderr, dynamic_ncols=True, disable=None)
    readers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="blip2-read")

    def prepare(batch: list[Item]):
        raw = list(readers.map(_read, batch)) if output.wants_bytes else [it.load() for it in batch]
        usable = [r for r in raw if not isinstance(r, ImageError)]
        return raw, model.images(usable, errors="return")  # decoding starts now, on the stream's workers

    try:
        ahead = prepare(batches[0]) if batches else None
        for n, batch in enumerate(batches):
            raw, rows = ahead
            ahead = prepare(batches[n + 1]) if n + 1 < len(batches) else None
            rows = iter(rows)
            images = [r if isinstance(r, ImageError) else _named(next(rows), r, item) for r, item in zip(raw, batch)]
            made = records(model, batch, images, task, model_name)
            output.write(made, [r if isinstance(r, bytes) else None for r in raw])
            bad = [r for r in made if r["error"] is not None]
            for r in bad:
                if report is not None:
                    report(r["error"])
            answered, failed = answered + len(made) - len(bad), failed + len(bad)
            bar.update(len(batch))
            bar.set_postfix(errors=failed, refresh=False)
        output.close()
    finally:
        bar.close()
        readers.shutdown(cancel_futures=True)
    return answered, failed, len(mine) - len(todo)


def _named(row, data, item: Item):
    """An image decoded and resized for the model, or the error decoding `data` gave, named by the
    item's source rather than by the bytes it was read into."""
    if not isinstance(row, ImageError):
        return Resized(row)
    return ImageError(str(row).replace(f"<{len(data)} bytes>", repr(item.source))) if isinstance(data, bytes) else row


def _read(item: Item) -> bytes | ImageError:
    """An image file's bytes (for outputs that store them); a URL is fetched."""
    try:
        if item.is_url():
            return fetch(item.source, UrlPolicy())
        data = item.load()
        return data if isinstance(data, bytes) else open(data, "rb").read()
    except ImageError as e:
        return e
    except OSError as e:
        return ImageError(f"cannot read image {item.source!r}: {e.strerror or e}")

