"""Continuous batching: one thread owns the model and decodes every running request's rows together,
one token per row per step. Requests join at step boundaries and leave as soon as they finish, so a
short answer never waits for a long one.

A request's images are encoded with those of the other requests that arrive at the same time (and
not again when the same image comes back: chat turns, several questions). Its prompt pass runs as
`Blip2.generate` runs it, together with those of requests whose prompts have its length (no
padding); its rows then move into a pool of decoding rows, each with a key/value cache written at a
position of its own. Its tokens are chosen by its own Search
(generation.py), with its own random generator, from its own rows' logits: what else runs beside it
changes only the rounding of the shared products, never which computation its numbers go through.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models.layers import KVCache, RowCache
from ..models.t5 import T5ForConditionalGeneration
from .generation import GenerationConfig, Hypothesis, SampleOrGreedy, Search
from .sessions import OPTSession, T5Session, open_session, pad_token_id


class QueueFull(RuntimeError):
    """The engine's queue holds its most requests; the caller should retry later."""


@dataclass(eq=False)
class Request:
    """One generation: a resized uint8 image [3, S, S], its prompt's token ids, its settings.

    `emit(kind, value)` is called on the engine's thread: ("tokens", [token per copy, None for a
    copy already ended]) after each step of a sampled or greedy request; ("done", [Hypothesis per
    returned sequence]) at the end; ("error", message) when it failed. `cancel()` from any thread
    frees its rows at the next step boundary; nothing is emitted after it.
    """

    image: torch.Tensor
    input_ids: list[int]
    gen: GenerationConfig
    emit: Callable[[str, object], None]
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # set by the engine
    rows: torch.Tensor | None = None
    search: Search | None = None
    next: torch.Tensor | None = None  # the tokens its rows take at the next step
    first: int = 0  # the slot of the first new token (beam reordering starts there)

    @property
    def copies(self) -> int:
        return self.gen.copies

    def cancel(self) -> None:
        self.cancelled = True


