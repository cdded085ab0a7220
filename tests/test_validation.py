"""Every config.json field, generation setting and quantization entry is checked where it enters, and
the error names the field (and the file) and what it allows."""

from __future__ import annotations

import json
import re

import pytest
from checkpoints import VOCAB, tiny_config

from blip2.config import Blip2Config, ConfigError
from blip2.engine.generation import GenerationConfig
from blip2.quant.formats import Quantization

NAN, INF = float("nan"), float("inf")
VOCAB_RANGE = f"[0, {VOCAB})"


def _config(lm: str = "opt", section: str | None = None, **overrides) -> dict:
    """tiny_config with `overrides` written into `section` (the top level when None)."""
    cfg = tiny_config(lm)
    (cfg if section is None else cfg[section]).update(overrides)
    return cfg


# (language model, section, override, the field the error must name, the range it must state)
BAD_FIELDS = [
    # types, from each field's annotation
    ("opt", "text_config", {"hidden_size": "abc"}, "text_config.hidden_size", "an integer"),
    ("opt", "text_config", {"num_hidden_layers": 2.5}, "text_config.num_hidden_layers", "an integer"),
    ("opt", "text_config", {"vocab_size": True}, "text_config.vocab_size", "an integer"),
    ("opt", "text_config", {"tie_word_embeddings": "false"}, "text_config.tie_word_embeddings", "true or false"),
    ("opt", "text_config", {"eos_token_id": "50"}, "text_config.eos_token_id", "a list of integers"),
    ("opt", "text_config", {"eos_token_id": [50, "x"]}, "text_config.eos_token_id", "a list of integers"),
    ("opt", "text_config", {"word_embed_proj_dim": True}, "text_config.word_embed_proj_dim", "an integer or null"),
    ("opt", "vision_config", {"qkv_bias": 1}, "vision_config.qkv_bias", "true or false"),
    ("opt", "vision_config", {"image_size": "28"}, "vision_config.image_size", "an integer"),
    ("opt", "vision_config", {"image_size": 28.5}, "vision_config.image_size", "an integer"),
    ("opt", "vision_config", {"patch_size": ["14", "14"]}, "vision_config.patch_size", "an integer"),
    ("opt", "vision_config", {"layer_norm_eps": NAN}, "vision_config.layer_norm_eps", "a finite number"),
    ("opt", "qformer_config", {"layer_norm_eps": INF}, "qformer_config.layer_norm_eps", "a finite number"),
    ("opt", "qformer_config", {"use_qformer_text_input": 0}, "qformer_config.use_qformer_text_input",
     "true or false"),
    ("t5", "text_config", {"feed_forward_proj": 5}, "text_config.feed_forward_proj", "a string"),
    ("t5", "text_config", {"layer_norm_epsilon": True}, "text_config.layer_norm_epsilon", "a finite number"),
    ("opt", None, {"num_query_tokens": "x"}, "num_query_tokens", "an integer"),
    # sizes, counts and epsilons
    ("opt", "vision_config", {"num_attention_heads": 0}, "vision_config.num_attention_heads", "at least 1"),
    ("opt", "vision_config", {"patch_size": 0}, "vision_config.patch_size", "at least 1"),
    ("opt", "vision_config", {"image_size": [0, 0]}, "vision_config.image_size", "at least 1"),
    ("opt", "vision_config", {"intermediate_size": -1}, "vision_config.intermediate_size", "at least 1"),
    ("opt", "vision_config", {"layer_norm_eps": 0}, "vision_config.layer_norm_eps", "above 0"),
    ("opt", "qformer_config", {"num_attention_heads": 0}, "qformer_config.num_attention_heads", "at least 1"),
    ("opt", "qformer_config", {"num_hidden_layers": 0}, "qformer_config.num_hidden_layers", "at least 1"),
    ("opt", "text_config", {"num_attention_heads": 0}, "text_config.num_attention_heads", "at least 1"),
    ("opt", "text_config", {"hidden_size": 0}, "text_config.hidden_size", "at least 1"),
    ("opt", "text_config", {"ffn_dim": 0}, "text_config.ffn_dim", "at least 1"),
    ("opt", "text_config", {"vocab_size": 0}, "text_config.vocab_size", "at least 1"),
    ("opt", "text_config", {"max_position_embeddings": 0}, "text_config.max_position_embeddings", "at least 1"),
    ("t5", "text_config", {"num_heads": 0}, "text_config.num_heads", "at least 1"),
    ("t5", "text_config", {"d_kv": 0}, "text_config.d_kv", "at least 1"),
    ("t5", "text_config", {"d_ff": 0}, "text_config.d_ff", "at least 1"),
    ("t5", "text_config", {"num_decoder_layers": 0}, "text_config.num_decoder_layers", "at least 1"),
    ("t5", "text_config", {"relative_attention_num_buckets": 0}, "text_config.relative_attention_num_buckets",
     "at least 1"),
    ("t5", "text_config", {"relative_attention_max_distance": 0}, "text_config.relative_attention_max_distance",
     "at least 1"),
    ("t5", "text_config", {"layer_norm_epsilon": -1e-6}, "text_config.layer_norm_epsilon", "above 0"),
    ("opt", None, {"num_query_tokens": 0}, "num_query_tokens", "at least 1"),
    # token ids index the language model's vocabulary
    ("opt", "text_config", {"eos_token_id": VOCAB}, "text_config.eos_token_id", VOCAB_RANGE),
    ("opt", "text_config", {"eos_token_id": [50, VOCAB]}, "text_config.eos_token_id", VOCAB_RANGE),
    ("opt", "text_config", {"pad_token_id": -1}, "text_config.pad_token_id", VOCAB_RANGE),
    ("opt", "text_config", {"bos_token_id": 200}, "text_config.bos_token_id", VOCAB_RANGE),
    ("t5", "text_config", {"decoder_start_token_id": VOCAB}, "text_config.decoder_start_token_id", VOCAB_RANGE),
    ("t5", "text_config", {"eos_token_id": -1}, "text_config.eos_token_id", VOCAB_RANGE),
    ("opt", None, {"image_token_index": VOCAB}, "image_token_index", VOCAB_RANGE),
    ("opt", None, {"image_token_index": -1}, "image_token_index", VOCAB_RANGE),
]


