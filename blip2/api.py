"""The user-facing object: `blip2.load(...)` returns a `Blip2`."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .config import Blip2Config
from .generation import GenerationConfig
from .hub import DEFAULT_MODEL, resolve
from .layers import PACK_FOR_ROWS, GraphedCalls, can_pack, pack_linears
from .model import Blip2Model
from .processing import ImageError, ImageProcessor, ImageSource, PromptTokenizer
from .quantize import Quantization, quantize_linears, stored_layer_modes, stored_quantization
from .weights import load_weights, resolve_ties

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu",
                encoder_decoder: bool = False) -> torch.dtype:
    """A dtype name or torch.dtype to a torch.dtype; None is float32, "auto" is `auto_dtype(device)`."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return auto_dtype(torch.device(device), encoder_decoder)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype} (use float32, bfloat16, float16 or auto)")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (use float32, bfloat16, float16 or auto)")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """A device name to a torch.device this process can use (None: the CPU); an error saying why not."""
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r} (use cpu, cuda or mps)")
    return device


def auto_dtype(device: torch.device, encoder_decoder: bool = False) -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs from
    Ampere on), float16 on other CUDA GPUs (float32 for T5, which overflows in float16), else float32:
    emulated bfloat16 is slower than float32."""
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3
            native = torch.cuda.is_bf16_supported()
        if native:
            return torch.bfloat16
        return torch.float32 if encoder_decoder else torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch's own checks, where present
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})  # "bf16": the Arm Features line


T5_FLOAT16 = ("Flan-T5 overflows in float16 (it generates \"ssss\" or NaN, in the reference too): use "
              "dtype=\"bfloat16\" or \"auto\", or force float16 with force_float16=True (CLI: --force-float16), "
              "which keeps the reference's guards (T5's wo in float32, clamped activations)")


def _dtype_plan(cfg: Blip2Config, dtype: torch.dtype):
    """Each parameter's dtype: the requested one, except what the reference keeps in float32 under float16."""

    def dtype_of(name: str) -> torch.dtype:
        if dtype == torch.float16:
            if name == "query_tokens" or name.startswith("qformer."):
                return torch.float32
            if cfg.is_encoder_decoder and ".DenseReluDense.wo." in name:
                return torch.float32
        return dtype

    return dtype_of


def _quantized_plan(model: Blip2Model, names: list[str], dtype_of):
    """dtype_of, except that quantized layers read their weights as they declare them: float32 (to be
    quantized on arrival) or the stored integer form, with float32 scales."""
    declared = {f"{name}.{attr}": p.dtype for name in names
                for attr, p in model.get_submodule(name).named_parameters() if attr != "bias"}
    return lambda name: declared.get(name) or dtype_of(name)


# Images through the vision encoder at once: on a par with one at a time on a 2-core CPU (measured);
# on a GPU enough rows (32 x 257) to fill it, while the next images are being prepared.
ENCODE_BATCH = 8
GPU_ENCODE_BATCH = 32
QUERY_CACHE = 64  # images whose query embeddings are kept