class Pool:
    """Decoding rows with room to grow. Row r holds one sequence: its cache, the slot where its next
    key and value go, whether it is in use. Rows are taken lowest first and freed in place; a step
    runs the rows up to the highest in use (a free row among them computes a throwaway token)."""

    # name: (row dimension, width dimension or None, value of a new row)
    FIELDS: dict[str, tuple[int, int | None, object]] = {}

    def __init__(self, lm, dtype: torch.dtype, device: torch.device):
        self.lm, self.dtype, self.device = lm, dtype, device
        self.used = torch.zeros(0, dtype=torch.bool)  # on the CPU: which rows are taken
        for name in self.FIELDS:
            setattr(self, name, None)

    @property
    def high(self) -> int:
        taken = torch.nonzero(self.used)
        return int(taken[-1]) + 1 if len(taken) else 0

    def take(self, n: int, width: int) -> torch.Tensor:
        """n free rows able to hold `width` positions, growing the pool as needed."""
        free = torch.nonzero(~self.used).view(-1)
        rows = len(self.used)
        if len(free) < n:
            rows = max(rows + n - len(free), rows + rows // 2)
        if len(free) < n or width > self.k.shape[3]:
            self._grow(rows, width)
            free = torch.nonzero(~self.used).view(-1)
        rows = free[:n]
        self.used[rows] = True
        return rows.to(self.device)

    def release(self, rows: torch.Tensor) -> None:
        self.used[rows.cpu()] = False
        self._reset(rows)

    def _grow(self, rows: int, width: int) -> None:
        """Reallocate every per-row tensor for `rows` rows and `width` positions, keeping what they hold."""
        old_rows = len(self.used)
        width = max(width, self.k.shape[3] if self.k is not None else 0)
        self.used = torch.cat([self.used, torch.zeros(rows - old_rows, dtype=torch.bool)])
        for name, (row_dim, width_dim, fill) in self.FIELDS.items():
            old = getattr(self, name)
            shape = list(self._shape(name, rows, width))
            new = torch.full(shape, fill, dtype=old.dtype if old is not None else self._dtype(name), device=self.device)
            if old is not None and old.numel():
                region = new.narrow(row_dim, 0, old.shape[row_dim])
                if width_dim is not None:
                    region = region.narrow(width_dim, 0, old.shape[width_dim])
                region.copy_(old)
            setattr(self, name, new)

    def reorder(self, rows: torch.Tensor, order: torch.Tensor, start: int, end: int) -> None:
        """Beam search: row rows[i] takes the cache of rows[order[i]], positions [start, end)."""
        keep = torch.arange(self.k.shape[1], device=rows.device)
        keep[rows] = rows[order]
        KVCache.of(self.k, self.v).reorder(keep, start, end)


class OPTPool(Pool):
    FIELDS = {"k": (1, 3, 0), "v": (1, 3, 0), "valid": (0, 1, False), "next_pos": (0, None, 0), "slot": (0, None, 0)}

    def _shape(self, name, rows, width):
        cfg = self.lm.config
        heads = cfg.num_attention_heads
        return {"k": (cfg.num_hidden_layers, rows, heads, width, cfg.hidden_size // heads),
                "valid": (rows, width)}.get("k" if name == "v" else name, (rows,))

    def _dtype(self, name):
        return {"k": self.dtype, "v": self.dtype, "valid": torch.bool}.get(name, torch.long)

    def join(self, session: OPTSession, which: torch.Tensor, width: int) -> torch.Tensor:
        """Move rows `which` of a prefilled session (their prompt's keys and values) into the pool;
        their rows there."""
        n = session.prompt_slots
        rows = self.take(len(which), width)
        self.k[:, rows, :, :n] = session.cache.k[:, which, :, :n]
        self.v[:, rows, :, :n] = session.cache.v[:, which, :, :n]
        self.valid[rows] = False
        self.valid[rows, :n] = session.valid[which, :n]
        self.next_pos[rows] = session.next_pos[which]
        self.slot[rows] = n
        return rows

    def _reset(self, rows):
        self.valid[rows] = False
        self.slot[rows] = 0
        self.next_pos[rows] = 0

    def step(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Feed tokens [high] (one per row up to the highest in use; `live` marks the rows in use):
        float32 logits [high, vocab]."""
        high = len(tokens)
        slot = self.slot[:high]
        width = int(slot.max()) + 1
        valid = self.valid[:high, :width]
        valid[torch.arange(high, device=self.device), slot] = True
        cache = RowCache.of(self.k[:, :high, :, :width], self.v[:, :high, :, :width])
        lm = self.lm
        hidden = lm(lm.embed(tokens)[:, None], self.next_pos[:high, None], valid[:, None, None, :], cache, slot)
        slot += live
        self.next_pos[:high] += live
        return lm.lm_head(hidden[:, -1]).float()


class T5Pool(Pool):
    FIELDS = {"k": (1, 3, 0), "v": (1, 3, 0), "slot": (0, None, 0),
              "cross_k": (1, 3, 0), "cross_v": (1, 3, 0), "encoder_mask": (0, 1, False), "encoded": (0, None, 0)}

    def __init__(self, lm: T5ForConditionalGeneration, dtype, device):
        super().__init__(lm, dtype, device)
        self.encoder_width = 0  # the cross-attention tensors' width: the longest encoded input's

    def _shape(self, name, rows, width):
        cfg = self.lm.config
        cache = (cfg.num_decoder_layers, rows, cfg.num_heads, width, cfg.d_kv)
        cross = (cfg.num_decoder_layers, rows, cfg.num_heads, self.encoder_width, cfg.d_kv)
        return {"k": cache, "v": cache, "cross_k": cross, "cross_v": cross,
                "encoder_mask": (rows, self.encoder_width)}.get(name, (rows,))

    def _dtype(self, name):
        return {"encoder_mask": torch.bool, "slot": torch.long, "encoded": torch.long}.get(name, self.dtype)

    def join(self, session: T5Session, which: torch.Tensor, width: int) -> torch.Tensor:
        """Move rows `which` of a session that has run its first step (encoder keys and values, the
        first decoder position) into the pool; their rows there."""
        s = session.cross.k.shape[3]
        if s > self.encoder_width:
            self.encoder_width = s
            if self.k is not None:
                self._grow(len(self.used), self.k.shape[3])
        rows = self.take(len(which), width)
        self.cross_k[:, rows, :, :s] = session.cross.k[:, which]
        self.cross_v[:, rows, :, :s] = session.cross.v[:, which]
        self.encoder_mask[rows] = False
        self.encoder_mask[rows, :s] = session.encoder_mask[which].bool()
        self.encoded[rows] = s
        self.k[:, rows, :, :1] = session.cache.k[:, which, :, :1]
        self.v[:, rows, :, :1] = session.cache.v[:, which, :, :1]
        self.slot[rows] = 1
        return rows

    def _reset(self, rows):
        self.slot[rows] = 0
        self.encoded[rows] = 0
        self.encoder_mask[rows] = False

    def step(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        high = len(tokens)
        slot = self.slot[:high]
        width, s = int(slot.max()) + 1, max(int(self.encoded[:high].max()), 1)
        cache = RowCache.of(self.k[:, :high, :, :width], self.v[:, :high, :, :width])
        cross = RowCache.of(self.cross_k[:, :high, :, :s], self.cross_v[:, :high, :, :s])
        lm = self.lm
        hidden = lm.decode(tokens[:, None], cross, self.encoder_mask[:high, :s], cache, slot[:, None])
        slot += live
        return lm.lm_head(hidden[:, -1]).float()


class Engine:
    """The loop that owns a loaded `Blip2` and serves `Request`s by continuous batching.

    max_rows: decoding rows at once (a request takes num_beams or n rows); max_queue: requests
    waiting for rows, beyond which `submit` raises QueueFull.
    """

    def __init__(self, blip2, max_rows: int = 32, max_queue: int = 256):
        self.blip2, self.max_rows, self.max_queue = blip2, max_rows, max_queue
        model = blip2.model
        lm = model.language_model
        kind = T5Pool if model.config.is_encoder_decoder else OPTPool
        self.pool = kind(lm, blip2.dtype, blip2.device)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.images_encoded = 0
        self.steps = 0
        self.error: BaseException | None = None  # what ended the loop, if anything did
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="blip2-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: Request) -> None:
        if request.copies > self.max_rows:
            raise ValueError(f"{request.copies} sequences at once (n or num_beams) is more than this server's "
                             f"{self.max_rows} decoding rows")
        with self._wake:
            if not self.alive:
                raise RuntimeError("the engine has stopped")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this server queues")
            self.waiting.append(request)
            self._wake.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop: requests still waiting or running get an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not self._stopping and not self.waiting and not self.running:
                            self._wake.wait()
                        if self._stopping:
                            break
                    self._forget_cancelled()
                    self._admit()
                    if self.running:
                        try:
                            self._step()
                        except Exception as e:  # noqa: BLE001 - those requests fail, the engine goes on
                            self._fail_running(e)
        except BaseException as e:  # noqa: BLE001 - reported to every request and through `alive`
            self.error = e
            raise
        finally:
            with self._wake:
                left = list(self.waiting) + self.running
                self.waiting.clear()
                self.running = []
            for r in left:
                if not r.cancelled:
                    r.emit("error", "the server is shutting down" if self.error is None else
                           f"the engine stopped: {type(self.error).__name__}: {self.error}")

    def _fail_running(self, error: Exception) -> None:
        """A step failed (out of memory, a bug): every running request gets the error, and decoding
        starts again from an empty pool, whose state the failed step may have left half written."""
        for r in self.running:
            r.rows = None
            if not r.cancelled:
                r.emit("error", f"generation failed: {type(error).__name__}: {error}")
        self.running = []
        self.pool = type(self.pool)(self.pool.lm, self.pool.dtype, self.pool.device)

    def _forget_cancelled(self) -> None:
        with self._wake:
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        for r in [r for r in self.running if r.cancelled]:
            self._finish(r)

    def _admit(self) -> None:
        """Start waiting requests while rows are free: their images encoded together, their prompt
        passes grouped by prompt length (_join), their rows into the pool."""
        free = self.max_rows - sum(r.copies for r in self.running)
        batch = []
        with self._wake:
            while self.waiting and self.waiting[0].copies <= free:
                r = self.waiting.popleft()
                free -= r.copies
                batch.append(r)
        if not batch:
            return
        try:
            queries = self.blip2.image_queries(r.image for r in batch)
        except Exception as e:  # noqa: BLE001 - the requests fail, the engine goes on
            for r in batch:
                r.emit("error", f"encoding the image failed: {type(e).__name__}: {e}")
            return
        self.images_encoded += len(batch)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(batch):
            groups.setdefault((len(r.input_ids), r.copies, r.gen.max_new_tokens), []).append(i)
        for members in groups.values():
            group = [batch[i] for i in members]
            try:
                self._join(group, queries[members])
            except Exception as e:  # noqa: BLE001 - these requests fail, the engine goes on
                for r in group:
                    if r in self.running:
                        self._finish(r)
                    elif r.rows is not None:
                        self.pool.release(r.rows)
                        r.rows = None
                    r.emit("error", f"generation failed: {type(e).__name__}: {e}")

    def _join(self, group: list[Request], queries: torch.Tensor) -> None:
        """One prompt pass for requests whose prompts have the same length and that ask for as many
        sequences and new tokens (so no row is padded: each computes what it computes alone), then
        their rows into the pool."""
        first = group[0]
        copies, max_new = first.copies, first.gen.max_new_tokens
        model = self.blip2.model
        ids = torch.tensor([r.input_ids for r in group], device=self.blip2.device)
        session, history, ignore = open_session(model, queries, ids, None, copies, max_new)
        logits = session.prefill()
        t5 = isinstance(session, T5Session)  # its prefill ran the first decoder step
        width = max_new + 1 if t5 else session.prompt_slots + max_new
        for i, r in enumerate(group):
            which = torch.arange(i * copies, (i + 1) * copies, device=ids.device)
            r.search = Search.start(r.gen, history[i:i + 1], model.config.eos_token_ids, pad_token_id(model),
                                    None if ignore is None else ignore[i:i + 1])
            r.first = 0 if t5 else session.prompt_slots
            r.next = r.search.advance(logits[which])
            self._emit_tokens(r)
            if r.next is None:
                self._done(r)
                continue
            r.rows = self.pool.join(session, which, width)
            if r.search.reorder is not None:
                self.pool.reorder(r.rows, r.search.reorder, r.first, int(self.pool.slot[r.rows[0]]))
            self.running.append(r)

    def _step(self) -> None:
        pool = self.pool
        high = pool.high
        tokens = torch.zeros(high, dtype=torch.long, device=pool.device)
        live = torch.zeros(high, dtype=torch.long, device=pool.device)
        for r in self.running:
            tokens[r.rows] = r.next
            live[r.rows] = 1
        logits = pool.step(tokens, live)
        self.steps += 1
        for r in list(self.running):
            r.next = r.search.advance(logits[r.rows])
            self._emit_tokens(r)
            if r.next is None:
                self._done(r)
            elif r.search.reorder is not None:
                pool.reorder(r.rows, r.search.reorder, r.first, int(pool.slot[r.rows[0]]))

    def _emit_tokens(self, r: Request) -> None:
        search = r.search
        if isinstance(search, SampleOrGreedy) and not r.cancelled:
            tokens, real = search.new[-1].tolist(), search.produced.tolist()
            r.emit("tokens", [t if ok else None for t, ok in zip(tokens, real)])

    def _done(self, r: Request) -> None:
        results: list[Hypothesis] = r.search.results()[0]
        self._finish(r)
        if not r.cancelled:
            r.emit("done", results)

    def _finish(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
        if r.rows is not None:
            self.pool.release(r.rows)
            r.rows = None

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "rows": sum(r.copies for r in self.running), "images_encoded": self.images_encoded}
