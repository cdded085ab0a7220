"""`blip2 bench serve`: an OpenAI-compatible server under concurrent streaming clients, timed by them.

Starts `blip2 serve` on a free loopback port (or measures one running at --url: ours or `vllm serve`),
sends a warm-up request, then per concurrency level runs a closed loop of that many clients until the
level's requests have finished. Each request: one of four 640x480 JPEG files as a data URL, a caption
or a question, greedy, exactly --max-tokens new tokens (min_tokens = max_tokens). Times are chunk
arrivals at the client: TTFT to the first chunk with text, TPOT (last chunk - first text) / (tokens - 1).
Tokens are the server's count (usage.completion_tokens, asked for with stream_options.include_usage).

    blip2 bench serve --model opt-2.7b --clients 1,8,32,64 [--json out.json]
    blip2 bench serve --url http://127.0.0.1:8000 --clients 1,8     # a server that is already running
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoints import CONFIGS, make_random_checkpoint, write_images
from .machine import machine

QUESTIONS = [None, "what is in the picture?", "how many dogs are in the picture?"]  # None: a caption
COLUMNS = {"clients": "clients", "requests": "requests", "requests_per_s": "requests/s",
           "tokens_per_s": "tokens/s", "ttft_ms_p50": "TTFT p50 (ms)", "ttft_ms_p99": "TTFT p99 (ms)",
           "tpot_ms_p50": "TPOT p50 (ms)", "tpot_ms_p99": "TPOT p99 (ms)", "latency_s_p50": "latency p50 (s)",
           "latency_s_p99": "latency p99 (s)", "errors": "errors"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    def positive(v: str) -> int:
        if not v.isdigit() or int(v) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
        return int(v)

    p.add_argument("--model", default="opt-2.7b",
                   help=f"{' or '.join(sorted(CONFIGS))} (the bench checkpoint, written if missing) or a checkpoint "
                        "directory (default opt-2.7b)")
    p.add_argument("--dir", type=Path, default=None, help="cache root of bench checkpoints and images (as for run)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--clients", type=lambda v: [positive(c) for c in v.split(",")], default=[1, 8, 32, 64],
                   help="comma-separated concurrency levels (default 1,8,32,64)")
    p.add_argument("--requests", type=positive, default=None, help="requests per level (default max(2 x clients, 8))")
    p.add_argument("--max-tokens", type=positive, default=20, help="new tokens per request, exactly (default 20)")
    p.add_argument("--url", default=None, help="measure the server at this address (ours or `vllm serve`) instead "
                                               "of starting ours")
    p.add_argument("--max-batch", type=positive, default=None, help="the started server's --max-batch")
    p.add_argument("--json", type=Path, default=None, help="also save every number here")


def main(args: argparse.Namespace, root: Path) -> int:
    """The benchmark: the table on stdout; progress, and the server's output in DIR/serve.log, elsewhere."""
    started = datetime.datetime.now(datetime.timezone.utc)
    images = [_data_url(Path(p)) for p in write_images(root / "images", 4)]
    server, url, load_s = None, args.url, None
    try:
        if url is None:
            model = make_random_checkpoint(args.model, root / args.model) if args.model in CONFIGS else args.model
            server, url, load_s = start_server(model, args.dtype, args.max_batch, root / "serve.log")
        served, levels = asyncio.run(measure(url.rstrip("/"), images, args.clients, args.requests, args.max_tokens))
    except (RuntimeError, OSError) as e:
        print(f"blip2 bench serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:  # SIGTERM lets running answers finish (up to 30 s); then kill
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    info = machine()
    where = f"blip2 serve ({args.dtype}), ready {load_s:.1f} s after start" if load_s is not None else url
    ram = info.get("ram_gib", "?")
    versions = ", ".join(f"{p} {info[p]}" for p in ("torch", "transformers", "vllm") if p in info)
    print(f"{served} on {where}: streamed chat completions, greedy, exactly {args.max_tokens} new tokens, 640x480 "
          "JPEG data URLs, captions and questions; a closed loop of N clients per level.\n"
          f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), {ram} GiB; "
          f"{versions}; {started:%Y-%m-%d}.\n\n{table(levels)}")
    if args.json is not None:
        raw = {"command": sys.argv, "model": args.model if args.url is None else served, "url": args.url,
               "dtype": args.dtype if args.url is None else None, "max_tokens": args.max_tokens,
               "started": started.isoformat(), "machine": info, "load_s": load_s, "levels": levels}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


