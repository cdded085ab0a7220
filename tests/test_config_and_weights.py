"""Config parsing, full-size shapes, and the loader's errors on bad checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip2
from blip2.config import Blip2Config, ConfigError, OPTConfig, T5Config
from blip2.models.blip2 import Blip2Model
from checkpoints import tiny_config, write_checkpoint

# The released checkpoints' config.json, reduced to the fields that matter (REFERENCE.md).
OPT_2_7B = {
    "model_type": "blip-2", "num_query_tokens": 32, "image_token_index": 50265,
    "vision_config": {"layer_norm_eps": 1e-6},
    "qformer_config": {},
    "text_config": {"model_type": "opt", "vocab_size": 50304, "hidden_size": 2560, "num_hidden_layers": 32,
                    "ffn_dim": 10240, "num_attention_heads": 32, "word_embed_proj_dim": 2560,
                    "eos_token_id": 50118, "max_position_embeddings": 2048},
}
FLAN_T5_XL = {
    "model_type": "blip-2", "num_query_tokens": 32, "image_token_index": 32100,
    "vision_config": {}, "qformer_config": {},
    "text_config": {"model_type": "t5", "vocab_size": 32128, "d_model": 2048, "d_kv": 64, "d_ff": 5120,
                    "num_layers": 24, "num_heads": 32, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu",
                    "tie_word_embeddings": False, "layer_norm_epsilon": 1e-6},
}
GiB = 2**30


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _meta_model(raw: dict) -> Blip2Model:
    with torch.device("meta"):
        model = Blip2Model(Blip2Config.from_dict(raw))
    if not model.config.is_encoder_decoder:  # OPT's head is tied to its embedding
        lm = model.language_model
        lm.lm_head.weight = lm.model.decoder.embed_tokens.weight
    return model


@pytest.mark.parametrize("raw, lm_params, projection", [
    (OPT_2_7B, 2_651_678_720, 1_968_640),
    (FLAN_T5_XL, 2_849_757_184, 1_574_912),
])
def test_full_size_parameter_counts_match_reference_md(raw, lm_params, projection):
    model = _meta_model(raw)
    assert _count(model.vision_model) == 985_952_256
    assert _count(model.qformer) + model.query_tokens.numel() == 105_162_240
    assert _count(model.language_projection) == projection
    assert _count(model.language_model) == lm_params


def test_full_size_opt_footprint_within_published_memory():
    """The model card's 14.43 GB / 7.21 GB are GiB over 3.87 B parameters (head counted twice); we tie it."""
    n = _count(_meta_model(OPT_2_7B))
    assert 3.7e9 < n < 3.9e9
    assert n * 4 / GiB <= 14.43
    assert n * 2 / GiB <= 7.21


def test_missing_fields_take_reference_defaults():
    cfg = Blip2Config.from_dict({"model_type": "blip-2"})
    assert (cfg.vision.hidden_size, cfg.vision.num_hidden_layers, cfg.vision.layer_norm_eps) == (1408, 39, 1e-6)
    assert (cfg.qformer.cross_attention_frequency, cfg.qformer.encoder_hidden_size) == (2, 1408)
    assert isinstance(cfg.text, OPTConfig) and cfg.text.word_embed_proj_dim == cfg.text.hidden_size
    assert cfg.num_query_tokens == 32 and cfg.image_token_index is None


def test_qformer_cross_attention_width_follows_vision():
    cfg = Blip2Config.from_dict({"model_type": "blip-2", "vision_config": {"hidden_size": 64},
                                 "qformer_config": {"encoder_hidden_size": 1408}})
    assert cfg.qformer.encoder_hidden_size == 64


def test_t5_activation_follows_reference_rules():
    assert T5Config(feed_forward_proj="gated-gelu").dense_act_fn == "gelu_new"
    assert T5Config(feed_forward_proj="gated-gelu", dense_act_fn="gelu").dense_act_fn == "gelu"
    assert T5Config(feed_forward_proj="relu").is_gated_act is False
    flan = Blip2Config.from_dict(FLAN_T5_XL).text
    assert flan.is_gated_act and flan.dense_act_fn == "gelu"
    assert flan.scale_decoder_outputs is False and flan.num_decoder_layers == 24


@pytest.mark.parametrize("raw, field, value", [
    ({"model_type": "blip-3"}, "model_type", "blip-3"),
    ({"model_type": "blip-2", "text_config": {"model_type": "llama"}}, "text_config.model_type", "llama"),
    ({"model_type": "blip-2", "vision_config": {"hidden_act": "mish"}}, "vision_config.hidden_act", "mish"),
    ({"model_type": "blip-2", "text_config": {"activation_function": "tanh"}}, "text_config.activation_function",
     "tanh"),
    ({"model_type": "blip-2", "text_config": {"model_type": "t5", "feed_forward_proj": "gated-relu-x"}},
     "text_config.feed_forward_proj", "gated-relu-x"),
    ({"model_type": "blip-2", "qformer_config": {"cross_attention_frequency": 0}},
     "qformer_config.cross_attention_frequency", "0"),
])
def test_unsupported_config_names_field_and_value(raw, field, value):
    with pytest.raises(ConfigError) as e:
        Blip2Config.from_dict(raw)
    assert field in str(e.value) and value in str(e.value)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        blip2.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        blip2.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        blip2.load(tmp_path / "nope")


