"""Admission of queued requests into an instance: FCFS while there are seats and pages, each request starting
from what its instance already holds (the prefix cache's blocks of its prompt, or the served KVzip context it
names), with the pages it will need reserved up front so that an admitted request never runs out of KV."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from serving.engine.contexts import ServedContext, copies_needed, share_for_request
from serving.engine.pages import SequenceKV
from serving.engine.request import EngineRequest, Phase
from serving.prefix_cache import block_keys

if TYPE_CHECKING:
    from serving.engine.engine import EngineInstance


class Admission:
    """Mixed into `Engine` (its state and lock are the engine's)."""

    def _admit(self, inst: EngineInstance, queue: deque, whole: bool) -> None:
        """FCFS: take queue heads while there are seats and pages (coupled: prompt + max_tokens; prefill: prompt)."""
        ec = self.engine_config
        while queue:
            if len(inst.prefilling) >= ec.prefill_rows:
                return
            if whole and len(inst.prefilling) + len(inst.running) >= ec.decode_rows:
                return
            r = queue[0]
            tokens = len(r.prefill_ids) + (r.sampling.max_tokens - r.produced if whole else 0)
            if r.context is not None:
                served = self.contexts.get(r.context)
                if served is None:
                    queue.popleft()
                    self._finish(r, "error", f"context {r.context!r} was deleted before the request started")
                    continue
                kv = self._context_view(inst, r, served, queue, tokens)
                if kv is None:
                    return
            else:
                kv = self._prefix_view(inst, r)
                hit = kv.next_position
                if not self._make_room(inst, kv.pages_to_hold(tokens - hit, ec.page_size)):
                    inst.pool.release(kv.owned())  # the shared blocks go back; it waits for pages
                    return
                queue.popleft()
                tokens -= hit
                r.prefilled = hit
                if inst.prefix is not None:
                    self.stats.prefix_hit_tokens += hit
                    self.stats.prefix_query_tokens += len(r.prompt)
            kv.grow(inst.pool, tokens, ec.page_size)
            r.kv, r.owner, r.phase = kv, inst.iid, Phase.PREFILL
            inst.prefilling.append(r)

    def _block_keys(self, r: EngineRequest) -> list[int]:
        """Hash-chain keys of the request's full prompt blocks (images' content hashes included); none for a MokA
        request: the KV of its image and sound tokens depends on its question, so it shares no block."""
        if r.moka:
            r.block_keys = []
        if r.block_keys is None:
            spans = [(im.hash, at, im.v_tokens) for im, at in zip(r.media, r.media_starts, strict=True)]
            r.block_keys = block_keys(r.prompt, spans, self.engine_config.page_size)
        return r.block_keys

    def _prefix_view(self, inst: EngineInstance, r: EngineRequest) -> SequenceKV:
        """A sequence starting with the cached blocks of the request's prompt (shared; at least its last token
        is left to prefill, for the logits of its first output token), or an empty one."""
        c = self.config
        if inst.prefix is None:
            return SequenceKV.empty(c.num_layers, c.num_kv_heads)
        limit = (len(r.prefill_ids) - 1) // self.engine_config.page_size
        blocks = inst.prefix.match(self._block_keys(r), limit)
        return inst.prefix.view(blocks) if blocks else SequenceKV.empty(c.num_layers, c.num_kv_heads)

    def _make_room(self, inst: EngineInstance, pages: int) -> bool:
        """True when `pages` pages are free on the instance, after evicting prefix blocks nobody uses if needed."""
        if pages > inst.kv_free and inst.prefix is not None:
            inst.prefix.evict(pages - inst.kv_free)
        return pages <= inst.kv_free

    def _context_view(self, inst: EngineInstance, r: EngineRequest, served: ServedContext, queue: deque,
                      tokens: int):
        """The request's sequence over its context's pages in this instance's pool (popping it from `queue`), or
        None while the context is still being loaded here or the pages are not free yet."""
        page = self.engine_config.page_size
        resident = served.resident.get(inst.iid)
        if resident is None:
            if inst.iid not in served.loading and self._make_room(inst, served.num_pages):
                served.loading.add(inst.iid)
                inst.context_loads.append((served, inst.pool.alloc(served.num_pages)))
            return None
        if not self._make_room(inst, copies_needed(resident, page) + resident.pages_to_hold(tokens, page)):
            return None
        queue.popleft()
        kv, src, dst = share_for_request(resident, inst.pool, page)
        r.copies = (src, dst) if len(src) else None
        served.requests += 1
        self.stats.context_requests += 1
        self.stats.context_tokens_saved += served.context_tokens
        return kv
