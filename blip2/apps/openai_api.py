"""OpenAI's chat completions protocol, as `blip2 serve` speaks it: the request body, its translation
into a prompt, an image and generation settings, and the answer's text as it grows."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.generation import GenerationConfig

# Answers are short; a request that names no length gets at most this many tokens.
DEFAULT_MAX_TOKENS = 256


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class Part(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ChatRequest(_Strict):
    """POST /v1/chat/completions. OpenAI's fields, and as extra fields (vLLM's names) our own
    generation settings: top_k, min_tokens, repetition_penalty, length_penalty, num_beams."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted with their neutral values only
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    # our own, as vLLM names them
    top_k: int = Field(0, ge=-1)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    length_penalty: float = 1.0
    num_beams: int = Field(1, ge=1, le=64)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        return stops

    def generation(self, max_tokens: int) -> GenerationConfig:
        """The decoding settings. temperature 0 is greedy (or beam search with num_beams > 1); a
        request that gives no temperature samples at 1.0 as OpenAI's API does, or searches beams
        when it asks for them."""
        for name in ("frequency_penalty", "presence_penalty", "logprobs"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by this server", param=name)
        if self.n > self.num_beams > 1:
            raise ApiError(400, f"n={self.n} is more than num_beams={self.num_beams}: beam search returns at most "
                           "num_beams sequences", param="n")
        temperature = self.temperature
        if temperature is None:
            temperature = 0.0 if self.num_beams > 1 else 1.0
        settings = dict(max_new_tokens=max_tokens, num_return_sequences=self.n, num_beams=self.num_beams,
                        top_p=self.top_p, top_k=max(self.top_k, 0), seed=self.seed,
                        repetition_penalty=self.repetition_penalty, length_penalty=self.length_penalty,
                        do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0)
        if self.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens={self.min_tokens} is more than the {max_tokens} tokens asked for",
                           param="min_tokens")
        settings["min_new_tokens"] = self.min_tokens
        try:
            return GenerationConfig.make(**settings)
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e)) from None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def conversation(messages: list[Message]) -> tuple[str | None, list[dict], bool]:
    """The conversation's image URL, its messages as text ({"role", "content"} for render_chat), and
    whether it asks only for a caption (one user message with an image and no text)."""
    image, turns = None, []
    for i, m in enumerate(messages):
        texts = []
        for part in [Part(type="text", text=m.content)] if isinstance(m.content, str) else m.content or []:
            if part.type == "image_url":
                if part.image_url is None:
                    raise ApiError(400, f"messages[{i}]: an image_url part needs an image_url object",
                                   param="messages")
                if image is not None:
                    raise ApiError(400, "BLIP-2 looks at one image per conversation; this one has more",
                                   param="messages")
                image = part.image_url.url
            elif part.text is None:
                raise ApiError(400, f"messages[{i}]: a text part needs its text", param="messages")
            else:
                texts.append(part.text)
        role = "system" if m.role == "developer" else m.role
        turns.append({"role": role, "content": " ".join(texts)})
    if image is None:
        raise ApiError(400, "BLIP-2 answers about an image: give one as an image_url content part",
                       param="messages")
    caption_only = len(turns) == 1 and turns[0]["role"] == "user" and not turns[0]["content"].strip()
    return image, turns, caption_only


class TextStream:
    """One choice's text as its tokens arrive: what is safe to show (no half character, no trailing
    space that the final text will strip), cut at the first stop string."""

    def __init__(self, decode, stops: list[str], eos: list[int]):
        self.decode, self.stops, self.eos = decode, stops, eos
        self.ids: list[int] = []
        self.sent = ""
        self.finish: str | None = None  # "stop" or "length" once ended

    def add(self, token: int) -> str:
        """Take one token; the new text to send."""
        if self.finish is None:
            self.ids.append(token)
            if token in self.eos:
                self.finish = "stop"
        return self._delta(self.decode(self.ids).strip(), final=False)

    def end(self, token_ids: list[int], finished: bool) -> str:
        """The whole answer (its token ids, whether it reached the end of sequence); the text still to send."""
        self.ids = list(token_ids)
        if self.finish is None:
            self.finish = "stop" if finished else "length"
        return self._delta(self.decode(self.ids).strip(), final=True)

    def _delta(self, text: str, final: bool) -> str:
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text, self.finish, final = text[:at].rstrip(), "stop", True
        if not final:
            text = text.rstrip().removesuffix("\ufffd")
        if not text.startswith(self.sent):  # a later token changed earlier text: keep what was sent
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def text(self) -> str:
        return self.sent

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended it before the model did."""
        return self.finish == "stop" and not (self.ids and self.ids[-1] in self.eos)