CAPTION = GenerationConfig(num_beams=5, max_new_tokens=30)
VQA = GenerationConfig(num_beams=5, max_new_tokens=10, length_penalty=-1.0)
CHAT = GenerationConfig(num_beams=5, max_new_tokens=30)
VQA_PROMPT = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}
# T5 has relative positions and no hard limit; the released tokenizer's model_max_length is 512.
T5_MAX_PROMPT = 512
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
    """A loaded BLIP-2 checkpoint: the model plus its image processor and tokenizer."""

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
        self._graphed_encoder = GraphedCalls(model.encode_images)

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
            out.append(self._graphed_encoder(chunk)[:n])
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
        return self.image_processor(images)

    def image_queries(self, pixel_values: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
        """encode_images with a small cache, so questions and chat turns about one image encode it once.

        pixel_values: [B, 3, S, S] normalised, or rows one by one, normalised or resized uint8 ones
        (ImageProcessor.stream; normalised where the model runs). Images not in the cache are
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
            # encoding started 0.2 s after its images were ready; BENCHMARKS.md, GPU run 5).
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
        _check_prompt(prompt, "prompt")
        results = self._run(images, prompt, GenerationConfig.make(CAPTION, **generation), errors)
        return _texts(results, single=_is_single(images))

    def ask(self, images: ImageSource | Sequence[ImageSource], questions: str | Sequence[str],
            errors: str = "raise", **generation) -> str | list:
        """Answers, with the paper's prompt ("Question: {} Answer:" for OPT, "Question: {} Short
        answer:" for Flan-T5). Defaults: 5 beams, up to 10 new tokens, length penalty -1. errors: as
        in `generate`."""
        single = isinstance(questions, str) and _is_single(images)
        questions = _check_prompt(questions, "questions")
        prompts = [VQA_PROMPT[self.kind].format(q.strip()) for q in questions]
        results = self._run(images, prompts, GenerationConfig.make(VQA, **generation), errors)
        return _texts(results, single=single)

    def chat(self, image: ImageSource, messages: Sequence[dict], **generation) -> str:
        """The assistant's next reply to `messages` ({"role": "user"|"assistant"|"system", "content"}),
        rendered as alternating "Question: ... Answer: ..." text as LAVIS and vLLM's BLIP-2 template
        do. Defaults: 5 beams, up to 30 new tokens."""
        if not _is_single(image):
            raise ValueError(f"chat is about one image, got {len(image)} (ask() takes several)")
        results = self._run(image, render_chat(messages), GenerationConfig.make(CHAT, **generation))
        return _texts(results, single=True)

    def _run(self, images, prompts, gen: GenerationConfig, errors: str = "raise"):
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        images = [images] if _is_single(images) else list(images)
        prompts = _check_prompt(prompts, "prompts")
        if not images:
            raise ValueError("no images given")
        if len(images) != len(prompts) and 1 not in (len(images), len(prompts)):
            raise ValueError(f"{len(images)} images and {len(prompts)} prompts: give one of each per pair, "
                             "or a single image or prompt for all")
        tokens = self.tokenizer(prompts, max_length=self.max_prompt_tokens(gen))  # checked before any image is read
        n = max(len(images), len(prompts))
        failed: dict[int, ImageError] = {}

        def readable():
            rows = self.image_processor.stream(images, processes=self.device.type == "cuda", errors=errors)
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
        seqs = self.model.generate(queries, ids.to(self.device), mask.to(self.device), gen)
        out = [[Result(self.tokenizer.decode(s.token_ids).strip(), s.token_ids, s.score) for s in row]
               for row in seqs]
        answers = dict(zip(keep, (row[0] for row in out) if gen.num_return_sequences == 1 else out))
        return [answers[i] if i in answers else failed[i] for i in range(n)]


def render_chat(messages: Sequence[dict]) -> str:
    """Messages to BLIP-2's prompt: "Question: {user} Answer: {assistant} ... Question: {user} Answer:"."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {_short(messages)} "
                         "(for a single question, use ask())")
    if not messages:
        raise ValueError("chat needs at least one message")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {_short(m)}")
        role, content = m.get("role"), m.get("content", "")
        if isinstance(content, list):  # OpenAI-style content parts: keep the text ones
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise ValueError(f"messages[{i}].content parts must be dicts like {{'type': 'text', 'text': ...}}")
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {_short(content)}")
        content = content.strip()
        if role == "user":
            parts.append(f"Question: {content}")
        elif role == "assistant":
            parts.append(f"Answer: {content}")
        elif role == "system":
            parts.append(content)
        else:
            raise ValueError(f"unknown chat role {role!r} in messages[{i}] (use user, assistant or system)")
    if messages[-1].get("role") != "user":
        raise ValueError("the last chat message must be the user's")
    return " ".join(p for p in parts if p) + " Answer:"


def _check_prompt(prompts, what: str) -> list[str]:
    """One prompt or a list of them, each a string, as a list."""
    items = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {_short(prompts)}")
    return list(items)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
         force_float16: bool = False) -> Blip2:
    """Load a BLIP-2 checkpoint in the Hugging Face layout: a local directory or a hub id
    (downloaded once into the Hugging Face cache, only the files needed).

    dtype: float32, bfloat16, float16 or "auto" (bfloat16 where the hardware computes it natively,
    float16 on CUDA without it, else float32); default float32, or "auto" when quantizing. Flan-T5
    refuses float16 unless force_float16=True. device: "cpu" (default), "cuda", ...
    quantize: "int8" or "int4" weight-only quantization of the language model's layers and, unless
    quantize_vision=False, the vision encoder's; a checkpoint written by `blip2 quantize` loads
    quantized as it was written. Each weight is read once and stored directly in its final form.
    """
    start = time.perf_counter()
    directory = resolve(path)
    cfg = Blip2Config.from_file(directory)
    resolve_ties(directory, cfg)
    stored = stored_quantization(directory)
    if stored is not None and quantize not in (None, stored.mode):
        raise ValueError(f"{directory} is quantized to {stored.mode}; it cannot be loaded as {quantize} "
                         "(quantize the original checkpoint instead)")
    quantization = stored or (Quantization(quantize, vision=quantize_vision) if quantize else None)
    device = parse_device(device)
    dtype = parse_dtype("auto" if dtype is None and quantization else dtype, device, cfg.is_encoder_decoder)
    if dtype == torch.float16 and cfg.is_encoder_decoder and not force_float16:
        raise ValueError(T5_FLOAT16)
    dtype_of = _dtype_plan(cfg, dtype)
    with torch.device("meta"):
        model = Blip2Model(cfg)
        if quantization is not None:
            names = quantize_linears(model, quantization, dtype_of,
                                     None if stored is None else stored_layer_modes(directory))
            dtype_of = _quantized_plan(model, names, dtype_of)
        if can_pack(dtype, device):
            # Packing pays where the weights are read once per row (decoding), and in the vision
            # encoder, where the plain product first copies the bias into every output row (one
            # image 11-17% faster, scripts/cpu_ab.py). A head tied to the embedding stays plain: the
            # embedding reads the same tensor. A float32 language model is packed for one row, which
            # decodes fastest (see PACK_FOR_ROWS).
            tied = cfg.text.tie_word_embeddings
            pack_linears(model.language_model, lambda name: not (tied and name == "lm_head") and dtype_of(
                f"language_model.{name}.weight") == dtype, 1 if dtype == torch.float32 else PACK_FOR_ROWS)
            pack_linears(model.vision_model, lambda name: dtype_of(f"vision_model.{name}.weight") == dtype)
    load_weights(model, directory, dtype_of, device)
    model.eval()
    return Blip2(model, directory, time.perf_counter() - start, quantization)
