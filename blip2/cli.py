"""The `blip2` command line: results on stdout, progress and errors on stderr, exit codes scripts can trust."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import blip2

    model = blip2.load(args.model, dtype=args.dtype, device=args.device)
    cfg = model.config
    params = {id(p): p.numel() for p in model.model.parameters()}
    print(f"path: {model.path}")
    print(f"language model: {cfg.text.model_type}, {len(params)} tensors, {sum(params.values()):,} parameters")
    print(f"image size: {cfg.vision.image_size}, query tokens: {cfg.num_query_tokens}, "
          f"image token: {cfg.image_token_index}")
    print(f"dtype: {model.dtype}, device: {model.device}, loaded in {model.load_seconds:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2", description="BLIP-2 captioning, visual question answering and chat")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="load a checkpoint and describe it")
    info.add_argument("model", help="checkpoint directory")
    info.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    info.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"blip2: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
