"""The object users hold: `blip2.load(...)` returns a `Blip2`, which captions, answers and chats."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import check_ties, load_weights, unfragmented_heap
from ..config import Blip2Config
from ..hub import DEFAULT_MODEL, resolve
from ..inputs.image_stream import ImageStream
from ..inputs.images import ImageError, ImageProcessor, ImageSource
from ..inputs.prompts import CAPTION, CHAT, VQA, VQA_PROMPT, check_prompts, render_chat
from ..inputs.tokenizer import T5_MAX_PROMPT, PromptTokenizer
from ..models.blip2 import Blip2Model
from ..quant.checkpoint import stored_layer_modes, stored_quantization
from ..quant.formats import Quantization
from ..quant.linear import quantize_linears
from ..quant.packed import PACK_FOR_ROWS, Packer, can_pack, kernel_for, pack_linears, pack_tied_head
from .cuda_graphs import CudaGraphs
from .dtypes import T5_FLOAT16, dtype_plan, parse_device, parse_dtype, quantized_plan
from .generation import GenerationConfig
from .sessions import generate

# Images through the vision encoder at once: on a par with one at a time on a 2-core CPU (measured);
# on a GPU enough rows (32 x 257) to fill it, while the next images are being prepared.
ENCODE_BATCH = 8
GPU_ENCODE_BATCH = 32
QUERY_CACHE = 64  # images whose query embeddings are kept

# T5 has no position limit for what it generates either; its decoding cache is allocated for the whole
# answer up front (24 layers x 2 x 2048 x 2 bytes per token and beam at full size in bfloat16), so bound it.
T5_MAX_NEW_TOKENS = 2048


@dataclass
class Result:
    """One generated answer: its text (prompt excluded), new token ids, and the sequence score
    (beam search: length-penalised log-probability; otherwise the sum of token log-probabilities)."""

    text: str
    token_ids: list[int]
    score: float


class Blip2:
    """A loaded BLIP-2 checkpoint: the model plus its image processor and tokenizer, and what it owns
    while it serves: the image workers, the query embeddings of recent images, and on a GPU its CUDA
    graphs. `close()` (or a `with` block) ends the workers and drops the graphs."""

    def __init__(self, model: Blip2Model, path: Path, load_seconds: float,
                 quantization: Quantization | None = None):
        self.model = model
        self.config = model.config
        self.path = path
        self.load_seconds = load_seconds
        self.quantization = quantization
        self.image_processor = ImageProcessor.from_dir(path)
        cfg = self.config
        try:  # read now, so that a broken tokenizer file is an error of loading, not of the first caption
            self._tokenizer = PromptTokenizer.from_dir(
                path, self.kind, image_token_id=cfg.image_token_index,
                num_query_tokens=cfg.num_query_tokens if cfg.image_token_index is not None else 0)
        except FileNotFoundError as e:  # weights alone still serve forward() and encode_images()
            self._tokenizer, self._no_tokenizer = None, e
        self._queries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.images = ImageStream(self.image_processor)
        self.graphs = CudaGraphs(model.encode_images, model.language_model.prompt)

    def close(self) -> None:
        """End the image workers and drop the CUDA graphs and cached queries (the model stays usable)."""
        self.images.close()
        self.graphs.close()
        self._queries.clear()

    def __enter__(self) -> Blip2:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self) -> PromptTokenizer:
        if self._tokenizer is None:
            raise self._no_tokenizer
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.language_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_projection.weight.dtype

    @property
    def kind(self) -> str:
        return self.config.text.model_type

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> projected query embeddings [B, num_query_tokens, lm_hidden].

        On a GPU, through CUDA graphs: images go in chunks of GPU_ENCODE_BATCH, a smaller batch
        padded to a power of two, so that a few graphs serve every batch size.
        """
        pixels = pixel_values.to(self.device)
        if pixels.device.type != "cuda":
            return self.model.encode_images(pixels)
        out = []
        for chunk in pixels.split(GPU_ENCODE_BATCH):
            n = len(chunk)
            padded = 1 << (n - 1).bit_length()
            if padded > n:
                chunk = torch.cat([chunk, chunk.new_zeros(padded - n, *chunk.shape[1:])])
            out.append(self.graphs.encoder(chunk)[:n])
        return torch.cat(out)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits as the reference Blip2ForConditionalGeneration.forward computes them (see Blip2Model.forward)."""
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        return self.model(to(pixel_values), to(input_ids), to(attention_mask), to(decoder_input_ids))

    __call__ = forward

    def pixel_values(self, images: ImageSource | Sequence[ImageSource]) -> torch.Tensor:
        """Images (paths, URLs, bytes, PIL images, arrays) to the checkpoint's normalised [B, 3, S, S]."""
        batch = [images] if _is_single(images) else list(images)
        if not batch:
            raise ValueError("no images given")
        return self.image_processor.normalize(torch.stack(list(self.images(batch))))

    def image_queries(self, pixel_values: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
        """encode_images with a small cache, so questions and chat turns about one image encode it once.

        pixel_values: [B, 3, S, S] normalised, or rows one by one, normalised or resized uint8 ones
        (an ImageStream's; normalised where the model runs). Images not in the cache are
        encoded together as soon as a chunk of them is ready (ENCODE_BATCH on a CPU,
        GPU_ENCODE_BATCH on a GPU), so on a GPU encoding overlaps the preparation of the next images.
        """
        chunk = ENCODE_BATCH if self.device.type == "cpu" else GPU_ENCODE_BATCH
        keys: list[bytes] = []
        found: dict[bytes, torch.Tensor] = {}
        waiting: dict[bytes, torch.Tensor] = {}

        def encode() -> None:
            # Gathered by numpy on this thread, on a GPU into pinned memory (so that the copy does not
            # wait for the last chunk's encoding): torch's CPU copies run on its thread pool, whose
            # threads wait for cores that the image workers hold (on the H100 host the first chunk's
            # encoding started 0.2 s after its images were ready; docs/log.md).
            rows = list(waiting.values())
            pixels = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype,
                                 pin_memory=self.device.type == "cuda")
            np.stack([r.numpy() for r in rows], out=pixels.numpy())
            pixels = pixels.to(self.device, non_blocking=True)
            if pixels.dtype == torch.uint8:  # resized images: normalised where the model runs
                pixels = self.image_processor.normalize(pixels)
            found.update(zip(waiting, self.encode_images(pixels)))
            waiting.clear()

        for row in pixel_values:
            key = hashlib.sha1(row.contiguous().numpy()).digest()
            keys.append(key)
            if key in self._queries:
                found[key] = self._queries[key]
            elif key not in found and key not in waiting:
                waiting[key] = row
                if len(waiting) == chunk:
                    encode()
        if waiting:
            encode()
        if not keys:
            return torch.empty(0, self.config.num_query_tokens, self.config.text.hidden_size, device=self.device)
        for k in keys:
            self._queries[k] = found[k]
            self._queries.move_to_end(k)
        while len(self._queries) > QUERY_CACHE:
            self._queries.popitem(last=False)
        return torch.stack([found[k] for k in keys])

    def max_prompt_tokens(self, gen: GenerationConfig) -> int:
        """The longest prompt (in tokens) that leaves room for `gen.max_new_tokens`; an error naming
        the model's limit when no prompt can."""
        if self.config.is_encoder_decoder:
            if gen.max_new_tokens > T5_MAX_NEW_TOKENS:
                raise ValueError(f"max_new_tokens={gen.max_new_tokens} is more than {T5_MAX_NEW_TOKENS}, the most "
                                 "this model generates at once")
            return T5_MAX_PROMPT
        positions, queries = self.config.text.max_position_embeddings, self.config.num_query_tokens
        room = positions - queries - gen.max_new_tokens
        if room < 1:  # the prompt holds at least OPT's BOS token
            raise ValueError(f"max_new_tokens={gen.max_new_tokens} leaves no room for the prompt: the model has "
                             f"{positions} positions, {queries} of them for the image, so at most "
                             f"{positions - queries - 1} new tokens")
        return room

    def max_new_tokens(self, prompt_tokens: int) -> int:
        """The most new tokens that fit after a prompt of `prompt_tokens` tokens (as `tokenizer.count_tokens`
        counts them): the converse of max_prompt_tokens."""
        if self.config.is_encoder_decoder:
            return T5_MAX_NEW_TOKENS
        return self.config.text.max_position_embeddings - self.config.num_query_tokens - prompt_tokens

    @torch.inference_mode()
    def generate(self, images: ImageSource | Sequence[ImageSource], prompts: str | Sequence[str] = "",
                 errors: str = "raise", **generation) -> list:
        """Generate text for images and prompts, paired one to one; a single image or a single prompt
        is paired with every item of the other. Settings: see GenerationConfig (defaults: greedy, 30
        new tokens). Returns one Result per pair, or a list of `num_return_sequences` per pair.

        errors: "raise" (default): an image that cannot be read raises its ImageError; "return": its
        ImageError takes the place of its results, and every other pair is answered.
        """
        gen = GenerationConfig.make(**generation)
        return self._run(images, prompts, gen, errors)

    def caption(self, images: ImageSource | Sequence[ImageSource], prompt: str = "", errors: str = "raise",
                **generation) -> str | list:
        """Captions (the prompt, e.g. "a photo of", is not repeated in the output). Defaults: beam
        search with 5 beams, up to 30 new tokens. A single image gives a single string. errors: as
        in `generate`."""
        check_prompts(prompt, "prompt")
        results = self._run(images, prompt, GenerationConfig.make(GenerationConfig(**CAPTION), **generation), errors)
        return _texts(results, single=_is_single(images))

    def ask(self, images: ImageSource | Sequence[ImageSource], questions: str | Sequence[str],
            errors: str = "raise", **generation) -> str | list:
        """Answers, with the paper's prompt ("Question: {} Answer:" for OPT, "Question: {} Short
        answer:" for Flan-T5). Defaults: 5 beams, up to 10 new tokens, length penalty -1. errors: as
        in `generate`."""
        single = isinstance(questions, str) and _is_single(images)
        questions = check_prompts(questions, "questions")
        prompts = [VQA_PROMPT[self.kind].format(q.strip()) for q in questions]
        results = self._run(images, prompts, GenerationConfig.make(GenerationConfig(**VQA), **generation), errors)
        return _texts(results, single=single)

    def chat(self, image: ImageSource, messages: Sequence[dict], **generation) -> str:
        """The assistant's next reply to `messages` ({"role": "user"|"assistant"|"system", "content"}),
        rendered as alternating "Question: ... Answer: ..." text as LAVIS and vLLM's BLIP-2 template
        do. Defaults: 5 beams, up to 30 new tokens."""
        if not _is_single(image):
            raise ValueError(f"chat is about one image, got {len(image)} (ask() takes several)")
        results = self._run(image, render_chat(messages), GenerationConfig.make(GenerationConfig(**CHAT), **generation))
        return _texts(results, single=True)

    def _run(self, images, prompts, gen: GenerationConfig, errors: str = "raise"):
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        images = [images] if _is_single(images) else list(images)
        prompts = check_prompts(prompts, "prompts")
        if not images:
            raise ValueError("no images given")
        if len(images) != len(prompts) and 1 not in (len(images), len(prompts)):
            raise ValueError(f"{len(images)} images and {len(prompts)} prompts: give one of each per pair, "
                             "or a single image or prompt for all")
        tokens = self.tokenizer(prompts, max_length=self.max_prompt_tokens(gen))  # checked before any image is read
        n = max(len(images), len(prompts))
        failed: dict[int, ImageError] = {}

        def readable():
            rows = self.images(images, processes=self.device.type == "cuda", errors=errors)
            for i, row in enumerate(rows):
                if isinstance(row, ImageError):
                    failed[i] = row
                else:
                    yield row

        queries = self.image_queries(readable())
        if len(images) == 1 and failed:
            return [failed[0]] * n
        keep = [i for i in range(n) if i not in failed]
        if not keep:
            return [failed[i] for i in range(n)]
        if failed and len(prompts) > 1:  # padded as if the failed pairs had never been asked
            tokens = self.tokenizer([prompts[i] for i in keep])
        queries = queries.expand(len(keep), -1, -1) if len(queries) == 1 else queries
        ids, mask = tokens.input_ids, tokens.attention_mask
        if len(ids) == 1:
            ids, mask = ids.expand(len(keep), -1), mask.expand(len(keep), -1)
        seqs = generate(self.model, queries, ids.to(self.device), mask.to(self.device), gen, self.graphs)
        out = [[Result(self.tokenizer.decode(s.token_ids).strip(), s.token_ids, s.score) for s in row]
               for row in seqs]
        answers = dict(zip(keep, (row[0] for row in out) if gen.num_return_sequences == 1 else out))
        return [answers[i] if i in answers else failed[i] for i in range(n)]


