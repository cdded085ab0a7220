"""The `blip2` command line: results on stdout, progress and errors on stderr, exit codes scripts can trust.

    blip2 caption photo.jpg photos/ 'shots/*.png' [--json]
    blip2 ask photo.jpg "how many dogs are there?"
    blip2 chat photo.jpg
    blip2 info [--model DIR_OR_HUB_ID]
    blip2 quantize SRC DST --int4 [--no-vision]
    blip2 bench run --model opt-2.7b [--compare transformers]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
import time
from pathlib import Path

from .hub import DEFAULT_MODEL

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm"}


def _err(message: str) -> None:
    print(f"blip2: error: {message}", file=sys.stderr, flush=True)


def expand_images(args: list[str]) -> tuple[list[str], list[str]]:
    """Files, directories (their image files, sorted) and glob patterns to a list of inputs; also the
    errors for arguments that name nothing."""
    found, errors = [], []
    for arg in args:
        if arg.startswith(("http://", "https://")):
            found.append(arg)
        elif Path(arg).is_dir():
            files = sorted(str(p) for p in Path(arg).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            found.extend(files) if files else errors.append(f"{arg}: directory has no image files")
        elif any(c in arg for c in "*?[") and not Path(arg).exists():
            matches = sorted(glob.glob(arg, recursive=True))
            found.extend(matches) if matches else errors.append(f"{arg}: no file matches")
        else:
            found.append(arg)  # a missing file is reported by the image loader, per image
    return found, errors


class Progress:
    """A one-line progress bar on stderr, shown only when stderr is a terminal or many items are queued."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.show = total > 1 and sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        if self.show:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            width = 30
            filled = int(width * self.done / self.total)
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:.2f} images/s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.show:
            print(file=sys.stderr)


def _generation(args: argparse.Namespace) -> dict:
    settings = dict(num_beams=args.beams, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                    repetition_penalty=args.repetition_penalty, length_penalty=args.length_penalty, seed=args.seed,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.sample:
        settings.update(do_sample=True, num_beams=args.beams or 1)
    return {k: v for k, v in settings.items() if v is not None}


def _load(args: argparse.Namespace):
    import blip2

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model = blip2.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                       quantize_vision=not args.no_quantize_vision, force_float16=args.force_float16)
    q = f", {model.quantization.mode}" if model.quantization else ""
    print(f"loaded in {model.load_seconds:.1f} s ({model.dtype}{q}, {model.device})", file=sys.stderr, flush=True)
    return model


def _caption(args: argparse.Namespace) -> int:
    from .processing import ImageError, load_image

    paths, errors = expand_images(args.images)
    for e in errors:
        _err(e)
    if not paths:
        _err("no images to caption")
        return 1
    model = _load(args)
    settings = _generation(args)
    failed = len(errors)
    progress = Progress(len(paths))
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start:start + args.batch_size]
        images, names = [], []
        for path in batch:
            try:
                images.append(load_image(path))
                names.append(path)
            except ImageError as e:
                _err(str(e))
                failed += 1
        if images:
            t = time.perf_counter()
            captions = model.caption(images, args.prompt, **settings)
            seconds = (time.perf_counter() - t) / len(images)
            for name, caption in zip(names, captions):
                if args.json:
                    print(json.dumps({"path": name, "caption": caption, "seconds": round(seconds, 3)}), flush=True)
                else:
                    print(f"{name}\t{caption}" if len(paths) > 1 else caption, flush=True)
        progress.update(len(batch))
    progress.close()
    return 1 if failed else 0


