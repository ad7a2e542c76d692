"""The engine's image and sound path: placeholders expanded to the encoders' tokens, the embedding cache (content
hash -> embeddings, pinned by the requests that need them), and the encode steps, on encode instances (non-blocking
policies) or on the instance that prefills the request (blocking ones)."""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from kvzip_jax.models.llava import MODALITY_IDS, TEXT
from serving.engine.request import EngineRequest, MediaInput, Phase

if TYPE_CHECKING:
    from serving.engine.engine import EngineInstance


class MediaStage:
    """Mixed into `Engine` (its state and lock are the engine's)."""

    def _expand_media(self, prompt: list[int], media: tuple, context_id: str | None, modality_ids=None,
                      key_mask=None):
        """(prompt, media with their token counts, where each item's tokens start, the MokA key mask or None).

        Without `modality_ids` each item's placeholder token (one per item, in order) is expanded to the encoder's
        tokens. With them the prompt is already expanded: each run of a modality's id holds its items' tokens.
        `key_mask` (MokA: the question tokens) covers the prompt as given."""
        if key_mask is not None:
            if self.moka is None:
                raise ValueError("key_mask is for a model with MokA adapters; this one has none")
            key_mask = np.asarray(key_mask, bool)
            if key_mask.shape != (len(prompt),):
                raise ValueError(f"key_mask has shape {key_mask.shape}; the prompt has {len(prompt)} tokens")
        if not media:
            if modality_ids is not None and (np.asarray(modality_ids) != TEXT).any():
                raise ValueError("modality_ids mark image or audio tokens but no images or sounds were given")
            held = {m.token_id: name for name, m in self.modalities.items() if m.token_id in prompt}
            if modality_ids is None and held:
                token_id, name = next(iter(held.items()))
                raise ValueError(f"the prompt holds {name} placeholder tokens (id {token_id}) but no {name} was given")
            return prompt, (), (), None
        if not self.modalities:
            raise ValueError("this model takes no images or sounds")
        if context_id is not None:
            raise ValueError("a request on a context takes no images or sounds (its question is text)")
        if len(media) > self.engine_config.encode_items:
            raise ValueError(f"{len(media)} images and sounds in one request; this engine takes at most "
                             f"{self.engine_config.encode_items} (encode_items)")
        for k, item in enumerate(media):
            if not isinstance(item, MediaInput):
                raise TypeError(f"item #{k + 1} is a {type(item).__name__}, not a MediaInput")
            m = self.modalities.get(item.modality)
            if m is None:
                raise ValueError(f"item #{k + 1} is a {item.modality!r}; this model takes {sorted(self.modalities)}")
            if tuple(item.values.shape) != tuple(m.input_shape):
                raise ValueError(f"item #{k + 1} ({item.modality}) has inputs of shape {tuple(item.values.shape)}; "
                                 f"this model takes {tuple(m.input_shape)}")
        media = tuple(dataclasses.replace(it, v_tokens=self.modalities[it.modality].tokens_per_item) for it in media)
        if modality_ids is None:
            prompt, starts, key_mask = self._expand_placeholders(prompt, media, key_mask)
        else:
            starts = self._item_runs(prompt, media, modality_ids)
        if self.moka is not None:
            key_mask = self._check_moka(prompt, media, starts, key_mask)
        return prompt, media, starts, key_mask

    def _expand_placeholders(self, prompt: list[int], media: tuple, key_mask):
        by_token = {m.token_id: name for name, m in self.modalities.items()}
        if len(by_token) < len(self.modalities):
            raise ValueError("this model's modalities share one placeholder token: give modality_ids with the "
                             "expanded prompt")
        out, starts, keys, k = [], [], [], 0
        for i, t in enumerate(prompt):
            name = by_token.get(t)
            if name is None:
                out.append(t)
                keys.append(bool(key_mask[i]) if key_mask is not None else False)
                continue
            if k >= len(media) or media[k].modality != name:
                given = [it.modality for it in media]
                raise ValueError(f"placeholder #{k + 1} of the prompt is a {name} (token id {t}); the items given "
                                 f"are, in order, {given}")
            starts.append(len(out))
            out += [t] * media[k].v_tokens
            keys += [False] * media[k].v_tokens
            k += 1
        if k != len(media):
            raise ValueError(f"the prompt holds {k} placeholder token(s) but {len(media)} images and sounds were given")
        return out, tuple(starts), np.asarray(keys, bool) if key_mask is not None else None

    def _item_runs(self, prompt: list[int], media: tuple, modality_ids) -> tuple[int, ...]:
        """Where each item's tokens start in an expanded prompt, from its modality ids."""
        ids = np.asarray(modality_ids)
        if ids.shape != (len(prompt),):
            raise ValueError(f"modality_ids has shape {ids.shape}; the prompt has {len(prompt)} tokens")
        names = {MODALITY_IDS[name]: name for name in self.modalities}
        unknown = sorted(set(np.unique(ids).tolist()) - {TEXT} - set(names))
        if unknown:
            raise ValueError(f"modality id {unknown[0]} is not text ({TEXT}) or one of this model's modalities "
                             f"{ {n: MODALITY_IDS[n] for n in self.modalities} }")
        starts, k, i = [], 0, 0
        while i < len(ids):
            if ids[i] == TEXT:
                i += 1
                continue
            name = names[int(ids[i])]
            if k >= len(media) or media[k].modality != name:
                raise ValueError(f"modality_ids hold a {name} at position {i}; the items given are, in order, "
                                 f"{[it.modality for it in media]}")
            n = media[k].v_tokens
            if i + n > len(ids) or (ids[i:i + n] != ids[i]).any():
                raise ValueError(f"the {name} at position {i} needs {n} tokens of modality id {ids[i]}")
            starts.append(i)
            i, k = i + n, k + 1
        if k != len(media):
            raise ValueError(f"modality_ids hold {k} items but {len(media)} images and sounds were given")
        return tuple(starts)

    def _check_moka(self, prompt: list[int], media: tuple, starts: tuple, key_mask) -> np.ndarray:
        """MokA prefills a prompt with images or sounds in one step, and its keys are text tokens."""
        keys = np.zeros(len(prompt), bool) if key_mask is None else key_mask
        if len(prompt) > self.engine_config.prefill_chunk:
            raise ValueError(f"the prompt has {len(prompt)} tokens; a MokA prompt with images or sounds is "
                             f"prefilled in one step of at most prefill_chunk = {self.engine_config.prefill_chunk}")
        for it, at in zip(media, starts, strict=True):
            if keys[at:at + it.v_tokens].any():
                raise ValueError(f"key_mask marks tokens of the {it.modality} at position {at}: keys are text tokens")
        if keys.sum() > self.moka.max_keys:
            raise ValueError(f"key_mask marks {int(keys.sum())} question tokens; this engine takes at most "
                             f"{self.moka.max_keys} (MokAServing.max_keys)")
        return keys

    def _lookup_embeddings(self, r: EngineRequest, recheck: bool = False) -> None:
        """Take what the embedding cache holds of the request's items (pinned until its prefill ends). A recheck
        (another request may have brought the same item since) is not counted in the hit statistics again."""
        cache = self.embedding_cache
        for im in r.todo_media:
            if recheck and im.hash in cache.pool:
                cache.pool.acquire(im.hash)
            elif recheck or not cache.lookup_acquire(im.hash):
                continue
            r.embeds[im.hash] = self.embedding_store[im.hash]
            r.cache_holds.append(im.hash)

    def _release_embeddings(self, r: EngineRequest) -> None:
        for h in r.cache_holds:
            self.embedding_cache.release(h)
        r.cache_holds.clear()

    def _fit_media(self, requests: list[EngineRequest]) -> list[EngineRequest]:
        """The longest head of `requests` whose items fit one encode step (at least the first request)."""
        out, n = [], 0
        for r in requests:
            k = len(r.todo_media)
            if out and n + k > self.engine_config.encode_items:
                break
            out.append(r)
            n += k
        return out

    def _take_encode(self, inst: EngineInstance, queue: deque) -> None:
        """FCFS from an encode queue into this instance's encode step, while the items fit one step. A request
        the embedding cache can now serve whole (another request brought the same item) goes on to prefill."""
        n = 0
        while queue:
            r = queue[0]
            self._lookup_embeddings(r, recheck=True)  # what it pins stays pinned until its prefill ends
            if not r.todo_media:
                queue.popleft()
                self._enqueue_prefill(r)
                continue
            if inst.encoding and n + len(r.todo_media) > self.engine_config.encode_items:
                return
            queue.popleft()
            n += len(r.todo_media)
            r.phase = Phase.ENCODING
            inst.encoding.append(r)

    def _apply_encode(self, inst: EngineInstance, requests, embeddings: dict) -> None:
        self.stats.media_encoded += len(embeddings)
        for r in requests:
            if r.phase == Phase.DONE:
                continue
            for im in r.todo_media:
                r.embeds[im.hash] = embeddings[im.hash]
                if self.embedding_cache.insert_acquired(im.hash, im.v_tokens):
                    r.cache_holds.append(im.hash)
                    self.embedding_store[im.hash] = embeddings[im.hash]
            if r in inst.encoding:  # from an encode queue: on to its prefill queue
                inst.encoding.remove(r)
                if r.cancelled:
                    self._finish(r, "cancelled")
                else:
                    self._enqueue_prefill(r)
