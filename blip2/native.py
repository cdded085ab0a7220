"""blip2's C++ kernels: compiled on first use by the machine's C++ compiler (g++, c++ or $CXX; about a
second each, cached in ~/.cache/blip2/kernels under a hash of the source, the shared headers, the
flags and torch's version), loaded with ctypes, threaded with OpenMP: the libgomp torch runs on (same
soname, loaded once), so their threads are torch's. Each kernel is a source file beside the Python
that calls it; what several share is a header in blip2/csrc."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HEADERS = Path(__file__).with_name("csrc")  # shared by several kernels; part of every cache key


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (x86 "flags", Arm "Features"); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1] for line in f if line.startswith(("flags", "Features"))),
                                  "").split())
    except OSError:
        return frozenset()


# What a kernel built on blip2/csrc/pairs_avx512.h needs from the compiler (where pair_units() holds)
PAIR_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-fno-math-errno",
              "-fopenmp", "-shared", "-fPIC")


def pair_units() -> bool:
    """Whether blip2's products on weights laid out in pairs pay here (blip2/csrc/pairs_avx512.h): a CPU
    with AVX512-BF16 and VNNI and without AMX (whose tile units oneDNN and torch use), torch on AVX-512."""
    flags = cpu_flags()
    return (torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16")
            and {"avx512_bf16", "avx512_vnni"} <= flags and "amx_bf16" not in flags)


def load(source: Path, flags: tuple[str, ...], signatures: dict[str, list], instead: str) -> ctypes.CDLL | None:
    """The library built from `source` with its functions' argument types set (all return void), or
    None where it cannot be built: then a warning says what serves `instead`, and why."""
    try:
        lib = build(source, flags)
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.warning("%s: blip2's own could not be built: %s", instead, e)
        return None
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, None
    return lib


def build(source: Path, flags: tuple[str, ...]) -> ctypes.CDLL:
    """The library compiled from `source` with `flags` (from the cache when there); raises OSError,
    subprocess.SubprocessError or RuntimeError where it cannot be built or loaded."""
    flags = (*flags, f"-I{HEADERS}")
    headers = "".join(path.read_text() for path in sorted(HEADERS.glob("*.h")))
    key = hashlib.sha256((source.read_text() + headers + " ".join(flags) + torch.__version__).encode()).hexdigest()
    return ctypes.CDLL(str(_compiled(f"{source.stem}-{key[:16]}.so", source, flags)))


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "blip2" / "kernels"


def _compiled(name: str, source: Path, flags: tuple[str, ...]) -> Path:
    """The shared library `name`, compiled from `source` unless a cache directory already holds it."""
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "blip2-kernels"):
        path = directory / name
        if path.exists():
            return path
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if not compiler:
            raise RuntimeError("no C++ compiler found (g++, c++ or $CXX)")
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            out = Path(tmp) / name
            run = subprocess.run([compiler, *flags, str(source), "-o", str(out)], capture_output=True, text=True, timeout=300)
            if run.returncode:
                raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-2000:]}")
            os.replace(out, path)  # atomic: another process may be compiling the same
        return path
    raise RuntimeError("no writable cache directory for the compiled kernel")
