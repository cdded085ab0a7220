"""Calibrated quantization (GPTQ; Frantar et al., 2022) for `blip2 quantize --calibrate IMAGES`.

Round-to-nearest (formats.quantize_weight) rounds every weight on its own. GPTQ rounds a layer's
input columns one at a time, the most used first, and moves each column's rounding error onto the
columns not yet rounded, weighted by how the layer's inputs on calibration images correlate
(H = sum of x xᵀ), so that the layer's outputs rather than its weights stay close. The scales and
zeros are round-to-nearest's (each group's range, fixed before rounding: "static groups"), so the
result is the same portable form, read by every loader and kernel unchanged. The calibration inputs
are the images with a few prompts and written captions, questions and answers, teacher-forced as a
chat. The Q-Former, the token embedding and the head are int8 in int4 mode (formats.role_quantization).

Against float32, on images and text the calibration never saw: int4 logits 3.8% off with GPTQ
against 7.7% rounded to nearest on the OPT test checkpoint, 14.4% against 15.7% on Flan-T5's
(tests/test_quantize.py); 14.8% against 33.1% on full-size random opt-2.7b weights, and int8 1.64%
against 3.39% there (docs/precision.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..checkpoint import read_checkpoint
from ..inputs.prompts import VQA_PROMPT
from ..inputs.tokenizer import T5_MAX_PROMPT
from .formats import Quantization, _pack_nibbles, dequantize_weight, quantize_weight
from .packed import PackedEmbedding

log = logging.getLogger(__name__)

# Added to H's diagonal, as a fraction of its mean: keeps the inverse stable, and the directions the
# calibration inputs leave unseen rounded as to nearest. GPTQ's paper takes 0.01 with 128 sequences of
# 2048 tokens; with 16 images, int4 test-checkpoint logits against float32 (OPT, Flan-T5): 0.01 4.5%,
# 16.5%; 0.1 4.0%, 14.6%; 0.5 3.9%, 14.1%; 1.0 4.0%, 14.0% (rounded to nearest: 8.3%, 15.8%).
DAMP = 0.5
BLOCK = 128  # columns rounded before the error reaches the rest of the matrix at once
HESSIAN_BYTES = 3 << 29  # inputs' second moments held at a time (1.5 GB); more layers take more passes


def gptq_weight(w: torch.Tensor, h: torch.Tensor, q: Quantization) -> dict[str, torch.Tensor]:
    """A float weight [N, K] and its inputs' second moments [K, K] to the portable quantized form of
    formats.quantize_weight, with the same scales and zeros and GPTQ's codes."""
    parts = quantize_weight(w, q)
    n, k = w.shape
    h = h.float().clone()  # float32 factorisations: 1.7x faster than float64 for a 10240-wide fc2 on
    # the 2-core CPU (29 against 49 s), outputs as close (5.0007% against 5.0003% off on correlated inputs)
    dead = h.diagonal() == 0  # inputs that were always zero: any code serves
    h[dead, dead] = 1
    h.diagonal().add_(DAMP * h.diagonal().mean())
    order = torch.argsort(h.diagonal(), descending=True)
    h = h[order][:, order]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    W = w.float()[:, order].clone()
    codes = torch.empty(n, k, device=w.device)
    if q.mode == "int8":
        scales = parts["scales"][:, None].expand(n, k)
        lo, hi = -127, 127
    else:  # the kernels' grid: (code - 8) * scale + zero
        scales = parts["scales"].repeat_interleave(q.group_size, 1)
        zeros = parts["zeros"].repeat_interleave(q.group_size, 1)[:, order]
        lo, hi = 0, 15
    scales = scales[:, order]
    for a in range(0, k, BLOCK):
        b = min(a + BLOCK, k)
        W1, E1, H1 = W[:, a:b].clone(), torch.empty(n, b - a, device=w.device), hinv[a:b, a:b]
        for i in range(b - a):
            s, x = scales[:, a + i], W1[:, i]
            if q.mode == "int8":
                c = (x / s).round_().clamp_(lo, hi)
                value = c * s
            else:
                z = zeros[:, a + i]
                c = ((x - z) / s + 8).round_().clamp_(lo, hi)
                value = (c - 8) * s + z
            codes[:, a + i] = c
            E1[:, i] = (x - value) / H1[i, i]
            W1[:, i:] -= E1[:, i, None] * H1[i, i:]
        W[:, b:] -= E1 @ hinv[a:b, b:]
    natural = torch.empty_like(codes)
    natural[:, order] = codes
    if q.mode == "int8":
        return {"weight": natural.to(torch.int8), "scales": parts["scales"]}
    return {"weight": _pack_nibbles(natural.to(torch.uint8)), "scales": parts["scales"], "zeros": parts["zeros"]}


