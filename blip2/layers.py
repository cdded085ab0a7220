"""Small pieces shared by every model part: activations, the key/value cache, packed linears."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import operator
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # The reference's "gelu_new" is written out, not F.gelu(approximate="tanh"): same formula, kept
    # literal so rounding matches.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
}


def embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised (its weights come from the checkpoint). Its default random
    init on the meta device runs through torch's reference decompositions, which import torch._dynamo
    and sympy: 70 MB of resident memory and a second of loading for nothing."""
    return nn.Embedding.from_pretrained(torch.empty(num, dim), freeze=False)


# Decoding a large batch on a GPU, torch's attention kernels spend most of a step on tiles of 64
# queries where each row has one: for batch x heads >= SINGLE_QUERY_ROWS, attention runs as two
# batched products around a float32 softmax instead (BENCHMARKS.md, scripts/gpu_ab.py).
SINGLE_QUERY_ROWS = 1024


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of [B, H, N, D] queries over [B, H, L, D] keys/values, the scale already in
    q; `mask` boolean (True: may attend) or additive, broadcast to [B, H, N, L]."""
    b, h, n, _ = q.shape
    if n == 1 and q.is_cuda and b * h >= SINGLE_QUERY_ROWS:
        return single_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """`attention` for one query per row as two batched products. Scores are float32 like those
    inside torch's fused kernels (on CUDA straight from the product's float32 accumulator); the
    probabilities are rounded to v's dtype for the second product, as flash attention does."""
    b, h, _, d = q.shape
    keys = k.reshape(b * h, -1, d).transpose(1, 2)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        scores = torch.bmm(q.reshape(b * h, 1, d), keys, out_dtype=torch.float32)
    else:
        scores = torch.bmm(q.reshape(b * h, 1, d).float(), keys.float())
    scores = scores.view(b, h, 1, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


class KVCache:
    """Preallocated keys and values for every layer: [layers, batch, heads, max_len, head_dim].

    Written in place at the positions being computed, so decoding allocates nothing per step and
    beam search reorders rows in place.
    """

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """A cache holding these keys and values (a prefill's outputs)."""
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, H, len(pos), D] at positions `pos`; return this layer's whole cache."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding batch rows `rows` (one input's prefill shared by its beams)."""
        return KVCache.of(self.k.index_select(1, rows), self.v.index_select(1, rows))

    def reorder(self, rows: torch.Tensor, start: int, end: int) -> None:
        """Keep batch rows `rows` (beam search), in place: only the rows that take another row's
        history, and only positions [start, end): those written since the beams split (their shared
        prompt is the same in every beam) and before the next step. Copying the whole cache cost
        more than a fifth of a 5-beam OPT-2.7b decoding step on CPU."""
        moved = torch.nonzero(rows != torch.arange(len(rows), device=rows.device)).squeeze(1)
        if len(moved) and end > start:
            for t in (self.k, self.v):
                written = t.narrow(3, start, end - start)
                written.index_copy_(1, moved, written.index_select(1, rows[moved]))


# The row count oneDNN lays a weight out for. Measured on full-size OPT, bfloat16 on AMX: 8 decodes
# as fast as 1 at batch 1 and up to 1.3x faster at batch 8, and prefills 1.4x faster. float32 on AVX2
# (2 cores, fc1-shaped weights): 1 decodes 1.35x faster than 8 at batch 1 and within 1.2x at batch 8
# (both 2.2-2.7x MKL's plain product at 8 and 48 rows); 8 encodes images best.
PACK_FOR_ROWS = 8
_PACKER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blip2-pack")
_IN_FLIGHT: collections.deque = collections.deque()


class PackedLinear(nn.Module):
    """A Linear whose weight is packed in oneDNN's blocked layout, for `rows` rows, as it is loaded (CPU).

    In bfloat16/float16 results are bit-identical to F.linear on the same weights for decoding rows
    and one image's patches (for thousands of rows oneDNN may sum in another order), and a decode step
    (one row at a time, bound by reading the weights) runs up to twice as fast: the plain path
    re-lays out the weight on every call. In float32 F.linear is MKL's product, which oneDNN's beats
    1.35x at one row and 2-2.7x at 8-48 rows on an AVX2 AMD EPYC (results differ in rounding,
    ~1e-6 relative). Packing at load time, one weight at a time on a second thread (0.5-1 s off a 9 s
    full-size bfloat16 load), keeps peak memory at the final size.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rows: int = PACK_FOR_ROWS):
        super().__init__()
        self.in_features, self.out_features, self.rows = in_features, out_features, rows
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def load_parameter(self, name: str, value: torch.Tensor) -> None:
        if name == "weight":
            # Packed on a second thread while the loader reads and converts the next tensors; at most
            # two wait, so the unpacked copies in flight stay a few tens of MB.
            while len(_IN_FLIGHT) >= 2:
                _IN_FLIGHT.popleft().result()
            self._packing = _PACKER.submit(torch.ops.mkldnn._reorder_linear_weight, value, self.rows)
            _IN_FLIGHT.append(self._packing)
            return
        self._parameters[name] = nn.Parameter(value, requires_grad=False)

    def finish_loading(self) -> None:
        """Wait for the weight packed in the background while the loader read on."""
        self._parameters["weight"] = nn.Parameter(self._packing.result(), requires_grad=False)
        if self._packing in _IN_FLIGHT:
            _IN_FLIGHT.remove(self._packing)
        del self._packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN packing pays off for CPU weights where oneDNN can pack their dtype."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and _onednn_packs(dtype)