def _is_single(images) -> bool:
    if isinstance(images, (list, tuple)):
        return False
    return not (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)


def _texts(results, single: bool):
    texts = [r if isinstance(r, ImageError) else r.text if isinstance(r, Result) else [x.text for x in r]
             for r in results]
    return texts[0] if single else texts


def load(path: str | Path = DEFAULT_MODEL, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, quantize: str | None = None, quantize_vision: bool = True,
         quantize_language: bool = True,
         force_float16: bool = False, trainable: Callable[[str], bool] | None = None) -> Blip2:
    """Load a BLIP-2 checkpoint in the Hugging Face layout: a local directory or a hub id
    (downloaded once into the Hugging Face cache, only the files needed).

    dtype: float32, bfloat16, float16 or "auto" (bfloat16 where the hardware computes it natively,
    float16 on CUDA without it, else float32); default float32, or "auto" when quantizing. Flan-T5
    refuses float16 unless force_float16=True. device: "cpu" (default), "cuda", ...
    quantize: "int8" or "int4" weight-only quantization of the language model's layers and the vision
    encoder's; quantize_vision=False keeps the vision side in `dtype`, quantize_language=False the
    language model (int8 vision alone: faster image batches on int8 vector units, docs/precision.md).
    A checkpoint written by `blip2 quantize` loads quantized as it was written. Each weight is read once and stored directly in its final form.
    trainable(name): the parameters to leave trainable (requires_grad, in memory of their own); the
    model's forward then works under autograd (weights are not packed for oneDNN).
    """
    start = time.perf_counter()
    directory = resolve(path)
    cfg = Blip2Config.from_file(directory)
    stored = stored_quantization(directory)
    if stored is not None and quantize not in (None, stored.mode):
        raise ValueError(f"{directory} is quantized to {stored.mode}; it cannot be loaded as {quantize} "
                         "(quantize the original checkpoint instead)")
    quantization = stored or (Quantization(quantize, vision=quantize_vision, language=quantize_language)
                              if quantize else None)
    device = parse_device(device)
    dtype = parse_dtype("auto" if dtype is None and quantization else dtype, device, cfg.is_encoder_decoder)
    if dtype == torch.float16 and cfg.is_encoder_decoder and not force_float16:
        raise ValueError(T5_FLOAT16)
    with torch.device("meta"):
        model = Blip2Model(cfg)
    check_ties(model, directory)
    dtype_of = dtype_plan(model, dtype)
    packer = Packer()
    with torch.device("meta"):
        if quantization is not None:
            layers = quantize_linears(model, quantization, dtype_of,
                                      None if stored is None else stored_layer_modes(directory))
            dtype_of = quantized_plan(model, layers, dtype_of)
        if can_pack(dtype, device) and trainable is None:
            # Packing pays where the weights are read once per row (decoding), and in the vision
            # encoder, where the plain product first copies the bias into every output row (one
            # image 11-17% faster, scripts/cpu_ab.py). A weight tied to another stays plain: that
            # one's module reads the same tensor. A float32 language model is packed for one row,
            # which decodes fastest (see PACK_FOR_ROWS), or on AVX2 CPUs for blip2's own float32
            # product; a bfloat16 one, where it can, for blip2's own product, which decodes faster than
            # oneDNN's (the vision encoder keeps oneDNN's: equal on many rows, and AMX-capable).
            tied = {name.removesuffix(".weight") for name in model.tied_weights}
            kernel, rows = kernel_for(dtype), 1 if dtype == torch.float32 else PACK_FOR_ROWS
            for head, table in model.tied_weights.items():  # on blip2's kernels: one packed tensor for both
                if head.startswith("language_model.") and dtype_of(head) == dtype_of(table) == dtype:
                    pack_tied_head(model, head.removesuffix(".weight"), table.removesuffix(".weight"), packer,
                                   kernel, rows)
            plain = lambda prefix: lambda name: f"{prefix}{name}" not in tied and dtype_of(  # noqa: E731
                f"{prefix}{name}.weight") == dtype
            pack_linears(model.language_model, plain("language_model."), packer, rows, kernel)
            pack_linears(model.vision_model, plain("vision_model."), packer)
    try:
        with unfragmented_heap():
            load_weights(model, directory, dtype_of, device, trainable)
    finally:
        packer.close()
    model.eval()
    return Blip2(model, directory, time.perf_counter() - start, quantization)
