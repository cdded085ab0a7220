"""Packed float linears for the CPU: the weight laid out once, at load, for the kernel that multiplies
it: oneDNN's blocked layout, or on CPUs with AVX512-BF16 and no AMX, for bfloat16, blip2's own
(quant/cpu_kernels.bf16_mm)."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import threading
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..checkpoint import Rows
from . import cpu_kernels


# The row count oneDNN lays a weight out for. Measured on full-size OPT, bfloat16 on AMX: 8 decodes
# as fast as 1 at batch 1 and up to 1.3x faster at batch 8, and prefills 1.4x faster. float32 on AVX2
# (2 cores, fc1-shaped weights): 1 decodes 1.35x faster than 8 at batch 1 and within 1.2x at batch 8
# (both 2.2-2.7x MKL's plain product at 8 and 48 rows); 8 encodes images best.
PACK_FOR_ROWS = 8


class Packer:
    """Packs weights on a second thread while the loader reads and converts the next tensors (0.5-1 s
    off a 9 s full-size bfloat16 load); at most two wait, so the unpacked copies in flight stay a few
    tens of MB. Owned by one load, which closes it; once closed, weights are packed at once.

    A weight converted on its way in (a float32 checkpoint loaded in bfloat16) is converted into one
    of a few staging buffers that are used again once it is packed, not into new memory: the kernel
    zeroes every page a process touches for the first time, and zeroing a fresh copy of each weight
    took a fifth to a quarter of a full-size load (docs/log.md, 2026-12-05)."""

    STAGED_BYTES = 64 << 20  # larger tensors (token tables, read once) get memory of their own
    STAGING_BUFFERS = 3  # one being converted, two waiting

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="blip2-pack")
        self._in_flight: collections.deque = collections.deque()
        self._free: list[torch.Tensor] = []  # staging buffers (bytes) ready for the next weight
        self._lent: dict[int, torch.Tensor] = {}  # address -> staging buffer holding a weight to pack
        self._lock = threading.Lock()

    def submit(self, pack: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor | Rows) -> concurrent.futures.Future:
        if self._pool is None:
            return _packed_now(pack, weight)
        if isinstance(weight, Rows):
            weight = weight.whole(self._staging)
        while len(self._in_flight) >= 2:
            self._in_flight.popleft().result()
        future = self._pool.submit(self._pack, pack, weight)
        self._in_flight.append(future)
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool = None
        self._in_flight.clear()
        self._free.clear()

    def _staging(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.STAGED_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                buffer = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            else:
                buffer = torch.empty(nbytes, dtype=torch.uint8)
            self._lent[buffer.data_ptr()] = buffer
        return buffer[:nbytes].view(dtype).view(shape)

    def _pack(self, pack: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        packed = pack(weight)
        with self._lock:
            buffer = self._lent.pop(weight.data_ptr(), None)
            # oneDNN's packed weights (opaque tensors) are always new memory, blip2's layouts nearly always
            if buffer is not None and (packed.is_mkldnn or packed.untyped_storage().data_ptr() != buffer.data_ptr()):
                self._free.append(buffer)
                self._free.sort(key=torch.Tensor.numel)
                del self._free[:-self.STAGING_BUFFERS]  # the largest stay
        return packed


class OwnKernel(NamedTuple):
    """One of blip2's own products: how it lays out a weight, reads a table's rows from that layout,
    and multiplies x [..., K] by it (with a bias, for N outputs)."""

    layout: Callable[[torch.Tensor], torch.Tensor]
    rows: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor]


# blip2's own kernels (the rest is oneDNN's)
OWN_KERNELS = {"bf16": OwnKernel(cpu_kernels.bf16_layout, cpu_kernels.pair_rows, cpu_kernels.bf16_mm),
               "f32": OwnKernel(cpu_kernels.f32_layout, cpu_kernels.f32_rows, cpu_kernels.f32_mm)}

# oneDNN's post-ops (attribute, scalars, algorithm) for the activations that equal torch's functions
POST_OPS = {"relu": ("relu", [], ""), "gelu": ("gelu", [], "none"), "gelu_pytorch_tanh": ("gelu", [], "tanh")}


class PackedLinear(nn.Module):
    """A Linear whose weight is packed as it is loaded (CPU): in oneDNN's blocked layout, for `rows`
    rows, or (kernel "bf16") in pairs of inputs for blip2's own bfloat16 product, or (kernel "f32",
    AVX2 CPUs) in blocks of 16 outputs for blip2's own float32 product.

    The bf16 kernel reads a decoding row's weights at about 1.4x oneDNN's speed and multiplies prompts
    at the same rate (CPUs with AVX512-BF16 and without AMX); it sums in oneDNN's order (full-size
    checkpoints gave bit-identical logits).

    In bfloat16/float16 results are bit-identical to F.linear on the same weights for decoding rows
    and one image's patches (for thousands of rows oneDNN may sum in another order), and a decode step
    (one row at a time, bound by reading the weights) runs up to twice as fast: the plain path
    re-lays out the weight on every call. In float32 F.linear is MKL's product, which oneDNN's beats
    1.35x at one row and 2-2.7x at 8-48 rows on an AVX2 AMD EPYC (results differ in rounding,
    ~1e-6 relative); blip2's f32 kernel reads a decoding row's weights 1.2-1.5x faster than oneDNN's
    on AVX2 and matches it on many rows (cpu_kernels.f32_mm). Packing at load time, one weight at a
    time on a second thread (0.5-1 s off a 9 s full-size bfloat16 load), keeps peak memory at the
    final size.
    """

    loads_rows = ("weight",)  # the loader hands the weight over unread, for the packer to convert it (Packer)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rows: int = PACK_FOR_ROWS,
                 packer: Packer | None = None, kernel: str = "onednn"):
        super().__init__()
        self.in_features, self.out_features, self.rows, self.kernel = in_features, out_features, rows, kernel
        self.packer = packer  # None: packed at once, on this thread
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def load_parameter(self, name: str, value: torch.Tensor | Rows) -> None:
        if name == "weight":
            pack = (OWN_KERNELS[self.kernel].layout if self.kernel in OWN_KERNELS
                    else functools.partial(torch.ops.mkldnn._reorder_linear_weight, batch_size=self.rows))
            self._packing = _submit(self.packer, pack, value)
            return
        self._parameters[name] = nn.Parameter(value, requires_grad=False)

    def finish_loading(self) -> None:
        """Wait for the weight packed in the background while the loader read on (a head tied to a
        PackedEmbedding loads nothing: the loader hands it the embedding's packed table)."""
        if hasattr(self, "_packing"):
            self._parameters["weight"] = nn.Parameter(self._packing.result(), requires_grad=False)
            del self._packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel in OWN_KERNELS:
            return OWN_KERNELS[self.kernel].product(x, self.weight, self.bias, self.out_features)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def activated(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """activation(self(x)) with oneDNN applying it to the float32 sums (models.layers.activated),
        or None where this layer cannot (blip2's own kernel, an activation oneDNN lacks)."""
        if self.kernel != "onednn" or activation not in POST_OPS:
            return None
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias,
                                               *POST_OPS[activation])
        return y.view(*x.shape[:-1], self.out_features)


class PackedEmbedding(nn.Module):
    """A token embedding whose table is laid out for blip2's own product (kernel "bf16" or "f32"), so
    that an output head tied to it (OPT's lm_head, a PackedLinear of the same kernel) multiplies the
    same tensor at that kernel's speed rather than the plain product's; lookups gather their rows from
    the layout."""

    loads_rows = PackedLinear.loads_rows

    def __init__(self, num_embeddings: int, embedding_dim: int, packer: Packer | None = None, kernel: str = "bf16"):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.packer, self.kernel = num_embeddings, embedding_dim, packer, kernel
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def load_parameter(self, name: str, value: torch.Tensor | Rows) -> None:
        self._packing = _submit(self.packer, OWN_KERNELS[self.kernel].layout, value)

    finish_loading = PackedLinear.finish_loading

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return OWN_KERNELS[self.kernel].rows(self.weight, ids, self.embedding_dim)


def pack_tied_head(model: nn.Module, head: str, table: str, packer: Packer, kernel: str, rows: int) -> None:
    """Replace, before loading, an nn.Linear head and the nn.Embedding it is tied to by a PackedLinear
    and a PackedEmbedding of blip2's own `kernel` ("bf16" or "f32") sharing one packed table. On
    oneDNN's kernel (whose packed form has no rows to look up), or where the head or the table is not
    plain (quantized), both are left as they are."""
    linear, embedding = model.get_submodule(head), model.get_submodule(table)
    if kernel not in OWN_KERNELS or type(linear) is not nn.Linear or type(embedding) is not nn.Embedding:
        return
    parent, _, name = head.rpartition(".")
    setattr(model.get_submodule(parent), name,
            PackedLinear(linear.in_features, linear.out_features, linear.bias is not None, rows, kernel=kernel))
    parent, _, name = table.rpartition(".")
    setattr(model.get_submodule(parent), name,
            PackedEmbedding(embedding.num_embeddings, embedding.embedding_dim, packer, kernel))


def _submit(packer: Packer | None, pack: Callable[[torch.Tensor], torch.Tensor],
            weight: torch.Tensor | Rows) -> concurrent.futures.Future:
    """`weight` packed by `pack` on the packer's thread, or at once where there is no packer."""
    return packer.submit(pack, weight) if packer else _packed_now(pack, weight)


def _packed_now(pack: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor | Rows) -> concurrent.futures.Future:
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(pack(weight.whole() if isinstance(weight, Rows) else weight))
    return done


def kernel_for(dtype: torch.dtype) -> str:
    """The kernel a language model's packed layers use in `dtype`: blip2's own bfloat16 product where
    the CPU has AVX512-BF16 without AMX, its own float32 product on AVX2 CPUs (where those build),
    else oneDNN's."""
    if dtype == torch.bfloat16 and cpu_kernels.pairs_library() is not None:
        return "bf16"
    if dtype == torch.float32 and cpu_kernels.preferred():
        return "f32"
    return "onednn"


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


def pack_linears(module: nn.Module, wanted: Callable[[str], bool], packer: Packer, rows: int = PACK_FOR_ROWS,
                 kernel: str = "onednn", prefix: str = "") -> None:
    """Replace, in place and before loading, each nn.Linear under `module` whose name `wanted`
    accepts by a PackedLinear of the same shape, packed by `packer` for `kernel` (and `rows` rows)."""
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if type(child) is nn.Linear and wanted(full):
            setattr(module, name, PackedLinear(child.in_features, child.out_features, child.bias is not None, rows,
                                               packer, kernel))
        else:
            pack_linears(child, wanted, packer, rows, kernel, full + ".")
