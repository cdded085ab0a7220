"""The CUDA paths against the reference on a GPU, on small random checkpoints (skipped without one):
float32 logits and greedy/beam ids against `transformers` on CUDA (three times: captured, then kept
CUDA graphs; again with decoding attention as two products), the graphed vision encoder and prompt
pass against the eager ones, GPU normalisation against the CPU's, float16/bfloat16 and int8/int4
generation end to end (int4 also with every product widened from tinygemm's layout), GPTQ's codes on
CUDA against the CPU's, and int4 weights of full-size shapes unpacked from tinygemm's layout."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import blip2
import blip2.engine.cuda_graphs as cuda_graphs
import blip2.models.layers as layers
import blip2.quant.linear as linear
from blip2.engine.generation import GenerationConfig
from blip2.engine.sessions import OPTSession, T5Session, generate
from blip2.quant.formats import Quantization, _nibbles, quantize_weight
from blip2.quant.gptq import gptq_weight
from blip2.quant.layouts import _pack_int4, _unpack_tiles, cuda_int4_band
from blip2.quant.linear import QuantizedLinear
from checkpoints import opt_inputs, pixels, reference, rel_err, t5_inputs, tiny_config, write_checkpoint

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", params=["opt", "t5"])
def case(request, ckpt_root):
    lm = request.param
    # widths the int4 kernel takes (multiples of 128 in, 16 out)
    text = dict(hidden_size=128, ffn_dim=256, num_attention_heads=4) if lm == "opt" else \
        dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_decoder_layers=2)
    cfg = tiny_config(lm, **text)
    cfg["vision_config"].update(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    path = write_checkpoint(ckpt_root / f"cuda-{lm}", cfg, seed=3)
    ids, mask = (opt_inputs if lm == "opt" else t5_inputs)(cfg, [[5, 6, 7, 8], [9, 10]])
    return lm, path, ids, mask, blip2.load(path, device="cuda")


@contextlib.contextmanager
def _attention(model, products: bool):
    """Every decoding step's attention as two products (or as the library chooses), on fresh decoding
    graphs: a kept graph records the attention it was captured with."""
    model.graphs.steps.clear()
    with mock.patch.object(layers, "SINGLE_QUERY_ROWS", 0 if products else layers.SINGLE_QUERY_ROWS):
        yield
    model.graphs.steps.clear()


def _ids(model, px, ids, mask, gen: GenerationConfig) -> list[list[int]]:
    with torch.inference_mode():
        return [h[0].token_ids for h in generate(model.model, model.encode_images(px), ids.cuda(), mask.cuda(), gen,
                                                 model.graphs)]


def test_float32_logits_equal_reference_on_cuda(case):
    lm, path, ids, mask, ours = case
    px = pixels(2, 28)
    dec = None if lm == "opt" else torch.tensor([[0, 4, 5], [0, 6, 7]])
    with torch.inference_mode():
        r = reference(path).cuda()(pixel_values=px.cuda(), input_ids=ids.cuda(), attention_mask=mask.cuda(),
                                   decoder_input_ids=None if dec is None else dec.cuda()).logits
    assert rel_err(ours.forward(px, ids, mask, dec), r) < 1e-4


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("products", [False, True], ids=["fused-attention", "attention-as-products"])
def test_token_ids_equal_reference_through_kept_graphs(case, beams, products):
    lm, path, ids, mask, ours = case
    px = pixels(2, 28)
    with torch.inference_mode():
        out = reference(path).cuda().generate(pixel_values=px.cuda(), input_ids=ids.cuda(), attention_mask=mask.cuda(),
                                               num_beams=beams, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    expected = (out[:, ids.shape[1]:] if lm == "opt" else out[:, 1:]).tolist()
    gen = GenerationConfig(num_beams=beams, max_new_tokens=8, min_new_tokens=8)
    with _attention(ours, products):  # fresh, then the kept graph twice
        assert [_ids(ours, px, ids, mask, gen) for _ in range(3)] == [expected] * 3


def test_graphed_vision_encoder_equals_eager(case):
    *_, ours = case
    px3 = pixels(3, 28)  # padded to 4
    eager = ours.model.encode_images(torch.cat([px3, px3[:1] * 0]).cuda())[:3]
    graphed = [ours.encode_images(px3) for _ in range(3)][-1]
    assert torch.equal(graphed, eager)


def _prompt_state(model, queries, ids, mask, graphed: bool) -> tuple[torch.Tensor, ...]:
    """What a session's prompt pass leaves (8 new tokens' room)."""
    positions = cuda_graphs.GRAPHED_PROMPT_POSITIONS if graphed else 0
    with mock.patch.object(cuda_graphs, "GRAPHED_PROMPT_POSITIONS", positions), torch.inference_mode():
        lm = model.model.language_model
        embeds, full = model.model.embed_inputs(queries, ids, mask)
        if model.config.is_encoder_decoder:
            s = T5Session(lm, embeds, full, 1, 8, model.graphs)
            return s.cross.k, s.cross.v
        s = OPTSession(lm, embeds, full, 1, 8, model.graphs)
        return s.prefill(), s.cache.k, s.cache.v


def test_prompt_pass_through_graphs_equals_eager(case):
    lm, path, ids, mask, ours = case
    queries = ours.encode_images(pixels(2, 28))
    eager = _prompt_state(ours, queries, ids.cuda(), mask.cuda(), graphed=False)
    for _ in range(3):  # runs eagerly, captures, replays
        graphed = _prompt_state(ours, queries, ids.cuda(), mask.cuda(), graphed=True)
        assert all(torch.equal(a, b) for a, b in zip(eager, graphed))


def test_normalisation_on_cuda_equals_cpu(case):
    *_, ours = case
    resized = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    norm = ours.image_processor
    assert torch.equal(norm.normalize(resized.cuda()).cpu(), norm.normalize(resized))


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_half_precision_and_quantized_generation_on_cuda(case, quantize):
    lm, path, ids, mask, _ = case
    half = "float16" if lm == "opt" else "bfloat16"
    px = pixels(2, 28)
    gen = GenerationConfig(max_new_tokens=8)
    m = blip2.load(path, dtype=half, device="cuda", quantize=quantize)
    tokens = _ids(m, px, ids, mask, gen)
    assert all(len(t) == 8 or t[-1] in m.config.eos_token_ids for t in tokens)
    with _attention(m, products=True):  # runs; in half precision its rounding may pick other tokens
        assert len(_ids(m, px, ids, mask, gen)) == len(tokens)
    if quantize == "int4":  # a fresh model whose int4 products all widen the weight from tinygemm's layout
        with mock.patch.object(linear, "CUDA_INT4_GEMM_ROWS", 1):
            widened = blip2.load(path, dtype=half, device="cuda", quantize=quantize)
        assert _ids(widened, px, ids, mask, gen) == tokens


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gptq_codes_on_cuda_equal_cpu(mode):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) / 512 ** 0.5
    x = torch.randn(2048, 512, generator=g) @ (torch.randn(512, 512, generator=g) / 512 ** 0.5)
    cpu = gptq_weight(w, x.T @ x, Quantization(mode))
    gpu = gptq_weight(w.cuda(), (x.T @ x).cuda(), Quantization(mode))
    assert float((cpu["weight"] == gpu["weight"].cpu()).float().mean()) > 0.99  # but for rounding ties


@pytest.mark.parametrize("n, k", [(10240, 2560), (2560, 10240), (4224, 1408), (1408, 6144), (5120, 2048)])
def test_int4_widened_from_tinygemm_layout_equals_kernel(n, k):
    # full-size shapes: OPT-2.7b's fc1 and fc2, the vision encoder's qkv and fc2, Flan-T5-xl's wi
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g) * 0.02
    portable = quantize_weight(w, Quantization("int4"))["weight"]
    band = cuda_int4_band(k, "cuda:0")
    assert band is not None
    assert torch.equal(_unpack_tiles(_pack_int4(portable.cuda()), band, n, k).cpu(), _nibbles(portable).view(n, k))
    layer = QuantizedLinear(k, n, False, Quantization("int4"), torch.bfloat16)
    layer.load_parameter("weight", w.cuda())
    x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        kernel = torch.ops.aten._weight_int4pack_mm(x, layer.weight, 128, layer.scales_and_zeros).float()
        assert rel_err(layer(x).float(), kernel) < 1e-2
