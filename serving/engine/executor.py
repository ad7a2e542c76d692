"""One instance's device side: its weights and paged KV pool on its own device (or its own submesh), and the jitted
stage steps.

Tensor parallelism: an instance of k devices holds its weights sharded over a ("data", "model") mesh of those
devices by the library's logical-axis rules (`kvzip_jax.sharding`: heads, KV heads, MLP and vocab over "model"),
and the jitted steps are partitioned by XLA (GSPMD). Its KV pool is replicated over the k devices: a page holds
one (layer, KV head) run and the page table maps heads to pages freely, so the pool cannot be split by head
without a pool per shard (the weights' memory is divided by k, the KV's is not).

Only the instance's worker thread calls an executor, so the pool arrays (donated to every step, updated in
place) have one owner. Shapes come from a few buckets (table width, prefill chunk) so that every executable can
be compiled before the first request (`warmup`), and a role switch never compiles on the critical path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from kvzip_jax.cache import PagedKVCache
from kvzip_jax.config import ModelConfig
from kvzip_jax.models.decoder import embed, forward
from kvzip_jax.models.llava import PAD, TEXT
from kvzip_jax.sharding import make_mesh, shard_params
from moka_jax.context import make_context
from moka_jax.model import MOKA_LOGICAL_AXES
from moka_jax.model import forward as moka_forward
from serving.engine.pages import SequenceKV
from serving.engine.request import MediaInput
from serving.engine.sampling import RowSampling, SamplingParams, sample_rows


def pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


MIN_MOVE_PAGES = 16  # the smallest bucket of pages moved by one migration or copy


@dataclasses.dataclass(frozen=True)
class ExecutorShape:
    """Static sizes of an instance: they fix the executables it compiles."""

    num_pages: int
    page_size: int
    decode_rows: int  # continuous-batching slots
    decode_steps: int  # decode steps per dispatch
    prefill_rows: int  # requests per prefill step
    prefill_chunk: int  # prompt tokens per request per prefill step (chunked prefill)
    max_table_width: int  # pages per head sequence: ceil(max sequence length / page_size)
    min_table_width: int = 8
    min_prefill_width: int = 16
    encode_items: int = 0  # images and sounds per encode step (0: the model takes neither)

    def encode_buckets(self) -> list[int]:
        return sorted({pow2_at_least(n, 1) for n in range(1, self.encode_items + 1)})

    def table_buckets(self) -> list[int]:
        out, w = [], pow2_at_least(1, self.min_table_width)
        while w < self.max_table_width:
            out.append(w)
            w *= 4
        return [*out, pow2_at_least(self.max_table_width, self.min_table_width)]

    def table_width(self, needed: int) -> int:
        return next(w for w in self.table_buckets() if w >= needed)

    def prefill_buckets(self) -> list[int]:
        out, w = [], self.min_prefill_width
        while w < self.prefill_chunk:
            out.append(w)
            w *= 4
        return [*out, self.prefill_chunk]

    def prefill_width(self, needed: int) -> int:
        return next(w for w in self.prefill_buckets() if w >= needed)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(1,))
def _prefill_step(params, pool, tokens, positions, n_valid, table, num_pages, lengths, sampling, mm=None, *, config):
    k_pages, v_pages, pos_pages = pool
    cache = PagedKVCache(k_pages, v_pages, pos_pages, table, num_pages, lengths, positions[:, 0])
    inputs = tokens
    if mm is not None:
        inputs = _splice(params, tokens, mm, config)
    logits, cache = forward(params, inputs, positions, cache, config=config, n_valid=n_valid, logits_at="last")
    # the first generated token sits right after the last prompt token
    first = sample_rows(logits, sampling, positions[:, 0] + n_valid)
    return (cache.k_pages, cache.v_pages, cache.pos_pages), first


def _splice(params, tokens, mm, config):
    """(embeddings [B, T, H], mask [B, T]): encoder outputs where the placeholders sit, token embeddings elsewhere."""
    text = embed(params, tokens, config=config)
    return jnp.where(mm[1][..., None], mm[0].astype(text.dtype), text)


@functools.partial(jax.jit, static_argnames=("config", "moka"), donate_argnums=(2,))
def _moka_prefill_step(params, adapted, pool, tokens, positions, n_valid, table, num_pages, lengths, sampling, mm,
                       context, *, config, moka):
    """`_prefill_step` through the MokA-adapted decoder (`adapted`): per-token modality slots and the question keys
    in `context` (a `moka_jax.context.MokAContext` over this step's [B, T])."""
    cache = PagedKVCache(*pool, table, num_pages, lengths, positions[:, 0])
    logits, cache = moka_forward(adapted, _splice(params, tokens, mm, config), positions, cache, config=config,
                                 moka=moka, context=context, n_valid=n_valid, logits_at="last")
    first = sample_rows(logits, sampling, positions[:, 0] + n_valid)
    return (cache.k_pages, cache.v_pages, cache.pos_pages), first


@functools.partial(jax.jit, static_argnames=("config", "steps"), donate_argnums=(1,))
def _decode_steps(params, pool, tokens, positions, active, table, num_pages, lengths, sampling, *, config, steps):
    def step(carry, _):
        pool, tok, pos, lengths = carry
        cache = PagedKVCache(*pool, table, num_pages, lengths, pos)
        logits, cache = forward(params, tok[:, None], pos[:, None], cache, config=config, n_valid=active,
                                logits_at="last")
        nxt = sample_rows(logits, sampling, pos + 1)
        return ((cache.k_pages, cache.v_pages, cache.pos_pages), nxt, pos + 1, cache.lengths), nxt

    (pool, *_), out = jax.lax.scan(step, (pool, tokens, positions, lengths), None, length=steps)
    return pool, out.T  # [B, steps]


@jax.jit
def _gather_pages(pool, ids):
    return tuple(x[ids] for x in pool)


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_pages(pool, ids, data):
    return tuple(x.at[ids].set(d) for x, d in zip(pool, data, strict=True))


class HostInputError(ValueError):
    """A step's inputs could not be built on the host (a request's values do not fit): nothing reached the device,
    so the instance is fine; only that step's requests fail."""


@contextlib.contextmanager
def host_inputs():
    try:
        yield
    except Exception as e:
        raise HostInputError(f"{type(e).__name__}: {e}") from e


@dataclasses.dataclass
class PrefillRow:
    tokens: np.ndarray  # this step's chunk of the prompt
    kv: SequenceKV  # pages already hold room for the chunk
    sampling: SamplingParams
    mm: tuple[np.ndarray, np.ndarray] | None = None  # (embeddings [chunk, H], mask [chunk]) where items sit
    moka: tuple[np.ndarray, np.ndarray] | None = None  # MokA: (modality ids [chunk], question-key mask [chunk])


@dataclasses.dataclass
class DecodeRow:
    last_token: int
    kv: SequenceKV  # pages hold room for `decode_steps` more pairs
    sampling: SamplingParams


class InstanceExecutor:
    def __init__(self, config: ModelConfig, params, devices: Sequence[jax.Device], shape: ExecutorShape,
                 modalities=None, moka=None, dtype=jnp.float32):
        """`devices`: the instance's device, or its submesh's (tensor parallel). `modalities`: name ->
        `kvzip_jax.multimodal_lm.Modality` whose encoders this instance runs (its own copies, replicated over a
        submesh); `moka`: a `serving.engine.moka.MokAServing` whose adapted decoder prefills requests with items."""
        self.config = config
        self.devices = list(devices)
        self.shape = shape
        if len(self.devices) == 1:
            self.placement = self.devices[0]  # where the instance's arrays go: its device, or its mesh, replicated
            self.params = jax.device_put(params, self.placement)
            self.moka_params = None if moka is None else jax.device_put(moka.params, self.placement)
        else:
            mesh = make_mesh(data=1, model=len(self.devices), devices=self.devices)
            self.placement = NamedSharding(mesh, PartitionSpec())
            self.params = shard_params(params, mesh)
            self.moka_params = None if moka is None else shard_params(moka.params, mesh, table=MOKA_LOGICAL_AXES)
        self.modalities = dict(modalities or {})
        self.encoder_params = {name: jax.device_put(m.params, self.placement) for name, m in self.modalities.items()}
        self.moka = moka
        pages = (shape.num_pages, shape.page_size)
        kv = (*pages, config.head_dim)
        self.pool = jax.device_put((jnp.zeros(kv, dtype), jnp.zeros(kv, dtype), jnp.zeros(pages, jnp.int32)),
                                   self.placement)

    @property
    def kv_itemsize(self) -> int:
        return self.pool[0].dtype.itemsize

    @property
    def kv_bytes_per_page(self) -> int:
        return 2 * self.shape.page_size * self.config.head_dim * self.kv_itemsize

    @property
    def location(self) -> str:
        return ",".join(f"{d.platform}:{d.id}" for d in self.devices)

    host = "local"  # every in-process instance shares this process's host

    def close(self) -> None:
        """Nothing to free: its arrays go with the engine (a Ray instance's `close` ends its actor)."""

    def _tables(self, seqs: list[SequenceKV], rows: int):
        c = self.config
        width = self.shape.table_width(max([s.table.shape[2] for s in seqs] + [1]))
        table = np.zeros((c.num_layers, rows, c.num_kv_heads, width), np.int32)
        num_pages = np.zeros((c.num_layers, rows, c.num_kv_heads), np.int32)
        lengths = np.zeros_like(num_pages)
        for i, s in enumerate(seqs):
            table[:, i, :, :s.table.shape[2]] = s.table
            num_pages[:, i] = s.num_pages
            lengths[:, i] = s.lengths
        return table, num_pages, lengths

    def prefill(self, rows: list[PrefillRow]) -> np.ndarray:
        """Append each row's chunk to its pages; returns the token sampled after each chunk's last token (only
        meaningful for rows whose chunk ends the prompt)."""
        with host_inputs():
            args = self._prefill_inputs(rows)
            context = self._moka_context(rows, args[0].shape) if any(r.moka is not None for r in rows) else None
        if context is not None:
            self.pool, first = _moka_prefill_step(self.params, self.moka_params, self.pool, *args, context,
                                                  config=self.config, moka=self.moka.moka)
        else:
            self.pool, first = _prefill_step(self.params, self.pool, *args, config=self.config)
        return np.asarray(first)[:len(rows)]

    def _moka_context(self, rows: list[PrefillRow], shape: tuple[int, int]):
        ids, keys = np.full(shape, PAD, np.int8), np.zeros(shape, bool)
        for i, r in enumerate(rows):
            ids[i, :len(r.tokens)] = TEXT  # a text row in an adapted step: every token takes the text path
            if r.moka is not None:
                ids[i, :len(r.tokens)], keys[i, :len(r.tokens)] = r.moka
        return make_context(self.moka.moka, ids, keys, max_keys=self.moka.max_keys)

    def _prefill_inputs(self, rows: list[PrefillRow]):
        n, width = self.shape.prefill_rows, self.shape.prefill_width(max(len(r.tokens) for r in rows))
        tokens = np.zeros((n, width), np.int32)
        positions = np.zeros((n, width), np.int32)
        n_valid = np.zeros(n, np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r.tokens)] = r.tokens
            positions[i] = r.kv.next_position + np.arange(width)
            n_valid[i] = len(r.tokens)
        table, num_pages, lengths = self._tables([r.kv for r in rows], n)
        sampling = RowSampling.from_params([r.sampling for r in rows], n)
        mm = None
        if any(r.mm is not None for r in rows):  # text-only steps keep the token-id executable
            mm = (np.zeros((n, width, self.config.hidden_size), np.float32), np.zeros((n, width), bool))
            for i, r in enumerate(rows):
                if r.mm is not None:
                    mm[0][i, :len(r.tokens)], mm[1][i, :len(r.tokens)] = r.mm
        return tokens, positions, n_valid, table, num_pages, lengths, sampling, mm

    def encode(self, items) -> dict[str, np.ndarray]:
        """Encoder embeddings [tokens per item, H] of each item (`MediaInput`s), by content hash: one encoder call
        per modality, its batch padded to a bucket."""
        out = {}
        for name, m in self.modalities.items():
            mine = [it for it in items if it.modality == name]
            if not mine:
                continue
            with host_inputs():
                bucket = next(b for b in self.shape.encode_buckets() if b >= len(mine))
                batch = np.zeros((bucket, *m.input_shape), np.float32)
                batch[:len(mine)] = np.stack([it.values for it in mine])
            embeds = np.asarray(m.encode_fn(self.encoder_params[name], jax.device_put(batch, self.placement)))
            out.update((it.hash, e) for it, e in zip(mine, embeds, strict=False))
        return out

    def decode(self, rows: list[DecodeRow]) -> np.ndarray:
        """`decode_steps` tokens per row [len(rows), steps]; each row's input is its last token."""
        with host_inputs():
            args = self._decode_inputs(rows)
        self.pool, out = _decode_steps(self.params, self.pool, *args, config=self.config,
                                       steps=self.shape.decode_steps)
        return np.asarray(out)[:len(rows)]

    def _decode_inputs(self, rows: list[DecodeRow]):
        n = self.shape.decode_rows
        tokens = np.zeros(n, np.int32)
        positions = np.zeros(n, np.int32)
        active = np.zeros(n, np.int32)
        for i, r in enumerate(rows):
            tokens[i], positions[i], active[i] = r.last_token, r.kv.next_position, 1
        table, num_pages, lengths = self._tables([r.kv for r in rows], n)
        sampling = RowSampling.from_params([r.sampling for r in rows], n)
        return tokens, positions, active, table, num_pages, lengths, sampling

    @staticmethod
    def padded_ids(ids: np.ndarray) -> np.ndarray:
        """Page ids padded with the dummy page 0 to a power of two (>= MIN_MOVE_PAGES): one compiled gather and
        scatter per bucket, not per request size. Page 0 is never read unmasked, so what lands there is moot."""
        out = np.zeros(pow2_at_least(len(ids), MIN_MOVE_PAGES), np.int32)
        out[:len(ids)] = ids
        return out

    def export_pages(self, ids: np.ndarray, destination):
        """Copies of pages `ids` (K, V and positions; padded, see `padded_ids`), on their way to `destination` (the
        importing executor's `placement`: a device, or its submesh)."""
        gathered = _gather_pages(self.pool, self.padded_ids(ids))
        jax.block_until_ready(gathered)  # read before a later step donates (and deletes) this pool version
        return jax.device_put(gathered, destination)

    def import_pages(self, ids: np.ndarray, data) -> None:
        """Write pages (padded, as `export_pages` gives them; anywhere, they are placed here first) into this
        pool at `ids`; returns once they are in place."""
        self.pool = _scatter_pages(self.pool, self.padded_ids(ids), jax.device_put(data, self.placement))
        jax.block_until_ready(self.pool)

    def copy_pages(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy pages inside this pool (copy-on-write of a shared context's partly filled pages)."""
        self.pool = _scatter_pages(self.pool, self.padded_ids(dst), _gather_pages(self.pool, self.padded_ids(src)))

    def warmup(self) -> None:
        """Compile every bucket now: all rows padded, nothing is written."""
        c, s = self.config, self.shape
        for width in s.table_buckets():
            empty = SequenceKV(np.zeros((c.num_layers, c.num_kv_heads, width), np.int32),
                               np.zeros((c.num_layers, c.num_kv_heads), np.int32),
                               np.zeros((c.num_layers, c.num_kv_heads), np.int32), 0)
            self.decode([DecodeRow(0, empty, SamplingParams())])
            for chunk in s.prefill_buckets():
                self.prefill([PrefillRow(np.zeros(chunk, np.int32), empty, SamplingParams())])
                if self.modalities:
                    mm = (np.zeros((chunk, c.hidden_size), np.float32), np.zeros(chunk, bool))
                    self.prefill([PrefillRow(np.zeros(chunk, np.int32), empty, SamplingParams(), mm)])
                if self.moka is not None:
                    moka = (np.full(chunk, TEXT, np.int8), np.zeros(chunk, bool))
                    self.prefill([PrefillRow(np.zeros(chunk, np.int32), empty, SamplingParams(), mm, moka)])
        for name, m in self.modalities.items():
            for n in s.encode_buckets():
                self.encode([MediaInput(f"{name}{k}", np.zeros(m.input_shape, np.float32), name) for k in range(n)])
        # migrations of every size a request can have (only the dummy page 0 is read and written)
        most = self.config.num_layers * self.config.num_kv_heads * s.max_table_width
        n = MIN_MOVE_PAGES
        while n < 2 * most:
            self.copy_pages(np.zeros(n, np.int32), np.zeros(n, np.int32))
            n *= 2
