"""The simulator's invariants (spec 6.1) checked on the real engine: every live request is in exactly one place
(a queue, a prefill or decode batch, a migration), and every used page of every live instance has exactly as many
owners (requests, resident contexts, migrations and loads under way) as its pool's reference count says; the
embedding cache's reference counts are exactly the live requests that pin each entry, and it keeps the arrays of
exactly its entries."""

from __future__ import annotations

import numpy as np

from serving.model import InstState


def check_engine_invariants(engine) -> None:
    """Raise AssertionError naming the first broken invariant. Call under the engine's lock."""
    where: dict[int, list[str]] = {rid: [] for rid in engine.requests}
    for (g, s), q in engine.q.items():
        for r in q:
            where.setdefault(r.rid, []).append(f"queue {g.name}/{s.name}")
    owners = [np.zeros(i.pool.num_pages, np.int32) for i in engine.insts]
    for i in engine.insts:
        for r in i.local_queue:
            where.setdefault(r.rid, []).append(f"instance {i.iid} queue")
        for r in i.prefilling:
            where.setdefault(r.rid, []).append(f"instance {i.iid} prefill")
        for r in i.encoding:
            where.setdefault(r.rid, []).append(f"instance {i.iid} encode")
        for r in i.running.values():
            where.setdefault(r.rid, []).append(f"instance {i.iid} decode")
        moving = [m for m, _ in i.incoming] + [m for m in i.outgoing]
        if i.in_flight is not None and i.in_flight[0] in ("export", "import"):
            kind, payload = i.in_flight
            moving.append(payload if kind == "export" else payload[0])
        for m in moving:
            where.setdefault(m.request.rid, []).append(f"instance {i.iid} migrating")
            np.add.at(owners[m.target.iid], m.new_ids, 1)
    for r in engine.requests.values():
        if r.kv is not None and r.owner >= 0:
            np.add.at(owners[r.owner], r.kv.owned(), 1)
    for i in engine.insts:
        if i.prefix is not None and i.state != InstState.FAILED:
            np.add.at(owners[i.iid], i.prefix.pages(), 1)
    for served in engine.contexts.values():
        for iid, kv in served.resident.items():
            np.add.at(owners[iid], kv.owned(), 1)
    for i in engine.insts:
        loads = list(i.context_loads)
        if i.in_flight is not None and i.in_flight[0] == "load_context":
            loads.append(i.in_flight[1])
        for _, ids in loads:
            np.add.at(owners[i.iid], ids, 1)
    for rid, places in where.items():
        r = engine.requests.get(rid)
        if r is None:
            raise AssertionError(f"request {rid} is queued but not live: {places}")
        if len(places) != 1:
            raise AssertionError(f"request {rid} ({r.phase.name}) is in {len(places)} places: {places}")
    for i, count in zip(engine.insts, owners, strict=True):
        if i.state == InstState.FAILED:
            if i.prefilling or i.running or i.outgoing or i.incoming or i.local_queue:
                raise AssertionError(f"failed instance {i.iid} still holds requests")
            continue
        count[0] = 1
        if not np.array_equal(count, i.pool.refs):
            bad = np.flatnonzero(count != i.pool.refs)[:5]
            raise AssertionError(f"instance {i.iid}: page owners {count[bad]} != pool references "
                                 f"{i.pool.refs[bad]} at pages {bad}")
        if i.reserved < 0 or i.arriving < 0 or i.kv_free < 0:
            raise AssertionError(f"instance {i.iid}: reserved {i.reserved}, arriving {i.arriving}")
    _check_embedding_cache(engine)


def _check_embedding_cache(engine) -> None:
    cache = engine.embedding_cache
    try:
        cache.pool.check()
    except RuntimeError as e:
        raise AssertionError(str(e)) from e
    pins: dict[str, int] = {}
    for r in engine.requests.values():
        if len(set(r.cache_holds)) != len(r.cache_holds):
            raise AssertionError(f"request {r.rid} pins an embedding entry twice")
        for h in r.cache_holds:
            pins[h] = pins.get(h, 0) + 1
    refs = {h: n for h, n in cache.pool.ref.items() if n}
    if pins != refs:
        raise AssertionError(f"embedding cache references {refs} != pins of live requests {pins}")
    if set(engine.embedding_store) != set(cache.pool.size):
        raise AssertionError("the embedding store and the cache's entries differ")
