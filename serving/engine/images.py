"""The engine's image path: placeholders expanded to the encoder's tokens, the embedding cache (content hash ->
embeddings, pinned by the requests that need them), and the encode steps, on encode instances (non-blocking
policies) or on the instance that prefills the request (blocking ones)."""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import TYPE_CHECKING

from kvzip_jax.models.llava import check_placeholders, expand_placeholders
from serving.engine.request import EngineRequest, ImageInput, Phase

if TYPE_CHECKING:
    from serving.engine.engine import EngineInstance


class ImageStage:
    """Mixed into `Engine` (its state and lock are the engine's)."""

    def _expand_images(self, prompt: list[int], images: tuple, context_id: str | None):
        """The prompt with each image placeholder expanded to the encoder's tokens; the images with their token
        count; where each image's tokens start."""
        if not images:
            if self.image is not None and self.image.token_id in prompt:
                raise ValueError(f"the prompt holds image placeholder tokens (id {self.image.token_id}) but no "
                                 "images were given")
            return prompt, (), ()
        if self.image is None:
            raise ValueError("this model takes no images")
        if context_id is not None:
            raise ValueError("a request on a context takes no images (its question is text)")
        if len(images) > self.engine_config.encode_images:
            raise ValueError(f"{len(images)} images in one request; this engine takes at most "
                             f"{self.engine_config.encode_images} (encode_images)")
        m = self.image
        for k, im in enumerate(images):
            if not isinstance(im, ImageInput):
                raise TypeError(f"image #{k + 1} is a {type(im).__name__}, not an ImageInput")
            if tuple(im.pixel_values.shape) != tuple(m.input_shape):
                raise ValueError(f"image #{k + 1} has pixels of shape {tuple(im.pixel_values.shape)}; this model "
                                 f"takes {tuple(m.input_shape)}")
        check_placeholders([prompt], m.token_id, [len(images)], "image")
        starts = tuple(i + k * (m.tokens_per_item - 1)
                       for k, i in enumerate(i for i, t in enumerate(prompt) if t == m.token_id))
        images = tuple(dataclasses.replace(im, v_tokens=m.tokens_per_item) for im in images)
        return expand_placeholders(prompt, m.token_id, m.tokens_per_item), images, starts

    def _lookup_embeddings(self, r: EngineRequest, recheck: bool = False) -> None:
        """Take what the embedding cache holds of the request's images (pinned until its prefill ends). A recheck
        (another request may have brought the same image since) is not counted in the hit statistics again."""
        cache = self.embedding_cache
        for im in r.todo_images:
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

    def _fit_images(self, requests: list[EngineRequest]) -> list[EngineRequest]:
        """The longest head of `requests` whose images fit one encode step (at least the first request)."""
        out, n = [], 0
        for r in requests:
            k = len(r.todo_images)
            if out and n + k > self.engine_config.encode_images:
                break
            out.append(r)
            n += k
        return out

    def _take_encode(self, inst: EngineInstance, queue: deque) -> None:
        """FCFS from an encode queue into this instance's encode step, while the images fit one step. A request
        the embedding cache can now serve whole (another request brought the same image) goes on to prefill."""
        n = 0
        while queue:
            r = queue[0]
            self._lookup_embeddings(r, recheck=True)  # what it pins stays pinned until its prefill ends
            if not r.todo_images:
                queue.popleft()
                self._enqueue_prefill(r)
                continue
            if inst.encoding and n + len(r.todo_images) > self.engine_config.encode_images:
                return
            queue.popleft()
            n += len(r.todo_images)
            r.phase = Phase.ENCODING
            inst.encoding.append(r)

    def _apply_encode(self, inst: EngineInstance, requests, embeddings: dict) -> None:
        self.stats.images_encoded += len(embeddings)
        for r in requests:
            if r.phase == Phase.DONE:
                continue
            for im in r.todo_images:
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