def calibrated_parts(model, layers: dict[str, Quantization], images: Sequence, texts: dict
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ's portable form of every layer in `layers` (name -> its quantization) that takes inputs
    (not the token embedding), for `model`, a float32 Blip2 as load() gives it, run on `images` with
    `texts` ({"prompts": {"opt": [...], "t5": [...]}, "captions": [...], "questions": [...]}). The
    float weights are read again from the model's checkpoint. The layers' input moments are gathered
    a few layers at a time (HESSIAN_BYTES), in the order a forward calls them, each pass over the
    calibration inputs stopping after its last layer and running through the layers already rounded
    (the model's weights are replaced by their quantized values as it goes), so that each layer's
    rounding makes up for the error its inputs already carry."""
    m = model.model
    modules = {name: m.get_submodule(name) for name in layers}
    linear = [name for name in layers if not isinstance(modules[name], (torch.nn.Embedding, PackedEmbedding))]
    inputs = _calibration_inputs(model, images, texts)
    reads = {key.removesuffix(".weight"): read for key, _, read, _ in read_checkpoint(model.path)
             if key.removesuffix(".weight") in linear}
    order = _call_order(m, modules, inputs[0])
    linear.sort(key=order.index)
    queries = None  # the images' queries through the quantized vision encoder and Q-Former, once done
    out: dict[str, dict[str, torch.Tensor]] = {}
    total = len(linear)
    while linear:
        batch, size = [], 0
        while linear and (not batch or size + modules[linear[0]].in_features ** 2 * 4 <= HESSIAN_BYTES):
            size += modules[linear[0]].in_features ** 2 * 4
            batch.append(linear.pop(0))
        done = total - len(linear) - len(batch)
        log.info("GPTQ: layers %d-%d of %d (%s ... %s)", done + 1, done + len(batch), total, batch[0], batch[-1])
        text_only = all(name.startswith("language_model.") for name in batch)
        if text_only and queries is None:
            with torch.inference_mode():
                queries = [m.encode_images(px.to(model.device)) for px, *_ in inputs]
        moments = _moments(m, {name: modules[name] for name in batch}, inputs, queries if text_only else None)
        for name in batch:  # on the model's device: a GPU factorises far faster
            w = reads[name](torch.float32).to(model.device)
            parts = gptq_weight(w, moments.pop(name).to(model.device), layers[name])
            out[name] = {key: value.cpu() for key, value in parts.items()}
            _set_weight(modules[name], dequantize_weight(parts, layers[name]))
    return out


def _set_weight(module: torch.nn.Module, w: torch.Tensor) -> None:
    """Give a float model's layer its quantized weight, so that later passes see its outputs."""
    if hasattr(module, "finish_loading"):  # PackedLinear: packed again
        module.load_parameter("weight", w)
        module.finish_loading()
    else:
        module.weight.data = w.to(module.weight.dtype)


class _Stop(Exception):
    """Raised by the last hooked layer of a pass: the rest of the forward is not needed."""


# Question-and-answer turns per image, as in a chat about it. More text positions show GPTQ more
# directions of each layer's inputs: on a narrower random opt model (1024 wide, 8 layers, 16 images),
# int4 logits against float32 14.3% with 1 turn, 13.2% with 8 (rounded to nearest: 26.6%).
TURNS = 4


def _calibration_inputs(model, images: Sequence, texts: dict) -> list[tuple]:
    """(pixel_values, input_ids, mask, decoder_input_ids) per image: a prompt and a caption, then
    TURNS - 1 questions with answers, as the language model reads a chat: OPT's in one sequence, T5's
    history and last question in the encoder and the last answer on the decoder side. Written
    captions rather than the model's own answers: those are what the model will read in use, and a
    model's greedy answers can repeat a token (a random one's do), which leaves most directions of its
    inputs unseen."""
    out = []
    tok, kind = model.tokenizer, model.kind
    prompts, captions, questions = texts["prompts"][kind], texts["captions"], texts["questions"]
    for i, image in enumerate(images):
        chat = [(prompts[i % len(prompts)], captions[i % len(captions)])]
        chat += [(VQA_PROMPT[kind].format(questions[(i + t) % len(questions)]), captions[(i + 5 * t) % len(captions)])
                 for t in range(1, TURNS)]
        if model.config.is_encoder_decoder:
            history = " ".join([*(f"{q} {a}".strip() for q, a in chat[:-1]), chat[-1][0]]).strip()
            tokens = _fit(tok, history, T5_MAX_PROMPT)
            start = model.config.text.decoder_start_token_id
            dec = torch.tensor([[start, *tok.encode(chat[-1][1])]])
        else:
            limit = model.config.text.max_position_embeddings - model.config.num_query_tokens
            text = " ".join(f"{q} {a}".strip() for q, a in chat)
            tokens = _fit(tok, text, limit)
            dec = None
        out.append((model.pixel_values([image]), tokens.input_ids, tokens.attention_mask, dec))
    return out


def _fit(tok, text: str, limit: int):
    """`text` tokenized with the tokenizer's special tokens, cut to fit `limit` tokens."""
    ids = tok.encode(text)
    while True:
        try:
            return tok([text], max_length=limit)
        except ValueError:  # too long
            ids = ids[:len(ids) - max(1, len(ids) // 16)]
            text = tok.decode(ids)


def _call_order(m, modules: dict, sample: tuple) -> list[str]:
    """The layers' names in the order one forward calls them."""
    seen: list[str] = []
    hooks = [mod.register_forward_pre_hook(lambda mod, args, name=name: seen.append(name))
             for name, mod in modules.items()]
    try:
        _forward(m, sample)
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(seen)) + [name for name in modules if name not in seen]


def _moments(m, modules: dict, inputs: list[tuple], queries: list | None) -> dict[str, torch.Tensor]:
    """sum of x xᵀ over every input row each layer of `modules` receives (float32, on the CPU); with
    `queries`, the images' queries are taken from there instead of encoded again."""
    sums: dict[str, torch.Tensor] = {}
    last = list(modules)[-1]

    def hook(mod, args, name):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        h = (x.T @ x).cpu()
        if name in sums:
            sums[name] += h
        else:
            sums[name] = h
        if name == last:
            raise _Stop

    hooks = [mod.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
             for name, mod in modules.items()]
    try:
        for i, sample in enumerate(inputs):
            try:
                _forward(m, sample, None if queries is None else queries[i])
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return sums


@torch.inference_mode()
def _forward(m, sample: tuple, queries: torch.Tensor | None = None) -> None:
    px, ids, mask, dec = sample
    device = m.language_projection.weight.device
    m(None if queries is not None else px.to(device), ids.to(device), mask.to(device),
      None if dec is None else dec.to(device), queries=queries)
