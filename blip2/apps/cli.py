"""The `blip2` command line: results on stdout, progress and errors on stderr, exit codes scripts can trust.

    blip2 caption photo.jpg photos/ 'shots/*.png' [--json]
    blip2 ask photo.jpg "how many dogs are there?"
    blip2 chat photo.jpg
    blip2 info [--model DIR_OR_HUB_ID]
    blip2 quantize SRC DST --int4 [--no-vision]
    blip2 serve [--model ...] [--port 8000] [--api-key KEY]
    blip2 bench run --model opt-2.7b [--compare transformers]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from ..engine.dtypes import parse_device
from ..engine.generation import GenerationConfig
from ..engine.pipeline import load
from ..hub import DEFAULT_MODEL, resolve
from ..inputs.images import ImageWarning, load_image
from ..models.layers import attention_kernels
from ..quant.formats import GROUP_SIZE, Quantization
from ..quant.linear import QuantizedLinear
from ..quant.packed import PackedLinear
from ..data.job import Task, run as run_job
from ..data.outputs import open_output
from ..data.sources import LIST_SUFFIXES, TABLE_SUFFIXES, in_shard, list_items
from .caption_job import caption_files, expand_images

DATASET_SUFFIXES = LIST_SUFFIXES | TABLE_SUFFIXES | {".tar"}
from .chat import chat_loop
from .quantize_job import quantize_checkpoint


def _err(message: str) -> None:
    print(f"blip2: error: {message}", file=sys.stderr, flush=True)


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
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                 quantize_vision=not args.no_quantize_vision, quantize_language=not args.no_quantize_language,
                 force_float16=args.force_float16)
    q = f", {model.quantization.mode}" if model.quantization else ""
    print(f"loaded in {model.load_seconds:.1f} s ({model.dtype}{q}, {model.device})", file=sys.stderr, flush=True)
    return model


def _caption(args: argparse.Namespace) -> int:
    if _dataset_job(args):
        return _caption_dataset(args)
    paths, errors = expand_images(args.images)
    for e in errors:
        _err(e)
    if not paths:
        _err("no images to caption")
        return 1
    settings = _generation(args)
    _, failed = caption_files(_load(args), paths, args.prompt, settings, batch_size=args.batch_size, as_json=args.json,
                              report=_err, failed_before=len(errors))
    return 1 if failed else 0


def _dataset_job(args: argparse.Namespace) -> bool:
    """Whether `caption` runs as a dataset job (records, resume, shards) rather than its simple form."""
    flags = (args.output, args.sidecar, args.ray, args.question, args.shard, args.column, args.format)
    return (any(f is not None for f in flags) or args.recursive or args.num_captions > 1
            or any(Path(a).suffix.lower() in DATASET_SUFFIXES and Path(a).is_file() for a in args.images))


def _caption_dataset(args: argparse.Namespace) -> int:
    task = Task(args.prompt, tuple(args.question or ()), args.num_captions, _generation(args))
    task.check()
    shard = args.shard or (0, 1)
    items, errors = list_items(args.images, recursive=args.recursive, column=args.column)
    for e in errors:
        _err(e)
    if not items:
        _err("no images to caption")
        return 1
    output = open_output(args.output, args.format, args.sidecar, overwrite=args.overwrite,
                         tag=f"s{shard[0]:03d}of{shard[1]:03d}", per_part=args.per_part, seconds=args.commit_seconds)
    try:
        if args.ray is not None:
            from ..data.ray import run as run_ray

            load_kwargs = dict(model=args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
            answered, failed, skipped = run_ray(
                [it for it in items if in_shard(it, *shard)], output, task, load_kwargs=load_kwargs, address=None if args.ray == "local" else args.ray,
                actors=args.ray_actors, batch_size=args.batch_size,
                gpus_per_actor=1 if (args.device or "").startswith("cuda") else 0, report=_err)
        else:
            answered, failed, skipped = run_job(_load(args), items, output, task, model_name=args.model,
                                                batch_size=args.batch_size, shard=shard, report=_err)
    finally:
        output.close()
    failed += len(errors)
    already = f", {skipped} already done" if skipped else ""
    print(f"blip2: {answered} captioned, {failed} failed{already}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _chat(args: argparse.Namespace) -> int:
    image = load_image(args.image)
    settings = _generation(args)
    return chat_loop(_load(args), image, settings, report=_err)


def _ask(args: argparse.Namespace) -> int:
    image = load_image(args.image)  # a bad image, path or setting fails before the model is loaded
    settings = _generation(args)
    model = _load(args)
    print(model.ask(image, args.question, **settings), flush=True)
    return 0


def _info(args: argparse.Namespace) -> int:
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
        parts = [p for p, on in (("language model", q.language), ("vision encoder, Q-Former", q.vision)) if on]
        head = "; the token embedding and output head in int8" if q.language else ""
        print(f"quantization: {q.mode}{group}, {len(quantized)} layers ({', '.join(parts)}{head})")
    print(f"image size: {cfg.vision.image_size}, query tokens: {cfg.num_query_tokens}, "
          f"image token: {cfg.image_token_index}, end of sequence: {cfg.eos_token_ids}")
    print(f"dtype: {model.dtype}, device: {model.device}, loaded in {model.load_seconds:.2f} s")
    print(f"products: {_products(model)}")
    print(f"attention: {attention_kernels(model.dtype, model.device)}")
    return 0


# What a layer's product runs on, by the kernel it chose at load (PackedLinear.kernel, QuantizedLinear.few_rows).
_PRODUCTS = {"bf16": "blip2 AVX-512 bfloat16", "f32": "blip2 AVX2 float32", "onednn": "oneDNN packed",
             "plain": "torch's F.linear", "pairs_product": "blip2 int8 (pair layout)", "own_product": "blip2 AVX2 int4",
             "torch_kernel": "torch's weight-only kernel", "cuda_int8_widened": "widened on the GPU",
             "cuda_int4_widened": "widened on the GPU", "cpu_widened": "the weight widened",
             "cpu_int8_dynamic": "int8 activations"}


def _products(model) -> str:
    """Which kernels the linear layers run on, per part of the model: "language model: blip2 AVX-512
    bfloat16 (193 layers); vision and Q-Former: oneDNN packed (156 layers)"."""
    found: collections.Counter = collections.Counter()
    for name, m in model.model.named_modules():
        if isinstance(m, PackedLinear):
            kernel = m.kernel
        elif isinstance(m, QuantizedLinear):
            kernel = _PRODUCTS.get(m.few_rows, m.few_rows)
            if m.many_rows is not None:
                kernel += f", from {m.many_from} rows {_PRODUCTS.get(m.many_rows, m.many_rows)}"
        elif isinstance(m, torch.nn.Linear):
            kernel = _PRODUCTS["plain"]
        else:
            continue
        part = "language model" if name.startswith("language_model.") else "vision and Q-Former"
        found[part, _PRODUCTS.get(kernel, kernel)] += 1
    return "; ".join(f"{part}: {kernel} ({n} layers)" for (part, kernel), n in sorted(found.items()))


