"""`blip2 bench caption`: the dataset job (`blip2 caption DIR --output OUT.jsonl`) against a batched
`transformers` loop, on a folder of JPEG photos of mixed real-world sizes.

Each system runs once in a fresh process on the same files, greedy, exactly --max-tokens new tokens,
--batch-size images a call. Wall time runs from spawn to exit (interpreter start and imports
included); load time is what each process reports; peak RSS is each process's own VmHWM.

    blip2 bench caption --model opt-2.7b --images 64 --batch-size 8 --compare transformers [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .checkpoints import CONFIGS, make_random_checkpoint
from .machine import machine

# Photo sizes, cycled: VGA, XGA, 4:3 1.2 MP, full HD, a portrait 12 MP phone photo, a square upload.
SIZES = [(640, 480), (1024, 768), (1280, 960), (1920, 1080), (3024, 4032), (800, 800)]

# The competitor: a plain batched loop as transformers' docs show it, with the worker's processor
# (the PIL backend, as LAVIS resizes) and the worker's way of slicing off the prompt.
_TRANSFORMERS = """
import json, sys, time
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor, logging

logging.set_verbosity_error(), logging.disable_progress_bar()
spec = json.loads(sys.argv[1])
start = time.perf_counter()
processor = Blip2Processor.from_pretrained(spec["model"], backend="pil")
model = Blip2ForConditionalGeneration.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"])).eval()
print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
files, b, n = spec["files"], spec["batch_size"], spec["max_tokens"]
captions = {}
for i in range(0, len(files), b):
    batch = files[i:i + b]
    images = [Image.open(p).convert("RGB") for p in batch]
    inputs = processor(images=images, text=[""] * len(batch), return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
    # OPT's output repeats the input ids; T5's starts with the decoder start token (a special token).
    new = out[:, inputs["input_ids"].shape[1]:] if model.config.use_decoder_only_language_model else out
    captions.update(zip(batch, processor.batch_decode(new, skip_special_tokens=True)))
with open(spec["captions"], "w") as f:
    json.dump(captions, f, indent=1)
"""

# Put before each child's code: its peak RSS, printed at exit. (The parent's view, ru_maxrss, starts
# at the parent's own peak, which fork or vfork hands down until exec.)
_PEAK = ("import atexit, sys; atexit.register(lambda: print('peak RSS', next(l.split()[1] for l in "
         "open('/proc/self/status') if l.startswith('VmHWM:')), 'kB', file=sys.stderr, flush=True))\n")


def _positive(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return int(v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="opt-2.7b",
                   help=f"{' or '.join(sorted(CONFIGS))} (the bench checkpoint, written if missing) or a checkpoint "
                        "directory (default opt-2.7b)")
    p.add_argument("--dir", type=Path, default=None, help="cache root of bench checkpoints and images (as for run)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--images", type=_positive, default=1000, help="JPEG files to caption (default 1000)")
    p.add_argument("--batch-size", type=_positive, default=8, help="images per batch, both systems (default 8)")
    p.add_argument("--max-tokens", type=_positive, default=20, help="new tokens per caption, exactly (default 20)")
    p.add_argument("--compare", choices=["transformers"], default=None, help="also run this system")
    p.add_argument("--json", type=Path, default=None, help="also save every number here")


def main(args: argparse.Namespace, root: Path) -> int:
    """The benchmark: the table on stdout; the systems' progress on stderr."""
    started = datetime.datetime.now(datetime.timezone.utc)
    model = str(make_random_checkpoint(args.model, root / args.model) if args.model in CONFIGS else args.model)
    folder = write_mixed_jpegs(root / f"jpegs-mixed-{args.images}", args.images)
    (work := root / "caption-bench").mkdir(parents=True, exist_ok=True)
    n, b, t = args.images, args.batch_size, args.max_tokens
    results = {}
    try:
        ours = work / "ours.jsonl"
        cli = _PEAK + "import runpy; runpy.run_module('blip2.apps.cli', run_name='__main__', alter_sys=True)"
        results["ours"] = timed_run([sys.executable, "-c", cli, "caption", str(folder), "--model", model, "--dtype",
                                     args.dtype, "--output", str(ours), "--overwrite", "--batch-size", str(b),
                                     "--beams", "1", "--max-new-tokens", str(t), "--min-new-tokens", str(t)], "ours", n)
        results["ours"]["captions"] = str(ours)
        if args.compare == "transformers":
            theirs = work / "transformers.json"
            spec = {"model": model, "dtype": args.dtype, "files": sorted(str(p) for p in folder.glob("*.jpg")),
                    "batch_size": b, "max_tokens": t, "captions": str(theirs)}
            results["transformers"] = timed_run([sys.executable, "-c", _PEAK + _TRANSFORMERS, json.dumps(spec)],
                                                "transformers", n)
            results["transformers"]["captions"] = str(theirs)
    except RuntimeError as e:
        print(f"blip2 bench caption: error: {e}", file=sys.stderr)
        return 1
    info = machine()
    versions = ", ".join(f"{p} {info[p]}" for p in ("torch", "transformers") if p in info)
    agree = agreement(results)
    print(f"{args.model}, {args.dtype}: {n} JPEG files of mixed sizes ({', '.join(f'{w}x{h}' for w, h in SIZES)}), "
          f"batches of {b}, greedy, exactly {t} new tokens; one fresh process per system.\n"
          f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
          f"{info.get('ram_gib', '?')} GiB; {versions}; {started:%Y-%m-%d}.\n\n{table(results, n)}"
          + (f"\n\nCaptions agree on {agree} of {n} images." if agree is not None else ""))
    if args.json is not None:
        raw = {"command": sys.argv, "model": args.model, "dtype": args.dtype, "images": n, "batch_size": b,
               "max_tokens": t, "sizes": SIZES, "started": started.isoformat(), "machine": info,
               "systems": results, "captions_agree": agree}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


def write_mixed_jpegs(directory: Path, count: int, sizes: list[tuple[int, int]] = SIZES, seed: int = 0) -> Path:
    """`count` JPEG photos-alike (quality 90) whose sizes cycle over `sizes`, made once into `directory`.

    Smooth colour fields plus luminance grain at half resolution: about 1.5 bits a pixel, as photos
    of that quality, so that reading and decoding cost what real files cost.
    """
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        path = directory / f"photo-{i:05d}-{w}x{h}.jpg"
        if path.is_file():
            continue
        rng = np.random.default_rng([seed, i])
        base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        grain = rng.normal(0, 8, (max(h // 2, 1), max(w // 2, 1))).astype(np.float32)
        grain = np.asarray(Image.fromarray(grain, mode="F").resize((w, h), Image.BILINEAR))
        pixels = np.asarray(base, dtype=np.float32) + grain[..., None]  # (h, w, 3)
        tmp = path.with_suffix(".tmp")  # not an image suffix: a half-written file is never captioned
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=90)
        tmp.replace(path)
    return directory


def timed_run(command: list[str], name: str, images: int) -> dict:
    """Run `command` (its stderr echoed to ours): wall seconds from spawn to exit, load seconds (its
    "loaded in X s" line), images/s with and without the load, peak RSS (its "peak RSS" line)."""
    env = dict(os.environ)  # the child imports this checkout's blip2, wherever the working directory is
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]), env.get("PYTHONPATH")]))
    print(f"{name}: {images} images ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in filter(str.strip, proc.stderr):  # as it comes: a run takes minutes
        print(f"    {name}: {line}", end="", file=sys.stderr, flush=True)
        lines.append(line)
    wall = time.perf_counter() - start if proc.wait() == 0 else None
    found = {key: [float(m[1]) for line in lines if (m := re.search(pattern, line))]
             for key, pattern in [("load_s", r"loaded in ([0-9.]+) s"), ("peak_kb", r"^peak RSS (\d+) kB")]}
    if wall is None or not all(found.values()):
        killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
        raise RuntimeError(f"{name} exited with {proc.returncode}{killed}: {''.join(lines[-5:]).strip()}")
    load = found["load_s"][-1]
    return {"images": images, "wall_s": wall, "load_s": load, "ips": images / (wall - load),
            "ips_with_load": images / wall, "peak_rss_gb": found["peak_kb"][-1] * 1024 / 1e9}


def agreement(results: dict[str, dict]) -> int | None:
    """On how many images ours (the job's JSONL records) and transformers (its JSON) wrote the same
    caption; None when one system ran."""
    if len(results) < 2:
        return None
    records = map(json.loads, Path(results["ours"]["captions"]).read_text().splitlines())
    ours = {r["source"]: (r["caption"] or "").strip() for r in records}
    theirs = json.loads(Path(results["transformers"]["captions"]).read_text())
    return sum(ours.get(path) == text.strip() for path, text in theirs.items())


def table(results: dict[str, dict], images: int) -> str:
    """One row per system, then ours / transformers for each figure."""
    keys = ["load_s", "ips", "ips_with_load", "peak_rss_gb"]
    header = ["system", "images", "load (s) ↓", "images/s excl. load ↑", "images/s incl. load ↑", "peak RSS (GB) ↓"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        lines.append("| " + " | ".join([name, str(images), *(f"{r[k]:.3g}" for k in keys)]) + " |")
    if len(results) == 2:
        ours, theirs = results["ours"], results["transformers"]
        lines.append("| " + " | ".join(["ours/transformers", "", *(f"{ours[k] / theirs[k]:.2f}" for k in keys)]) + " |")
    return "\n".join(lines)
