"""Discrete-event simulator of a multi-instance multimodal serving node.

The simulator owns the mechanics (queues, batches, KV blocks, transfers, migrations, role switches); a
policy object (serving/policies.py, serving/elasticmm.py) owns the decisions: the initial layout, routing
of requests to modality groups, the prefill token budget and, on periodic ticks, role switches. The same
policy objects are meant to drive the real JAX engine later, so they only talk to the `Simulator` through
the small read/act surface marked PUBLIC below.

Simplifications (documented in docs/elasticmm.md): DP instances are independent except for transfers;
transfers are delays without link contention; a decode request reserves KV for prompt + output on
admission (so decode never OOMs mid-flight); the prefix and embedding caches are per-group pools of
their own capacity.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from .costmodel import CostModel
from .model import STAMP_ORDER, Group, Instance, InstState, Modality, ReqState, Request, Stage, blocks_for
from .prefix_cache import EmbeddingCache, PrefixKVCache, PromptKeyer

# event kinds
ARRIVAL, PREPROC_DONE, ENC_DONE, PRE_DONE, DEC_STEP, ENQ_P, ENQ_D, MIG_DONE, SWITCH_DONE, TICK, HANDOFF_DONE = range(11)


_REQ_EVENTS = frozenset((ARRIVAL, PREPROC_DONE, ENQ_P, ENQ_D, MIG_DONE, HANDOFF_DONE))


class InvariantError(AssertionError):
    pass


@dataclass
class SimConfig:
    tick: float = 0.05  # policy tick period (s)
    drain_limit: float = 300.0  # keep simulating this long after the last arrival, then stop
    check_invariants: bool = False  # check spec 6.1 invariants at every event (tests)
    emb_cache_tokens: int = 262_144  # vision tokens per group (1.9 GB of bf16 embeddings at 7 KB/token)
    prefix_cache_blocks: int = 32_768  # KV blocks of 16 tokens per group (524k tokens, 30 GB over the group)
    decode_backpressure: float = 0.92  # prefill stops admitting when group decode KV use exceeds this
    record_decisions: bool = True
    # Many hosts: instance i runs on host i // instances_per_host (0: every instance on one host). A KV hand-off or
    # migration between hosts takes the profile's `cross_host_link` instead of its `link`.
    instances_per_host: int = 0
    host_aware_decode: bool = True  # a hand-off or migration prefers a decode instance on the KV's own host
    # Instance i on host i // instances_per_host (False) or i mod the host count (True). Policies give each role a
    # range of instance ids, so the first puts whole roles on a host, and the second spreads every role over hosts.
    spread_over_hosts: bool = False
    # Decode iterations per dispatch (the engine's `EngineConfig.decode_steps`): a decode instance runs this many
    # steps back to back; tokens reach the client, finished requests leave and a coupled instance may prefill only
    # between dispatches. A request that finishes inside a dispatch rides along to its end.
    decode_steps: int = 1

    def __post_init__(self):
        if not isinstance(self.decode_steps, int) or self.decode_steps < 1:
            raise ValueError(f"decode_steps must be an integer >= 1, got {self.decode_steps!r}")


@dataclass
class SimResult:
    requests: list
    instances: list
    end_time: float
    n_events: int
    wall_s: float
    decision_times: list
    decision_cpu_times: list
    switches: int
    migrations: int
    migrated_bytes: float
    stage_busy: dict
    stage_time: dict
    emb_hits: int
    emb_misses: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    encoded_tokens: int
    trace_hash: int
    policy: str
    layout_log: list = field(default_factory=list)
    switch_log: list = field(default_factory=list)
    handoff_bytes: float = 0.0  # prefill -> decode KV hand-offs
    cross_host_bytes: float = 0.0  # hand-offs and migrations between hosts


class RoleView:
    """The role queries policies make, shared by the simulator and the engine (both hold `insts`)."""

    def role_insts(self, g: Group, s: Stage, active_only: bool = True) -> list:
        return [i for i in self.insts if i.group == g and i.stage == s
                and (i.state == InstState.ACTIVE or not active_only)]

    def effective_role(self, inst) -> tuple:
        return inst.pending_target if inst.pending_target is not None else (inst.group, inst.stage)

    def layout_counts(self) -> dict:
        out = {}
        for i in self.insts:
            k = self.effective_role(i)
            out[k] = out.get(k, 0) + 1
        return out


class Simulator(RoleView):
    def __init__(self, policy, requests: list[Request], cost: CostModel, num_instances: int | None = None,
                 config: SimConfig | None = None):
        self.cost = cost
        self.cfg = config or SimConfig()
        self.policy = policy
        n = cost.profile["num_instances"] if num_instances is None else num_instances
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_instances = {n!r} must be an integer >= 1")
        self.N = n
        self.reqs = sorted(requests, key=lambda r: (r.t_arrival, r.rid))
        self.now = 0.0
        self.events: list = []
        self.seq = 0
        self.trace = 0
        self.n_events = 0
        layout = policy.layout(n, cost)
        if len(layout) != n:
            raise ValueError(f"policy {policy.name!r} returned a layout of {len(layout)} instances for {n}")
        self.insts = [Instance(iid=i, group=g, stage=s, kv_total=cost.kv_blocks) for i, (g, s) in enumerate(layout)]
        for inst in self.insts:
            inst.local_queue = deque()
            inst.pending = deque()
        self.groups = tuple(sorted({g for g, _ in layout}))
        self.q = {(g, s): deque() for g in Group for s in Stage}
        self.cpu_free = [0.0] * cost.cpu_workers
        self.inflight: dict[int, Request] = {}  # requests in transfers / preprocessing / migration
        self.n_arrived = 0
        self.n_done = 0
        self.switch_count = 0
        self.switch_log: list = []  # (time, instance, (group, stage) before, (group, stage) after)
        self.migrations = 0
        self.migrated_bytes = 0.0
        self.handoff_bytes = self.cross_host_bytes = 0.0
        self.encoded_tokens = 0
        self.decision_times: list[float] = []
        self.decision_cpu_times: list[float] = []
        self.layout_log: list = [(0.0, self.layout_counts())]
        self.stage_busy = {s: 0.0 for s in Stage}
        self.stage_time = {s: 0.0 for s in Stage}
        use_cache = getattr(policy, "prefix_cache", False)
        self.emb_cache = {g: EmbeddingCache(self.cfg.emb_cache_tokens) for g in Group} if use_cache else None
        self.kv_cache = {g: PrefixKVCache(self.cfg.prefix_cache_blocks, cost.block_size) for g in Group} \
            if use_cache else None
        self.keyer = PromptKeyer(cost.block_size)
        self.inline_encode = getattr(policy, "inline_encode", True)
        self.uncovered: dict = {}  # (group, stage) -> since when it has queued work and no instance (invariants)
        self._check_layout_stages()

    # ---- PUBLIC read surface for policies --------------------------------------------------------------
    def decode_batch(self, inst: Instance) -> int:
        return len(inst.running) + len(inst.pending)

    # ---- PUBLIC act surface -----------------------------------------------------------------------------
    def switch(self, inst: Instance, group: Group, stage: Stage, urgent: bool = False) -> None:
        """Re-assign an instance; it drains its batch (migrating decode KV to same-stage peers) first.

        A policy with `may_empty_stages` may take a group's last instance of a stage (a group idle for a while
        lends all its instances); `urgent` (only for such a policy) exempts the move from the cooldown: it is
        reserved for re-covering a stage left with no instance (see ElasticMM._cover_empty_stages)."""
        if not check_switch(self, inst, group, stage, urgent):
            return
        old = (inst.group, inst.stage)
        if inst.stage == Stage.DECODE and (inst.running or inst.pending) and not self._decode_peers(inst):
            raise ValueError(f"instance {inst.iid}: no decode peer to migrate its KV to")
        inst.pending_target = (group, stage)
        self.switch_log.append((self.now, inst.iid, old, (group, stage)))
        inst.state = InstState.DRAINING
        self.switch_count += 1
        inst.switches += 1
        inst.last_switch = self.now
        if not inst.busy:
            self._finish_drain(inst)

    # ---- event plumbing ---------------------------------------------------------------------------------
    def _push(self, t, kind, a=None, b=None):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def run(self) -> SimResult:
        t0 = time.perf_counter()
        reqs = self.reqs
        n = len(reqs)
        ai = 0
        last_arrival = reqs[-1].t_arrival if reqs else 0.0
        t_stop = last_arrival + self.cfg.drain_limit
        tick = getattr(self.policy, "tick_interval", None)
        if tick:
            self._push(0.0, TICK)
        self.policy.start(self)
        check = self.cfg.check_invariants
        ev = self.events
        while True:
            if ai < n and (not ev or reqs[ai].t_arrival <= ev[0][0]):
                r = reqs[ai]
                ai += 1
                self.now = r.t_arrival
                kind, a, b = ARRIVAL, r, None
            elif ev:
                t, _, kind, a, b = heapq.heappop(ev)
                if kind == TICK and ai >= n and self.n_done == n:
                    break
                self.now = t
            else:
                break
            if self.now > t_stop:
                break
            self.n_events += 1
            # determinism witness: a running hash of (kind, time, subject) of every event
            self.trace = hash((self.trace, kind, self.now, a.rid if kind in _REQ_EVENTS else
                               (a.iid if a is not None else None)))
            self._dispatch(kind, a, b)
            if check:
                self.check_invariants()
        for inst in self.insts:
            self.stage_time[inst.stage] += max(0.0, self.now - inst.role_since)
        return SimResult(
            requests=reqs, instances=self.insts, end_time=self.now, n_events=self.n_events,
            wall_s=time.perf_counter() - t0, decision_times=self.decision_times,
            decision_cpu_times=self.decision_cpu_times, switches=self.switch_count,
            migrations=self.migrations, migrated_bytes=self.migrated_bytes, stage_busy=self.stage_busy,
            stage_time=self.stage_time,
            emb_hits=sum(c.hits for c in self.emb_cache.values()) if self.emb_cache else 0,
            emb_misses=sum(c.misses for c in self.emb_cache.values()) if self.emb_cache else 0,
            prefix_hit_tokens=sum(c.hit_tokens for c in self.kv_cache.values()) if self.kv_cache else 0,
            prefix_query_tokens=sum(c.query_tokens for c in self.kv_cache.values()) if self.kv_cache else 0,
            encoded_tokens=self.encoded_tokens, trace_hash=self.trace, policy=self.policy.name,
            layout_log=self.layout_log, switch_log=self.switch_log, handoff_bytes=self.handoff_bytes,
            cross_host_bytes=self.cross_host_bytes)

    def _dispatch(self, kind, a, b):
        if kind == ARRIVAL:
            self._on_arrival(a)
        elif kind == DEC_STEP:
            if a.epoch == b:
                self._check_completion(a)
                self._on_decode_step(a)
        elif kind == PRE_DONE:
            if a.epoch == b:
                self._check_completion(a)
                self._on_prefill_done(a)
        elif kind == ENQ_D:
            self._on_enqueue_decode(a, b)
        elif kind == ENQ_P:
            self.inflight.pop(a.rid, None)
            self._enqueue(a.group, Stage.PREFILL, a)
        elif kind == TICK:
            t0, c0 = time.perf_counter(), time.thread_time()
            self.policy.on_tick(self, self.now)
            if self.cfg.record_decisions:  # wall time, and CPU time (robust when the machine is shared)
                self.decision_times.append(time.perf_counter() - t0)
                self.decision_cpu_times.append(time.thread_time() - c0)
            self._push(self.now + self.policy.tick_interval, TICK)
        elif kind == PREPROC_DONE:
            self.inflight.pop(a.rid, None)
            a.state = ReqState.QUEUED_E
            self._enqueue(a.group, Stage.ENCODE, a)
        elif kind == ENC_DONE:
            if a.epoch == b:
                self._check_completion(a)
                self._on_encode_done(a)
        elif kind == MIG_DONE:
            self._on_migration_done(a, b)
        elif kind == HANDOFF_DONE:
            self._on_cross_host_handoff_done(a, b)
        elif kind == SWITCH_DONE:
            self._on_switch_done(a)

    def _check_completion(self, inst: Instance):
        """A live completion event must end the instance's one running step (no parallel step chains)."""
        if self.cfg.check_invariants and (not inst.busy or abs(inst.busy_until - self.now) > 1e-9):
            raise InvariantError(f"instance {inst.iid}: completion at {self.now} but busy={inst.busy}, "
                                 f"busy_until={inst.busy_until}")

    # ---- arrivals and routing ---------------------------------------------------------------------------
    def _on_arrival(self, r: Request):
        self.n_arrived += 1
        g = self.policy.route(r)
        r.group = g
        if r.modality == Modality.MM and not self.inline_encode:
            ec = self.emb_cache[g] if self.emb_cache else None
            todo, held = [], []
            for im in r.images:
                if ec is not None and ec.lookup_acquire(im.hash):
                    held.append(im.hash)
                else:
                    todo.append(im)
            r.todo_imgs, r.emb_keys = tuple(todo), tuple(held)
            r.enc_hits = len(held)
            if not todo:  # every image hit: skip preprocessing, encode and the E->P transfer
                r.state = ReqState.QUEUED_P
                self._enqueue(g, Stage.PREFILL, r)
                return
            # non-blocking preprocessing on the host CPU pool, images in parallel
            done = self.now
            for im in todo:
                free = heapq.heappop(self.cpu_free)
                end = max(free, self.now) + self.cost.preprocess_time(im.pixels)
                heapq.heappush(self.cpu_free, end)
                done = max(done, end)
            r.state = ReqState.PREPROC
            self.inflight[r.rid] = r
            self._push(done, PREPROC_DONE, r)
            return
        r.todo_imgs = r.images
        r.state = ReqState.QUEUED_P
        if g == Group.ANY and self.policy.coupled:
            inst = self.policy.coupled_target(self, r)
            inst.local_queue.append(r)
            if not inst.busy and inst.state == InstState.ACTIVE:
                self._start_coupled(inst)
            return
        self._enqueue(g, Stage.PREFILL, r)

    def _enqueue(self, g: Group, s: Stage, r: Request):
        q = self.q[(g, s)]
        q.append(r)
        for inst in self.insts:
            if inst.group == g and inst.stage == s and not inst.busy and inst.state == InstState.ACTIVE:
                self._kick(inst)
                if not q:
                    return
        if s in (Stage.PREFILL, Stage.ENCODE) and getattr(self.policy, "lend_prefill", None) is not None:
            # no free instance of the role: an idle prefill instance (of another group, or any for encode) may take it
            for inst in self.insts:
                if (inst.stage == Stage.PREFILL and (inst.group != g or s == Stage.ENCODE) and not inst.busy
                        and inst.state == InstState.ACTIVE and not self.q[(inst.group, Stage.PREFILL)]):
                    self._kick(inst)
                    if not q:
                        return

    def _kick(self, inst: Instance):
        if inst.busy or inst.state != InstState.ACTIVE:
            return
        s = inst.stage
        if s == Stage.PREFILL:
            self._start_prefill(inst)
        elif s == Stage.ENCODE:
            self._start_encode(inst)
        elif s == Stage.DECODE:
            self._start_decode(inst)
        else:
            self._start_coupled(inst)

    # ---- encode stage ------------------------------------------------------------------------------------
    def _start_encode(self, inst: Instance, g: Group | None = None):
        q = self.q[(inst.group if g is None else g, Stage.ENCODE)]
        if not q:
            return
        batch, n_img, sv, sv2 = [], 0, 0, 0
        cap = self.cost.enc_max_images
        while q and (not batch or n_img + len(q[0].todo_imgs) <= cap):
            r = q.popleft()
            batch.append(r)
            for im in r.todo_imgs:
                n_img += 1
                sv += im.v_tokens
                sv2 += im.v_tokens * im.v_tokens
            r.state = ReqState.ENCODING
            r.t_enc_start = self.now
        dt = self.cost.encode_time(sv, sv2)
        self.encoded_tokens += sv
        self._busy(inst, batch, dt)
        self._push(self.now + dt, ENC_DONE, inst, inst.epoch)

    def _on_encode_done(self, inst: Instance):
        batch = self._unbusy(inst)
        for r in batch:
            ec = self.emb_cache[r.group] if self.emb_cache else None  # r.group: a lent prefill instance may encode
            r.t_enc_end = self.now
            if ec is not None:
                held = [im.hash for im in r.todo_imgs if ec.insert_acquired(im.hash, im.v_tokens)]
                r.emb_keys = r.emb_keys + tuple(held)
            r.state = ReqState.QUEUED_P
            self.inflight[r.rid] = r
            self._push(self.now + self.cost.transfer_time(r.v_tokens * self.cost.bytes_ve), ENQ_P, r)
        self._after_batch(inst)

    # ---- prefill stage -----------------------------------------------------------------------------------
    def _prefix_match(self, r: Request, g: Group) -> tuple[int, list]:
        if self.kv_cache is None:
            return 0, []
        cache = self.kv_cache[g]
        keys = self.keyer.keys(r)
        n = 0
        for k in keys:
            if k not in cache.pool:
                break
            n += 1
        cached = min(n * self.cost.block_size, r.input_len - 1)
        return cached, keys

    def _form_prefill_batch(self, inst: Instance, q: deque, budget: int, kv_limit: int, coupled: bool):
        """FCFS prefix of q: stop at the first request that does not fit the token budget or the KV pool."""
        batch, tok, blocks = [], 0, 0
        bs = self.cost.block_size
        while q:
            r = q[0]
            cached, keys = self._prefix_match(r, r.group)
            new = r.input_len - cached
            need = blocks_for(r.input_len + (r.output_len if coupled else 0), bs)
            if batch and tok + new > budget:
                break
            if blocks + need > kv_limit:
                break
            q.popleft()
            if self.kv_cache is not None:
                cache = self.kv_cache[r.group]  # a lent prefill instance serves another group's pool
                got = cache.match_acquire(keys[:cached // bs], r.input_len)
                r.cache_keys = tuple(got)
                r.prefix_keys = keys
            r.cached_tokens = cached
            r.kv_blocks = need
            r.kv_owner = inst.iid
            batch.append(r)
            tok += new
            blocks += need
        return batch, blocks

    def _inline_encode_time(self, inst: Instance, batch: list) -> float:
        """Blocking path: host preprocessing (serial in the engine process) + encode inside the prefill step."""
        ec = self.emb_cache[batch[0].group] if self.emb_cache and batch else None
        pre, sv, sv2 = 0.0, 0, 0
        for r in batch:
            if not r.images:
                continue
            todo, held = [], []
            for im in r.images:
                if ec is not None and ec.lookup_acquire(im.hash):
                    held.append(im.hash)
                else:
                    todo.append(im)
            r.enc_hits = len(held)
            r.emb_keys = tuple(held)
            r.todo_imgs = tuple(todo)
            for im in todo:
                pre += self.cost.preprocess_time(im.pixels)
                sv += im.v_tokens
                sv2 += im.v_tokens * im.v_tokens
        if sv == 0 and pre == 0:
            return 0.0
        self.encoded_tokens += sv
        return pre + (self.cost.encode_time(sv, sv2) if sv else 0.0)

    def _prefill_time(self, batch) -> float:
        sn = sq = 0
        for r in batch:
            L, k = r.input_len, r.cached_tokens
            sn += L - k
            sq += L * L - k * k
        return self.cost.prefill_time(sn, sq)

    def _start_prefill(self, inst: Instance):
        g = inst.group
        q = self.q[(g, Stage.PREFILL)]
        if not q:
            # pooled prefill: an idle prefill instance may serve one prefill batch of another group's queue (the KV
            # goes to that group's decode and caches) or one encode batch, without switching role (policy decides)
            lend = getattr(self.policy, "lend_prefill", None)
            tgt = lend(self, inst) if lend is not None else None
            if tgt is None:
                return
            g, s = tgt
            if s == Stage.ENCODE:
                self._start_encode(inst, g)
                return
            q = self.q[(g, Stage.PREFILL)]
            if not q:
                return
        if self._decode_kv_usage(g) > self.cfg.decode_backpressure:
            return  # back-pressure: decode is out of KV; a decode completion will kick prefill again
        budget = self.policy.prefill_budget(self, inst)
        batch, blocks = self._form_prefill_batch(inst, q, budget, inst.kv_free, coupled=False)
        if not batch:
            return
        inst.kv_used += blocks
        self._run_prefill(inst, batch)

    def _run_prefill(self, inst, batch):
        enc = self._inline_encode_time(inst, batch) if self.inline_encode else 0.0
        t_pre = self.now + enc
        for r in batch:
            if self.inline_encode and r.images:
                r.t_enc_start, r.t_enc_end = self.now, t_pre
            r.t_pre_start = t_pre
            r.state = ReqState.PREFILL
        dt = enc + self._prefill_time(batch)
        self._busy(inst, batch, dt)
        self._push(self.now + dt, PRE_DONE, inst, inst.epoch)

    def _on_prefill_done(self, inst: Instance):
        batch = self._unbusy(inst)
        for r in batch:
            r.t_pre_end = r.t_first = self.now
            r.produced = 1
            self._release_caches(r, r.group)
            if inst.stage == Stage.COUPLED:
                if r.output_len <= 1:
                    self._complete(r, inst)
                else:
                    self._join_decode(inst, r)
                continue
            if r.output_len <= 1:
                self._complete(r, inst)
                continue
            r.state = ReqState.QUEUED_D
            self.inflight[r.rid] = r
            self._push(self.now + self.cost.kv_transfer_time(r.input_len), ENQ_D, r, inst)
        self._after_batch(inst)

    def _release_caches(self, r: Request, g: Group):
        if self.emb_cache is not None:
            ec = self.emb_cache[g]
            if self.inline_encode:  # embeddings computed inside this prefill become reusable now
                for im in r.todo_imgs:
                    if ec.insert_acquired(im.hash, im.v_tokens):
                        ec.release(im.hash)
            for h in r.emb_keys:
                ec.release(h)
            r.emb_keys = ()
        if self.kv_cache is not None:
            cache = self.kv_cache[g]
            cache.release(r.cache_keys)
            cache.insert_unreferenced(r.prefix_keys[len(r.cache_keys):])
            r.cache_keys = ()

    # ---- decode stage ------------------------------------------------------------------------------------
    def _decode_peers(self, inst: Instance) -> list[Instance]:
        return [i for i in self.insts if i is not inst and i.group == inst.group and i.stage == Stage.DECODE
                and i.state == InstState.ACTIVE]

    def _decode_kv_usage(self, g: Group) -> float:
        tot = used = 0
        for i in self.insts:
            if i.group == g and i.stage == Stage.DECODE:
                tot += i.kv_total
                used += i.kv_used
        return used / tot if tot else 0.0

    def _pick_decode(self, g: Group, need: int, exclude=None, near: Instance | None = None) -> Instance | None:
        """The decode instance of `g` with the most free KV that can take `need` blocks; with `near` (where the
        KV is now) and `host_aware_decode`, one on the same host first, if any has room."""
        best, best_key = None, None
        cap = self.cost.decode_max_batch
        aware = near is not None and self.cfg.host_aware_decode
        for i in self.insts:
            if (i.group == g and i.stage == Stage.DECODE and i.state == InstState.ACTIVE and i is not exclude
                    and len(i.running) + len(i.pending) < cap and i.kv_free >= need):
                key = (aware and self._same_host(i, near), i.kv_free)
                if best is None or key > best_key:
                    best, best_key = i, key
        return best

    def _on_enqueue_decode(self, r: Request, src: Instance):
        self.inflight.pop(r.rid, None)
        self.q[(r.group, Stage.DECODE)].append(r)
        self._drain_decode_queue(r.group)

    def _drain_decode_queue(self, g: Group):
        q = self.q[(g, Stage.DECODE)]
        bs = self.cost.block_size
        while q:
            r = q[0]
            need = blocks_for(r.input_len + r.output_len, bs)
            src = self.insts[r.kv_owner]
            tgt = self._pick_decode(g, need, near=src)
            if tgt is None:
                return
            q.popleft()
            if src.stage == Stage.PREFILL:  # the prefill's KV hand-off (charged on the link when it was queued)
                self.handoff_bytes += r.input_len * self.cost.bytes_kv
            if not self._same_host(src, tgt):
                self._start_cross_host_handoff(r, src, tgt, need)
                continue
            src.kv_used -= r.kv_blocks  # two-phase hand-off: source frees once the destination holds it
            tgt.kv_used += need
            r.kv_blocks, r.kv_owner = need, tgt.iid
            tgt.pending.append(r)
            if not tgt.busy:
                self._start_decode(tgt)
            if src.stage == Stage.PREFILL and not src.busy and src.state == InstState.ACTIVE:
                self._kick(src)

    def _same_host(self, a: Instance, b: Instance) -> bool:
        per = self.cfg.instances_per_host
        if per <= 0:
            return True
        if self.cfg.spread_over_hosts:  # instance i on host i mod H
            hosts = -(-self.N // per)
            return a.iid % hosts == b.iid % hosts
        return a.iid // per == b.iid // per

    def _start_cross_host_handoff(self, r: Request, src: Instance, tgt: Instance, need: int):
        """The destination is on another host: the KV crosses the slower link. The queueing step charged the
        local link's time; the rest comes before the request joins `tgt` (two-phase: `tgt` reserves now, the
        source frees on arrival)."""
        self.cross_host_bytes += r.input_len * self.cost.bytes_kv
        extra = self.cost.kv_transfer_time(r.input_len, True) - self.cost.kv_transfer_time(r.input_len)
        tgt.kv_used += need
        tgt.incoming += need
        r.state = ReqState.MIGRATING
        self.inflight[r.rid] = r
        self._push(self.now + max(0.0, extra), HANDOFF_DONE, r, tgt)

    def _on_cross_host_handoff_done(self, r: Request, tgt: Instance):
        self.inflight.pop(r.rid, None)
        src = self.insts[r.kv_owner]
        need = blocks_for(r.input_len + r.output_len, self.cost.block_size)
        tgt.incoming -= need
        if tgt.state != InstState.ACTIVE or (tgt.group, tgt.stage) != (r.group, Stage.DECODE):
            # the policy moved the destination while the KV was on the wire (it looked idle): the KV is still the
            # source's; the request goes back to the head of its decode queue for another destination
            tgt.kv_used -= need
            r.state = ReqState.QUEUED_D
            self.q[(r.group, Stage.DECODE)].appendleft(r)
            self._drain_decode_queue(r.group)
            return
        src.kv_used -= r.kv_blocks
        r.kv_blocks, r.kv_owner = need, tgt.iid
        r.state = ReqState.QUEUED_D
        tgt.pending.append(r)
        if not tgt.busy and tgt.state == InstState.ACTIVE:
            self._start_decode(tgt)
        if src.stage == Stage.PREFILL and not src.busy and src.state == InstState.ACTIVE:
            self._kick(src)

    def _join_decode(self, inst: Instance, r: Request):
        r.state = ReqState.DECODING
        r.join_iter = inst.iters
        r.tokens_left = r.output_len - r.produced
        inst.running[r.rid] = r
        heapq.heappush(inst.finish_heap, (inst.iters + r.tokens_left, r.rid))
        inst.sum_ctx += r.input_len + r.produced - 1
        inv = 1.0 / r.output_len
        inst.inv_out += inv
        inst.prog += (r.produced - r.join_iter) * inv

    def _leave_decode(self, inst: Instance, r: Request):
        del inst.running[r.rid]
        inv = 1.0 / r.output_len
        inst.inv_out -= inv
        inst.prog -= (r.produced - r.join_iter) * inv
        steps = inst.iters - r.join_iter  # may pass its last token: it rode along to the end of a dispatch
        inst.sum_ctx -= r.input_len + r.produced - 1 + steps
        r.produced += min(steps, r.tokens_left)

    def _start_decode(self, inst: Instance):
        if inst.busy:  # one iteration at a time: a second start would run a parallel step chain
            return
        imports = 0.0
        while inst.pending and len(inst.running) < self.cost.decode_max_batch:
            r = inst.pending.popleft()
            imports += self.cost.kv_import_time(r.input_len + r.produced - 1)
            self._join_decode(inst, r)
        if not inst.running:
            return
        self._dispatch_decode(inst, imports)

    def _dispatch_decode(self, inst: Instance, imports: float = 0.0):
        """`decode_steps` iterations of the running batch, each a step longer in context per request, after
        `imports`: the time the instance spends writing newly arrived requests' KV into its pool."""
        n = len(inst.running)
        dt = imports + sum(self.cost.decode_step_time(n, inst.sum_ctx + j * n) for j in range(self.cfg.decode_steps))
        inst.busy = True
        inst.step_start = self.now
        inst.busy_until = self.now + dt
        self._push(self.now + dt, DEC_STEP, inst, inst.epoch)

    def _on_decode_step(self, inst: Instance):
        inst.busy = False
        dt = self.now - inst.step_start
        inst.busy_time += dt
        self.stage_busy[inst.stage] += dt
        inst.iters += self.cfg.decode_steps
        inst.sum_ctx += len(inst.running) * self.cfg.decode_steps
        fh = inst.finish_heap
        while fh and fh[0][0] <= inst.iters:
            fi, rid = heapq.heappop(fh)
            r = inst.running.get(rid)
            if r is None or r.join_iter + r.tokens_left != fi:  # stale entry of a migrated request
                continue
            self._leave_decode(inst, r)
            self._complete(r, inst)
        if inst.stage == Stage.COUPLED:
            self._after_batch(inst)
            return
        if inst.state == InstState.DRAINING:
            self._finish_drain(inst)
            return
        self._drain_decode_queue(inst.group)
        self._start_decode(inst)
        # decode completions free KV: prefill may have been held back by back-pressure
        if self.q[(inst.group, Stage.PREFILL)]:
            for p in self.insts:
                if p.group == inst.group and p.stage == Stage.PREFILL and not p.busy and p.state == InstState.ACTIVE:
                    self._kick(p)

    def _complete(self, r: Request, inst: Instance):
        r.t_done = self.now
        r.state = ReqState.DONE
        owner = self.insts[r.kv_owner]
        owner.kv_used -= r.kv_blocks
        r.kv_owner, r.kv_blocks = -1, 0
        self.n_done += 1
        if self.cfg.check_invariants:
            check_causality(r)

    # ---- coupled instances (vLLM-like: prefill-priority iteration scheduling, inline encode) -------------
    def _start_coupled(self, inst: Instance):
        q = inst.local_queue
        cap = self.cost.decode_max_batch
        if q and len(inst.running) < cap:
            kv_limit = inst.kv_free
            budget = self.policy.prefill_budget(self, inst)
            batch, blocks = self._form_prefill_batch(inst, q, budget, kv_limit, coupled=True)
            batch_cap = cap - len(inst.running)
            if len(batch) > batch_cap:  # return the overflow to the queue head, in order
                for r in reversed(batch[batch_cap:]):
                    blocks -= r.kv_blocks
                    r.kv_owner, r.kv_blocks = -1, 0
                    if self.kv_cache is not None:
                        self.kv_cache[inst.group].release(r.cache_keys)
                        r.cache_keys = ()
                    q.appendleft(r)
                batch = batch[:batch_cap]
            if batch:
                inst.kv_used += blocks
                self._run_prefill(inst, batch)
                return
        if inst.running:
            self._dispatch_decode(inst)

    # ---- batches, draining, switching, migration ---------------------------------------------------------
    def _busy(self, inst: Instance, batch: list, dt: float):
        inst.busy = True
        inst.batch = batch
        inst.busy_until = self.now + dt
        inst.step_start = self.now

    def _unbusy(self, inst: Instance) -> list:
        inst.busy = False
        dt = self.now - inst.step_start
        inst.busy_time += dt
        self.stage_busy[inst.stage] += dt
        batch, inst.batch = inst.batch, []
        return batch

    def _after_batch(self, inst: Instance):
        if inst.state == InstState.DRAINING:
            self._finish_drain(inst)
        else:
            self._kick(inst)

    def _finish_drain(self, inst: Instance):
        """The instance's batch is over: migrate decode KV to peers, then switch role."""
        ready = self.now + self.cost.t_switch
        if inst.stage == Stage.DECODE and (inst.running or inst.pending):
            moving = list(inst.running.values()) + list(inst.pending)
            for r in list(inst.running.values()):
                self._leave_decode(inst, r)
            inst.pending.clear()
            inst.finish_heap.clear()
            for r in moving:
                tgt = self._pick_decode(inst.group, r.kv_blocks, exclude=inst, near=inst)
                if tgt is None:
                    # every peer is at its batch cap: wait in the group's decode queue; the KV stays in this
                    # instance's (role-independent) pool until a peer admits it
                    r.state = ReqState.QUEUED_D
                    self.q[(inst.group, Stage.DECODE)].append(r)
                    continue
                tgt.kv_used += r.kv_blocks
                tgt.incoming += r.kv_blocks
                r.state = ReqState.MIGRATING
                r.migrations += 1
                self.inflight[r.rid] = r
                ctx = r.input_len + r.produced
                cross = not self._same_host(inst, tgt)
                dt = self.cost.kv_transfer_time(ctx, cross)
                self.migrations += 1
                self.migrated_bytes += ctx * self.cost.bytes_kv
                self.cross_host_bytes += ctx * self.cost.bytes_kv if cross else 0.0
                self._push(self.now + dt, MIG_DONE, r, tgt)
                ready = max(ready, self.now + dt + self.cost.t_switch)
        self.stage_time[inst.stage] += self.now - inst.role_since
        inst.role_since = self.now
        inst.state = InstState.SWITCHING
        inst.epoch += 1
        self._push(ready, SWITCH_DONE, inst)

    def _on_migration_done(self, r: Request, tgt: Instance):
        self.inflight.pop(r.rid, None)
        src = self.insts[r.kv_owner]
        src.kv_used -= r.kv_blocks
        tgt.incoming -= r.kv_blocks
        r.kv_owner = tgt.iid
        r.state = ReqState.QUEUED_D
        tgt.pending.append(r)
        if not tgt.busy and tgt.state == InstState.ACTIVE:
            self._start_decode(tgt)

    def _on_switch_done(self, inst: Instance):
        g, s = inst.pending_target
        inst.group, inst.stage = g, s
        inst.pending_target = None
        inst.state = InstState.ACTIVE
        inst.role_since = self.now
        inst.iters = 0
        inst.sum_ctx = 0
        inst.inv_out = inst.prog = 0.0
        self.layout_log.append((self.now, self.layout_counts()))
        if s == Stage.DECODE:
            self._drain_decode_queue(g)
        self._kick(inst)
        if s == Stage.PREFILL:  # a new prefill instance may be the one that un-sticks the decode queue
            self._drain_decode_queue(g)

    def _check_layout_stages(self):
        for g in self.groups:
            for s in self.policy.group_stages[g]:
                if g == Group.ANY:
                    continue
                if not any(i.group == g and i.stage == s for i in self.insts):
                    raise ValueError(f"layout leaves group {g.name} without a {s.name} instance")

    # ---- invariants (spec 6.1) ---------------------------------------------------------------------------
    def check_invariants(self):
        # 1. no request lost: every arrived request is in exactly one place
        where: dict[int, str] = {}

        def put(r, place):
            if r.rid in where:
                raise InvariantError(f"request {r.rid} in two places: {where[r.rid]} and {place}")
            where[r.rid] = place

        for (g, s), q in self.q.items():
            for r in q:
                put(r, f"queue {g.name}/{s.name}")
        for i in self.insts:
            for r in i.local_queue:
                put(r, f"local queue {i.iid}")
            for r in i.batch:
                put(r, f"batch {i.iid}")
            for r in i.running.values():
                put(r, f"running {i.iid}")
            for r in i.pending:
                put(r, f"pending {i.iid}")
        for r in self.inflight.values():
            put(r, "in flight")
        live = self.n_arrived - self.n_done
        if len(where) != live:
            raise InvariantError(f"{live} requests should be live but {len(where)} are accounted for")
        # 2. instance conservation and stage coverage
        if len(self.insts) != self.N:
            raise InvariantError("instance count changed")
        counts = {}
        for i in self.insts:
            counts[self.effective_role(i)] = counts.get(self.effective_role(i), 0) + 1
            if i.state == InstState.SWITCHING and i.pending_target is None:
                raise InvariantError(f"instance {i.iid} switching without a target")
        if sum(counts.values()) != self.N:
            raise InvariantError("instances not conserved")
        may_empty = getattr(self.policy, "may_empty_stages", False)
        limit = (getattr(self.policy, "tick_interval", None) or 0.0) + 1e-9
        for g in self.groups:
            if g == Group.ANY:
                continue
            for s in self.policy.group_stages[g]:
                if counts.get((g, s), 0) >= 1:
                    self.uncovered.pop((g, s), None)
                elif not may_empty:
                    raise InvariantError(f"group {g.name} has no {s.name} instance")
                elif self.q[(g, s)]:
                    # a policy may empty an idle stage, but queued work must get an instance within one tick
                    since = self.uncovered.setdefault((g, s), self.now)
                    if self.now - since > limit:
                        raise InvariantError(f"{g.name}/{s.name} has had queued work and no instance since {since}")
                else:
                    self.uncovered.pop((g, s), None)
        # 3. KV ownership: used blocks == blocks of requests owned + reservations of incoming migrations
        owned = [0] * self.N
        for i in self.insts:
            for r in list(i.running.values()) + list(i.pending) + list(i.batch) + list(i.local_queue):
                if r.kv_owner >= 0 and r.state != ReqState.MIGRATING:
                    owned[r.kv_owner] += r.kv_blocks
        for q in self.q.values():
            for r in q:
                if r.kv_owner >= 0:
                    owned[r.kv_owner] += r.kv_blocks
        for r in self.inflight.values():
            if r.kv_owner >= 0:
                owned[r.kv_owner] += r.kv_blocks
        for i in self.insts:
            if not 0 <= i.kv_used <= i.kv_total:
                raise InvariantError(f"instance {i.iid}: kv_used {i.kv_used} outside [0, {i.kv_total}]")
            if i.kv_used != owned[i.iid] + i.incoming:
                raise InvariantError(f"instance {i.iid}: kv_used {i.kv_used} != owned {owned[i.iid]} "
                                     f"+ incoming {i.incoming}")
        # 6. caches
        for caches in (self.emb_cache, self.kv_cache):
            if caches:
                for c in caches.values():
                    c.pool.check()


def check_switch(sim, inst, group: Group, stage: Stage, urgent: bool) -> bool:
    """The checks every switch passes, in the simulator and in the engine (both expose `policy`, `now`, `insts`,
    `effective_role`): ValueError for a move the policy may not make, InvariantError for a cooldown broken.
    False for a switch to the role the instance already has (nothing to do)."""
    if stage not in sim.policy.group_stages.get(group, ()):
        raise ValueError(f"stage {stage.name} is not valid in group {group.name}")
    if inst.pending_target is not None or inst.state != InstState.ACTIVE:
        raise ValueError(f"instance {inst.iid} is already switching")
    if (inst.group, inst.stage) == (group, stage):
        return False
    may_empty = getattr(sim.policy, "may_empty_stages", False)
    if urgent and not may_empty:
        raise ValueError("urgent switches are only for policies that may empty a stage")
    cool = getattr(sim.policy, "cooldown", 0.0)
    if cool and not urgent and sim.now - inst.last_switch < cool - 1e-9:
        raise InvariantError(f"instance {inst.iid} switched twice within the cooldown {cool}s")
    old = (inst.group, inst.stage)
    if (not may_empty and old[1] != Stage.COUPLED
            and sum(1 for i in sim.insts if sim.effective_role(i) == old) <= 1):
        raise ValueError(f"instance {inst.iid} is the last {old[0].name}/{old[1].name} instance")
    return True


def check_causality(r: Request):
    last, last_name = r.t_arrival, "t_arrival"
    for name in STAMP_ORDER[1:]:
        v = getattr(r, name)
        if v is None:
            continue
        if v < last - 1e-12:
            raise InvariantError(f"request {r.rid}: {name}={v} before {last_name}={last}")
        last, last_name = v, name
    if r.t_done is not None and r.t_first is None:
        raise InvariantError(f"request {r.rid} done without a first token")


def simulate(policy, requests, cost, num_instances=None, config=None) -> SimResult:
    return Simulator(policy, requests, cost, num_instances, config).run()
