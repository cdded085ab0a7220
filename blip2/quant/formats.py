"""The quantized forms: what int8 and int4 mean, how a float weight becomes one, and back.

int8: symmetric, one scale per output channel, w ~ q * s with q in [-127, 127]
      (aten._weight_int8pack_mm on CPU; dequantize-then-matmul elsewhere).
int4: asymmetric, one scale and zero per group of `group_size` inputs, w ~ (q - 8) * s + z with q in
      [0, 15] (the "tinygemm" convention: aten._weight_int4pack_mm_for_cpu, aten._weight_int4pack_mm on CUDA).
On AVX2 CPUs, blip2's own products (cpu_kernels.py) replace torch's CPU kernels, which are written for
AVX-512; many rows (image batches) widen the weight and use the float GEMM.

Quantized: every Linear inside a transformer layer of the language model (OPT q/k/v/out_proj, fc1,
fc2; T5 q/k/v/o, wi/wi_0/wi_1, wo), its output head, and, unless `vision=False`, the image side: the
vision encoder's layers (qkv, projection, fc1, fc2) and the Q-Former's. The token embedding, the
output head and the Q-Former are int8 in both modes (one scale per row; a head tied to the embedding
reads the same int8 rows, each row's scale being that output's scale; see role_quantization). Norms,
biases, position tables, query tokens and the language projection keep the float dtype. A quantized
checkpoint's layers are read in the mode they were stored in (stored_layer_modes).

A quantized checkpoint stores a portable form, the same on every device; the kernels' packed layout
(which differs between CPU and CUDA) is made at load:
    int8: <layer>.weight int8 [N, K], <layer>.scales float32 [N]
    int4: <layer>.weight uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high one),
          <layer>.scales and <layer>.zeros float32 [N, K/group_size]
"""


from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ..checkpoint import Rows

MODES = ("int8", "int4")
# 128 keeps int4 scales at 0.25 bit per weight; see README "Precision and quantization" for the measured
# quality and speed of 32, 64 and 128.
GROUP_SIZE = 128
_ROWS = 1024  # quantize and pack this many output rows at a time, so temporaries stay small


@dataclass(frozen=True)
class Quantization:
    """What is quantized and how: recorded as the "quantization" entry of a quantized checkpoint's config.json."""

    mode: str
    group_size: int = GROUP_SIZE  # int4 only
    vision: bool = True  # the vision encoder and Q-Former
    language: bool = True  # the language model

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unsupported quantization {self.mode!r} (use {' or '.join(MODES)})")
        # int8 ignores group_size, but one that is not an integer is a mistake in either mode.
        is_int = isinstance(self.group_size, int) and not isinstance(self.group_size, bool)
        if not is_int or (self.mode == "int4" and self.group_size not in (32, 64, 128, 256)):
            raise ValueError(f"group_size={self.group_size!r} must be 32, 64, 128 or 256 (inputs per int4 scale)")
        for part in ("vision", "language"):
            if not isinstance(getattr(self, part), bool):
                raise ValueError(f"{part}={getattr(self, part)!r} must be True or False")
        if not (self.vision or self.language):
            raise ValueError("quantizing neither the vision side nor the language model quantizes nothing")

    def to_json(self) -> dict:
        out = asdict(self)
        if self.mode == "int8":
            out.pop("group_size")
        if self.language:  # written only when the language model is left unquantized
            out.pop("language")
        return out

    @classmethod
    def from_json(cls, raw: dict) -> "Quantization":
        """Read config.json's "quantization" entry, as written by to_json; an error names the entry."""
        try:
            if not isinstance(raw, dict) or "mode" not in raw:
                raise ValueError('expected an object with a "mode"')
            return cls(raw["mode"], raw.get("group_size", GROUP_SIZE), raw.get("vision", True), raw.get("language", True))
        except ValueError as e:
            raise ValueError(f'config.json: malformed "quantization" entry {raw!r}: {e}') from None


def unfit(in_features: int, out_features: int, q: Quantization) -> str | None:
    """Why the kernels cannot take this Linear (None when they can). Checked the same way on every
    device, so a quantized checkpoint loads anywhere."""
    if q.mode == "int8" and in_features % 16:
        return f"int8 needs in_features divisible by 16, got {in_features}"  # the CPU kernel reads 16 at a time
    if q.mode == "int4" and in_features % q.group_size:
        return f"int4 needs in_features divisible by the group size {q.group_size}, got {in_features}"
    if q.mode == "int4" and out_features % 16:
        return f"int4 needs out_features divisible by 16, got {out_features}"
    return None


