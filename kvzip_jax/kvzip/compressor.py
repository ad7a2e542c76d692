"""The KVzip workflow: prefill [system prefix | context], score by reconstruction, select, compact into the
head-wise paged cache, then answer any number of questions from it (each rolled back afterwards).

    scored = score(params, config, prompt, [context_ids])           # once per context (the expensive part)
    ctx = scored.compress(ratio=0.3)                                 # cheap; any ratio / level from one scoring
    answers = ctx.ask(params, [question_ids], max_new_tokens=64)     # as many times as you like

Batches of contexts of different lengths are rows of one batch; each row has its own budget.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvzip_jax.cache import DenseKVCache, PagedKVCache
from kvzip_jax.config import ModelConfig
from kvzip_jax.generate import (
    DEFAULT_CHUNK,
    DEFAULT_SAMPLING,
    GenerationResult,
    SamplingConfig,
    TokenStream,
    check_positions,
    check_token_ids,
    continue_generation,
    pad_prompts,
    prefill,
)
from kvzip_jax.kvzip.compact import DEFAULT_PAGE_SIZE, compact
from kvzip_jax.kvzip.prompts import (
    DEFAULT_CHUNK_SIZE,
    KVzipPrompt,
    context_ids,
    fit_chunk_size,
    question_ids,
    repeat_inputs,
)
from kvzip_jax.kvzip.question_pages import context_pages, plan_questions, working_cache
from kvzip_jax.kvzip.scoring import score_context
from kvzip_jax.kvzip.select import keep_mask
from kvzip_jax.models.decoder import forward

DEFAULT_HEADROOM = 256
CAPACITY_MULTIPLE = 256  # dense working caches are this many slots long, rounded up (fewer compiled shapes)
QUESTION_PAD = 16


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """What compression bought, per batch: bytes of K+V and the real kept fraction per row."""

    dense_kv_bytes: int  # K+V of the uncompressed [system | context] pairs (no padding, no headroom)
    compressed_kv_bytes: int  # K+V of the paged pool: kept pairs + page rounding (no decode headroom)
    kept_kv_bytes: int  # K+V of the kept pairs alone
    metadata_bytes: int  # positions, page tables, lengths
    kept_ratios: tuple[float, ...]  # real fraction of evictable context pairs kept, per row
    kept_ratio: float  # the same over the whole batch (a single context: its own)
    times: dict[str, float]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ScoredContext:
    """A prefilled dense cache with KVzip scores: compress it at any ratio and level without rescoring."""

    config: ModelConfig
    prompt: KVzipPrompt
    cache: DenseKVCache
    scores: np.ndarray  # [L, B, Hkv, n_c_max] float32
    n_ctx: tuple[int, ...]
    times: dict[str, float]
    method: str = "kvzip"
    # (scores, ratio, level, valid, layers, head_scores) -> SelectionResult; None = KVzip's `select.keep_mask`.
    selector: Callable | None = None
    chunk_size: int | None = None  # the reconstruction chunk KVzip scored with (after `fit_chunk_size`)

    @property
    def n_sys(self) -> int:
        return self.prompt.n_sys

    def evictable_layers(self) -> np.ndarray:
        """Gemma3: only full-attention layers are scored and evicted; sliding layers keep their window."""
        return ~self.config.sliding_layers

    def keep_mask(self, ratio: float, level: str = "pair", head_scores=None):
        """(selection over the context [L, B, Hkv, n_c], keep mask over the cache slots [L, B, Hkv, S_cap])."""
        c = self.config
        valid = np.arange(self.scores.shape[-1])[None, :] < np.array(self.n_ctx)[:, None]
        layers = self.evictable_layers()
        if not layers.any():
            raise ValueError("every layer of this model is a sliding-window layer: nothing for KVzip to evict")
        select = self.selector or _kvzip_selector
        selection = select(self.scores, ratio, level, valid, layers, head_scores)
        num_layers, batch, heads, capacity = self.cache.k.shape[:4]
        keep = np.zeros((num_layers, batch, heads, capacity), bool)
        keep[..., : self.n_sys] = True  # the system prefix (template + instruction) is always kept
        for b, n in enumerate(self.n_ctx):
            keep[:, b, :, self.n_sys : self.n_sys + n] = selection.mask[:, b, :, :n]
            total = self.n_sys + n
            if c.sliding_window is not None:
                # A sliding layer's future queries (positions >= total) only see positions > total - window.
                window_start = max(total - c.sliding_window + 1, 0)
                for layer in np.flatnonzero(c.sliding_layers):
                    keep[layer, b, :, :] = False
                    keep[layer, b, :, window_start:total] = True
        return selection, keep

    def compress(
        self, ratio: float, level: str = "pair", *, head_scores=None, headroom: int = DEFAULT_HEADROOM,
        page_size: int = DEFAULT_PAGE_SIZE, pad_to: tuple[int, int] | None = None,
    ) -> CompressedContext:
        """Select and compact at `ratio`. `headroom`: the most tokens one question and its answer may append
        (a limit; their pages are allocated per call). `pad_to` (see `compact.compact`) fixes the pool shape."""
        t0 = time.perf_counter()
        selection, keep = self.keep_mask(ratio, level, head_scores)
        if headroom < 1:
            raise ValueError(f"headroom must be >= 1 (tokens a question and its answer may append), got {headroom}")
        # No decode headroom in the pool: questions get their pages on demand (`question_pages`).
        paged = compact(self.cache, keep, headroom=0, page_size=page_size, pad_to=pad_to)
        jax.block_until_ready(paged.k_pages)
        times = {**self.times, "compact_s": time.perf_counter() - t0}
        itemsize = paged.k_pages.dtype.itemsize
        per_pair = 2 * self.config.head_dim * itemsize
        layers, heads = self.config.num_layers, self.config.num_kv_heads
        report = MemoryReport(
            dense_kv_bytes=int(sum(layers * heads * (self.n_sys + n) for n in self.n_ctx) * per_pair),
            compressed_kv_bytes=int(paged.nbytes()),
            kept_kv_bytes=int(keep.sum() * per_pair),
            metadata_bytes=int(paged.metadata_nbytes()),
            kept_ratios=tuple(float(r) for r in selection.kept_ratio),
            kept_ratio=float(np.average(selection.kept_ratio, weights=self.n_ctx)),
            times=times,
        )
        return CompressedContext(self.config, self.prompt, paged, np.asarray(paged.lengths),
                                 np.asarray(paged.next_position), headroom, ratio, level, report)


def _kvzip_selector(scores, ratio, level, valid, layers, head_scores):
    return keep_mask(scores, ratio, level, valid=valid, layers=layers, head_scores=head_scores)


def bucketed_capacity(slots: int, config: ModelConfig) -> int:
    """`slots` rounded up to whole CAPACITY_MULTIPLE slots (not past the model's positions, unless `slots` is):
    contexts of nearby lengths then share one compiled prefill and scoring; slots past a row's length are
    masked, so the results do not depend on the rounding."""
    rounded = -(-slots // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
    return max(min(rounded, config.max_position_embeddings), slots)


def prefill_contexts(
    params: nnx.State,
    config: ModelConfig,
    prompt: KVzipPrompt,
    contexts: Sequence[Sequence[int]],
    *,
    extra_slots: int,
    extra_positions: int = 0,
    prefill_chunk: int = DEFAULT_CHUNK,
) -> tuple[DenseKVCache, float]:
    """Dense cache holding [system prefix | context] per row, with `extra_slots` free slots after the longest
    row (for observation windows). `extra_positions`: positions that must exist after the longest row without
    slots (KVzip's repeat inputs), checked before the prefill. Returns (cache, prefill seconds)."""
    if not contexts:
        raise ValueError("no contexts given")
    rows = [context_ids(prompt, c) for c in contexts]  # raises on an empty context
    check_token_ids(np.concatenate([np.asarray(r) for r in rows]), config)
    longest = max(len(r) for r in rows)
    # P16: what follows the context needs positions too.
    check_positions(longest + max(extra_slots, extra_positions) - 1, config)
    cache = DenseKVCache.zeros(config, len(rows), bucketed_capacity(longest + extra_slots, config),
                               params["embed"][...].dtype)
    t0 = time.perf_counter()
    _, cache = prefill(params, config, rows, cache, chunk_size=prefill_chunk)
    jax.block_until_ready(cache.k)
    return cache, time.perf_counter() - t0


def score(
    params: nnx.State,
    config: ModelConfig,
    prompt: KVzipPrompt,
    contexts: Sequence[Sequence[int]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prefill_chunk: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> ScoredContext:
    """Prefill [system prefix | context] for each row and score every context pair by reconstruction.

    `chunk_size` shrinks automatically (`prompts.fit_chunk_size`) when a long context leaves too few positions
    for its repeat input; the chunk used is `ScoredContext.chunk_size`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not contexts:
        raise ValueError("no contexts given")
    longest = max(len(c) for c in contexts)
    if longest:  # an empty context is repeat_inputs' error, below
        chunk_size = fit_chunk_size(prompt, longest, config.max_position_embeddings, chunk_size)
    chunks = [repeat_inputs(prompt, c, chunk_size) for c in contexts]  # raises on an empty context
    # Scoring never writes the repeat inputs into the cache: they need positions but no slots.
    width = max(len(c.ids) for row in chunks for c in row)
    cache, prefill_s = prefill_contexts(params, config, prompt, contexts, extra_slots=0, extra_positions=width,
                                        prefill_chunk=prefill_chunk)
    t0 = time.perf_counter()
    scores, cache = score_context(params, config, cache, chunks, n_sys=prompt.n_sys, chunk_size=chunk_size,
                                  progress=progress)
    return ScoredContext(config, prompt, cache, scores, tuple(len(c) for c in contexts),
                         {"prefill_s": prefill_s, "score_s": time.perf_counter() - t0}, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _append(params, tokens, cache: PagedKVCache, n_valid, *, config: ModelConfig):
    positions = cache.next_position[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return forward(params, tokens, positions, cache, config=config, n_valid=n_valid, logits_at="last")


@dataclasses.dataclass
class CompressedContext:
    """A compressed context, ready for any number of questions.

    `cache` holds the context: its tables list only the pages of kept pairs (page rounding aside); the pool may
    also hold free pages after them, which questions borrow (`question_pages`). Each call lays out its questions
    as rows of a working cache that shares the context's full pages and writes only into private pages, so the
    context is never modified: questions are independent, and several can ask one context in one batch."""

    config: ModelConfig
    prompt: KVzipPrompt
    cache: PagedKVCache
    base_lengths: np.ndarray  # [L, B, Hkv]: kept pairs per head sequence (host copy)
    base_next_position: np.ndarray  # [B]: RoPE position after each context (host copy)
    headroom: int  # the most tokens (question + answer) one question may append; pages are allocated on demand
    ratio: float
    level: str
    report: MemoryReport

    def __post_init__(self):
        self._table = np.asarray(self.cache.page_table)
        self._first_free = context_pages(self.cache)
        self._streaming = False

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def context_cache(self) -> PagedKVCache:
        """The context alone: the pool without the free pages that questions borrowed (what `store` saves)."""
        self._check_not_streaming()
        n = max(self._first_free, 1)
        if self.cache.k_pages.shape[0] == n:
            return self.cache
        return dataclasses.replace(self.cache, k_pages=self.cache.k_pages[:n], v_pages=self.cache.v_pages[:n],
                                   pos_pages=self.cache.pos_pages[:n])

    def question_rows(self, n_questions: int, rows: Sequence[int] | None = None) -> np.ndarray:
        """The context row each of `n_questions` questions asks: `rows` as given (checked); by default one
        question per context row, or every question on the only context."""
        batch = self.batch_size
        if rows is None:
            if n_questions == batch:
                return np.arange(batch)
            if batch == 1:
                return np.zeros(n_questions, np.int64)
            raise ValueError(f"{n_questions} questions for {batch} compressed contexts: ask one question per "
                             "context row, or pass rows= (the context row of each question)")
        out = np.asarray(rows)
        if out.shape != (n_questions,) or not np.issubdtype(out.dtype, np.integer):
            raise ValueError(f"rows must hold one context row index per question ({n_questions}), got {rows!r}")
        bad = out[(out < 0) | (out >= batch)]
        if bad.size:
            raise ValueError(f"rows: context row {int(bad[0])} does not exist; this context has rows 0..{batch - 1}")
        return out

    def _check_not_streaming(self) -> None:
        if self._streaming:  # the open stream's steps donate the pool that `self.cache` points at
            raise RuntimeError("a stream from this compressed context is still open: finish it or close() it first")

    def _working_cache(self, rows: np.ndarray, slots: int) -> PagedKVCache:
        self._check_not_streaming()
        plan = plan_questions(self._table, self.base_lengths, rows, slots, page_size=self.cache.page_size,
                              first_free=self._first_free, pool_pages=int(self.cache.k_pages.shape[0]))
        return working_cache(self.cache, plan, self.base_next_position[rows])

    def decode_cache(self, slots: int, rows: Sequence[int] | None = None) -> PagedKVCache:
        """A cache for token-level decoding loops (`generate.decode_step`, `continue_generation`): one row per
        context row (or per entry of `rows`), each with room for `slots` appended tokens per head, over a copy of
        the pool, so the caller may donate it. The context itself is unchanged."""
        question_rows = self.question_rows(self.batch_size if rows is None else len(rows), rows)
        work = self._working_cache(question_rows, slots)
        self._keep_pool(work)
        return jax.tree.map(jnp.copy, work)

    def _keep_pool(self, used: PagedKVCache) -> None:
        """Take back the (donated, maybe grown) pool; the context's own pages in it were never written."""
        self.cache = dataclasses.replace(self.cache, k_pages=used.k_pages, v_pages=used.v_pages,
                                         pos_pages=used.pos_pages)

    def _start(self, params, questions, rows, max_new_tokens, stop_token_ids, raw):
        """Check every input, lay the questions out as rows of a working cache and prefill them:
        (first logits, working cache, stop ids)."""
        self._check_not_streaming()
        if not len(questions):
            raise ValueError("no questions given")
        question_rows = self.question_rows(len(questions), rows)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        turns = [list(q) if raw else question_ids(self.prompt, q) for q in questions]
        empty = [i for i, t in enumerate(turns) if not t]
        if empty:
            raise ValueError(f"question #{empty[0] + 1} has no tokens")
        tokens, lengths = pad_prompts(turns, multiple=QUESTION_PAD)  # fewer distinct shapes, fewer compiles
        check_token_ids(tokens, self.config)
        needed = int(lengths.max()) + max_new_tokens - 1
        if needed > self.headroom:
            raise ValueError(f"a question of {int(lengths.max())} tokens + max_new_tokens={max_new_tokens} needs "
                             f"{needed} slots per head but the decode headroom is {self.headroom}")
        check_positions(int(self.base_next_position[question_rows].max()) + needed - 1, self.config)
        stops = tuple(self.config.eos_token_ids) if stop_token_ids is None else tuple(stop_token_ids)
        check_token_ids(np.array(stops, np.int64), self.config, "stop token id")
        work = self._working_cache(question_rows, needed)
        logits, work = _append(params, jnp.asarray(tokens), work, jnp.asarray(lengths), config=self.config)
        return logits, work, stops

    def ask(
        self,
        params: nnx.State,
        questions: Sequence[Sequence[int]],
        *,
        rows: Sequence[int] | None = None,
        max_new_tokens: int = 64,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        stop_token_ids: Sequence[int] | None = None,
        seed: int = 0,
        raw: bool = False,
    ) -> GenerationResult:
        """Answer questions (token ids) in one batched decode: by default one per context row, or any number
        on a single context; `rows[i]` names the context row question i asks. Without `raw`, each is wrapped
        as the official query turn (question ‖ template postfix). The context is left as it was."""
        logits, work, stops = self._start(params, questions, rows, max_new_tokens, stop_token_ids, raw)
        result = continue_generation(params, self.config, logits, work, max_new_tokens=max_new_tokens,
                                     sampling=sampling, stop_token_ids=stops, seed=seed)
        self._keep_pool(result.cache)
        return dataclasses.replace(result, cache=self.cache)

    def stream(
        self,
        params: nnx.State,
        question: Sequence[int],
        *,
        row: int = 0,
        max_new_tokens: int = 64,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        stop_token_ids: Sequence[int] | None = None,
        seed: int = 0,
        raw: bool = False,
    ) -> Iterator[int]:
        """One question on context row `row`, its answer token by token as it is generated (the same tokens as
        `ask`; the stop token, when reached, is the last one). Until the iterator is exhausted or closed, the
        context cannot be asked again."""
        logits, work, stops = self._start(params, [question], [row], max_new_tokens, stop_token_ids, raw)
        steps = TokenStream(params, self.config, logits, work, max_new_tokens=max_new_tokens, sampling=sampling,
                            stop_token_ids=stops, seed=seed)
        self._keep_pool(work)  # valid until the first step donates it; the stream gives the pool back at its end
        self._streaming = True
        return _AnswerStream(self, steps)

    def logits(self, params: nnx.State, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits [B, T, V] of appending `tokens` (equal lengths, one row per context) to the compressed
        context; the context is left as it was."""
        toks = jnp.asarray(np.asarray(tokens, np.int32))
        check_token_ids(np.asarray(toks), self.config)
        if toks.shape[1] > self.headroom:
            raise ValueError(f"{toks.shape[1]} tokens exceed the decode headroom of {self.headroom}")
        rows = self.question_rows(toks.shape[0])
        work = self._working_cache(rows, toks.shape[1])
        positions = work.next_position[:, None] + jnp.arange(toks.shape[1], dtype=jnp.int32)[None, :]
        out, work = _logits_all(params, toks, positions, work, config=self.config)
        self._keep_pool(work)
        return np.asarray(out)


class _AnswerStream:
    """The tokens of one streamed answer (`CompressedContext.stream`). Gives the pool back to its context when
    exhausted, closed, or dropped, started or not."""

    def __init__(self, context: CompressedContext, steps: TokenStream):
        self._context, self._steps, self._open = context, steps, True

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if not self._open:
            raise StopIteration
        try:
            step = next(self._steps)
        except BaseException:  # StopIteration included: the answer is complete
            self.close()
            raise
        if step[0] is None:
            self.close()
            raise StopIteration
        return step[0]

    def close(self) -> None:
        if self._open:
            self._open = False
            self._context._keep_pool(self._steps.cache)
            self._context._streaming = False

    def __del__(self):
        self.close()


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _logits_all(params, tokens, positions, cache, *, config):
    return forward(params, tokens, positions, cache, config=config)


def compress(
    params: nnx.State,
    config: ModelConfig,
    prompt: KVzipPrompt,
    contexts: Sequence[Sequence[int]],
    *,
    ratio: float = 0.3,
    level: str = "pair",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    headroom: int = DEFAULT_HEADROOM,
    page_size: int = DEFAULT_PAGE_SIZE,
    head_scores=None,
    progress: bool = True,
) -> CompressedContext:
    """score + compress in one call."""
    scored = score(params, config, prompt, contexts, chunk_size=chunk_size, progress=progress)
    return scored.compress(ratio, level, head_scores=head_scores, headroom=headroom, page_size=page_size)