@pytest.mark.parametrize("lm, section, override, field, allowed", BAD_FIELDS,
                         ids=[f"{f}={v!r}" for _, _, o, f, _ in BAD_FIELDS for v in o.values()])
def test_bad_field_names_field_and_range(lm, section, override, field, allowed):
    with pytest.raises(ConfigError) as e:
        Blip2Config.from_dict(_config(lm, section, **override))
    message = str(e.value)
    assert f"{field}=" in message and allowed in message and "\n" not in message


@pytest.mark.parametrize("lm, section, override, field, allowed", BAD_FIELDS[::6])
def test_bad_field_in_file_names_the_file(tmp_path, lm, section, override, field, allowed):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config(lm, section, **override)))
    for where in (path, tmp_path):
        with pytest.raises(ConfigError) as e:
            Blip2Config.from_file(where)
        assert str(e.value).startswith(f"{path}: ") and f"{field}=" in str(e.value) and allowed in str(e.value)


@pytest.mark.parametrize("text, got", [("[]", "list"), ("null", "null"), ('"blip-2"', "str"), ("3", "int")])
def test_config_json_must_hold_an_object(tmp_path, text, got):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: config.json must hold a JSON object, got {got}$"):
        Blip2Config.from_file(path)
    with pytest.raises(ConfigError, match=f"^config.json must hold a JSON object, got {got}$"):
        Blip2Config.from_dict(json.loads(text))


@pytest.mark.parametrize("section", ["vision_config", "qformer_config", "text_config"])
@pytest.mark.parametrize("value, got", [("opt", "str"), ([], "list"), ([{"hidden_size": 8}], "list"), (7, "int")])
def test_nested_config_must_be_an_object(tmp_path, section, value, got):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config("opt", None, **{section: value})))
    expected = f"^{re.escape(str(path))}: {section} in config.json must be a JSON object, got {got}$"
    with pytest.raises(ConfigError, match=expected):
        Blip2Config.from_file(path)