def quantize_weight(w: torch.Tensor | Rows, q: Quantization, buffers: dict | None = None) -> dict[str, torch.Tensor]:
    """A float weight [N, K] (or its rows as the loader reads them) to its portable quantized form (see
    the module docstring); scales in float32. Works on _ROWS rows at a time in `buffers` (the caller's,
    reused from one weight to the next: fresh blocks of tens of MB cost more in page faults than the
    arithmetic)."""
    w = w.detach() if isinstance(w, torch.Tensor) else w
    n, k = w.shape
    buffers = {} if buffers is None else buffers
    block = _reused(buffers, ("rows", w.device), (min(_ROWS, n), k), torch.float32, w.device)

    def rows_at(r: int) -> torch.Tensor:  # a float32 copy of rows [r, r + _ROWS), ours to overwrite
        m = min(_ROWS, n - r)
        return w.read_into(r, r + m, block[:m]) if isinstance(w, Rows) else block[:m].copy_(w[r:r + m])

    if q.mode == "int8":
        qw = torch.empty(n, k, dtype=torch.int8, device=w.device)
        scales = torch.empty(n, dtype=torch.float32, device=w.device)
        for r in range(0, n, _ROWS):
            rows = rows_at(r)
            s = torch.maximum(-rows.amin(1), rows.amax(1)).clamp_(min=1e-12) / 127  # (aminmax is 5x slower)
            qw[r:r + len(rows)] = rows.div_(s[:, None]).round_().clamp_(-127, 127)
            scales[r:r + len(rows)] = s
        return {"weight": qw, "scales": scales}
    g = q.group_size
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // g, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    codes = _reused(buffers, ("codes", w.device), (min(_ROWS, n), k), torch.uint8, w.device)
    for r in range(0, n, _ROWS):
        rows = rows_at(r)
        m = len(rows)
        grouped = rows.view(m, k // g, g)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
        s = (hi - lo).clamp(min=1e-6) / 15
        c = codes[:m].copy_(grouped.sub_(lo[..., None]).div_(s[..., None]).round_().clamp_(0, 15).view(m, k))
        torch.bitwise_or(c[:, 0::2], c[:, 1::2].bitwise_left_shift_(4), out=packed[r:r + m])
        scales[r:r + m] = s
        zeros[r:r + m] = lo + 8 * s
    return {"weight": packed, "scales": scales, "zeros": zeros}


def _reused(store: dict, key: object, shape: tuple[int, int], dtype: torch.dtype,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """A buffer of `shape` kept in `store` under `key`, grown as needed: fresh blocks of tens of MB
    cost more (in page faults) than the work done in them."""
    n = shape[0] * shape[1]
    buf = store.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # an ordinary tensor: usable inside and outside inference mode
            buf = store[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def dequantize_weight(parts: dict[str, torch.Tensor], q: Quantization) -> torch.Tensor:
    """The float32 weight [N, K] a portable quantized form stands for."""
    if q.mode == "int8":
        return parts["weight"].float() * parts["scales"].float()[:, None]
    codes = _unpack_nibbles(parts["weight"]).float()
    n, k = codes.shape
    s, z = parts["scales"].float(), parts["zeros"].float()
    return ((codes.view(n, -1, q.group_size) - 8) * s[..., None] + z[..., None]).view(n, k)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 15] -> the portable form, uint8 [N, K/2] (column 2j in the low nibble)."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit value of a packed tensor in memory order (byte by byte, the low nibble first: for
    int32 words on a little-endian machine, the word's bits 0-3, 4-7, ...)."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack([b & 15, b >> 4], -1).view(-1)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Portable uint8 [N, K/2] -> int32 codes [N, K]."""
    return _nibbles(packed).view(packed.shape[0], -1).to(torch.int32)


# The roles a model declares for its quantizable layers (Blip2Model.quantizable): "text", the
# language model's layers; "text-int8", its token embedding and own output head; "image", the vision
# encoder's layers; "image-int8", the Q-Former's.
ROLES = ("text", "text-int8", "image", "image-int8")


def role_quantization(role: str, q: Quantization) -> Quantization | None:
    """How a layer of this role is quantized under `q` (None: it is not). The image side only when
    q.vision, the language model only when q.language. The token embedding, the output head and the Q-Former are int8 in every mode: the
    head's error goes straight into the logits (an int4 OPT embedding, tied to the head, would save
    61 MB but take the test checkpoint's int4 logits error from 8.0% to 12.7%; an int8 Flan-T5 head
    takes it from 18.8% to 15.9%, for 31 MB), and the Q-Former's 32 queries are all the language
    model sees of the image (on full-size random opt-2.7b weights an int4 Q-Former alone moves the
    logits by 16.0%, an int8 one by 1.4%, for 49 MB)."""
    if role not in ROLES:
        raise ValueError(f"unknown quantization role {role!r} (one of {', '.join(ROLES)})")
    if (role.startswith("image") and not q.vision) or (role.startswith("text") and not q.language):
        return None
    return replace(q, mode="int8", group_size=GROUP_SIZE) if role.endswith("-int8") else q
