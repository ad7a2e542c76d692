"""The request bodies of the OpenAI-compatible API (pydantic), and their translation to engine sampling params.

Unknown fields are ignored, as OpenAI's own server does for fields a model does not use; fields we cannot honour
(n > 1, logprobs, tools) are refused with a clear 400 rather than silently dropped.
"""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.engine.sampling import MAX_SEED, MAX_TOP_K, SamplingParams

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 8


class RequestError(ValueError):
    """A request we refuse: (HTTP status, message, the parameter at fault)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class InputAudio(BaseModel):
    data: str  # base64
    format: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url", "input_audio"]
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K)  # an extension (vLLM has it too); 0 = off
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # an extension (vLLM has it too): generate max_tokens tokens whatever comes
    context_id: str | None = None  # an extension: start from a KVzip context uploaded to /v1/contexts

    def sampling(self, prompt_len: int, max_model_len: int, max_tokens: int | None = None) -> SamplingParams:
        if self.n != 1:
            raise RequestError(f"n = {self.n}: this server returns one choice per request (n = 1)", param="n")
        if self.logprobs:
            raise RequestError("logprobs are not supported by this server", param="logprobs")
        room = max_model_len - prompt_len
        if room < 1:
            raise RequestError(f"the prompt has {prompt_len} tokens; this model's context is {max_model_len} tokens",
                               param="messages")
        requested = max_tokens if max_tokens is not None else self.max_tokens
        if requested is not None and requested > room:
            raise RequestError(f"max_tokens = {requested} is too large: the prompt has {prompt_len} tokens and the "
                               f"context is {max_model_len}, so at most {room} tokens can be generated",
                               param="max_tokens")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise RequestError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings, got {list(stop)!r}",
                               param="stop")
        return SamplingParams(
            max_tokens=requested if requested is not None else min(DEFAULT_MAX_TOKENS, room),
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed if self.seed is not None else secrets.randbelow(MAX_SEED), stop=stop,
            ignore_eos=self.ignore_eos,
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None


class ContextCreateRequest(BaseModel):
    """POST /v1/contexts: a long context to compress once with KVzip and serve by id."""

    model_config = ConfigDict(extra="ignore")
    model: str
    text: str | None = None
    token_ids: list[int] | None = None
    ratio: float = Field(default=0.3, gt=0.0, le=1.0)
    level: Literal["pair", "pair-uniform", "head"] = "pair"
