"""Configuration: the checkpoint's config.json read into small dataclasses.

Every field that changes the computation is here, with the reference implementation's default
when config.json leaves it out. Anything we do not implement is an error naming the field.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "silu", "swish")


class ConfigError(ValueError):
    """config.json asks for something we do not support, or is malformed."""


def _check(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"unsupported {name}={value!r} in config.json (supported: {', '.join(map(str, allowed))})")


def _section(raw: dict, name: str) -> dict:
    """A nested config (vision_config, ...); missing or null means the reference defaults."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} in config.json must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _build(cls, raw: dict, section: str):
    """Fill a dataclass from a dict, ignoring keys that do not change the computation."""
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in raw.items() if k in known}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - only on malformed configs
        raise ConfigError(f"{section}: {e}") from None


# What a field's annotation admits. JSON has one number type, so a float field takes an integer;
# bool is a subclass of int in Python but `true` is not a size. numpy's numbers count as numbers.
_KINDS = {
    "None": ("null", lambda v: v is None),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    "float": ("a finite number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)
              and math.isfinite(v)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list[int]": ("a list of integers", lambda v: isinstance(v, list) and len(v) > 0
                  and all(_KINDS["int"][1](x) for x in v)),
}
def matches(value: Any, annotation: str) -> bool:
    """Whether `value` is of a type a dataclass field's annotation admits ("int | None", "float", ...)."""
    return any(_KINDS[kind][1](value) for kind in annotation.split(" | "))


# Fields that index the language model's vocabulary; every other int is a size or a count.
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "image_token_index")


def _check_value(name: str, value: Any, annotation: str, vocab_size: int | None = None) -> None:
    """Check a field's type against its annotation and its range against what it means: token ids lie
    in [0, vocab_size), other ints are sizes or counts (at least 1), floats are epsilons (above 0)."""
    kinds = annotation.split(" | ")
    if name.rsplit(".", 1)[-1] in TOKEN_IDS:
        in_range, allowed = (lambda v: 0 <= v < vocab_size), f"within the vocabulary [0, {vocab_size})"
    elif "float" in kinds:
        in_range, allowed = (lambda v: v > 0), "above 0"
    else:
        in_range, allowed = (lambda v: v >= 1), "at least 1"
    numbers = [v for v in (value if isinstance(value, list) else [value]) if _KINDS["float"][1](v)]
    if any(_KINDS[k][1](value) for k in kinds) and all(in_range(v) for v in numbers):
        return
    words = [_KINDS[k][0] for k in kinds]
    expected = " or ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} or {words[-1]}"
    if {"int", "float"} & set(kinds):
        expected += f", {allowed}"
    raise ConfigError(f"{name}={value!r} in config.json: expected {expected}")


def _check_fields(cfg, section: str) -> None:
    # Token ids last: their range needs vocab_size checked first.
    for f in sorted(fields(cfg), key=lambda f: f.name in TOKEN_IDS):
        _check_value(f"{section}.{f.name}", getattr(cfg, f.name), f.type, getattr(cfg, "vocab_size", None))


def _pair(value: Any, name: str) -> Any:
    """image_size and patch_size may be written as [height, width]; only squares are supported."""
    if isinstance(value, (list, tuple)) and value:
        if any(v != value[0] for v in value):
            raise ConfigError(f"unsupported non-square {name}={value!r} in config.json")
        return value[0]
    return value


@dataclass
class VisionConfig:
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        self.image_size = _pair(self.image_size, "vision_config.image_size")
        self.patch_size = _pair(self.patch_size, "vision_config.patch_size")
        _check_fields(self, "vision_config")
        _check("vision_config.hidden_act", self.hidden_act, ACTIVATIONS)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )


@dataclass
class QFormerConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "qformer_config")
        _check("qformer_config.hidden_act", self.hidden_act, ACTIVATIONS)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"qformer_config.hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )


@dataclass
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2

    model_type = "opt"
    is_encoder_decoder = False

    def __post_init__(self) -> None:
        _check_fields(self, "text_config")
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        _check("text_config.activation_function", self.activation_function, ACTIVATIONS)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text_config.hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self._remove_final_layer_norm


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int = 0

    model_type = "t5"
    is_encoder_decoder = True

    def __post_init__(self) -> None:
        _check_fields(self, "text_config")
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(f"unsupported text_config.feed_forward_proj={self.feed_forward_proj!r} in config.json")
        self.is_gated_act = parts[0] == "gated"
        if self.dense_act_fn is None:
            # The reference derives the activation from feed_forward_proj, mapping "gated-gelu" to the tanh
            # approximation; a dense_act_fn written in config.json (blip2-flan-t5-xl says "gelu") wins.
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        _check("text_config.dense_act_fn", self.dense_act_fn, ACTIVATIONS)
        if self.scale_decoder_outputs is None:
            # Original T5 ties lm_head to the embedding and rescales the decoder output by d_model**-0.5;
            # T5 v1.1 / Flan-T5 (tie_word_embeddings false) does neither.
            self.scale_decoder_outputs = self.tie_word_embeddings

    @property
    def hidden_size(self) -> int:
        return self.d_model


@dataclass
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: OPTConfig | T5Config = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_token_index: int | None = None

    def __post_init__(self) -> None:
        _check_value("num_query_tokens", self.num_query_tokens, "int")
        _check_value("image_token_index", self.image_token_index, "int | None", self.text.vocab_size)

    @classmethod
    def from_dict(cls, raw: dict) -> "Blip2Config":
        """Build from the dict of a BLIP-2 config.json."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {_json_type(raw)}")
        _check("model_type", raw.get("model_type"), ("blip-2",))
        vision = _build(VisionConfig, _section(raw, "vision_config"), "vision_config")
        # The Q-Former's cross-attention width always follows the vision tower, as in the reference.
        qformer_raw = {**_section(raw, "qformer_config"), "encoder_hidden_size": vision.hidden_size}
        qformer = _build(QFormerConfig, qformer_raw, "qformer_config")
        text_raw = _section(raw, "text_config")
        text_type = text_raw.get("model_type", "opt")
        _check("text_config.model_type", text_type, ("opt", "t5"))
        text = _build(OPTConfig if text_type == "opt" else T5Config, text_raw, "text_config")
        image_token_index = raw.get("image_token_index", raw.get("image_token_id"))
        return cls(vision, qformer, text, raw.get("num_query_tokens", 32), image_token_index)

    @classmethod
    def from_file(cls, path: str | Path) -> "Blip2Config":
        """Read a config.json (or the config.json inside a checkpoint directory); errors name the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json; is this a BLIP-2 checkpoint directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text.is_encoder_decoder

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.text.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def read_settings(path: Path) -> dict:
    """A JSON object from one of a checkpoint's settings files ({} when there is no such file); a
    file that is not a JSON object is a ConfigError naming it."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    return raw
