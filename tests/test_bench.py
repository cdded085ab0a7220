"""The benchmark's random checkpoints have exactly the layout transformers saves and loads."""

from __future__ import annotations

import copy
import json
from math import prod

import pytest
import torch
from safetensors import safe_open

from blip2.bench import CONFIGS, _checkpoint_shapes, _write_checkpoint, measure_load

transformers = pytest.importorskip("transformers")


def _tiny(kind: str) -> dict:
    """The full-size config with every dimension shrunk, so writing and loading take a moment."""
    config = copy.deepcopy(CONFIGS[kind])
    config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=28)
    config["qformer_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, encoder_hidden_size=32)
    config["num_query_tokens"] = 4
    text = config["text_config"]
    if kind == "opt-2.7b":
        text.update(vocab_size=120, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, eos_token_id=50)
    else:
        text.update(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
    config["image_token_index"] = 110
    return config


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_tiny_checkpoint_loads_in_transformers_without_missing_or_unexpected_keys(tmp_path, kind):
    config = _tiny(kind)
    out = _write_checkpoint(config, tmp_path / kind, shard_bytes=40_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2, "the small shard size should force several shards"
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    stored = {}
    for name in shards:
        with safe_open(out / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            stored.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert stored == dict(_checkpoint_shapes(config))
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == 4 * sum(prod(s) for s in stored.values())

    model, info = transformers.Blip2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = model.state_dict()
    with safe_open(out / index["weight_map"]["query_tokens"], "pt") as f:
        assert torch.equal(sd["query_tokens"], f.get_tensor("query_tokens"))
    assert torch.all(sd["vision_model.post_layernorm.weight"] == 1)
    assert torch.all(sd["vision_model.post_layernorm.bias"] == 0)
    if kind == "flan-t5-xl":
        # Flan-T5 keeps its own lm_head, distinct from the shared embedding.
        assert "language_model.lm_head.weight" in stored
        assert not torch.equal(sd["language_model.lm_head.weight"], sd["language_model.shared.weight"])
    else:
        assert "language_model.lm_head.weight" not in stored  # tied, as save_pretrained leaves it out
        assert model.language_model.lm_head.weight is model.language_model.model.decoder.embed_tokens.weight


def test_complete_checkpoint_is_reused_and_a_different_seed_rewrites_it(tmp_path):
    config = _tiny("opt-2.7b")
    out = _write_checkpoint(config, tmp_path, shard_bytes=40_000)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")}
    _write_checkpoint(config, tmp_path, shard_bytes=40_000)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")} == first

    shard = out / f"model-00001-of-{len(first):05d}.safetensors"
    with safe_open(shard, "pt") as f:
        before = f.get_tensor("query_tokens")
    _write_checkpoint(config, tmp_path, shard_bytes=40_000, seed=1)
    with safe_open(shard, "pt") as f:
        assert not torch.equal(f.get_tensor("query_tokens"), before)


def test_truncated_shard_is_detected_and_rewritten(tmp_path):
    config = _tiny("opt-2.7b")
    out = _write_checkpoint(config, tmp_path, shard_bytes=40_000)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    _write_checkpoint(config, tmp_path, shard_bytes=40_000)
    assert shard.stat().st_size == size


def test_full_size_specs_have_the_released_parameter_counts():
    # REFERENCE.md: ViT-g + Q-Former + projection + language model (OPT's lm_head tied, so not stored).
    opt = sum(prod(s) for _, s in _checkpoint_shapes(CONFIGS["opt-2.7b"]))
    t5 = sum(prod(s) for _, s in _checkpoint_shapes(CONFIGS["flan-t5-xl"]))
    assert opt == 985_952_256 + 105_162_240 + 1_968_640 + 2_651_678_720
    assert t5 == 985_952_256 + 105_162_240 + 1_574_912 + 2_849_757_184


@pytest.mark.parametrize("system", ["ours", "transformers"])
def test_measure_load_reports_time_and_memory_of_a_load_in_a_fresh_process(tmp_path, system):
    out = _write_checkpoint(_tiny("opt-2.7b"), tmp_path, shard_bytes=40_000)
    result = measure_load(system, out)
    assert result["seconds"] > 0
    assert 0 < result["final_rss_gb"] <= result["peak_rss_gb"] < 20
    assert 0 < result["peak_anon_gb"] <= result["peak_rss_gb"]
