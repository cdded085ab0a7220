"""CUDA graphs: decoding steps, the vision encoder and the prompt's pass replayed instead of launched."""

from __future__ import annotations

import collections
import operator
import weakref
from typing import Callable

import torch


# Decoding graphs kept for the next session of the same shape: what their caches and masks take, at most.
KEEP_GRAPH_BYTES = 1 << 30


class _Captured:
    """One captured decoding step: its graph, the token input and logits output it reads and writes,
    and the session state (caches, masks, positions) it works on in place."""

    def __init__(self, graph, tokens: torch.Tensor, logits: torch.Tensor, state: list[torch.Tensor], owner):
        self.graph, self.tokens, self.logits, self.state = graph, tokens, logits, state
        self.owner = weakref.ref(owner)
        self.bytes = sum(t.nbytes for t in state)


def _capture(fn: Callable, *xs: torch.Tensor):
    """One CUDA graph of fn on copies of xs (recorded, not run): (graph, its inputs, its output)."""
    statics = [x.clone() for x in xs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*statics)
    return graph, statics, out


def _set(obj, path: str, value) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        obj = getattr(obj, parent)
    setattr(obj, name, value)


class GraphedSteps:
    """Base of the decoding sessions: step() runs _step() eagerly at first; on CUDA, from the second
    step on, it replays one captured CUDA graph of _step(). A step is hundreds of small kernels, whose
    launches from Python cost more than their work on a GPU. _step() must keep every tensor it touches
    in place (update the slot, positions, masks and caches, never replace them), and those tensors
    are named in STATE.

    A graph is kept in `graphs` (the model's CudaGraphs: up to KEEP_GRAPH_BYTES of state, least
    recently used dropped first) and reused by the next session of the same shapes: that session's
    state is copied into the graph's tensors, which then become its own. Capturing costs 4-5 steps.
    Without `graphs` every step runs eagerly.
    """

    STATE: tuple[str, ...] = ()
    graphs: CudaGraphs | None = None
    _graph: _Captured | None = None
    _steps = 0

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [rows]; logits [rows, vocab] (float32) for the next."""
        self._steps += 1
        if tokens.device.type != "cuda" or self.graphs is None:
            return self._step(tokens)
        if self._graph is None:
            # A kept graph serves from the first step; without one, the first step runs eagerly (it
            # warms up what a capture needs) and the second captures.
            self._graph = self._reuse(tokens)
            if self._graph is None:
                if self._steps == 1:
                    return self._step(tokens)
                self._graph = self._capture_step(tokens)
        self._graph.tokens.copy_(tokens)
        self._graph.graph.replay()
        return self._graph.logits.clone()

    def _state(self) -> list[torch.Tensor]:
        return [operator.attrgetter(path)(self) for path in self.STATE]

    def _kept(self, tokens: torch.Tensor) -> tuple[collections.OrderedDict, tuple]:
        """The decoding graphs kept for the model, and this session's key among them (its shapes)."""
        return self.graphs.steps, (type(self), tuple(tokens.shape), tuple((tuple(t.shape), t.dtype) for t in self._state()))

    def _reuse(self, tokens: torch.Tensor) -> _Captured | None:
        """The kept graph of this shape, with this session's state copied in and adopted, if one is
        free (not in use by a live session)."""
        kept, key = self._kept(tokens)
        graph = kept.get(key)
        if graph is None or graph.owner() is not None:
            return None
        for path, mine, static in zip(self.STATE, self._state(), graph.state):
            static.copy_(mine)
            _set(self, path, static)
        graph.owner = weakref.ref(self)
        kept.move_to_end(key)
        return graph

    def _capture_step(self, tokens: torch.Tensor) -> _Captured:
        kept, key = self._kept(tokens)
        graph, (static,), logits = _capture(self._step, tokens)  # the step is recorded, not run
        graph = _Captured(graph, static, logits, self._state(), self)
        if graph.bytes <= KEEP_GRAPH_BYTES:
            kept[key] = graph
            while sum(g.bytes for g in kept.values()) > KEEP_GRAPH_BYTES:
                kept.popitem(last=False)
        return graph


class GraphedCalls:
    """fn(*xs) on CUDA through one captured CUDA graph per shape of its tensor inputs: the first call
    of a shape runs eagerly (warming up the libraries' kernels), the second captures, later ones
    replay, returning copies of fn's outputs (a tensor or a tuple of tensors). For the vision encoder
    and the prompt's pass of the language model: hundreds of kernels that Python launches slower than
    the GPU runs them. fn must be a pure function of its inputs. Elsewhere fn runs as is. `keep`
    bounds the graphs held (least recently used dropped first)."""

    def __init__(self, fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], keep: int | None = None):
        self.fn, self.keep = fn, keep
        self.seen: set = set()
        self.graphs: collections.OrderedDict = collections.OrderedDict()

    def __call__(self, *xs: torch.Tensor):
        if xs[0].device.type != "cuda":
            return self.fn(*xs)
        key = tuple((tuple(x.shape), x.dtype) for x in xs)
        if key not in self.graphs:
            if key not in self.seen:
                self.seen.add(key)
                return self.fn(*xs)
            self.graphs[key] = _capture(self.fn, *xs)
            if self.keep is not None and len(self.graphs) > self.keep:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, statics, out = self.graphs[key]
        for static, x in zip(statics, xs):
            static.copy_(x)
        graph.replay()
        return out.clone() if isinstance(out, torch.Tensor) else tuple(o.clone() for o in out)


# Prompts of up to this many positions in all (rows x positions) take their pass through CUDA graphs:
# beyond, the GPU's work outweighs Python's launches.
GRAPHED_PROMPT_POSITIONS = 512


class CudaGraphs:
    """The CUDA graphs of one loaded model, owned by it (the Blip2 object), dropped by close(): its
    image encoder's (one per batch shape), its prompt pass's (eight shapes at most), and decoding
    steps kept for the next session of the same shapes (GraphedSteps). On other devices nothing is
    captured and every call runs as is."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], prompt: Callable[..., tuple]):
        self.encoder = GraphedCalls(encode)
        self.prompt = GraphedCalls(prompt, keep=8)
        self.steps: collections.OrderedDict = collections.OrderedDict()

    def prompt_pass(self, *inputs: torch.Tensor):
        """The language model's prompt pass; on a GPU, for small prompts, through kept graphs."""
        if inputs[0].device.type != "cuda" or inputs[0].shape[:2].numel() > GRAPHED_PROMPT_POSITIONS:
            return self.prompt.fn(*inputs)
        return self.prompt(*inputs)

    def close(self) -> None:
        for calls in (self.encoder, self.prompt):
            calls.graphs.clear()
            calls.seen.clear()
        self.steps.clear()