def _ask(args: argparse.Namespace) -> int:
    from .processing import load_image

    image = load_image(args.image)
    model = _load(args)
    print(model.ask(image, args.question, **_generation(args)), flush=True)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .processing import ImageError, load_image

    image = load_image(args.image)
    model = _load(args)
    settings = _generation(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask about the image. /reset clears the conversation, /image PATH changes the image, "
              "Ctrl-D leaves.", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line == "/reset":
            messages = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            try:
                image = load_image(line[len("/image"):].strip())
                messages = []
                print("(new image; conversation cleared)", file=sys.stderr)
            except ImageError as e:
                _err(str(e))
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = model.chat(image, messages, **settings)
        except ValueError as e:
            _err(str(e))
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
        print(f"blip2> {reply}" if interactive else reply, flush=True)


def _info(args: argparse.Namespace) -> int:
    from .quantize import QuantizedLinear

    model = _load(args)
    cfg = model.config
    params = {id(p): p.numel() for p in model.model.parameters()}
    quantized = [m for m in model.model.modules() if isinstance(m, QuantizedLinear)]
    count = sum(params.values()) + sum(m.in_features * m.out_features for m in quantized)
    # Tied tensors counted once; packed (oneDNN) weights have no data pointer, and are never shared.
    tensors = {id(t) if t.is_mkldnn else t.data_ptr(): t.numel() * t.element_size()
               for t in [*model.model.parameters(), *model.model.buffers()]}
    print(f"path: {model.path}")
    print(f"language model: {cfg.text.model_type}, {count:,} parameters, {sum(tensors.values()) / 2**30:.2f} GiB in memory")
    if model.quantization:
        q = model.quantization
        group = f", groups of {q.group_size}" if q.mode == "int4" else ""
        print(f"quantization: {q.mode}{group}, {len(quantized)} layers (language model"
              f"{', vision encoder, Q-Former' if q.vision else ''}; the token embedding and output head in int8)")
    print(f"image size: {cfg.vision.image_size}, query tokens: {cfg.num_query_tokens}, "
          f"image token: {cfg.image_token_index}, end of sequence: {cfg.eos_token_ids}")
    print(f"dtype: {model.dtype}, device: {model.device}, loaded in {model.load_seconds:.2f} s")
    return 0


class _Stderr(logging.Handler):
    """Log lines to whatever sys.stderr is when they are written."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def _quantize(args: argparse.Namespace) -> int:
    from .hub import resolve
    from .quantize import GROUP_SIZE, Quantization, write_quantized

    q = Quantization(args.mode, args.group_size or GROUP_SIZE, vision=not args.no_vision)
    images, errors = expand_images(args.calibrate or [])
    for error in errors:
        _err(error)
    if errors:
        return 2
    progress = logging.getLogger("blip2.gptq")  # the calibration passes, on stderr
    if images and not progress.handlers:
        progress.addHandler(_Stderr())
        progress.setLevel(logging.INFO)
    start = time.perf_counter()
    how = f"GPTQ on {len(images)} image{'s' * (len(images) != 1)}" if images else "rounded to nearest"
    print(f"quantizing {args.src} to {args.mode} ({how}) ...", file=sys.stderr, flush=True)
    shards = write_quantized(resolve(args.src), Path(args.dst), q, images, args.device)
    size = sum(p.stat().st_size for p in shards) / 1e9
    print(f"wrote {args.dst} ({len(shards)} shards, {size:.2f} GB) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2", description="BLIP-2 captioning, visual question answering and chat")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or hub id ({DEFAULT_MODEL})")
    common.add_argument("--dtype", default=None,
                        help="float32 (default; auto when quantizing), bfloat16, float16 or auto (bfloat16 where "
                             "the hardware computes it natively, else float16 on CUDA, else float32)")
    common.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    common.add_argument("--quantize", choices=["int8", "int4"],
                        help="weight-only quantization of the language model and vision encoder, while loading")
    common.add_argument("--no-quantize-vision", action="store_true", help="with --quantize: keep the vision encoder in --dtype")
    common.add_argument("--force-float16", action="store_true",
                        help="run Flan-T5 in float16 although it overflows (with the reference's guards)")
    gen = argparse.ArgumentParser(add_help=False)
    g = gen.add_argument_group("generation (defaults: the task's, see README)")
    g.add_argument("--beams", type=int, help="beam search width (1: greedy)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--sample", action="store_true", help="sample instead of searching")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--length-penalty", type=float)

    p = sub.add_parser("caption", parents=[common, gen], help="caption images")
    p.add_argument("images", nargs="+", help="image files, directories, glob patterns or URLs")
    p.add_argument("--prompt", default="", help='text the caption continues, e.g. "a photo of"')
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="one JSON object per image: path, caption, seconds")
    p.set_defaults(run=_caption)

    p = sub.add_parser("ask", parents=[common, gen], help="answer a question about an image")
    p.add_argument("image")
    p.add_argument("question")
    p.set_defaults(run=_ask)

    p = sub.add_parser("chat", parents=[common, gen], help="talk about an image in the terminal")
    p.add_argument("image")
    p.set_defaults(run=_chat)

    p = sub.add_parser("info", parents=[common], help="load a checkpoint and describe it")
    p.set_defaults(run=_info)

    p = sub.add_parser("quantize", help="write a quantized copy of a checkpoint, which every command loads directly")
    p.add_argument("src", help="checkpoint directory or hub id")
    p.add_argument("dst", help="new directory for the quantized checkpoint")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--int8", dest="mode", action="store_const", const="int8", help="int8, one scale per output channel")
    mode.add_argument("--int4", dest="mode", action="store_const", const="int4", help="int4, a scale and zero per group")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128 (default)")
    p.add_argument("--no-vision", action="store_true", help="keep the vision encoder unquantized")
    p.add_argument("--calibrate", nargs="+", metavar="IMAGE",
                   help="quantize by GPTQ on these images (files, directories, globs), not to nearest")
    p.add_argument("--device", default="cpu", help="where calibration runs (cpu, cuda)")
    p.set_defaults(run=_quantize)

    p = sub.add_parser("bench", add_help=False, help="the side-by-side benchmark against transformers "
                       "(blip2 bench --help; see BENCHMARKS.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: `blip2 bench --help` shows the benchmark's options
        from .bench import main as bench

        return bench(argv[1:], prog="blip2 bench")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        _err(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
