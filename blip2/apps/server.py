"""`blip2 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one continuous-batching engine.

    POST /v1/chat/completions   chat, questions and captions about an image (streamed or not)
    GET  /v1/models             the served model
    GET  /health                200 while the engine runs, 503 when it has stopped
    GET  /metrics               Prometheus metrics
    GET  /                      a web page to caption, ask and chat
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.batching import Engine, QueueFull, Request
from ..inputs.images import ImageError, load_image
from ..inputs.prompts import render_chat
from ..inputs.urls import UrlPolicy
from .openai_api import DEFAULT_MAX_TOKENS, ApiError, ChatRequest, TextStream, conversation

log = logging.getLogger("blip2.server")


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_rows: int = 32
    max_queue: int = 256
    request_timeout: float = 600.0
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20
    urls: UrlPolicy = UrlPolicy(allow_private=False)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, engine: Engine):
        r = self.registry = CollectorRegistry()
        Gauge("blip2_requests_running", "Requests decoding now", registry=r).set_function(
            lambda: len(engine.running))
        Gauge("blip2_requests_waiting", "Requests waiting for decoding rows", registry=r).set_function(
            lambda: len(engine.waiting))
        Gauge("blip2_images_encoded", "Images through the vision encoder since start", registry=r).set_function(
            lambda: engine.images_encoded)
        self.prompt_tokens = Counter("blip2_prompt_tokens", "Prompt positions read (image queries included)",
                                     registry=r)
        self.generated_tokens = Counter("blip2_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("blip2_requests", "Finished requests", ["finish_reason"], registry=r)
        self.errors = Counter("blip2_request_errors", "Requests answered with an error", ["kind"], registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("blip2_time_to_first_token_seconds", "Arrival to first token", buckets=buckets,
                              registry=r)
        self.tpot = Histogram("blip2_time_per_output_token_seconds", "Mean time between tokens after the first",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3), registry=r)
        self.latency = Histogram("blip2_e2e_request_latency_seconds", "Arrival to last token", buckets=buckets,
                                 registry=r)


def build_app(model, settings: ServerSettings) -> FastAPI:
    """The server's app over a loaded `Blip2`; its engine starts now and stops with the app."""
    engine = Engine(model, max_rows=settings.max_rows, max_queue=settings.max_queue)
    metrics = Metrics(engine)
    created = int(time.time())

    async def lifespan(app):
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="blip2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def refuse(e: ApiError) -> JSONResponse:
        metrics.errors.labels(e.code or e.kind).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return refuse(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return refuse(ApiError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        log.exception("internal error")
        return refuse(ApiError(500, f"internal error: {type(e).__name__}", "internal_error"))

    @app.middleware("http")
    async def authorize(request: HttpRequest, call_next):
        if settings.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return refuse(ApiError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                       "authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "blip2", "max_model_len": _max_len(model)}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("blip2.apps").joinpath("web/index.html").read_text()

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await _read_json(http, settings.max_body_bytes)
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"{param}: {first['msg']}", param=param) from None
        if req.model != settings.model_name:
            raise ApiError(404, f"model {req.model!r} is not served here (this server serves "
                           f"{settings.model_name!r})", "not_found_error", param="model", code="model_not_found")
        job = await _prepare(model, req, settings)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind, value):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the server's loop has closed
                pass

        work = Request(job.image, job.input_ids, job.gen, emit)
        try:
            engine.submit(work)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise ApiError(400, str(e), param="n") from None
        except RuntimeError as e:
            raise ApiError(503, str(e), "server_error", code="engine_stopped") from None
        answer = _Answer(req, job, model, work, events, metrics, settings.request_timeout)
        if req.stream:
            return StreamingResponse(answer.chunks(http), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await answer.whole(http)

    return app


@dataclass
class _Job:
    image: object  # resized uint8 [3, S, S]
    input_ids: list[int]
    gen: object
    stops: list[str]
    prompt_positions: int


async def _read_json(http: HttpRequest, limit: int) -> object:
    declared = http.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes is larger than this server's limit "
                       f"of {limit}", code="request_too_large")
    data = bytearray()
    async for chunk in http.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


async def _prepare(model, req: ChatRequest, settings: ServerSettings) -> _Job:
    """Check a request and turn it into the engine's inputs: the image (read on a worker thread),
    the prompt's token ids, the generation settings."""
    url, turns, caption_only = conversation(req.messages)
    stops = req.stops()
    try:
        prompt = "" if caption_only else render_chat(turns)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    gen = req.generation(req.requested_tokens() or _default_tokens(model, prompt))
    try:
        limit = model.max_prompt_tokens(gen)
    except ValueError as e:
        raise ApiError(400, str(e), param="max_tokens") from None
    try:
        tokens = model.tokenizer([prompt], max_length=limit)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    image = await run_in_threadpool(_image, model, url, settings)
    ids = tokens.input_ids[0].tolist()
    cfg = model.config
    positions = len(ids) + (cfg.num_query_tokens if cfg.image_token_index is None else 0)
    return _Job(image, ids, gen, stops, positions)


def _image(model, url: str, settings: ServerSettings):
    """An image URL (data:, http(s): or an allowed file:) to the model's resized uint8 pixels."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "a data: image URL must be base64 (data:image/...;base64,...)", param="image_url")
        if len(payload) * 3 // 4 > settings.max_image_bytes:
            raise ApiError(413, f"image of about {len(payload) * 3 // 4} bytes is larger than this server's limit "
                           f"of {settings.max_image_bytes}", param="image_url", code="image_too_large")
        try:
            source = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the data: image URL is not valid base64", param="image_url") from None
    else:
        source = url
    try:
        image = load_image(source, policy=settings.urls)
    except ImageError as e:
        raise ApiError(400, str(e), param="image_url", code="invalid_image") from None
    return model.image_processor.resized(image)


def _default_tokens(model, prompt: str) -> int:
    """For a request that names no length: as much as fits after the prompt, up to DEFAULT_MAX_TOKENS."""
    return max(1, min(DEFAULT_MAX_TOKENS, model.max_new_tokens(model.tokenizer.count_tokens(prompt))))


def _max_len(model) -> int:
    cfg = model.config
    return cfg.text.max_position_embeddings if not cfg.is_encoder_decoder else 512


class _Answer:
    """A submitted request's answer: whole (one JSON body) or in chunks (server-sent events)."""

    def __init__(self, req: ChatRequest, job: _Job, model, work: Request, events: asyncio.Queue, metrics: Metrics,
                 timeout: float):
        self.req, self.job, self.work, self.events, self.metrics, self.timeout = req, job, work, events, metrics, timeout
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        eos = model.config.eos_token_ids
        self.choices = [TextStream(model.tokenizer.decode, job.stops, eos) for _ in range(req.n)]
        self.first_token: float | None = None

    async def _next(self, deadline: float):
        left = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.events.get(), max(left, 0.001))
        except asyncio.TimeoutError:
            self.work.cancel()
            raise ApiError(504, f"no answer within the server's request timeout of {self.timeout:g} s",
                           "timeout_error", code="timeout") from None

    def _failed(self, message: str) -> ApiError:
        return ApiError(500, message, "server_error", code="generation_failed")

    async def whole(self, http: HttpRequest) -> JSONResponse:
        """Wait for the end (or the client leaving, which cancels the request)."""
        watch = asyncio.create_task(_disconnected(http))
        try:
            deadline = self.work.arrived + self.timeout
            while True:
                get = asyncio.create_task(self._next(deadline))
                await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self.work.cancel()
                    return JSONResponse({}, status_code=499)
                kind, value = get.result()
                if kind == "tokens":
                    self._first()
                elif kind == "error":
                    raise self._failed(value)
                else:
                    for choice, h in zip(self.choices, value):
                        choice.end(h.token_ids, h.finished)
                    self._first()
                    return JSONResponse(self._body())
        finally:
            watch.cancel()

    async def chunks(self, http: HttpRequest):
        """Server-sent events: a role chunk, text deltas as tokens arrive, each choice's finish, usage
        if asked, then [DONE]. An error after the first chunk is sent as an error event."""
        try:
            yield _sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                    for i in range(self.req.n)]))
            deadline = self.work.arrived + self.timeout
            while True:
                try:
                    kind, value = await self._next(deadline)
                except ApiError as e:
                    yield _sse(e.body())
                    break
                if kind == "error":
                    self.metrics.errors.labels("generation_failed").inc()
                    yield _sse(self._failed(value).body())
                    break
                self._first()
                deltas = []
                if kind == "tokens":
                    for i, (choice, token) in enumerate(zip(self.choices, value)):
                        if token is not None and choice.finish is None:
                            text = choice.add(token)
                            if text:
                                deltas.append({"index": i, "delta": {"content": text}, "finish_reason": None})
                    if all(c.stopped for c in self.choices):  # every choice hit a stop string
                        self.work.cancel()
                        kind = "done"
                else:
                    for i, (choice, h) in enumerate(zip(self.choices, value)):
                        text = choice.end(h.token_ids, h.finished)
                        if text:
                            deltas.append({"index": i, "delta": {"content": text}, "finish_reason": None})
                if deltas:
                    yield _sse(self._chunk(deltas))
                if kind == "done":
                    yield _sse(self._chunk([{"index": i, "delta": {}, "finish_reason": c.finish}
                                            for i, c in enumerate(self.choices)]))
                    if self.req.stream_options and self.req.stream_options.include_usage:
                        yield _sse({**self._chunk([]), "usage": self._usage()})
                    self._record()
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.work.cancel()  # a client that left frees its rows at the next step

    def _first(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
            self.metrics.ttft.observe(self.first_token - self.work.arrived)

    def _usage(self) -> dict:
        generated = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": self.job.prompt_positions, "completion_tokens": generated,
                "total_tokens": self.job.prompt_positions + generated}

    def _record(self) -> None:
        end = time.monotonic()
        m = self.metrics
        m.latency.observe(end - self.work.arrived)
        generated = sum(len(c.ids) for c in self.choices)
        m.prompt_tokens.inc(self.job.prompt_positions)
        m.generated_tokens.inc(generated)
        per_choice = max(len(c.ids) for c in self.choices)
        if per_choice > 1 and self.first_token is not None:
            m.tpot.observe((end - self.first_token) / (per_choice - 1))
        for c in self.choices:
            m.requests.labels(c.finish or "length").inc()

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.req.model,
                "choices": choices}

    def _body(self) -> dict:
        self._record()
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.req.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish, "logprobs": None} for i, c in enumerate(self.choices)],
                "usage": self._usage()}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client has gone (its connection closed)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def serve(model, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until SIGINT or SIGTERM: it then stops taking connections, lets running
    answers finish for up to 30 s, and cancels the rest."""
    import uvicorn

    app = build_app(model, settings)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)