@functools.cache
def _onednn_packs(dtype: torch.dtype) -> bool:
    # oneDNN packs half-precision weights only with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: an AVX2
    # CPU (AMD EPYC before Zen 4, say) raises, and then the plain product is the one to use. The probe
    # names its device: load() asks while building the model under torch.device("meta").
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype, device="cpu"), PACK_FOR_ROWS)
    except RuntimeError:
        return False
    return True


def pack_linears(module: nn.Module, wanted: Callable[[str], bool], rows: int = PACK_FOR_ROWS, prefix: str = "") -> None:
    """Replace, in place and before loading, each nn.Linear under `module` whose name `wanted`
    accepts by a PackedLinear of the same shape, packed for `rows` rows."""
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if type(child) is nn.Linear and wanted(full):
            setattr(module, name, PackedLinear(child.in_features, child.out_features, child.bias is not None, rows))
        else:
            pack_linears(child, wanted, rows, full + ".")


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

    A graph is kept on the language model (up to KEEP_GRAPH_BYTES of state, least recently used
    dropped first) and reused by the next session of the same shapes: that session's state is copied
    into the graph's tensors, which then become its own. Capturing costs 4-5 steps.
    """

    STATE: tuple[str, ...] = ()
    lm: nn.Module
    _graph: _Captured | None = None
    _steps = 0

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [rows]; logits [rows, vocab] (float32) for the next."""
        self._steps += 1
        if tokens.device.type != "cuda":
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
        """The graphs kept on the language model, and this session's key among them (its shapes)."""
        kept = self.lm.__dict__.setdefault("_kept_graphs", collections.OrderedDict())
        return kept, (type(self), tuple(tokens.shape), tuple((tuple(t.shape), t.dtype) for t in self._state()))

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


# Prompts of up to this many positions in all (rows x positions) take their pass through CUDA graphs
# (prompt_pass): beyond, the GPU's work outweighs Python's launches.
GRAPHED_PROMPT_POSITIONS = 512


def prompt_pass(lm: nn.Module, *inputs: torch.Tensor):
    """lm.prompt(*inputs); on a GPU, for small prompts, through graphs kept on lm (eight shapes)."""
    if inputs[0].device.type != "cuda" or inputs[0].shape[:2].numel() > GRAPHED_PROMPT_POSITIONS:
        return lm.prompt(*inputs)
    graphs = lm.__dict__.get("_prompt_graphs")
    if graphs is None:
        graphs = lm.__dict__["_prompt_graphs"] = GraphedCalls(lm.prompt, keep=8)
    return graphs(*inputs)