@pytest.fixture()
def opt_ckpt(ckpt_root, tmp_path):
    src = ckpt_root / "errors-opt"
    if not src.exists():
        write_checkpoint(src, tiny_config("opt"), seed=11)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_an_error_naming_it(opt_ckpt):
    _edit(opt_ckpt, lambda s: s.pop("qformer.layernorm.weight"))
    with pytest.raises(blip2.WeightsError, match="missing weights: qformer.layernorm.weight"):
        blip2.load(opt_ckpt)


def test_unexpected_key_is_an_error_naming_it(opt_ckpt):
    _edit(opt_ckpt, lambda s: s.update({"qformer.extra.weight": torch.zeros(2)}))
    with pytest.raises(blip2.WeightsError, match=r"unexpected keys.*qformer.extra.weight \(model.safetensors\)"):
        blip2.load(opt_ckpt)


def test_shape_mismatch_names_file_and_key(opt_ckpt):
    cfg = json.loads((opt_ckpt / "config.json").read_text())
    cfg["qformer_config"]["intermediate_size"] = 45
    (opt_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(blip2.WeightsError, match=r"model.safetensors: qformer\.encoder\.layer\.0\..* has shape"):
        blip2.load(opt_ckpt)


def test_truncated_safetensors_names_the_file(opt_ckpt):
    f = opt_ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(blip2.WeightsError, match="model.safetensors: truncated"):
        blip2.load(opt_ckpt)


def test_corrupt_safetensors_header_names_the_file(opt_ckpt):
    f = opt_ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(blip2.WeightsError, match="model.safetensors: corrupt"):
        blip2.load(opt_ckpt)


def test_missing_shard_names_the_file(ckpt_root, tmp_path):
    dst = tmp_path / "sharded"
    write_checkpoint(dst, tiny_config("opt"), fmt="sharded", seed=12)
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(blip2.WeightsError, match=f"{victim.name}: shard listed in model.safetensors.index.json"):
        blip2.load(dst)


def test_corrupt_bin_names_the_file(tmp_path):
    dst = tmp_path / "bin"
    write_checkpoint(dst, tiny_config("opt"), fmt="bin", seed=13)
    f = dst / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(blip2.WeightsError, match="pytorch_model.bin: cannot read"):
        blip2.load(dst)


def test_no_weight_files(opt_ckpt):
    (opt_ckpt / "model.safetensors").unlink()
    with pytest.raises(blip2.WeightsError, match="no model.safetensors"):
        blip2.load(opt_ckpt)


def test_loaded_model_has_no_meta_tensors_and_ties_opt_head(opt_ckpt):
    model = blip2.load(opt_ckpt, dtype="bfloat16").model
    assert all(p.device.type == "cpu" for p in model.parameters())
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight


def test_import_does_not_pull_in_transformers():
    import subprocess
    import sys

    code = "import sys, blip2; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_stored_copy_of_a_tied_head_equal_to_the_embedding_stays_tied(opt_ckpt, quantize):
    _edit(opt_ckpt, lambda s: s.update({"language_model.lm_head.weight":
                                        s["language_model.model.decoder.embed_tokens.weight"].clone()}))
    lm = blip2.load(opt_ckpt, dtype="bfloat16", quantize=quantize).model.language_model
    embedding = lm.model.decoder.embed_tokens
    assert lm.lm_head is embedding if quantize else lm.lm_head.weight is embedding.weight


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_stored_head_that_differs_from_its_tied_embedding_is_used(opt_ckpt, quantize):
    # As transformers does: a head stored with other values than the embedding it is declared tied
    # to is the model's real head, in every precision (a quantized load used to drop it).
    from checkpoints import opt_inputs, pixels, reference, rel_err

    head = 0.5 * torch.randn(99, 48, generator=torch.Generator().manual_seed(5))
    _edit(opt_ckpt, lambda s: s.update({"language_model.lm_head.weight": head}))
    cfg = json.loads((opt_ckpt / "config.json").read_text())
    assert cfg["text_config"].get("tie_word_embeddings", True)
    ids, mask = opt_inputs(cfg, [[5, 6, 7], [8]])
    with torch.no_grad():
        expected = reference(opt_ckpt)(pixel_values=pixels(2, 28), input_ids=ids, attention_mask=mask).logits
    model = blip2.load(opt_ckpt, quantize=quantize)
    lm = model.model.language_model
    assert lm.lm_head is not lm.model.decoder.embed_tokens
    assert rel_err(model.forward(pixels(2, 28), ids, mask), expected) < (1e-4 if quantize is None else 0.05)


def test_t5_input_embedding_that_differs_from_the_shared_one_is_refused(ckpt_root, tmp_path):
    path = write_checkpoint(tmp_path / "t5", tiny_config("t5"), seed=14)
    _edit(path, lambda s: s.update({"language_model.encoder.embed_tokens.weight":
                                    s["language_model.shared.weight"] + 1}))
    with pytest.raises(blip2.WeightsError, match="encoder.embed_tokens.weight differs from language_model.shared"):
        blip2.load(path)
