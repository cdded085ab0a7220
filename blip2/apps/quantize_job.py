"""`blip2 quantize`: a quantized copy of a checkpoint, rounded to nearest or calibrated by GPTQ."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..engine.pipeline import load
from ..quant.checkpoint import quantization_targets, write_quantized
from ..quant.formats import Quantization
from ..quant.gptq import calibrated_parts

# The calibration text: prompts, written captions and questions, read as chats about each image.
CALIBRATION_TEXT = Path(__file__).with_name("calibration.json")


def quantize_checkpoint(src: Path, dst: Path, q: Quantization, images: Sequence = (), device: str = "cpu",
                        texts: dict | None = None) -> list[Path]:
    """Write `src` quantized by `q` to the new directory `dst`. With calibration `images` (anything
    load_image takes), the layers are quantized by GPTQ on them, run on `device` with `texts`
    (default: CALIBRATION_TEXT), otherwise rounded to nearest. Returns the shard paths."""
    calibrated = None
    if images:
        texts = texts or json.loads(CALIBRATION_TEXT.read_text())
        with load(src, dtype="float32", device=device) as model:
            calibrated = calibrated_parts(model, quantization_targets(src, q), images, texts)
    return write_quantized(src, dst, q, calibrated)