def test_valid_variants_still_load():
    """What the checks must let through (passes before them too): ints for floats, [h, w] sizes, lists
    of end tokens, nulls where the reference takes them."""
    cfg = Blip2Config.from_dict(_config("opt", "vision_config", image_size=[28, 28], patch_size=(14, 14),
                                        layer_norm_eps=1))
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.layer_norm_eps) == (28, 14, 1)
    cfg = Blip2Config.from_dict(_config("opt", "text_config", eos_token_id=[50, VOCAB - 1], bos_token_id=None,
                                        word_embed_proj_dim=None))
    assert cfg.eos_token_ids == [50, VOCAB - 1] and cfg.text.word_embed_proj_dim == cfg.text.hidden_size
    assert Blip2Config.from_dict(_config("t5", None, image_token_index=None)).image_token_index is None
    assert Blip2Config.from_dict(_config("opt", None, vision_config=None)).vision.hidden_size == 1408


# (setting, value, the range the error must state)
BAD_SETTINGS = [
    ("max_new_tokens", 2.5, "an integer >= 1"),
    ("max_new_tokens", True, "an integer >= 1"),
    ("min_new_tokens", 1.5, "between 0 and max_new_tokens"),
    ("num_beams", "3", "an integer >= 1"),
    ("num_beams", True, "an integer >= 1"),
    ("num_return_sequences", 1.5, "between 1 and num_beams"),
    ("do_sample", "yes", "True or False"),
    ("early_stopping", 1, "True, False or 'never'"),
    ("temperature", NAN, "a finite number > 0"),
    ("temperature", 0.0, "a finite number > 0"),
    ("temperature", -1, "a finite number > 0"),
    ("repetition_penalty", NAN, "a finite number > 0"),
    ("repetition_penalty", INF, "a finite number > 0"),
    ("length_penalty", NAN, "a finite number"),
    ("top_p", NAN, "(0, 1]"),  # an error before these checks too; kept so NaN stays one
    ("top_p", "0.9", "(0, 1]"),
    ("top_k", -5, "an integer >= 0"),
    ("top_k", 1.5, "an integer >= 0"),
    ("seed", 2**70, "[0, 2**64 - 1]"),
    ("seed", -1, "[0, 2**64 - 1]"),
    ("seed", "1", "[0, 2**64 - 1]"),
    ("seed", True, "[0, 2**64 - 1]"),
    ("no_repeat_ngram_size", -1, "an integer >= 0"),
    ("no_repeat_ngram_size", 2.0, "an integer >= 0"),
]


@pytest.mark.parametrize("setting, value, allowed", BAD_SETTINGS)
def test_bad_generation_setting_names_setting_and_range(setting, value, allowed):
    for build in (GenerationConfig, GenerationConfig.make):
        with pytest.raises(ValueError) as e:
            build(**{setting: value})
        assert str(e.value).startswith(f"{setting} must be ") and allowed in str(e.value)


def test_generation_settings_take_ints_for_floats_and_64_bit_seeds():
    gen = GenerationConfig(temperature=1, top_p=1, repetition_penalty=2, length_penalty=0, seed=2**64 - 1, top_k=0)
    assert (gen.temperature, gen.seed, gen.top_k) == (1, 2**64 - 1, 0)
    with pytest.raises(TypeError, match="unknown generation setting"):
        GenerationConfig.make(beams=3)


@pytest.mark.parametrize("args", [("int4", 0), ("int4", 64.0), ("int4", True), ("int4", 48), ("int8", "64"),
                                  ("int4", 64, "no")])
def test_bad_quantization_names_field(args):
    field = "vision" if len(args) == 3 else "group_size"
    with pytest.raises(ValueError, match=f"^{field}=.* must be "):
        Quantization(*args)


@pytest.mark.parametrize("raw, field", [
    ({"mode": "int4", "group_size": "64"}, "group_size"),
    ({"mode": "int4", "group_size": "abc"}, "group_size"),
    ({"mode": "int4", "group_size": 64.5}, "group_size"),
    ({"mode": "int4", "group_size": 0}, "group_size"),
    ({"mode": "int8", "vision": "no"}, "vision"),
])
def test_bad_quantization_entry_names_config_json_entry(raw, field):
    with pytest.raises(ValueError) as e:
        Quantization.from_json(raw)
    assert str(e.value).startswith('config.json: malformed "quantization" entry') and f"{field}=" in str(e.value)