def start_server(model: str | Path, dtype: str, max_batch: int | None,
                 log: Path) -> tuple[subprocess.Popen, str, float]:
    """`blip2 serve` on a free loopback port: (its process, its URL, seconds until /health answered)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "blip2.apps.cli", "serve", "--model", str(model), "--port", str(port),
               "--dtype", dtype, *(["--max-batch", str(max_batch)] if max_batch else [])]
    env = dict(os.environ)  # the child imports this checkout's blip2, wherever the working directory is
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]), env.get("PYTHONPATH")]))
    print(f"starting blip2 serve --model {model} (its output: {log})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    load_s = time.perf_counter() - start
                    print(f"server ready in {load_s:.1f} s", file=sys.stderr, flush=True)
                    return proc, url, load_s
            time.sleep(0.5)
    except BaseException:  # interrupted while it loads: take it down with us
        proc.kill()
        raise
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"blip2 serve exited with {proc.returncode} before it was ready:\n{tail}")


async def measure(url: str, images: list[str], levels: list[int], requests: int | None,
                  max_tokens: int) -> tuple[str, list[dict]]:
    """(the served model's name, one summary per concurrency level)."""
    import httpx

    timeout = httpx.Timeout(900, connect=10)  # a request waits behind the others on a slow machine
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
        try:
            served = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, LookupError) as e:
            raise RuntimeError(f"no OpenAI-compatible server at {url} ({type(e).__name__}: {e})") from None
        bodies = [request_body(served, images[i % len(images)], QUESTIONS[i % len(QUESTIONS)], max_tokens)
                  for i in range(len(images) * len(QUESTIONS))]  # every image with every question
        warm = await _request(client, url, bodies[0])
        if "error" in warm:
            raise RuntimeError(f"the warm-up request failed: {warm['error']}")
        print(f"warm-up request: {warm['latency_s']:.1f} s", file=sys.stderr, flush=True)
        out = []
        for clients in levels:
            n = requests or max(2 * clients, 8)
            todo, results = iter(range(n)), []

            async def worker():
                for i in todo:  # one iterator shared by the workers: each request is sent once
                    results.append(await _request(client, url, bodies[i % len(bodies)]))

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            out.append(summarize(clients, results, time.perf_counter() - start))
            errors = [r["error"] for r in results if "error" in r][:1]
            print(f"{clients} clients: {n} requests in {out[-1]['seconds']:.1f} s",
                  *(f"(first error: {e})" for e in errors), file=sys.stderr, flush=True)
    return served, out


def request_body(model: str, image: str, question: str | None, max_tokens: int) -> dict:
    """A streamed chat completion: a caption (no question) or an answer, greedy, exactly max_tokens."""
    content = [{"type": "image_url", "image_url": {"url": image}},
               *([{"type": "text", "text": question}] if question else [])]
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}


async def _request(client, url: str, body: dict) -> dict:
    """One streamed request: {"error": message}, or its tokens and timings (seconds)."""
    import httpx

    start = time.perf_counter()
    first = last = None
    tokens = texts = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:300].decode(errors='replace')}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event, now = json.loads(line[6:]), time.perf_counter()
                if "error" in event:
                    return {"error": event["error"].get("message", str(event["error"]))}
                choices = event.get("choices") or []
                if any(c.get("delta", {}).get("content") for c in choices):
                    first, texts = first or now, texts + 1
                if any(c.get("delta", {}).get("content") or c.get("finish_reason") for c in choices):
                    last = now
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except (httpx.HTTPError, ValueError) as e:  # ValueError: a line that is not JSON
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    tokens, last = tokens or texts, last or end  # no usage sent: one token per chunk with text
    first = first or last
    return {"tokens": tokens, "ttft_s": first - start, "latency_s": end - start,
            "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else None}


def summarize(clients: int, results: list[dict], seconds: float) -> dict:
    """A level's rates (finished requests and tokens per second of the level's wall time) and percentiles."""
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    out = {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "seconds": seconds,
           "tokens": tokens, "requests_per_s": len(ok) / seconds, "tokens_per_s": tokens / seconds}
    for key, name, scale in (("ttft_s", "ttft_ms", 1e3), ("tpot_s", "tpot_ms", 1e3), ("latency_s", "latency_s", 1)):
        values = [r[key] for r in ok if r[key] is not None]
        for q in (50, 99):
            out[f"{name}_p{q}"] = scale * float(np.percentile(values, q)) if values else None
    return dict(out, results=results)


def table(levels: list[dict]) -> str:
    def cell(v) -> str:
        return "—" if v is None else str(v) if isinstance(v, int) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"

    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(level[key]) for key in COLUMNS) + " |" for level in levels]
    return "\n".join(lines)


def _data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
