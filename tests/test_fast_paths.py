"""Optimised paths give the plain path's results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blip2
import blip2.models.opt
import blip2.models.t5
from blip2.engine.generation import GenerationConfig
from blip2.engine.sessions import generate
from blip2.models.layers import KVCache, _cpu_decoding, cpu_single_query_attention, single_query_attention
from blip2.quant import cpu_kernels
from blip2.quant.packed import OWN_KERNELS, PACK_FOR_ROWS, PackedLinear, _onednn_packs, can_pack, kernel_for
from checkpoints import opt_inputs, pixels, rel_err, t5_inputs, tiny_config, write_checkpoint



@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_packed_linears_equal_plain_linears(lm, dtype, ckpt_root, monkeypatch):
    if not can_pack(getattr(torch, dtype), torch.device("cpu")):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    cfg = tiny_config(lm, num_decoder_layers=2) if lm == "t5" else tiny_config(lm)
    path = write_checkpoint(ckpt_root / f"packed-{lm}", cfg, seed=41)
    _onednn_packs.cache_clear()  # load() must find packing possible itself (it asks under the meta device)
    packed = blip2.load(path, dtype=dtype)
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    # Flan-T5's head is its own and is packed. OPT's is tied to its embedding: it stays plain, except
    # for the bf16 kernel, where the two share one packed table.
    lm_model, own_kernel = packed.model.language_model, kernel_for(getattr(torch, dtype)) in OWN_KERNELS
    assert isinstance(lm_model.lm_head, PackedLinear) == (lm == "t5" or own_kernel)
    if lm == "opt" and own_kernel:
        assert lm_model.lm_head.weight is lm_model.model.decoder.embed_tokens.weight
    fc1 = packed.model.vision_model.encoder.layers[0].mlp.fc1
    assert isinstance(fc1, PackedLinear) and fc1.rows == PACK_FOR_ROWS
    decoder = [m for m in packed.model.language_model.modules() if isinstance(m, PackedLinear)]
    assert {m.rows for m in decoder} == {1 if dtype == "float32" else PACK_FOR_ROWS}  # float32 decodes one row
    assert {m.kernel for m in decoder} == {kernel_for(getattr(torch, dtype))}  # bfloat16: blip2's own where it can
    monkeypatch.setattr(blip2.engine.pipeline, "can_pack", lambda *a: False)
    plain = blip2.load(path, dtype=dtype)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    every_token = torch.arange(packed.config.text.vocab_size)[None]
    assert torch.equal(packed.model.language_model.embed(every_token), plain.model.language_model.embed(every_token))
    ids, mask = (opt_inputs if lm == "opt" else t5_inputs)(cfg, [[5, 6, 7], [8]])
    dec = None if lm == "opt" else torch.tensor([[0, 4, 5], [0, 6, 7]])
    px = pixels(2, 28)
    # Half precision: bit-identical, with the activations applied after the product's rounding as the
    # plain path does (test_fused_activations_round_once). float32: oneDNN's products round
    # differently from MKL's.
    monkeypatch.setattr(PackedLinear, "activated", lambda *a: None)
    same = torch.equal if dtype == "bfloat16" else lambda a, b: rel_err(a, b) < 1e-5
    assert same(packed.forward(px, ids, mask, dec), plain.forward(px, ids, mask, dec))
    with torch.inference_mode():
        q = packed.model.encode_images(px)
        assert same(q, plain.model.encode_images(px))
        gen = GenerationConfig(num_beams=3, max_new_tokens=6)
        a = generate(packed.model, q, ids, mask, gen)
        b = generate(plain.model, plain.model.encode_images(px), ids, mask, gen)
    assert [s.token_ids for r in a for s in r] == [s.token_ids for r in b for s in r]


def test_packer_converts_weights_into_reused_staging_buffers(tmp_path):
    from blip2.checkpoint import Rows, read_safetensors, write_safetensors
    from blip2.quant.packed import Packer

    g = torch.Generator().manual_seed(5)
    stored = {f"w{i}": torch.randn(48 + 16 * (i % 2), 40, generator=g) for i in range(8)}
    write_safetensors(stored, tmp_path / "w.safetensors")
    seen, results = [], {}

    def copy(w):  # a layout that copies (as every real one does)
        seen.append(w)  # held, so that a weight converted into memory of its own keeps its address
        return w.t().contiguous()

    def alias(w):  # one that hands its input back: that buffer must never be used again
        return w

    packer = Packer()
    for i, (key, shape, read) in enumerate(read_safetensors(tmp_path / "w.safetensors")):
        rows = Rows(shape, torch.bfloat16, torch.device("cpu"), read)
        results[key] = (packer.submit(alias if i == 3 else copy, rows), i == 3)
    packer.close()
    for name, (future, aliased) in results.items():
        want = stored[name].to(torch.bfloat16)
        assert torch.equal(future.result(), want if aliased else want.t())
    # 7 copied weights through the 3 buffers, and one more for the weight after the aliased one
    assert len({w.data_ptr() for w in seen}) <= Packer.STAGING_BUFFERS + 1
    assert not packer._lent and not packer._free
    assert torch.equal(packer.submit(copy, rows).result(), stored[key].to(torch.bfloat16).t())  # closed: at once
    assert not packer._lent and not packer._free  # and into memory of its own


@pytest.mark.skipif(cpu_kernels.pairs_library() is None, reason="needs AVX512-BF16 and VNNI without AMX, and a C++ compiler")
@pytest.mark.parametrize("m,k,n,bias", [(1, 2560, 1024, True), (1, 70, 13, False), (3, 33, 9, True), (4, 64, 16, False),
                                        (5, 3000, 50, True), (17, 1030, 200, True), (45, 256, 64, False), (0, 8, 8, True)])
def test_bf16_product_rounds_the_exact_product(m, k, n, bias):
    # Every shape the layout pads (odd k, n not a multiple of 16), tiles of 1-4 rows, chunks of 1024
    # inputs: each output is the exact sum rounded once to bfloat16 (float32 sums, within 2^-8).
    torch.manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16()
    b = torch.randn(n).bfloat16() if bias else None
    layout = cpu_kernels.bf16_layout(w)
    assert torch.equal(cpu_kernels.plain_layout(layout, (n, k)), w)
    y = cpu_kernels.bf16_mm(x, layout, b, n)
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()
    assert m == 0 or rel_err(y.float(), F.linear(x, w, b).float()) < 5e-3  # and oneDNN's, within rounding


@pytest.mark.skipif(cpu_kernels.library() is None, reason="needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("m,k,n,bias", [(1, 2560, 1024, True), (2, 70, 13, False), (3, 33, 40, True), (7, 300, 50, True),
                                        (13, 1030, 100, False), (1, 5, 64, False), (0, 8, 8, True)])
def test_f32_product_equals_the_exact_product(m, k, n, bias):
    # Decoding rows (four blocks at once), tiles of 1-6 rows, n not a multiple of 16, chunks of 256
    # and 1024 inputs: float32 sums, summed in order, within a few times torch's distance to float64.
    torch.manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k), torch.randn(n, k)
    b = torch.randn(n) if bias else None
    y = cpu_kernels.f32_mm(x, cpu_kernels.f32_layout(w), b, n)
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert m == 0 or rel_err(y.double(), exact) <= max(4 * rel_err(F.linear(x, w, b).double(), exact), 2e-6)


@pytest.mark.skipif(cpu_kernels.library() is None, reason="needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_float32_language_model_on_blip2_product_equals_plain(lm, ckpt_root, monkeypatch):
    # The f32 kernel (chosen on AVX2 CPUs) forced here on any x86 CPU: logits as the plain path's
    # within float32's rounding, beam search's tokens identical.
    cfg = tiny_config(lm, num_decoder_layers=2) if lm == "t5" else tiny_config(lm)
    path = write_checkpoint(ckpt_root / f"f32-{lm}", cfg, seed=43)
    monkeypatch.setattr(blip2.engine.pipeline, "kernel_for", lambda dtype: "f32")
    ours = blip2.load(path, dtype="float32")
    layers = [m for m in ours.model.language_model.modules() if isinstance(m, PackedLinear)]
    assert layers and {m.kernel for m in layers} == {"f32"}
    if lm == "opt":  # the head tied to the token embedding shares its packed table
        lm_model = ours.model.language_model
        assert lm_model.lm_head.weight is lm_model.model.decoder.embed_tokens.weight
    monkeypatch.setattr(blip2.engine.pipeline, "can_pack", lambda *a: False)
    plain = blip2.load(path, dtype="float32")
    every_token = torch.arange(ours.config.text.vocab_size)[None]
    assert torch.equal(ours.model.language_model.embed(every_token), plain.model.language_model.embed(every_token))
    ids, mask = (opt_inputs if lm == "opt" else t5_inputs)(cfg, [[5, 6, 7], [8]])
    dec = None if lm == "opt" else torch.tensor([[0, 4, 5], [0, 6, 7]])
    px = pixels(2, 28)
    with torch.inference_mode():
        assert rel_err(ours.forward(px, ids, mask, dec), plain.forward(px, ids, mask, dec)) < 1e-5
        gen = GenerationConfig(num_beams=3, max_new_tokens=6)
        a = generate(ours.model, ours.model.encode_images(px), ids, mask, gen)
        b = generate(plain.model, plain.model.encode_images(px), ids, mask, gen)
    assert [s.token_ids for r in a for s in r] == [s.token_ids for r in b for s in r]


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_activations_round_once(activation, dtype):
    # oneDNN applies relu/gelu to the product's float32 sums: one rounding where the plain path has
    # two, so in bfloat16 at least as close to the exact result; float32 within its rounding.
    dt = getattr(torch, dtype)
    if not can_pack(dt, torch.device("cpu")):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 37, 96).to(dt), torch.randn(200, 96).to(dt), torch.randn(200).to(dt)
    layer = PackedLinear(96, 200, kernel="onednn")
    layer.load_parameter("weight", w)
    layer.load_parameter("bias", b)
    layer.finish_loading()
    fused = blip2.models.layers.activated(layer, activation, x)
    act = blip2.models.layers.ACT[activation]
    plain, exact = act(F.linear(x, w, b)), act(F.linear(x.double(), w.double(), b.double()))
    assert fused.shape == plain.shape and fused.dtype == dt
    assert rel_err(fused.double(), exact) <= max(rel_err(plain.double(), exact), 1e-6)
    assert layer.activated(x, "gelu_new") is None  # not oneDNN's formula: applied after the product


@pytest.mark.parametrize("b,h,length,d", [(2, 16, 257, 88), (1, 3, 17, 40), (2, 2, 33, 22), (1, 2, 1, 8)])
def test_cpu_image_attention_equals_torch_attention(b, h, length, d):
    # The image encoder's attention: q, k, v strided views of one [B, L, 3, H, D] product, as the
    # encoder makes them; ViT-g's shape, odd lengths, D not a multiple of 16, a single position.
    from blip2.models.layers import cpu_image_attention

    torch.manual_seed(length)
    q, k, v = (torch.randn(b, length, 3, h, d) * 2).bfloat16().permute(2, 0, 3, 1, 4)
    ours = cpu_image_attention(q, k, v)
    if ours is None:
        pytest.skip("needs AVX512-BF16 and VNNI without AMX, and a C++ compiler")
    as_rows = lambda out: out.transpose(1, 2).reshape(b, length, h * d)  # noqa: E731
    exact = as_rows(F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    torch_bf16 = as_rows(F.scaled_dot_product_attention(q, k, v))
    assert ours.shape == torch_bf16.shape and ours.dtype == torch.bfloat16
    assert rel_err(ours.double(), exact) <= max(rel_err(torch_bf16.double(), exact) * 1.5, 1e-3)
    assert cpu_image_attention(q.float(), k.float(), v.float()) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,h,length,d,mask", [(1, 32, 65, 80, "bool"), (2, 4, 7, 8, "additive"), (3, 2, 1, 64, None),
                                               (2, 8, 300, 64, "additive"), (5, 3, 20, 24, "bool")])
def test_cpu_decoding_attention_equals_torch_attention(b, h, length, d, mask, dtype):
    # One query per row over a cache narrowed to its written positions (strided views), with OPT's
    # boolean mask or T5's additive position bias: as close to the exact result as torch's kernel.
    torch.manual_seed(length)
    cache_k, cache_v = torch.randn(2, b, h, length + 9, d).to(dtype), torch.randn(2, b, h, length + 9, d).to(dtype)
    k, v = cache_k[1, :, :, :length], cache_v[1, :, :, :length]
    q = torch.randn(b, 1, h, d).to(dtype).transpose(1, 2)  # [B, H, 1, D] as the layers make it
    keep = torch.rand(b, 1, 1, length) > 0.3
    keep[..., 0] = True
    if mask == "additive":
        mask = (torch.randn(1, h, 1, length) + torch.where(keep, 0.0, -1e30)).to(dtype)
    elif mask == "bool":
        mask = keep
    if not _cpu_decoding(q, k, v, mask):
        pytest.skip("blip2's attention kernel is not built here (no AVX2 or no compiler)")
    ours = cpu_single_query_attention(q, k, v, mask)
    exact_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=exact_mask, scale=1.0)
    torch_result = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    assert ours.shape == torch_result.shape and ours.dtype == dtype
    floor = 1e-3 if dtype == torch.bfloat16 else 1e-6
    assert rel_err(ours.double(), exact) <= max(rel_err(torch_result.double(), exact) * 1.5, floor)


def test_beam_reorder_copies_what_a_whole_cache_reorder_would():
    # Beams of two inputs (rows 0-2 and 3-5) after 4 prompt slots and 3 generated ones: only the
    # generated positions of rows that take another row's history are copied, and the result over
    # every position written so far equals reordering the whole cache.
    cache = KVCache(2, 6, 3, 10, 4, torch.float32, "cpu")
    cache.k[:, :, :, :4] = torch.randn(2, 2, 1, 3, 4, 4).expand(2, 2, 3, 3, 4, 4).reshape(2, 6, 3, 4, 4)  # shared prompt
    cache.k[:, :, :, 4:7] = torch.randn(2, 6, 3, 3, 4)
    cache.v.copy_(torch.randn_like(cache.v))
    cache.v[:, :, :, :4] = cache.v[:, [0, 0, 0, 3, 3, 3], :, :4]
    rows = torch.tensor([0, 0, 1, 5, 3, 4])
    expected_k, expected_v = cache.k[:, rows, :, :7].clone(), cache.v[:, rows, :, :7].clone()
    beyond_k = cache.k[:, :, :, 7:].clone()
    cache.reorder(rows, 4, 7)
    assert torch.equal(cache.k[:, :, :, :7], expected_k) and torch.equal(cache.v[:, :, :, :7], expected_v)
    assert torch.equal(cache.k[:, :, :, 7:], beyond_k)  # not yet written: left alone
    unchanged = cache.k.clone()
    cache.reorder(torch.arange(6), 4, 7)  # nothing moves
    assert torch.equal(cache.k, unchanged)


def test_single_query_attention_equals_torch_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 4, 7, 8), torch.randn(3, 4, 7, 8)
    keep = torch.rand(3, 1, 1, 7) > 0.3
    keep[..., 0] = True  # every row attends to something
    bias = torch.randn(1, 4, 1, 7) + torch.where(keep, 0.0, float("-inf"))  # T5: position bias + mask
    for mask in (keep, bias, None):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        torch.testing.assert_close(single_query_attention(q, k, v, mask), expected)
    # Half-precision inputs: float32 scores, probabilities rounded to bfloat16 (as flash attention does).
    h = [t.bfloat16() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*[t.double() for t in h], attn_mask=keep, scale=1.0)
    assert single_query_attention(*h, keep).dtype == torch.bfloat16
    torch.testing.assert_close(single_query_attention(*h, keep).double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_generation_with_single_query_attention_equals_plain(lm, ckpt_root, monkeypatch):
    # On a GPU, decoding steps of many rows take the two-product attention; here every step does.
    cfg = tiny_config(lm, num_decoder_layers=2) if lm == "t5" else tiny_config(lm)
    m = blip2.load(write_checkpoint(ckpt_root / f"single-query-{lm}", cfg, seed=43), dtype="float32")
    ids, mask = (opt_inputs if lm == "opt" else t5_inputs)(cfg, [[5, 6, 7], [8]])
    gen = GenerationConfig(num_beams=3, max_new_tokens=6, num_return_sequences=2)
    px = pixels(2, 28)

    def run():
        with torch.inference_mode():
            return [[s.token_ids for s in r] for r in generate(m.model, m.model.encode_images(px), ids, mask, gen)]

    plain = run()
    used = []

    def routed(q, k, v, mask):
        if q.shape[2] == 1:
            used.append(1)
            return single_query_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)

    monkeypatch.setattr(getattr(blip2.models, lm), "attention", routed)
    assert run() == plain and used


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_decoding_with_cpu_attention_equals_torch_attention(lm, dtype, ckpt_root, monkeypatch):
    # Decoding steps take csrc/decoding.cpp (OPT's boolean mask; T5's position bias and its
    # cross-attention's padding mask, and its RMS norms); beams and their scores as with torch's.
    import blip2.models.layers as layers

    cfg = tiny_config(lm, num_decoder_layers=2) if lm == "t5" else tiny_config(lm)
    m = blip2.load(write_checkpoint(ckpt_root / f"cpu-attention-{lm}", cfg, seed=47), dtype=dtype)
    ids, mask = (opt_inputs if lm == "opt" else t5_inputs)(cfg, [[5, 6, 7], [8]])
    gen = GenerationConfig(num_beams=3, max_new_tokens=8, num_return_sequences=3)
    px = pixels(2, 28)
    calls = []
    kernel = layers.cpu_single_query_attention

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    def run():
        with torch.inference_mode():
            return [[(s.token_ids, s.score) for s in r] for r in generate(m.model, m.model.encode_images(px), ids, mask, gen)]

    monkeypatch.setattr(layers, "cpu_single_query_attention", counted)
    ours = run()
    if not calls:
        pytest.skip("blip2's attention kernel is not built here (no AVX2 or no compiler)")
    monkeypatch.setattr(layers, "DECODING_DTYPES", ())  # torch's attention and norms
    theirs = run()
    assert [[t for t, _ in r] for r in ours] == [[t for t, _ in r] for r in theirs]
    close = 0.05 if dtype == "bfloat16" else 1e-4
    assert all(abs(a - b) < close for r, s in zip(ours, theirs) for (_, a), (_, b) in zip(r, s))


@pytest.mark.parametrize("shape", [(1, 1, 2048), (2, 45, 64), (3, 40), (1, 0, 8)])
def test_cpu_rms_norm_rounds_as_the_reference(shape):
    # T5's RMS norm in bfloat16 in one pass: the reference's roundings (the normalised row to
    # bfloat16, then times the weight), its mean of squares summed in another order: within one
    # bfloat16 step of the reference's formula everywhere, equal almost everywhere.
    from blip2.models.layers import cpu_rms_norm
    from blip2.models.t5 import T5LayerNorm

    torch.manual_seed(shape[-1])
    norm = T5LayerNorm(shape[-1], 1e-6).requires_grad_(False)
    norm.weight.data = (torch.randn(shape[-1]) * 0.5 + 1).bfloat16()
    x = (torch.randn(*shape) * 3).bfloat16()
    fused = cpu_rms_norm(x, norm.weight, norm.eps)
    if fused is None:
        pytest.skip("blip2's decoding kernels are not built here (no AVX2 or no compiler)")
    ref = norm.weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)).bfloat16()
    assert fused.shape == ref.shape and fused.dtype == torch.bfloat16
    assert torch.equal(norm(x), fused)  # the module takes it
    assert ((fused.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()
    assert x.numel() == 0 or (fused == ref).float().mean() > 0.999


@pytest.mark.parametrize("shape", [(1, 1, 2048), (2, 45, 64), (1, 0, 8)])
def test_cpu_rms_norm_in_float32_equals_the_reference(shape):
    # float32: no rounding between the steps; only the mean of squares sums in another order.
    from blip2.models.layers import cpu_rms_norm
    from blip2.models.t5 import T5LayerNorm

    torch.manual_seed(shape[-1])
    norm = T5LayerNorm(shape[-1], 1e-6).requires_grad_(False)
    norm.weight.data = torch.randn(shape[-1]) * 0.5 + 1
    x = torch.randn(*shape) * 3
    fused = cpu_rms_norm(x, norm.weight, norm.eps)
    if fused is None:
        pytest.skip("blip2's decoding kernels are not built here (no AVX2 or no compiler)")
    exact = norm.weight.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + norm.eps)
    assert fused.dtype == torch.float32 and torch.equal(norm(x), fused)
    torch.testing.assert_close(fused.double(), exact, rtol=1e-6, atol=1e-6)
