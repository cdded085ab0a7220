"""oneDNN-packed float linears for the CPU: the weight laid out once, at load, for the rows it will see."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import Callable

import torch
from torch import nn


# The row count oneDNN lays a weight out for. Measured on full-size OPT, bfloat16 on AMX: 8 decodes
# as fast as 1 at batch 1 and up to 1.3x faster at batch 8, and prefills 1.4x faster. float32 on AVX2
# (2 cores, fc1-shaped weights): 1 decodes 1.35x faster than 8 at batch 1 and within 1.2x at batch 8
# (both 2.2-2.7x MKL's plain product at 8 and 48 rows); 8 encodes images best.
PACK_FOR_ROWS = 8


class Packer:
    """Packs weights on a second thread while the loader reads and converts the next tensors (0.5-1 s
    off a 9 s full-size bfloat16 load); at most two wait, so the unpacked copies in flight stay a few
    tens of MB. Owned by one load, which closes it; once closed, weights are packed at once."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="blip2-pack")
        self._in_flight: collections.deque = collections.deque()

    def submit(self, weight: torch.Tensor, rows: int) -> concurrent.futures.Future:
        if self._pool is None:
            return _packed_now(weight, rows)
        while len(self._in_flight) >= 2:
            self._in_flight.popleft().result()
        future = self._pool.submit(torch.ops.mkldnn._reorder_linear_weight, weight, rows)
        self._in_flight.append(future)
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool = None
        self._in_flight.clear()


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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rows: int = PACK_FOR_ROWS,
                 packer: Packer | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rows = in_features, out_features, rows
        self.packer = packer  # None: packed at once, on this thread
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def load_parameter(self, name: str, value: torch.Tensor) -> None:
        if name == "weight":
            self._packing = self.packer.submit(value, self.rows) if self.packer else _packed_now(value, self.rows)
            return
        self._parameters[name] = nn.Parameter(value, requires_grad=False)

    def finish_loading(self) -> None:
        """Wait for the weight packed in the background while the loader read on."""
        self._parameters["weight"] = nn.Parameter(self._packing.result(), requires_grad=False)
        del self._packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def _packed_now(weight: torch.Tensor, rows: int) -> concurrent.futures.Future:
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(torch.ops.mkldnn._reorder_linear_weight(weight, rows))
    return done


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
                 prefix: str = "") -> None:
    """Replace, in place and before loading, each nn.Linear under `module` whose name `wanted`
    accepts by a PackedLinear of the same shape, packed for `rows` rows by `packer`."""
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if type(child) is nn.Linear and wanted(full):
            setattr(module, name, PackedLinear(child.in_features, child.out_features, child.bias is not None, rows,
                                               packer))
        else:
            pack_linears(child, wanted, packer, rows, full + ".")
