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
import contextlib
import glob
import json
import logging
import os
import stat
import sys
import time
import warnings
from pathlib import Path

from .generation import GenerationConfig
from .hub import DEFAULT_MODEL
from .processing import ImageWarning

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm"}


def _err(message: str) -> None:
    print(f"blip2: error: {message}", file=sys.stderr, flush=True)


def expand_images(args: list[str]) -> tuple[list[str], list[str]]:
    """Files, directories (their image files, sorted) and glob patterns to a list of inputs, each file
    once; also the errors for arguments that name nothing. `**` matches directories at any depth
    without following links to directories, so a link to a parent cannot make the walk endless."""
    found: dict[str, None] = {}  # insertion-ordered, for duplicates
    seen: set[str] = set()  # real paths of the files found
    errors = []

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            found[path] = None

    for arg in args:
        if arg.startswith(("http://", "https://")):
            found[arg] = None
        elif Path(arg).is_dir():
            files = sorted(str(p) for p in Path(arg).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            for f in files:
                add(f)
            if not files:
                errors.append(f"{arg}: directory has no image files")
        elif glob.has_magic(arg) and not Path(arg).exists():
            matches = _glob(arg)
            for f in matches:
                add(f)
            if not matches:
                errors.append(f"{arg}: no file matches")
        else:
            add(arg)  # a missing file is reported by the image loader, per image
    return list(found), errors


def _glob(pattern: str) -> list[str]:
    """The files matching `pattern`, sorted; pathlib's `**` does not follow links to directories."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    rest = str(Path(*parts[fixed:]))
    hidden = any(part.startswith(".") for part in parts[fixed:])  # as glob: hidden names only when asked for
    matches = (p for p in root.glob(rest)
               if p.is_file() and (hidden or not any(q.startswith(".") for q in p.relative_to(root).parts)))
    return sorted(str(p) for p in matches)


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
    settings = {k: v for k, v in settings.items() if v is not None}
    GenerationConfig.make(**settings)  # a bad setting fails now, not after loading the model
    return settings


def _load(args: argparse.Namespace):
    import blip2

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model = blip2.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                       quantize_vision=not args.no_quantize_vision, force_float16=args.force_float16)
    q = f", {model.quantization.mode}" if model.quantization else ""
    print(f"loaded in {model.load_seconds:.1f} s ({model.dtype}{q}, {model.device})", file=sys.stderr, flush=True)
    return model


def _caption(args: argparse.Namespace) -> int:
    paths, errors = expand_images(args.images)
    for e in errors:
        _err(e)
    if not paths:
        _err("no images to caption")
        return 1
    settings = _generation(args)
    model = _load(args)
    out = Records(sys.stdout)
    captioned, failed = 0, len(errors)
    progress = Progress(len(paths))
    try:
        for start in range(0, len(paths), args.batch_size):
            # Paths go to the model as they are: each is decoded and resized on a worker as its turn
            # comes, so memory holds one full-size image per worker, whatever the batch size.
            batch = paths[start:start + args.batch_size]
            t = time.perf_counter()
            captions = model.caption(batch, args.prompt, errors="return", **settings)
            seconds = (time.perf_counter() - t) / len(batch)
            for name, caption in zip(batch, captions):
                if isinstance(caption, Exception):
                    failed += 1
                    if args.json:
                        out.write(json.dumps({"path": name, "error": str(caption)}))
                    else:
                        _err(str(caption))
                    continue
                captioned += 1
                if args.json:
                    out.write(json.dumps({"path": name, "caption": caption, "seconds": round(seconds, 3)}))
                else:
                    out.write(f"{_escaped(name)}\t{_escaped(caption)}" if len(paths) > 1 else caption)
            progress.update(len(batch))
    finally:
        progress.close()
        if len(paths) > 1 or failed:
            print(f"blip2: {captioned} captioned, {failed} failed", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _escaped(name: str) -> str:
    """A file name (or caption) for a line of tab-separated output: backslash, tab, newline and
    carriage return escaped, so that no name can add a column or a line."""
    return name.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class OutputError(OSError):
    """The results could not be written (disk full, file too large, ...)."""


class Records:
    """Whole lines to a stream: a line that cannot be written entirely (a full disk) is taken back
    where the stream is a file, so the output ends with the last complete record."""

    def __init__(self, stream):
        self.stream, self.written = stream, 0
        try:
            self.fd = stream.fileno()
            self.start = os.lseek(self.fd, 0, os.SEEK_CUR) if stat.S_ISREG(os.fstat(self.fd).st_mode) else None
        except (AttributeError, OSError, ValueError):  # not a real file (a test's capture, a StringIO)
            self.fd = self.start = None

    def write(self, line: str) -> None:
        if self.fd is None:
            print(line, file=self.stream, flush=True)
            self.written += 1
            return
        data = (line + "\n").encode("utf-8", "surrogateescape")  # file names as the system gave them
        self.stream.flush()
        at = os.lseek(self.fd, 0, os.SEEK_END) if self.start is not None else None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except BrokenPipeError:
            raise
        except OSError as e:
            if at is not None:
                os.ftruncate(self.fd, at)
            raise OutputError(f"cannot write the output after {self.written} records: {e.strerror or e}") from None
        self.written += 1


def _ask(args: argparse.Namespace) -> int:
    from .processing import load_image

    image = load_image(args.image)  # a bad image, path or setting fails before the model is loaded
    settings = _generation(args)
    model = _load(args)
    print(model.ask(image, args.question, **settings), flush=True)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .processing import ImageError, load_image

    image = load_image(args.image)
    settings = _generation(args)
    model = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask about the image. /reset clears the conversation, /image PATH changes the image, "
              "Ctrl-D leaves.", file=sys.stderr)
    messages: list[dict] = []
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes spoil their own line, not the stream
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        if not line:
            continue
        if not _is_utf8(line):
            _err("that line is not valid UTF-8 text; the conversation goes on without it")
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
        except (ValueError, RuntimeError) as e:  # a bad turn (its text, its length) is that turn's error
            _err(str(e))
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
        print(f"blip2> {reply}" if interactive else reply, flush=True)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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

    from .api import parse_device

    q = Quantization(args.mode, GROUP_SIZE if args.group_size is None else args.group_size, vision=not args.no_vision)
    if args.calibrate:
        parse_device(args.device)
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
    p.add_argument("--batch-size", type=_positive, default=8, help="images per batch (default 8)")
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
    warnings.simplefilter("always", ImageWarning)  # one line for each image, not only the first
    with _warnings_as_lines():
        try:
            return args.run(args)
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            _err(str(e).splitlines()[0] if str(e) else type(e).__name__)
            return 1


@contextlib.contextmanager
def _warnings_as_lines():
    """Warnings on stderr as one `blip2: warning: ...` line each, instead of Python's two-line form."""
    shown = warnings.showwarning
    warnings.showwarning = lambda message, *_: print(f"blip2: warning: {message}", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        warnings.showwarning = shown


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
