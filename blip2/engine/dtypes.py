"""Dtypes and devices: names to torch's, what the hardware computes natively, and what each
parameter is stored in (the reference keeps some layers in float32 under float16)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..native import cpu_flags

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu",
                encoder_decoder: bool = False) -> torch.dtype:
    """A dtype name or torch.dtype to a torch.dtype; None is float32, "auto" is `auto_dtype(device)`."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return auto_dtype(torch.device(device), encoder_decoder)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype} (use float32, bfloat16, float16 or auto)")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (use float32, bfloat16, float16 or auto)")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """A device name to a torch.device this process can use (None: the CPU); an error saying why not."""
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r} (use cpu, cuda or mps)")
    return device


def auto_dtype(device: torch.device, encoder_decoder: bool = False) -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs from
    Ampere on), float16 on other CUDA GPUs (float32 for T5, which overflows in float16), else float32:
    emulated bfloat16 is slower than float32."""
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3
            native = torch.cuda.is_bf16_supported()
        if native:
            return torch.bfloat16
        return torch.float32 if encoder_decoder else torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch's own checks, where present
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})  # "bf16": the Arm Features line


T5_FLOAT16 = ("Flan-T5 overflows in float16 (it generates \"ssss\" or NaN, in the reference too): use "
              "dtype=\"bfloat16\" or \"auto\", or force float16 with force_float16=True (CLI: --force-float16), "
              "which keeps the reference's guards (T5's wo in float32, clamped activations)")


def dtype_plan(model: nn.Module, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """Each parameter's dtype: the requested one, except what the model declares the reference keeps
    in float32 under float16 (Blip2Model.float16_kept_in_float32)."""
    kept = model.float16_kept_in_float32() if dtype == torch.float16 else set()
    return lambda name: torch.float32 if name in kept else dtype


def quantized_plan(model: nn.Module, layers, dtype_of: Callable[[str], torch.dtype]) -> Callable[[str], torch.dtype]:
    """dtype_of, except that quantized layers read their weights as they declare them: float32 (to be
    quantized on arrival) or the stored integer form, with float32 scales."""
    declared = {f"{name}.{attr}": p.dtype for name in layers
                for attr, p in model.get_submodule(name).named_parameters() if attr != "bias"}
    return lambda name: declared.get(name) or dtype_of(name)
