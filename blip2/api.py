"""The user-facing object: `blip2.load(...)` returns a `Blip2`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import Blip2Config
from .model import Blip2Model
from .weights import load_weights

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype} (use float32, bfloat16 or float16)")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (use float32, bfloat16 or float16)")
    return DTYPES[dtype]


def _dtype_plan(cfg: Blip2Config, dtype: torch.dtype):
    """Each parameter's dtype: the requested one, except what the reference keeps in float32 under float16."""

    def dtype_of(name: str) -> torch.dtype:
        if dtype == torch.float16:
            if name == "query_tokens" or name.startswith("qformer."):
                return torch.float32
            if cfg.is_encoder_decoder and ".DenseReluDense.wo." in name:
                return torch.float32
        return dtype

    return dtype_of


class Blip2:
    """A loaded BLIP-2 checkpoint: the model plus what it needs to turn inputs into outputs."""

    def __init__(self, model: Blip2Model, path: Path, load_seconds: float):
        self.model = model
        self.config = model.config
        self.path = path
        self.load_seconds = load_seconds

    @property
    def device(self) -> torch.device:
        return self.model.language_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_projection.weight.dtype

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> projected query embeddings [B, num_query_tokens, lm_hidden]."""
        return self.model.encode_images(pixel_values.to(self.device))

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits as the reference Blip2ForConditionalGeneration.forward computes them (see Blip2Model.forward)."""
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        return self.model(to(pixel_values), to(input_ids), to(attention_mask), to(decoder_input_ids))

    __call__ = forward


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> Blip2:
    """Load a BLIP-2 checkpoint in the Hugging Face layout from a local directory.

    dtype: float32 (default), bfloat16 or float16; device: "cpu" (default), "cuda", ...
    Each weight is read once and stored directly in its final dtype and device.
    """
    start = time.perf_counter()
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    cfg = Blip2Config.from_file(directory)
    dtype = parse_dtype(dtype)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Blip2Model(cfg)
    load_weights(model, directory, _dtype_plan(cfg, dtype), device)
    model.eval()
    return Blip2(model, directory, time.perf_counter() - start)
