"""The benchmark: random checkpoints in exactly the layout transformers saves and loads, the floors, the run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from math import prod
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import blip2
from blip2.apps.bench import CONFIGS, PROMPT, agreement, floors, rows, work
from blip2.apps.bench.checkpoints import checkpoint_shapes, write_checkpoint

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
    out = write_checkpoint(config, tmp_path / kind, shard_bytes=40_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2, "the small shard size should force several shards"
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    stored = {}
    for name in shards:
        with safe_open(out / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            stored.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert stored == dict(checkpoint_shapes(config))
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
    out = write_checkpoint(config, tmp_path, shard_bytes=40_000)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")}
    write_checkpoint(config, tmp_path, shard_bytes=40_000)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")} == first

    shard = out / f"model-00001-of-{len(first):05d}.safetensors"
    with safe_open(shard, "pt") as f:
        before = f.get_tensor("query_tokens")
    write_checkpoint(config, tmp_path, shard_bytes=40_000, seed=1)
    with safe_open(shard, "pt") as f:
        assert not torch.equal(f.get_tensor("query_tokens"), before)


def test_truncated_shard_is_detected_and_rewritten(tmp_path):
    config = _tiny("opt-2.7b")
    out = write_checkpoint(config, tmp_path, shard_bytes=40_000)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    write_checkpoint(config, tmp_path, shard_bytes=40_000)
    assert shard.stat().st_size == size


def test_full_size_specs_have_the_released_parameter_counts():
    # REFERENCE.md: ViT-g + Q-Former + projection + language model (OPT's lm_head tied, so not stored).
    opt = sum(prod(s) for _, s in checkpoint_shapes(CONFIGS["opt-2.7b"]))
    t5 = sum(prod(s) for _, s in checkpoint_shapes(CONFIGS["flan-t5-xl"]))
    assert opt == 985_952_256 + 105_162_240 + 1_968_640 + 2_651_678_720
    assert t5 == 985_952_256 + 105_162_240 + 1_574_912 + 2_849_757_184


def test_bench_tokenizer_gives_transformers_and_us_the_same_ids_with_the_image_token_at_its_config_id(tmp_path):
    config = _tiny("opt-2.7b")
    out = write_checkpoint(config, tmp_path, shard_bytes=40_000)
    processor = transformers.Blip2Processor.from_pretrained(out, backend="pil")
    theirs = processor(images=[Image.new("RGB", (64, 48))], text=[PROMPT], return_tensors="pt").input_ids
    ours = blip2.load(out).tokenizer([PROMPT]).input_ids
    assert torch.equal(ours, theirs)
    n = config["num_query_tokens"]
    assert theirs[0, :n].tolist() == [config["image_token_index"]] * n
    # BOS "</s>" (id 2) then the prompt in words, as GPT-2's tokenizer splits it.
    assert theirs[0, n].item() == 2 and theirs.shape[1] == n + 13


def test_floors_count_every_weight_a_decoding_step_reads():
    opt = work(CONFIGS["opt-2.7b"], dict(checkpoint_shapes(CONFIGS["opt-2.7b"])), prompt_ids=13)
    # 32 OPT layers (q, k, v, out 2560^2; fc1, fc2 2560x10240) and the tied 50304x2560 head.
    assert opt["step_params"] == 32 * (4 * 2560**2 + 2 * 2560 * 10240) + 50304 * 2560
    assert opt["params"] == 985_952_256 + 105_162_240 + 1_968_640 + 2_651_678_720
    # ViT-g: 257 tokens through 985 M weights dominate one image's encoding.
    assert 257 * 0.98e9 < opt["encode_macs"] < 257 * 1.05e9
    t5 = work(CONFIGS["flan-t5-xl"], dict(checkpoint_shapes(CONFIGS["flan-t5-xl"])), prompt_ids=13)
    # T5 decoder: self-attention 4, cross-attention q and o 2 (its keys and values come from the prefill),
    # gated FFN 3 matrices; plus the untied head.
    assert t5["step_params"] == 24 * (6 * 2048**2 + 3 * 2048 * 5120) + 32128 * 2048

    f = floors(opt, {"bandwidth_gbs": 10.0, "matmul_gflops": 100.0}, dtype_bytes=2, new_tokens=20, batches=[8])
    assert f["decode_ms"] == pytest.approx(1e3 * opt["step_params"] * 2 / 10e9)
    assert f["encode_s"] == pytest.approx(2 * opt["encode_macs"] / 100e9)
    assert f["e2e_s"] > f["encode_s"] + 19 * f["decode_ms"] / 1e3
    assert f["b8_ips"] > 1 / f["e2e_s"]  # a batch shares the weight reads


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path):
    """The CI form: both systems in fresh processes on a small config; every row of the table."""
    json_path = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "blip2.apps.cli", "bench", "run", "--quick", "--dir", str(tmp_path),
                           "--json", str(json_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[1:4] == ["ours", "transformers", "ours/transformers"]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == [label for _, label, _ in rows([8, 32])]
    raw = json.loads(json_path.read_text())
    for system in ("ours", "transformers"):
        (run,) = raw["runs"][system]
        assert len(run["tokens"]) == 20 and run["load_s"] > 0 and run["peak_rss_gb"] >= run["load_rss_gb"] > 0


def test_agreement_names_where_systems_part():
    runs = {"ours": [{"tokens": [1, 2, 3]}], "transformers": [{"tokens": [1, 2, 4]}],
            "ours-int8": [{"tokens": [1, 2, 3]}]}
    note = agreement(runs)
    assert "ours and transformers agree on the first 2 of 20 tokens (random weights" in note
    assert "ours and ours-int8 generate the same 20 tokens" in note


def test_bench_batches_option_is_checked():
    proc = subprocess.run([sys.executable, "-m", "blip2.apps.cli", "bench", "run", "--quick", "--batches", "8,x"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "--batches takes comma-separated positive sizes" in proc.stderr


def test_vllm_runs_in_an_interpreter_of_its_own(tmp_path):
    # vLLM pins its own torch, so `--vllm-python` names a venv's interpreter: its version is probed
    # there, and its worker's result is the last JSON line it prints (vLLM prints more at exit).
    from blip2.apps.bench import run_worker, vllm_version

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$2" in *vllm*) echo 0.32.0;; *) echo \'{"system": "vllm", "load_s": 1.5}\'; '
                    'echo "shutting down";; esac\n')
    fake.chmod(0o755)
    assert vllm_version(str(fake)) == "0.32.0"
    assert vllm_version(str(tmp_path / "missing")) is None
    result = run_worker({"system": "vllm"}, python=str(fake))
    assert result["system"] == "vllm" and result["load_s"] == 1.5


def test_serve_benchmark_measures_a_server_it_starts(tmp_path, ckpt_root):
    """`blip2 bench serve` starts `blip2 serve` on a tiny checkpoint, streams every request to its end
    and counts the server's tokens: each request generates exactly --max-tokens."""
    pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from checkpoints import full_checkpoint

    path, _ = full_checkpoint(ckpt_root / "bench-serve", "t5", seed=62)
    json_path = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "blip2.apps.cli", "bench", "serve", "--model", str(path),
                           "--dir", str(tmp_path), "--clients", "1,4", "--requests", "4", "--max-tokens", "5",
                           "--json", str(json_path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| clients | requests | requests/s |" in proc.stdout
    levels = json.loads(json_path.read_text())["levels"]
    assert [level["clients"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] == 4 and level["errors"] == 0 and level["requests_per_s"] > 0
        assert level["tokens"] == level["requests"] * 5
        assert all(r["tokens"] == 5 and 0 < r["ttft_s"] <= r["latency_s"] for r in level["results"])


def test_caption_benchmark_runs_the_dataset_job_and_transformers_on_the_same_files(tmp_path, ckpt_root):
    """`blip2 bench caption`: our dataset job and a batched transformers loop caption the same JPEG
    files of mixed sizes, and write the same caption for each."""
    from checkpoints import full_checkpoint

    # Seed 64: a tiny model whose captions differ between these images (with 63 every image gets the
    # same one), so that a caption matched to the wrong image shows.
    path, _ = full_checkpoint(ckpt_root / "bench-caption", "opt", seed=64)
    json_path = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "blip2.apps.cli", "bench", "caption", "--model", str(path),
                           "--images", "6", "--batch-size", "3", "--max-tokens", "4", "--compare", "transformers",
                           "--dir", str(tmp_path), "--json", str(json_path)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ours/transformers |" in proc.stdout
    systems = json.loads(json_path.read_text())["systems"]
    assert set(systems) == {"ours", "transformers"}
    for r in systems.values():
        assert r["ips"] > 0 and r["ips_with_load"] > 0 and r["load_s"] >= 0 and r["peak_rss_gb"] > 0
    records = [json.loads(line) for line in Path(systems["ours"]["captions"]).read_text().splitlines()]
    ours = {r["source"]: r["caption"].strip() for r in records}
    theirs = {p: text.strip() for p, text in json.loads(Path(systems["transformers"]["captions"]).read_text()).items()}
    assert len(ours) == 6 and ours == theirs
    assert len(set(ours.values())) > 1
