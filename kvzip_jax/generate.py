"""Prefill, the single-token decode step, sampling and the jitted generation loop.

Every host-facing function checks its inputs before anything is traced (token ids, capacity, positions); the
jitted pieces assume valid inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import ModelConfig
from kvzip_jax.models.decoder import forward

DEFAULT_CHUNK = 512
PREFILL_WIDTH_MULTIPLE = 128  # balanced prefill chunks are rounded up to this (powers of two below it)


def balanced_chunk(length: int, chunk_size: int) -> int:
    """The prefill chunk for `length` tokens: as many chunks as `chunk_size` needs, but of equal width, rounded up
    to a few compiled shapes; 1,043 tokens take 3 x 384 slots of compute instead of 3 x 512."""
    pieces = -(-length // chunk_size)
    per = -(-length // pieces)
    width = PREFILL_WIDTH_MULTIPLE
    if per < width:
        width = 1 << (per - 1).bit_length()  # short prompts: the next power of two, not a 128-token pad
    return min(chunk_size, -(-per // width) * width)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


DEFAULT_SAMPLING = SamplingConfig()  # greedy; frozen, so one shared instance is a safe argument default


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, stop token included, nothing after it
    finished: list[bool]  # True where a stop token ended the row (False: max_new_tokens reached)
    cache: DenseKVCache


# ------------------------------------------------------------------ input checks (host side)
def check_token_ids(tokens: np.ndarray, config: ModelConfig, what: str = "token id") -> None:
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= config.vocab_size:
        raise ValueError(f"{what} {hi} is out of range: the vocabulary size is {config.vocab_size}")
    if lo < 0:
        raise ValueError(f"{what} {lo} is negative")


def check_positions(max_position: int, config: ModelConfig) -> None:
    if max_position >= config.max_position_embeddings:
        raise ValueError(
            f"position {max_position} is beyond max_position_embeddings ({config.max_position_embeddings})"
        )


def check_capacity(needed: int, capacity: int, what: str) -> None:
    if needed > capacity:
        raise ValueError(f"{what} needs {needed} cache slots but the cache capacity is {capacity}")


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged prompts: (tokens [B, T] int32, lengths [B] int32); T rounded up to `multiple`."""
    if not prompts:
        raise ValueError("no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise ValueError(f"prompt {int(lengths.argmin())} is empty")
    width = -(-int(lengths.max()) // multiple) * multiple
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


# ------------------------------------------------------------------ jitted pieces
@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _prefill_chunk(params, tokens, cache, n_valid, *, config: ModelConfig):
    positions = cache.length[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return forward(params, tokens, positions, cache, config=config, n_valid=n_valid, logits_at="last")


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def decode_step(params: nnx.State, tokens: jax.Array, cache: DenseKVCache, *, config: ModelConfig):
    """One token per row: tokens [B] -> (logits [B, V], cache). The cache is donated (updated in place).
    Works on the dense and on the compressed paged cache."""
    positions = cache.next_positions()[:, None]
    return forward(params, tokens[:, None], positions, cache, config=config, logits_at="last")


def prefill(
    params: nnx.State,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    cache: DenseKVCache,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[jax.Array, DenseKVCache]:
    """Append ragged prompts to `cache` in chunks of `chunk_size` tokens (one compiled shape per chunk size).

    Returns the logits [B, V] at each row's last prompt token, and the cache (donated and returned).
    """
    tokens, lengths = pad_prompts(prompts)
    check_token_ids(tokens, config)
    return _prefill_rows(params, config, tokens, lengths, cache, chunk_size)


def prefill_embeddings(
    params: nnx.State,
    config: ModelConfig,
    embeddings: jax.Array,
    lengths: Sequence[int],
    cache: DenseKVCache,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[jax.Array, DenseKVCache]:
    """`prefill` from input embeddings [B, T, H] instead of token ids: the path a multimodal prompt takes once its
    image or audio features are spliced into the text embeddings. Row b's first `lengths[b]` entries count (right
    padding). Returns the logits [B, V] at each row's last entry, and the cache (donated and returned)."""
    lengths = np.asarray(lengths, np.int64)
    if embeddings.ndim != 3 or embeddings.shape[2] != config.hidden_size:
        raise ValueError(f"embeddings must be [batch, length, {config.hidden_size}], got {tuple(embeddings.shape)}")
    if lengths.shape != (embeddings.shape[0],) or (lengths < 1).any() or (lengths > embeddings.shape[1]).any():
        raise ValueError(f"lengths {lengths.tolist()} must give each of the {embeddings.shape[0]} rows 1.."
                         f"{embeddings.shape[1]} entries")
    return _prefill_rows(params, config, embeddings, lengths, cache, chunk_size)


def _prefill_rows(params, config: ModelConfig, inputs, lengths: np.ndarray, cache: DenseKVCache, chunk_size: int):
    """Append right-padded rows (token ids [B, T] or embeddings [B, T, H]) to the cache in balanced chunks."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    start = np.asarray(jax.device_get(cache.length))
    if len(lengths) != cache.batch_size:
        raise ValueError(f"{len(lengths)} prompts for a cache of batch size {cache.batch_size}")
    check_capacity(int((start + lengths).max()), cache.capacity, "the prompt")
    check_positions(int((start + lengths).max()) - 1, config)
    chunk = balanced_chunk(inputs.shape[1], chunk_size)
    pad = [(0, 0), (0, -inputs.shape[1] % chunk)] + [(0, 0)] * (inputs.ndim - 2)
    inputs = np.pad(inputs, pad) if isinstance(inputs, np.ndarray) else jnp.pad(inputs, pad)
    last_logits = None
    for begin in range(0, inputs.shape[1], chunk):
        n_valid = np.clip(lengths - begin, 0, chunk).astype(np.int32)
        logits, cache = _prefill_chunk(
            params, jnp.asarray(inputs[:, begin : begin + chunk]), cache, jnp.asarray(n_valid), config=config
        )
        has_end = jnp.asarray((n_valid > 0)[:, None])
        last_logits = logits if last_logits is None else jnp.where(has_end, logits, last_logits)
    return last_logits, cache


def sample(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits [B, V] -> token ids [B]. Filters apply in the order temperature, top-k, top-p (as transformers)."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        drop_sorted = mass_before >= sampling.top_p  # the most likely token always stays
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg_inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _is_stop(tok, stop_ids):
    return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)


def _step(params, tok, cache, done, key, pad_id, *, config, sampling):
    """Feed each row's last token, sample the next one. Finished rows ride along but do not advance their cache."""
    positions = cache.next_positions()[:, None]
    logits, cache = forward(
        params, tok[:, None], positions, cache, config=config, n_valid=(~done).astype(jnp.int32), logits_at="last",
    )
    key, sub = jax.random.split(key)
    return jnp.where(done, pad_id, sample(logits, sub, sampling)), cache, key


@functools.partial(
    jax.jit, static_argnames=("config", "sampling", "max_new_tokens"), donate_argnames=("cache",)
)
def _generation_loop(params, first_logits, cache, key, stop_ids, pad_id, *, config, sampling, max_new_tokens):
    batch = first_logits.shape[0]
    key, sub = jax.random.split(key)
    tok = sample(first_logits, sub, sampling)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = _is_stop(tok, stop_ids)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tok, cache, done, out, key = state
        new, cache, key = _step(params, tok, cache, done, key, pad_id, config=config, sampling=sampling)
        out = out.at[:, step].set(new)
        return step + 1, new, cache, done | _is_stop(new, stop_ids), out, key

    state = (jnp.int32(1), tok, cache, done, out, key)
    steps, _, cache, done, out, _ = jax.lax.while_loop(cond, body, state)
    # The last sampled token of each unfinished row is not in the cache yet: generation stops after sampling.
    return out, done, steps, cache


@functools.partial(jax.jit, static_argnames=("sampling",))
def _first_token(first_logits, key, stop_ids, *, sampling):
    key, sub = jax.random.split(key)
    tok = sample(first_logits, sub, sampling)
    return tok, _is_stop(tok, stop_ids), key


@functools.partial(jax.jit, static_argnames=("config", "sampling"), donate_argnames=("cache",))
def _stream_step(params, tok, cache, done, key, stop_ids, pad_id, *, config, sampling):
    new, cache, key = _step(params, tok, cache, done, key, pad_id, config=config, sampling=sampling)
    return new, cache, done | _is_stop(new, stop_ids), key


class TokenStream:
    """Iterator over generated tokens, one step at a time: each item is the new token of every row (a list of
    ints; None for a row that had already finished). The same tokens, step for step and with the same random
    keys, as `continue_generation`'s jitted loop; one dispatch per token instead of one per answer.

    `cache` is the cache after the last step (donated into every step; read it once iteration ends)."""

    def __init__(self, params, config: ModelConfig, logits, cache, *, max_new_tokens: int, sampling: SamplingConfig,
                 stop_token_ids: Sequence[int], seed: int = 0):
        self._params, self._config, self._sampling = params, config, sampling
        self._stops = jnp.asarray(np.array(tuple(stop_token_ids) or (-1,), np.int32))
        self._pad = jnp.int32(config.pad_token_id if config.pad_token_id is not None else 0)
        self._logits, self.cache, self._max = logits, cache, max_new_tokens
        self._key = jax.random.key(seed)
        self._step, self._tok, self._done = 0, None, None

    def __iter__(self):
        return self

    def __next__(self) -> list[int | None]:
        if self._step >= self._max or (self._done is not None and bool(np.all(np.asarray(self._done)))):
            raise StopIteration
        was_done = None if self._done is None else np.asarray(self._done)
        if self._step == 0:
            self._tok, self._done, self._key = _first_token(self._logits, self._key, self._stops,
                                                            sampling=self._sampling)
        else:
            self._tok, self.cache, self._done, self._key = _stream_step(
                self._params, self._tok, self.cache, self._done, self._key, self._stops, self._pad,
                config=self._config, sampling=self._sampling)
        self._step += 1
        tokens = np.asarray(self._tok)
        return [None if was_done is not None and was_done[i] else int(t) for i, t in enumerate(tokens)]


def stream_text(tokenizer, tokens) -> Iterator[str]:
    """Incremental detokenization of one row's tokens: yields the text each new token adds (nothing while a
    multi-byte character is incomplete); the pieces join to ``tokenizer.decode(all tokens)``."""
    ids: list[int] = []
    emitted = ""
    for t in tokens:
        ids.append(t)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            continue  # an incomplete UTF-8 sequence, or a merge that rewrote the tail: wait for more tokens
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text != emitted:
        if not text.startswith(emitted):  # pragma: no cover - tokenizers whose decode is not prefix-stable
            raise RuntimeError("the tokenizer's decoding changed text it had already streamed")
        yield text[len(emitted):]


def generate(
    params: nnx.State,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    stop_token_ids: Sequence[int] | None = None,
    capacity: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    seed: int = 0,
    cache_dtype=None,
    stream: bool = False,
) -> GenerationResult | TokenStream:
    """Generate for a batch of ragged prompts (token id lists). Stops at EOS or any stop token per row.
    `stream=True` returns a `TokenStream` (the new tokens step by step) after the prefill."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens, lengths = pad_prompts(prompts)
    check_token_ids(tokens, config)
    stops = tuple(config.eos_token_ids) if stop_token_ids is None else tuple(stop_token_ids)
    check_token_ids(np.array(stops, np.int64), config, "stop token id")
    # The last sampled token is returned, never fed back, so it takes no cache slot and no position.
    needed = int(lengths.max()) + max_new_tokens - 1
    capacity = capacity or needed
    check_capacity(needed, capacity, f"a prompt of {int(lengths.max())} tokens + max_new_tokens={max_new_tokens}")
    check_positions(needed - 1, config)
    dtype = cache_dtype or params["embed"][...].dtype
    cache = DenseKVCache.zeros(config, len(prompts), capacity, dtype)
    logits, cache = prefill(params, config, prompts, cache, chunk_size=chunk_size)
    if stream:
        return TokenStream(params, config, logits, cache, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_token_ids=stops, seed=seed)
    return continue_generation(params, config, logits, cache, max_new_tokens=max_new_tokens, sampling=sampling,
                               stop_token_ids=stops, seed=seed)


def continue_generation(
    params: nnx.State,
    config: ModelConfig,
    logits: jax.Array,
    cache,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    stop_token_ids: Sequence[int],
    seed: int = 0,
) -> GenerationResult:
    """Sample from `logits` [B, V] (the last prompt token's) and run the jitted loop on a prefilled cache
    (dense or paged; donated). Callers have checked capacity and positions."""
    stops = tuple(stop_token_ids)
    stop_arr = jnp.asarray(np.array(stops or (-1,), np.int32))
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    out, done, steps, cache = _generation_loop(
        params, logits, cache, jax.random.key(seed), stop_arr, jnp.int32(pad_id),
        config=config, sampling=sampling, max_new_tokens=max_new_tokens,
    )
    out, done, steps = np.asarray(out), np.asarray(done), int(steps)
    result = []
    for row in out[:, :steps]:
        stop_at = next((i for i, t in enumerate(row) if int(t) in stops), None)
        result.append([int(t) for t in (row if stop_at is None else row[: stop_at + 1])])
    return GenerationResult(tokens=result, finished=[bool(d) for d in done], cache=cache)
