"""MokAContext: the per-token data every adapted linear reads, built once per batch on the host and checked there.

A batch carries `modality_ids` [B, T] (the library's ids from `kvzip_jax.models.llava`: TEXT, IMAGE, AUDIO, PAD)
and `key_mask` [B, T] (True on the question / instruction tokens: the keys and values of MokA's cross-attention;
never answer tokens, so teacher-forced targets cannot leak into earlier positions). The context turns them into
static-shaped arrays: each token's modality slot, its lambda, and the key positions gathered into a padded
[B, K] index, so the cross-attention is one batched matmul with a mask (no loop over samples, no NaN for a row
without keys).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.models.llava import MODALITY_IDS, PAD
from moka_jax.config import MokAConfig

KEY_SLOT_MULTIPLE = 8  # the padded key count is rounded up to this, so batches share compiled shapes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MokAContext:
    """Arrays only (a pytree that jitted functions take as an argument).

    slot [B, T] int32: index into `MokAConfig.modalities` (text for padding; `adapted` masks it).
    adapted [B, T] float32: 1 where the token gets an adapter output (0 on padding and inactive modalities).
    query_weight [B, T] float32: lambda of the token's modality (0 for text and non-query modalities).
    key_index [B, K] int32, key_valid [B, K] bool: each row's key positions, padded.
    dropout_key: a PRNG key for adapter dropout (training), or None (deterministic).
    layer: the decoder layer index, set by the decoder through `at_layer` (folds into the dropout key).
    """

    slot: jax.Array
    adapted: jax.Array
    query_weight: jax.Array
    key_index: jax.Array
    key_valid: jax.Array
    dropout_key: jax.Array | None = None
    layer: jax.Array | None = None

    def at_layer(self, layer: jax.Array) -> MokAContext:
        return dataclasses.replace(self, layer=layer)

    def with_dropout(self, key: jax.Array | None) -> MokAContext:
        return dataclasses.replace(self, dropout_key=key)

    @property
    def num_keys(self) -> jax.Array:
        return self.key_valid.sum(axis=-1)

    @property
    def key_select(self) -> jax.Array:
        """bool [B, K, T]: row k picks key k's position (all False for padded key slots)."""
        t = self.slot.shape[1]
        return (self.key_index[..., None] == jnp.arange(t, dtype=self.key_index.dtype)) & self.key_valid[..., None]


def make_context(
    config: MokAConfig,
    modality_ids,
    key_mask,
    *,
    modality_id_of: Mapping[str, int] = MODALITY_IDS,
    pad_id: int = PAD,
    max_keys: int | None = None,
    active_modalities: Sequence[str] | None = None,
    dropout_key: jax.Array | None = None,
) -> MokAContext:
    """Check a batch's `modality_ids` [B, T] and `key_mask` [B, T] on the host and build its context.

    `modality_id_of` maps each configured modality name to its id in `modality_ids`; `pad_id` marks padding.
    `max_keys` fixes the padded key count (default: the batch's largest, rounded up to 8); a row with more keys is
    an error, never a silent cut. `active_modalities` (default all) limits which modalities' tokens get an adapter
    output: the partial-modality diagnostic of the paper (the base weights still see every token).
    """
    ids = np.asarray(modality_ids)
    keys = np.asarray(key_mask).astype(bool)
    if ids.ndim != 2:
        raise ValueError(f"modality_ids must be [batch, length], got shape {ids.shape}")
    if keys.shape != ids.shape:
        raise ValueError(f"key_mask has shape {keys.shape}, modality_ids {ids.shape}: they must match")
    missing = [m for m in config.modalities if m not in modality_id_of]
    if missing:
        raise ValueError(f"modalities {missing} have no id in modality_id_of {dict(modality_id_of)}")
    allowed = {modality_id_of[m]: i for i, m in enumerate(config.modalities)}
    present = set(np.unique(ids).tolist()) - {pad_id}
    unknown = sorted(present - set(allowed))
    if unknown:
        names = {v: k for k, v in modality_id_of.items()}
        raise ValueError(
            f"modality id {unknown[0]} ({names.get(unknown[0], 'unnamed')}) is not one of the configured modalities "
            f"{ {m: modality_id_of[m] for m in config.modalities} } (padding: {pad_id})"
        )
    text_id = modality_id_of[config.text_modality]
    not_text = keys & (ids != text_id)
    if not_text.any():
        b, t = np.argwhere(not_text)[0]
        raise ValueError(f"key_mask marks position {t} of row {b}, a {ids[b, t]!r}-modality token: keys must be "
                         f"{config.text_modality} tokens")
    active = config.modalities if active_modalities is None else tuple(active_modalities)
    bad = [m for m in active if m not in config.modalities]
    if bad:
        raise ValueError(f"active_modalities {bad} are not among {config.modalities}")

    slot = np.zeros(ids.shape, np.int32)
    adapted = np.zeros(ids.shape, np.float32)
    query_weight = np.zeros(ids.shape, np.float32)
    for name in config.modalities:
        where = ids == modality_id_of[name]
        slot[where] = allowed[modality_id_of[name]]
        adapted[where] = 1.0 if name in active else 0.0
        query_weight[where] = config.weight_for(name)

    counts = keys.sum(axis=1)
    largest = int(counts.max()) if counts.size else 0
    if max_keys is None:
        max_keys = max(KEY_SLOT_MULTIPLE, -(-largest // KEY_SLOT_MULTIPLE) * KEY_SLOT_MULTIPLE)
    elif largest > max_keys:
        row = int(np.argmax(counts))
        raise ValueError(f"row {row} has {largest} question-key tokens, more than max_keys={max_keys}")
    key_index = np.zeros((ids.shape[0], max_keys), np.int32)
    key_valid = np.zeros((ids.shape[0], max_keys), bool)
    for b in range(ids.shape[0]):
        where = np.flatnonzero(keys[b])
        key_index[b, : len(where)] = where
        key_valid[b, : len(where)] = True
    return MokAContext(
        slot=jnp.asarray(slot), adapted=jnp.asarray(adapted), query_weight=jnp.asarray(query_weight),
        key_index=jnp.asarray(key_index), key_valid=jnp.asarray(key_valid), dropout_key=dropout_key,
    )


def question_key_mask(modality_ids, question_start, question_end) -> np.ndarray:
    """bool [B, T]: True on positions question_start[b] <= t < question_end[b] (the AVT code's question span)."""
    ids = np.asarray(modality_ids)
    t = np.arange(ids.shape[1])[None, :]
    start = np.asarray(question_start)[:, None]
    end = np.asarray(question_end)[:, None]
    return (t >= start) & (t < end)