class _Stderr(logging.Handler):
    """Log lines to whatever sys.stderr is when they are written."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def _quantize(args: argparse.Namespace) -> int:
    q = Quantization(args.mode, GROUP_SIZE if args.group_size is None else args.group_size, vision=not args.no_vision,
                     language=not args.no_language)
    if args.calibrate:
        parse_device(args.device)
    images, errors = expand_images(args.calibrate or [])
    for error in errors:
        _err(error)
    if errors:
        return 2
    progress = logging.getLogger("blip2.quant.gptq")  # the calibration passes, on stderr
    if images and not progress.handlers:
        progress.addHandler(_Stderr())
        progress.setLevel(logging.INFO)
    start = time.perf_counter()
    how = f"GPTQ on {len(images)} image{'s' * (len(images) != 1)}" if images else "rounded to nearest"
    print(f"quantizing {args.src} to {args.mode} ({how}) ...", file=sys.stderr, flush=True)
    shards = quantize_checkpoint(resolve(args.src), Path(args.dst), q, images, args.device)
    size = sum(p.stat().st_size for p in shards) / 1e9
    print(f"wrote {args.dst} ({len(shards)} shards, {size:.2f} GB) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .server import ServerSettings, serve
    except ImportError as e:
        raise RuntimeError(f"blip2 serve needs the server's packages ({e.name} is missing): "
                           "pip install 'blip2[serve]'") from None
    from ..inputs.urls import UrlPolicy

    media = Path(args.allowed_local_media_path).expanduser().resolve() if args.allowed_local_media_path else None
    if media is not None and not media.is_dir():
        raise ValueError(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a directory")
    settings = ServerSettings(model_name=args.served_model_name or args.model,
                              api_key=args.api_key or os.environ.get("BLIP2_API_KEY") or None,
                              max_rows=args.max_batch, max_queue=args.max_queue, request_timeout=args.request_timeout,
                              urls=UrlPolicy(allow_private=args.allow_private_urls, allowed_local_path=media))
    serve(_load(args), settings, host=args.host, port=args.port)
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
    common.add_argument("--no-quantize-language", action="store_true",
                        help="with --quantize: keep the language model in --dtype (int8: faster image batches)")
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
    d = p.add_argument_group("dataset jobs (docs/datasets.md)")
    d.add_argument("--output", help="records to OUT.jsonl, OUT.parquet/ (parts) or DIR/ (WebDataset shards); "
                   "running the same command again finishes a job that was stopped")
    d.add_argument("--format", choices=["jsonl", "parquet", "webdataset"], help="when --output's name does not say")
    d.add_argument("--sidecar", metavar="SUFFIX", help="write each caption beside its image (photo.jpg -> photo.txt "
                   "for --sidecar .txt); images that have one are skipped")
    d.add_argument("--overwrite", action="store_true", help="start over: replace what --output or --sidecar holds")
    d.add_argument("--recursive", action="store_true", help="directories: their subdirectories too")
    d.add_argument("--column", help="tables (.csv, .tsv, .jsonl, .parquet): the column of paths or URLs")
    d.add_argument("--question", action="append", help="answer this question about each image (repeatable)")
    d.add_argument("--num-captions", type=_positive, default=1, help="captions per image, sampled")
    d.add_argument("--shard", type=_shard, help="I/N: only this shard of the collection (0-based), for N "
                   "processes or machines that share no state")
    d.add_argument("--per-part", type=_positive, default=1000,
                   help="records per Parquet part or WebDataset shard (default 1000)")
    d.add_argument("--commit-seconds", type=float, default=60.0,
                   help="commit a part at least this often, so a stopped job loses at most this much (default 60)")
    d.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on a Ray cluster (ADDRESS, else RAY_ADDRESS, else a local one)")
    d.add_argument("--ray-actors", type=_positive, default=1, help="model replicas on the cluster (default 1)")
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
    p.add_argument("--no-language", action="store_true", help="keep the language model unquantized")
    p.add_argument("--calibrate", nargs="+", metavar="IMAGE",
                   help="quantize by GPTQ on these images (files, directories, globs), not to nearest")
    p.add_argument("--device", default="cpu", help="where calibration runs (cpu, cuda)")
    p.set_defaults(run=_quantize)

    p = sub.add_parser("serve", parents=[common], help="an OpenAI-compatible HTTP server with a web page")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model name clients give (default: --model)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (or set BLIP2_API_KEY)")
    p.add_argument("--max-batch", type=_positive, default=32,
                   help="sequences decoded at once (a request takes n, or num_beams, of them; default 32)")
    p.add_argument("--max-queue", type=_positive, default=256,
                   help="requests waiting beyond the batch before new ones are refused with 429 (default 256)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cancelled")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="fetch image URLs on private, loopback and link-local addresses too")
    p.add_argument("--allowed-local-media-path", metavar="DIR", help="serve file:// image URLs under DIR")
    p.set_defaults(run=_serve)

    p = sub.add_parser("bench", add_help=False, help="the side-by-side benchmark against transformers "
                       "(blip2 bench --help; see BENCHMARKS.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: `blip2 bench --help` shows the benchmark's options
        from .bench import main as bench

        return bench(argv[1:], prog="blip2 bench")
    args = build_parser().parse_args(argv)
    # Large CPU tensors (the weights) on transparent huge pages: torch then asks the kernel for 2 MB
    # pages for allocations of 2 MB and more, so loading faults in 512 times fewer pages (1-2 s of a
    # 9 s bfloat16 load, the same resident memory; docs/loading.md). Read by torch at its first large
    # allocation; THP_MEM_ALLOC_ENABLE=0 opts out.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
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


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"must be I/N with 0 <= I < N, got {text!r}")
    return i, n


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
