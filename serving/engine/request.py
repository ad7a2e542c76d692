"""A request inside the engine: what the client asked for, where its KV lives, what it has produced so far."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from serving.engine.detokenize import Detokenizer
from serving.engine.pages import SequenceKV
from serving.engine.sampling import SamplingParams
from serving.model import Group, Modality


class Phase(enum.IntEnum):
    QUEUED = 0  # waiting for a prefill (or coupled) instance
    PREFILL = 1  # its prompt is being prefilled, chunk by chunk
    WAIT_DECODE = 2  # prefilled; waits for a decode instance with room (it still holds its prefill pages)
    MIGRATING = 3  # its KV is on its way to a decode instance
    DECODE = 4  # in a decode batch
    DONE = 5


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One update sent to the request's sink: the new tokens and text, and at the end why it finished."""

    rid: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass(eq=False)
class EngineRequest:
    rid: int
    prompt: list[int]
    sampling: SamplingParams
    sink: Callable[[RequestOutput], None]
    stop_ids: frozenset[int]
    detok: Detokenizer | None
    modality: Modality = Modality.TEXT
    group: Group = Group.ANY
    phase: Phase = Phase.QUEUED
    prefilled: int = 0  # prompt tokens whose KV is in the pages
    kv: SequenceKV | None = None
    owner: int = -1  # instance whose pool holds `kv`
    output: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    migrations: int = 0
    images: tuple = ()  # (text requests so far; the policies read it)
    context: str | None = None  # a served KVzip context it starts from (its prompt is then the question turn)
    copies: tuple | None = None  # (source pages, destination pages) to copy before its first prefill chunk
    restarts: int = 0  # times its instance failed under it (its KV was recomputed elsewhere)
    t_arrival: float = 0.0  # engine clock (seconds since the engine started), the policies' `now`
    t_first: float | None = None
    t_done: float | None = None

    @property
    def produced(self) -> int:
        return len(self.output)

    @property
    def prefill_ids(self) -> list[int]:
        """What prefill must cover: the prompt, and after a restart also every token generated so far (their KV
        was lost with the failed instance; recomputing it gives the next token exactly as decode would)."""
        return self.prompt + self.output

    @property
    def input_len(self) -> int:  # the policies' name for the prompt length
        return len(self.prompt)

    @property
    def output_len(self) -> int:  # the policies plan with the most a request may produce
        return self.sampling.max_tokens
