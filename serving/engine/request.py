"""A request inside the engine: what the client asked for, where its KV lives, what it has produced so far."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import numpy as np

from kvzip_jax.models.llava import MODALITY_IDS
from kvzip_jax.preprocess.hashing import content_hash
from serving.engine.detokenize import Detokenizer
from serving.engine.pages import SequenceKV
from serving.engine.sampling import SamplingParams
from serving.model import Group, Modality


class Phase(enum.IntEnum):
    QUEUED = 0  # waiting for an encode, prefill or coupled instance
    PREFILL = 1  # its prompt is being prefilled, chunk by chunk
    WAIT_DECODE = 2  # prefilled; waits for a decode instance with room (it still holds its prefill pages)
    MIGRATING = 3  # its KV is on its way to a decode instance
    DECODE = 4  # in a decode batch
    DONE = 5
    ENCODING = 6  # its images / sounds are being encoded on an encode instance (or a prefill instance lent to encode)


@dataclasses.dataclass(frozen=True, eq=False)
class MediaInput:
    """One image or sound of a request: the encoder's preprocessed input and its content hash (the embedding cache's
    key, `kvzip_jax.preprocess.content_hash`). `v_tokens` is set by the engine: the encoder's tokens per item."""

    hash: str
    values: np.ndarray
    modality: str = "image"
    v_tokens: int = 0

    @classmethod
    def from_item(cls, modality, item) -> MediaInput:
        """An item as a user gives it (a picture, a waveform, or a preprocessed float array), through the model's
        processor (`kvzip_jax.multimodal_lm.Modality.prepare`), keyed by the content hash of what the encoder gets."""
        values = np.ascontiguousarray(modality.prepare(item), np.float32)
        return cls(content_hash(values, {"modality": modality.name}), values, modality.name)


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
    media: tuple[MediaInput, ...] = ()  # its images and sounds, in prompt order
    media_starts: tuple[int, ...] = ()  # where each item's placeholder run starts in the prompt
    embeds: dict = dataclasses.field(default_factory=dict)  # content hash -> its embeddings [v_tokens, hidden]
    key_mask: np.ndarray | None = None  # MokA: bool [len(prompt)], the question tokens non-text tokens attend to
    cache_holds: list = dataclasses.field(default_factory=list)  # embedding-cache entries it pins until prefilled
    block_keys: list | None = None  # hash-chain keys of its full prompt blocks (the prefix cache's), once computed
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
    def images(self) -> tuple[MediaInput, ...]:  # the policies' name: they plan with every item's v_tokens
        return self.media

    @property
    def todo_imgs(self) -> list[MediaInput]:  # the policies' name (ElasticMM sizes the encode queue's work)
        return self.todo_media

    @property
    def moka(self) -> bool:
        """Prefilled through the MokA adapters: a request with images or sounds on a MokA engine."""
        return self.key_mask is not None

    @property
    def todo_media(self) -> list[MediaInput]:
        """Its items whose embeddings it does not hold yet, each content once."""
        seen: dict[str, MediaInput] = {}
        for im in self.media:
            if im.hash not in self.embeds:
                seen.setdefault(im.hash, im)
        return list(seen.values())

    def chunk_embeddings(self, start: int, n: int, hidden: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Input embeddings [n, hidden] and their mask [n] for prefill positions start..start+n-1 where the
        placeholders sit (the rest come from the token embedding table); None when no item is there."""
        embeds = mask = None
        for im, at in zip(self.media, self.media_starts, strict=True):
            lo, hi = max(start, at), min(start + n, at + im.v_tokens)
            if lo >= hi:
                continue
            if embeds is None:
                embeds, mask = np.zeros((n, hidden), np.float32), np.zeros(n, bool)
            embeds[lo - start:hi - start] = self.embeds[im.hash][lo - at:hi - at]
            mask[lo - start:hi - start] = True
        return None if embeds is None else (embeds, mask)

    def chunk_moka(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """MokA's per-token inputs for prefill positions start..start+n-1: modality ids [n] (`MODALITY_IDS`; tokens
        generated before a restart are text) and the question-key mask [n]."""
        ids = np.full(n, MODALITY_IDS["text"], np.int8)
        for im, at in zip(self.media, self.media_starts, strict=True):
            lo, hi = max(start, at), min(start + n, at + im.v_tokens)
            if lo < hi:
                ids[lo - start:hi - start] = MODALITY_IDS[im.modality]
        keys = np.zeros(n, bool)
        mine = self.key_mask[start:start + n]
        keys[:len(mine)] = mine
        return ids, keys

    @property
    def input_len(self) -> int:  # the policies' name for the prompt length
        return len(self.prompt)

    @property
    def output_len(self) -> int:  # the policies plan with the most a request may produce
        return self.sampling.max_tokens
