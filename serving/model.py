"""Data model shared by the scheduler policies and the discrete-event simulator.

Pure Python: the same objects will later be driven by the JAX engine, so nothing here knows about time
advancing or about how a stage is executed; it only records who owns what.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class Modality(enum.IntEnum):
    TEXT = 0
    MM = 1


class Group(enum.IntEnum):
    """Modality group an instance serves. ANY is used by policies without modality groups."""

    TEXT = 0
    MM = 1
    ANY = 2


class Stage(enum.IntEnum):
    ENCODE = 0
    PREFILL = 1
    DECODE = 2
    COUPLED = 3  # encode + prefill + decode on one instance (vLLM-like)


class InstState(enum.IntEnum):
    ACTIVE = 0  # serving its stage
    DRAINING = 1  # finishing its current batch before a role switch
    SWITCHING = 2  # migrating its KV out / swapping executables; serves nothing
    FAILED = 3  # (the engine) a step failed on its device: it serves nothing again; its requests moved on


class ReqState(enum.IntEnum):
    QUEUED_PREPROC = 0
    PREPROC = 1
    QUEUED_E = 2
    ENCODING = 3
    QUEUED_P = 4
    PREFILL = 5
    QUEUED_D = 6
    DECODING = 7
    MIGRATING = 8
    DONE = 9


# Order in which per-stage timestamps must be non-decreasing (causality invariant, spec 6.1.4).
STAMP_ORDER = ("t_arrival", "t_enc_start", "t_enc_end", "t_pre_start", "t_pre_end", "t_first", "t_done")


@dataclass(slots=True)
class Image:
    hash: int  # content hash (after the fixed preprocessing parameters)
    pixels: int
    v_tokens: int  # vision tokens after the 2x2 merge


@dataclass(slots=True, eq=False)
class Request:
    rid: int
    modality: Modality
    t_arrival: float
    text_tokens: int  # text prompt tokens, including the shared system prompt
    output_len: int  # tokens to generate (the first one comes from prefill)
    images: tuple = ()  # tuple[Image, ...]
    sys_prompt: int = 0  # which shared system prompt opens the sequence
    sys_len: int = 0  # its length in tokens (part of text_tokens)
    state: ReqState = ReqState.QUEUED_PREPROC
    group: Group = Group.ANY
    # timestamps of every stage (None = stage not executed, e.g. skipped on a cache hit)
    t_enc_start: float | None = None
    t_enc_end: float | None = None
    t_pre_start: float | None = None
    t_pre_end: float | None = None
    t_first: float | None = None
    t_done: float | None = None
    # bookkeeping used by the simulator
    cached_tokens: int = 0  # prefix tokens whose KV was reused
    enc_hits: int = 0  # images whose embeddings were reused
    kv_owner: int = -1  # instance id that owns this request's KV blocks (-1: none)
    kv_blocks: int = 0
    join_iter: int = 0  # decode iteration counter of its instance at join time
    tokens_left: int = 0  # decode tokens still to produce at join time
    migrations: int = 0
    cache_keys: tuple = ()  # prefix-cache block keys held (referenced) during prefill
    emb_keys: tuple = ()  # embedding-cache keys held between encode and prefill
    todo_imgs: tuple = ()  # images that missed the embedding cache and must be preprocessed + encoded
    produced: int = 0  # tokens generated so far (set when leaving a decode batch)
    prefix_keys: list = field(default_factory=list)  # block keys of its shareable prefix

    v_tokens: int = 0  # vision tokens over all images (derived)
    input_len: int = 0  # tokens of the unified sequence (text + vision placeholders) prefill must cover

    def __post_init__(self):
        if self.output_len < 1 or self.text_tokens < 1:
            raise ValueError(f"request {self.rid}: output_len={self.output_len} and text_tokens="
                             f"{self.text_tokens} must be >= 1")
        self.v_tokens = sum(im.v_tokens for im in self.images)
        self.input_len = self.text_tokens + self.v_tokens


@dataclass(slots=True, eq=False)
class Instance:
    """One model replica on its own device set. The unit that policies reassign."""

    iid: int
    group: Group
    stage: Stage
    kv_total: int  # KV blocks in its pool
    kv_used: int = 0
    state: InstState = InstState.ACTIVE
    busy_until: float = 0.0  # end of the batch in flight (== now when idle)
    busy: bool = False
    last_switch: float = -math.inf
    switches: int = 0
    # decode state (continuous batching)
    running: dict = field(default_factory=dict)  # rid -> Request (decode batch or coupled running set)
    finish_heap: list = field(default_factory=list)  # (finish_iter, rid)
    iters: int = 0
    sum_ctx: int = 0  # sum of context lengths of the running batch at the *start* of the next iteration
    pending_target: tuple | None = None  # (group, stage) to take after draining
    # for coupled instances: their own waiting queue
    local_queue: object = None
    # utilisation accounting: busy seconds per stage
    busy_time: float = 0.0
    # batch in flight (encode / prefill): list of requests
    batch: list = field(default_factory=list)
    epoch: int = 0  # invalidates stale completion events after a switch
    pending: object = None  # deque of requests handed to this decode instance, joining at the next step
    role_since: float = 0.0
    incoming: int = 0  # KV blocks reserved by migrations in flight towards this instance
    step_start: float = 0.0
    inv_out: float = 0.0  # sum of 1/output_len over the running batch (O(1) gain-cost sums)
    prog: float = 0.0  # sum of (produced_at_join - join_iter)/output_len over the running batch

    @property
    def kv_free(self) -> int:
        return self.kv_total - self.kv_used


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)
