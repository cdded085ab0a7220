"""Linear layers with int8 or int4 weights, quantized while loading (or read as a quantized
checkpoint stores them), each computing through the kernel chosen for its device once at load."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Rows
from . import cpu_kernels
from .formats import Quantization, _reused, quantize_weight, role_quantization, unfit
from .layouts import _dequantize_cpu_int4_t, _dequantize_cuda_int4, _pack_int4, cpu_int4_block, cuda_int4_band
from .packed import can_pack

log = logging.getLogger(__name__)


def targets(model: nn.Module, q: Quantization) -> dict[str, Quantization]:
    """The layers of `model` (a Blip2Model) that `q` quantizes, each with how (role_quantization of
    the role the model declares for it), those the kernels cannot take excluded. A head tied to the
    embedding is not listed: it is the embedding."""
    out = {}
    for name, role in model.quantizable().items():
        lq = role_quantization(role, q)
        if lq is None:
            continue
        module = model.get_submodule(name)
        out_features, in_features = module.weight.shape
        reason = unfit(in_features, out_features, lq)
        if reason:
            log.debug("%s stays unquantized: %s", name, reason)
        else:
            out[name] = lq
    return out


# From this many rows on, CPU products widen the weight and run the float GEMM (see
# QuantizedLinear.forward): the kernels' cost grows with the rows, widening's with the weight (int4's
# dequantization costs about what torch's kernel does on 64-128 rows, measured on 2 cores). blip2's
# own AVX2 products (cpu_kernels.py) keep up with the GEMM until about 256 rows for both (OPT-2.7b's
# layers, float32, `python scripts/quantization.py products`: int8 260 against 322 ms at 256 rows,
# 632 against 461 at 512; int4 263 against 256 at 256).
_GEMM_ROWS = {"int8": 32, "int4": 128}
_OWN_GEMM_ROWS = 256
# From this many rows on, CUDA int4 products widen the weight to bfloat16 and use the GEMM
# (`python scripts/gpu_ab.py --only int4` times both on opt-2.7b's layers).
CUDA_INT4_GEMM_ROWS = 256
# Weight elements widened at a time. int8: 64 MB in bfloat16, the largest OPT-2.7b layer (fc1, 26 M)
# at once, the head in 4 parts. int4: 2 M, so the dequantization's temporaries stay small (at 257
# rows 2.5-3x faster than the kernel on the vision encoder's layers, measured).
_WIDEN_ELEMENTS = {"int8": 1 << 25, "int4": 1 << 21}


class Workspace:
    """Buffers the quantized layers of one model share: blocks of rows being quantized while loading
    (released once every tensor is placed), and the widened weight of many-row CPU products (kept:
    every such product reuses it). Fresh blocks of tens of MB cost more in page faults than the work
    done in them."""

    def __init__(self) -> None:
        self.loading: dict = {}
        self.widened: dict = {}


class QuantizedLinear(nn.Module):
    """A Linear with int8 or int4 weights, computing in a float dtype (`dtype`: the activations').

    Built on the meta device before loading. Its parameters say what the checkpoint holds: a float
    `weight` [N, K] (quantized the moment the loader hands it over, so the float model never exists),
    or the portable quantized form written by `blip2 quantize` (`prequantized`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, q: Quantization, dtype: torch.dtype,
                 prequantized: bool = False, workspace: Workspace | None = None):
        super().__init__()
        self.in_features, self.out_features, self.q, self.dtype = in_features, out_features, q, dtype
        self.workspace = workspace or Workspace()
        n, k = out_features, in_features
        if not prequantized:
            self.weight = nn.Parameter(torch.empty(n, k, dtype=torch.float32), requires_grad=False)
        elif q.mode == "int8":
            self.weight = nn.Parameter(torch.empty(n, k, dtype=torch.int8), requires_grad=False)
            self.scales = nn.Parameter(torch.empty(n, dtype=torch.float32), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(n, k // 2, dtype=torch.uint8), requires_grad=False)
            self.scales = nn.Parameter(torch.empty(n, k // q.group_size, dtype=torch.float32), requires_grad=False)
            self.zeros = nn.Parameter(torch.empty(n, k // q.group_size, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype), requires_grad=False) if bias else None
        self.loads_rows = () if prequantized else ("weight",)  # the loader hands the float weight over as Rows
        self.dynamic_activations = False  # may quantize its activations (set for the vision encoder's layers)
        self._parts: dict[str, torch.Tensor] = {}

    def load_parameter(self, name: str, value: torch.Tensor) -> None:
        """Called by the loader with each tensor as it is read."""
        if name == "bias":
            self.bias = nn.Parameter(value.to(self.dtype), requires_grad=False)
            return
        quantize = name == "weight" and (isinstance(value, Rows) or value.is_floating_point())
        parts = quantize_weight(value, self.q, self.workspace.loading) if quantize else {name: value}
        if self.q.mode == "int4" and "weight" in parts:
            # Packed at once: in a saved checkpoint a layer's codes and scales may lie far apart (safetensors
            # orders tensors by dtype), and holding every layer's unpacked codes meanwhile costs memory.
            parts["weight"] = _pack_int4(parts["weight"])
        self._parts.update(parts)
        if len(self._parts) == (2 if self.q.mode == "int8" else 3):
            self._finish(self._parts)
            self._parts = {}

    def finish_loading(self) -> None:
        """Called by the loader once every tensor is placed."""
        self.workspace.loading.clear()

    def _finish(self, parts: dict[str, torch.Tensor]) -> None:
        for name in ("weight", "scales", "zeros"):
            self._parameters.pop(name, None)
        cpu = parts["weight"].device.type == "cpu"
        # The kernels' activation dtype. CUDA tinygemm takes bfloat16 only; torch's CPU kernels are
        # vectorised for half precision on AVX2 too but multiply float32 one scalar at a time (10-30x
        # slower), so a float32 model hands them its activations rounded to bfloat16 (products still
        # sum in float32): docs/precision.md has the measured cost in quality.
        self.kernel_dtype = torch.bfloat16 if (self.q.mode == "int4" and not cpu) or (
            cpu and self.dtype == torch.float32) else self.dtype
        if self.q.mode == "int8" and self._pairs(cpu):
            # blip2's product for every row count, on the weight in pairs of inputs (its float32
            # scales as quantized), the rows looked up from it too (a token embedding)
            self.register_buffer("weight", cpu_kernels.pair_layout(parts["weight"]))
            self.register_buffer("scales", parts["scales"].float())
            self.few_rows, self.many_rows, self.many_from = "pairs_product", None, None
            return
        if self.q.mode == "int8":
            self.register_buffer("weight", parts["weight"].contiguous())
            self.register_buffer("scales", parts["scales"].to(self.dtype))
            self.register_buffer("kernel_scales", self.scales.to(self.kernel_dtype))
        else:
            self.register_buffer("weight", parts["weight"])
            sz = torch.stack([parts["scales"], parts["zeros"]], -1).transpose(0, 1)  # [K/G, N, 2]
            self.register_buffer("scales_and_zeros", sz.to(self.kernel_dtype).contiguous())
        # The kernel for few rows (decoding) and, from `many_from` rows on (prompts, image patches,
        # batches), the weight widened through the float GEMM: chosen here, once, for this device.
        self.few_rows, self.many_rows, self.many_from = self._kernels(cpu, parts["weight"].device)

    def _pairs(self, cpu: bool) -> bool:
        """int8 on blip2's product on the pair layout (cpu_kernels.int8_pairs_mm). With AVX512-BF16 and
        VNNI, no AMX (cpu_kernels.pair_units), it reads a decoding row's weights about 1.7x faster than
        torch's kernel and multiplies prompts at the bfloat16 rate, with no widened copy; the vision
        encoder's layers keep their int8 activations there (cpu_int8_dynamic: twice the rate again on
        many rows). On AVX2 machines every int8 layer takes it: decoding rows read the weight as one
        stream per block of outputs, and image patches and prompts multiply as 16-bit integers, faster
        than the weight widened to float32 (docs/log.md)."""
        if not (cpu and self.dtype in (torch.float32, torch.bfloat16)):
            return False
        if cpu_kernels.pairs_library() is not None:
            return not self.dynamic_activations
        return cpu_kernels.int8_pairs_library() is not None

    def _kernels(self, cpu: bool, device: torch.device) -> tuple[str, str | None, int | None]:
        if not cpu:
            few = "cuda_int8_widened" if self.q.mode == "int8" else "torch_kernel"
            if self.q.mode == "int4" and device.type == "cuda":
                # tinygemm works a few rows at a time; from CUDA_INT4_GEMM_ROWS the weight widened to
                # bfloat16 from its own tiles (found once per K, never while a graph is captured) is faster
                self.cuda_band = cuda_int4_band(self.in_features, str(device))
                if self.cuda_band is not None:
                    return few, "cuda_int4_widened", CUDA_INT4_GEMM_ROWS
            return few, None, None
        if (self.dynamic_activations and self.q.mode == "int8" and self.dtype in (torch.float32, torch.bfloat16)
                and self.in_features % 8 == 0 and self.out_features % 8 == 0 and cpu_kernels.dynamic_library()):
            # The vision encoder's products (257 rows an image) on int8 vector units: as integers, each
            # activation row quantized (cpu_kernels.int8_dynamic_mm). The language model's stay widened:
            # its prompt passes are few rows, and on the test checkpoints quantizing their activations
            # took Flan-T5's int8 logits error from 1.8% to 2.4%.
            self.register_buffer("float_scales", self.scales.float(), persistent=False)
            return "torch_kernel", "cpu_int8_dynamic", _GEMM_ROWS["int8"]
        # blip2's own int4 product on AVX2 machines (cpu_kernels.py) for up to _OWN_GEMM_ROWS rows: the
        # scales and zeros in bfloat16, torch's layout in blocks of 32 rows (int8 takes _pairs there)
        own = cpu_kernels.preferred() and self.q.mode == "int4" and (
            cpu_int4_block() == cpu_kernels.BLOCK and self.out_features % cpu_kernels.BLOCK == 0
            and self.scales_and_zeros.dtype == torch.bfloat16)
        # Widening needs int4 in a layout _dequantize_cpu_int4_t reads, in whole blocks
        block = cpu_int4_block()
        if self.q.mode == "int4" and not (block and self.out_features % block == 0):
            return ("own_product" if own else "torch_kernel"), None, None
        return ("own_product" if own else "torch_kernel"), "cpu_widened", (_OWN_GEMM_ROWS if own else _GEMM_ROWS[self.q.mode])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).to(self.dtype)
        many = self.many_from is not None and x.shape[0] >= self.many_from
        y = getattr(self, self.many_rows if many else self.few_rows)(x)  # bias included
        return y.view(*shape[:-1], self.out_features)

    def _biased(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """torch's weight-only kernels (CPU: vectorised for AVX-512; CUDA int4: tinygemm)."""
        xk = x.to(self.kernel_dtype).contiguous()
        if self.q.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(xk, self.weight, self.kernel_scales)
        elif x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self.weight, self.q.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(xk, self.weight, self.q.group_size, self.scales_and_zeros)
        return self._biased(y.to(self.dtype))

    def own_product(self, x: torch.Tensor) -> torch.Tensor:
        """blip2's AVX2 int4 product: activations in 16-bit steps, not bfloat16."""
        return self._biased(cpu_kernels.int4_mm(x, self.weight, self.scales_and_zeros, self.q.group_size).to(self.dtype))

    def pairs_product(self, x: torch.Tensor) -> torch.Tensor:
        """blip2's int8 product (cpu_kernels.int8_pairs_mm): x in 16-bit steps of each row's
        largest magnitude, integer sums, the scales and the bias applied on the way out."""
        return cpu_kernels.int8_pairs_mm(x, self.weight, self.scales, self.bias, self.out_features, self.dtype)

    def cuda_int8_widened(self, x: torch.Tensor) -> torch.Tensor:
        """CUDA int8: the weight widened (int8 values are exact in half precision) and the scales applied
        to the float32 output, as the CPU kernel does: 1.7x faster than scaling the widened weight first
        (docs/log.md). Integer-valued products may pass float16's range before scaling, hence float32."""
        w = self.weight.to(self.dtype).t()
        y = torch.mm(x, w, out_dtype=torch.float32) if self.dtype != torch.float32 else torch.mm(x, w)
        return self._biased((y * self.scales).to(self.dtype))

    def cuda_int4_widened(self, x: torch.Tensor) -> torch.Tensor:
        w = _dequantize_cuda_int4(self.weight, self.scales_and_zeros, self.q.group_size, self.out_features,
                                  self.in_features, self.cuda_band)
        return self._biased(F.linear(x.to(torch.bfloat16), w).to(self.dtype))

    def cpu_int8_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows on a CPU with int8 vector units: each row of x quantized to int8 by its largest
        magnitude, integer products, scales and bias applied in one pass (cpu_kernels.int8_dynamic_mm)."""
        return cpu_kernels.int8_dynamic_mm(x, self.weight, self.float_scales, self.bias, self.dtype)

    def cpu_widened(self, x: torch.Tensor) -> torch.Tensor:
        """The weight widened to the activations' dtype, _WIDEN_ELEMENTS at a time, through F.linear:
        the CPU kernels work row by row, so for many rows (image patches; with torch's kernels, a
        prompt too) this is faster (than torch's kernels: int8 up to 6x, int4 on the vision encoder
        2.5x). int8 values are exact in bfloat16 and their scales apply to the output, as in the
        kernel; int4 weights are dequantized as the kernel does and rounded to the dtype. The bias is
        added in the same pass as the scales (int8) or by the product (int4): on a CPU each pass over
        the output of an image's patches costs as much as widening the weight."""
        rows = max(64, _WIDEN_ELEMENTS[self.q.mode] // self.in_features // 64 * 64)
        out = torch.empty(x.shape[0], self.out_features, dtype=self.dtype, device=x.device)
        scratch = self.workspace.widened
        for r in range(0, self.out_features, rows):
            n = min(rows, self.out_features - r)
            if self.q.mode == "int8":
                w = _reused(scratch, self.dtype, (n, self.in_features), self.dtype).copy_(self.weight[r:r + n])
                if self.bias is None:
                    torch.mul(_float_product(x, w), self.scales[r:r + n], out=out[:, r:r + n])
                else:
                    torch.addcmul(self.bias[r:r + n], _float_product(x, w), self.scales[r:r + n], out=out[:, r:r + n])
            else:
                w_t = _reused(scratch, self.dtype, (self.in_features, n), self.dtype)
                _dequantize_cpu_int4_t(self.weight[r:r + n], self.scales_and_zeros[:, r:r + n], self.q.group_size, w_t)
                if self.bias is None:
                    torch.matmul(x, w_t, out=out[:, r:r + n])
                else:
                    torch.addmm(self.bias[r:r + n], x, w_t, out=out[:, r:r + n])
        return out

    def extra_repr(self) -> str:
        g = f", group_size={self.q.group_size}" if self.q.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.q.mode}{g}, dtype={self.dtype}"


def _float_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a widened weight: oneDNN's product in float32 (ViT-g's four layers at 257 rows under
    AVX2: 62-66 ms, as on a packed weight, where F.linear's MKL product takes 74-82), else F.linear."""
    if x.dtype == torch.float32 and can_pack(torch.float32, x.device):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


class QuantizedEmbedding(QuantizedLinear):
    """A token embedding [vocab, dim] in int8 (one scale per row). Called with token ids it looks rows
    up; called with hidden states it is the output head tied to the embedding (logits = x @ W.T, row
    scales applied to the outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return super().forward(x)
        rows = (cpu_kernels.pair_rows(self.weight, x, self.in_features) if self.few_rows == "pairs_product"
                else self.weight[x])
        return rows.to(self.dtype) * self.scales[x].to(self.dtype).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.out_features}, embedding_dim={self.in_features}, int8, dtype={self.dtype}"


def quantize_linears(model: nn.Module, q: Quantization, dtype_of, stored: dict[str, str] | None = None
                     ) -> dict[str, Quantization]:
    """Replace, on a meta-device Blip2Model before loading, the layers `q` targets (`targets`) by
    QuantizedLinear (QuantizedEmbedding for the token embedding), computing in dtype_of(<layer>.weight);
    a weight the model ties to a quantized one shares its layer (the head reads the int8 embedding).
    Returns each layer's quantization. stored: a quantized checkpoint's layer modes
    (stored_layer_modes), which the layers are then read in, as written."""
    layers = targets(model, q)
    roles = model.quantizable()
    if stored is not None:
        layers = {name: replace(q, mode=stored[name]) for name in layers if name in stored}
    workspace = Workspace()
    for name, lq in layers.items():
        parent_name, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        if isinstance(old, nn.Embedding):
            vocab, dim = old.weight.shape
            new = QuantizedEmbedding(dim, vocab, False, lq, dtype_of(f"{name}.weight"), stored is not None, workspace)
        else:
            new = QuantizedLinear(old.in_features, old.out_features, old.bias is not None, lq,
                                  dtype_of(f"{name}.weight"), stored is not None, workspace)
            new.dynamic_activations = roles[name] == "image"
        setattr(model.get_submodule(parent_name), child, new)
    for tied, source in model.tied_weights.items():
        layer = source.rpartition(".")[0]
        if layer in layers:
            parent_name, _, child = tied.rpartition(".")[0].rpartition(".")
            setattr(model.get_submodule(parent_name), child, model.get_submodule(layer))
    return layers
