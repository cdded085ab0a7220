"""Pieces every model part shares: activations, uninitialised embeddings, attention, the key/value cache."""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..native import PAIR_FLAGS, load, pair_units


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


def activated(linear: nn.Module, activation: str, x: torch.Tensor) -> torch.Tensor:
    """ACT[activation](linear(x)): in one pass where the layer applies the activation to its float32
    sums itself (`linear.activated`: oneDNN's packed products, for relu and gelu), which saves a pass
    over the widest activations of a batch of images and rounds once. A layer with hooks (calibration
    reading its inputs) is called as a module."""
    own = getattr(linear, "activated", None)
    hooked = linear._forward_hooks or linear._forward_pre_hooks
    y = own(x, activation) if own is not None and not hooked else None
    return ACT[activation](linear(x)) if y is None else y


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
    if n == 1 and _cpu_decoding(q, k, v, mask):
        return cpu_single_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


# A decoding step's small operations on the CPU in bfloat16 and float32 (csrc/decoding.cpp): torch's
# fused attention, tiled for many queries, and its eight operators of T5's RMS norm spend most of
# each call setting up; these compute one query per row, and a norm in one pass.
DECODING_SOURCE = Path(__file__).with_name("csrc") / "decoding.cpp"
DECODING_FLAGS = ("-O3", "-mavx2", "-mfma", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
DECODING_DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def _decoding_library() -> ctypes.CDLL | None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512", "AVX512_BF16", "AMX"):
        return None
    ptr, i64, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return load(DECODING_SOURCE, DECODING_FLAGS,
                {"blip2_single_query_attention": [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, flag, ptr, ptr,
                                                  flag, flag],
                 "blip2_rms_norm": [ptr, i64, i64, ptr, ctypes.c_float, ptr, flag, flag]},
                "decoding attention and RMS norms use torch's operators")


def _cpu_decoding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and q.dtype in DECODING_DTYPES
            and not (q.requires_grad or k.requires_grad or v.requires_grad)
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and (mask is None or mask.dtype in (torch.bool, q.dtype))
            and _decoding_library() is not None)


def cpu_single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mask: torch.Tensor | None) -> torch.Tensor:
    """`attention` for one bfloat16 or float32 query per row on the CPU (csrc/decoding.cpp): float32
    scores, softmax and sums, as in torch's fused kernels, in another order."""
    b, h, _, d = q.shape
    length = k.shape[2]
    out = torch.empty(b, h, 1, d, dtype=q.dtype)
    kind, mask_strides = 0, (0, 0, 0)
    if mask is not None:
        mask = mask.expand(b, h, 1, length)
        kind, mask_strides = (1 if mask.dtype == torch.bool else 2), (mask.stride(0), mask.stride(1), mask.stride(3))
    strides = lambda *values: (ctypes.c_int64 * len(values))(*values)  # noqa: E731
    _decoding_library().blip2_single_query_attention(
        q.data_ptr(), strides(q.stride(0), q.stride(1)), k.data_ptr(), v.data_ptr(),
        strides(k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)), b, h, length, d,
        None if mask is None else mask.data_ptr(), kind, strides(*mask_strides), out.data_ptr(),
        q.dtype == torch.bfloat16, torch.get_num_threads())
    return out


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


def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """T5's RMS norm of bfloat16 or float32 x with a weight of its dtype in one pass (csrc/decoding.cpp),
    or None where it does not apply (another dtype or device, autograd, no compiled kernel)."""
    if not (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in DECODING_DTYPES
            and not x.requires_grad and not weight.requires_grad and _decoding_library() is not None):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    _decoding_library().blip2_rms_norm(x.data_ptr(), x.numel() // dim if dim else 0, dim, weight.data_ptr(), eps,
                                       out.data_ptr(), x.dtype == torch.bfloat16, torch.get_num_threads())
    return out


# The image encoder's attention (every position to every other, no mask) in bfloat16 on CPUs where
# blip2's pair products pay (csrc/attention_avx512.cpp): 2.3x torch's flash attention on a ViT-g layer
# of 8 images on an AVX-512 AMD EPYC, whose tiles are made for longer sequences.
IMAGE_ATTENTION_SOURCE = Path(__file__).with_name("csrc") / "attention_avx512.cpp"


@functools.cache
def _image_attention_library() -> ctypes.CDLL | None:
    if not pair_units():
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    return load(IMAGE_ATTENTION_SOURCE, PAIR_FLAGS,
                {"blip2_image_attention": [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_float, ptr, ctypes.c_int]},
                "the image encoder's attention uses torch's")


def cpu_image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(D)) v for bfloat16 q, k, v [B, H, L, D] on the CPU, without a mask, as
    [B, L, H * D] (csrc/attention_avx512.cpp: float32 scores and sums, the probabilities rounded to
    bfloat16 as in torch's flash attention); None where it does not apply (another dtype or device,
    autograd, an odd D, or no kernel for this CPU)."""
    b, h, length, d = q.shape
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16 and d % 2 == 0
            and not (q.requires_grad or k.requires_grad or v.requires_grad)
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and _image_attention_library() is not None):
        return None
    out = torch.empty(b, length, h * d, dtype=q.dtype)
    strides = (ctypes.c_int64 * 9)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    _image_attention_library().blip2_image_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, b, h, length, d,
                                                     d ** -0.5, out.data_ptr(), torch.get_num_threads())
    return out


def attention_kernels(dtype: torch.dtype, device: torch.device) -> str:
    """Which attention a model of this dtype on this device runs (for `blip2 info`)."""
    cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16
    image = "blip2 AVX-512" if cpu_bf16 and _image_attention_library() is not None else "torch's"
    own_decoding = device.type == "cpu" and dtype in DECODING_DTYPES and _decoding_library() is not None
    decoding = "blip2 one-query kernel" if own_decoding else "torch's"
    return f"image encoder: {image}; decoding steps: {decoding}"


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

    def narrow(self, width: int) -> "KVCache":
        """A view of the first `width` positions (decoding on a CPU reads only what has been written)."""
        return KVCache.of(self.k[:, :, :, :width], self.v[:, :, :, :width])

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


class RowCache(KVCache):
    """A KVCache whose rows are written at positions of their own (a continuous batch, where each
    row is a sequence that started at another step): `update` takes one position per row."""

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store one step's k, v [B, H, 1, D], row b at position pos[b]; return this layer's whole cache."""
        rows, pos = torch.arange(k.shape[0], device=k.device), pos.view(-1)
        self.k[layer][rows, :, pos] = k[:, :, 0]
        self.v[layer][rows, :, pos] = v[:, :, 0]
        return self.k[layer], self.v[layer]


def linear_names(module: nn.Module, prefix: str) -> list[str]:
    """The names (under `prefix`) of every nn.Linear inside `module`: the layers a model declares quantizable."""
    return [f"{prefix}{name}" for name, m in module.named_modules() if isinstance(m, nn.Linear)]
