"""The serving engine: instances on their own devices, one worker thread each, driven by a `serving` policy.

The policy objects are the simulator's (`serving.policies.make_policy`): their `layout` places every instance in
a (group, stage) role, `route` picks a request's modality group and, for coupled serving, `coupled_target` picks
its instance. The engine carries the decisions out on real devices:

- coupled instances prefill (prefill first, as vLLM) and decode their own requests;
- prefill instances prefill, then hand each request's KV to a decode instance of its group: the source gathers
  the pages, `jax.device_put` moves them to the destination's device, the destination scatters them into pages it
  reserved; only after that insert completes does the request change owner and the source free its pages;
- decode instances run continuous batching, `decode_steps` tokens per dispatch;
- images and sounds (a model with encoders): the embedding cache (content hash -> embeddings, pinned while a
  request needs them, LRU among the rest) answers what it can; the rest are encoded on an encode instance of the
  group (non-blocking policies: static_epd, elasticmm), or by the prefill / coupled instance just before it
  prefills the request (blocking policies, as the simulator's `inline_encode`). Prefill splices the embeddings in
  where the placeholders sit.
- MokA adapters (`moka.py`): requests with images or sounds are prefilled in one step through the adapted
  forward; decode runs on the text path folded into the base weights.
- a prefix cache per prefill / coupled instance shares the KV of full prompt blocks with later prompts that
  start the same way.

The engine's parts: admission (`admission.py`), the image and sound stage (`media.py`), faults (`faults.py`), the prefix
cache (`prefix_kv.py`), the device side of an instance (`executor.py`) or its Ray actor on another host
(`ray_fleet.py`), pages (`pages.py`).

State lives on the host under one lock (a `threading.Condition`); device work runs outside it, so the instances'
steps overlap (JAX releases the GIL while a step runs). Each instance's pool arrays are touched only by its own
worker. Page reservations make every admitted request finish without running out of pages: a request enters an
instance only when its pages (prompt + max_tokens, or the prompt on a prefill instance) are there.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from kvzip_jax.config import ModelConfig
from serving.costmodel import CostModel, default_cost_model, load_profile
from serving.engine.admission import Admission
from serving.engine.contexts import ServedContext
from serving.engine.detokenize import Detokenizer
from serving.engine.executor import DecodeRow, ExecutorShape, HostInputError, InstanceExecutor, PrefillRow
from serving.engine.faults import FaultHandling
from serving.engine.invariants import check_engine_invariants
from serving.engine.media import MediaStage
from serving.engine.moka import MokAServing
from serving.engine.pages import PagePool
from serving.engine.prefix_kv import PrefixKVCache
from serving.engine.ray_fleet import RayFleet, RemoteExecutor
from serving.engine.request import EngineRequest, MediaInput, Phase, RequestOutput
from serving.engine.sampling import SamplingParams
from serving.model import Group, InstState, Modality, Stage
from serving.policies import make_policy
from serving.prefix_cache import EmbeddingCache
from serving.simulator import RoleView, check_switch

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Admission control: too many requests wait already. The client should retry later (HTTP 429)."""


class EngineError(RuntimeError):
    """The engine cannot run as configured, or was stopped."""


class InjectedFault(RuntimeError):
    """Raised by a step of an instance that `Engine.inject_fault` marked (fault-tolerance tests)."""


RECENT = 100_000  # steps, latencies and decision times kept for calibration and statistics (bounded memory)

@dataclasses.dataclass(frozen=True)
class EngineConfig:
    policy: str = "coupled"
    policy_options: tuple[tuple[str, object], ...] = ()  # e.g. (("n_prefill", 1),) for static_pd
    num_instances: int = 1
    page_size: int = 16
    pages_per_instance: int = 4096
    decode_rows: int = 8  # continuous-batching slots per instance
    decode_steps: int = 4  # decode steps per dispatch
    prefill_rows: int = 4
    prefill_chunk: int = 128
    max_model_len: int | None = None  # prompt + max_tokens; default: the model's max_position_embeddings
    max_waiting: int = 256  # queued requests beyond which submit answers QueueFull
    encode_items: int = 4  # images and sounds per encode step, and the most one request may carry
    embedding_cache_tokens: int = 16384  # encoder output tokens the embedding cache keeps (0: no cache)
    prefix_cache: bool = True  # prefill / coupled instances keep full prompt blocks for later prompts to share
    warmup: bool = True  # compile every shape bucket at start-up
    devices_per_instance: int = 1  # tensor parallel: each instance's weights sharded over this many devices
    check_invariants: bool = False  # after every step (tests)
    # The cost model the policy plans with (layout sizes, ElasticMM's gain-cost decisions): a packaged profile's
    # name or a .json file, e.g. one that scripts/calibrate_profile.py fitted to this engine (None: the default).
    cost_profile: str | None = None

    def __post_init__(self):
        for name in ("num_instances", "page_size", "decode_rows", "decode_steps", "prefill_rows", "prefill_chunk",
                     "encode_items", "devices_per_instance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.embedding_cache_tokens < 0:
            raise ValueError(f"embedding_cache_tokens must be >= 0, got {self.embedding_cache_tokens}")


@dataclasses.dataclass(frozen=True)
class Migration:
    request: EngineRequest
    source: EngineInstance
    target: EngineInstance
    old_ids: np.ndarray
    new_ids: np.ndarray
    growth: int  # pages reserved on the target for the tokens still to come


@dataclasses.dataclass(eq=False)
class EngineInstance:
    """An instance as policies see it (the simulator's read surface) plus its executor and page pool."""

    iid: int
    group: Group
    stage: Stage
    executor: InstanceExecutor | RemoteExecutor
    pool: PagePool
    state: InstState = InstState.ACTIVE
    pending_target: tuple | None = None
    last_switch: float = -float("inf")
    busy: bool = False
    busy_until: float = 0.0  # engine clock: when the step in flight is expected to end (policies read it)
    batch: list = dataclasses.field(default_factory=list)  # requests of the prefill step in flight
    switches: int = 0
    role_since: float = 0.0
    local_queue: deque = dataclasses.field(default_factory=deque)  # coupled: its own waiting requests
    prefilling: list = dataclasses.field(default_factory=list)
    encoding: list = dataclasses.field(default_factory=list)  # requests of its encode step (encode role or lent)
    running: dict = dataclasses.field(default_factory=dict)  # rid -> request in its decode batch
    outgoing: deque = dataclasses.field(default_factory=deque)  # migrations whose pages it must send
    incoming: deque = dataclasses.field(default_factory=deque)  # (migration, data) whose pages it must insert
    context_loads: deque = dataclasses.field(default_factory=deque)  # (context, page ids) to load into its pool
    in_flight: tuple | None = None  # (kind, payload) of the step running now
    arriving: int = 0  # migrations towards it that hold a decode seat
    reserved: int = 0  # pages promised to arriving requests' growth
    steps: int = 0
    fault: bool = False  # the next step raises InjectedFault
    prefix: PrefixKVCache | None = None  # its prompt blocks kept for sharing (prefill and coupled roles)
    thread: threading.Thread | None = None

    @property
    def kv_total(self) -> int:
        return self.pool.num_pages - 1

    @property
    def kv_used(self) -> int:
        return self.pool.used

    @property
    def cached_pages(self) -> int:
        """Pages its prefix cache keeps (when no request runs, the only pages in use)."""
        return 0 if self.prefix is None else len(self.prefix.pages())

    @property
    def kv_free(self) -> int:
        return self.pool.free - self.reserved

    @property
    def pending(self) -> list:  # requests promised to its decode batch (the simulator's name)
        return [m.request for m, _ in self.incoming]

    # The simulator's decode accounting, computed from the batch (ElasticMM's gain-cost model reads it).
    iters = 0

    @property
    def sum_ctx(self) -> int:
        return sum(r.input_len + r.produced - 1 for r in self.running.values())

    @property
    def inv_out(self) -> float:
        return sum(1.0 / r.output_len for r in self.running.values())

    @property
    def prog(self) -> float:
        return sum(r.produced / r.output_len for r in self.running.values())


@dataclasses.dataclass
class EngineStats:
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    migrations: int = 0
    migrated_pages: int = 0
    context_requests: int = 0  # requests that started from a served context
    context_tokens_saved: int = 0  # context tokens those requests did not prefill
    media_encoded: int = 0
    policy_errors: int = 0  # policy ticks that raised (logged; serving goes on without that tick's decisions)
    prefix_hit_tokens: int = 0  # prompt tokens found in a prefix cache (not prefilled again)
    prefix_query_tokens: int = 0  # prompt tokens of the requests that looked
    # the most recent finished requests only: a server runs for days (the API's histograms keep the whole history)
    ttft: deque = dataclasses.field(default_factory=lambda: deque(maxlen=RECENT))  # seconds
    tpot: deque = dataclasses.field(default_factory=lambda: deque(maxlen=RECENT))  # seconds per token after the 1st


class Engine(RoleView, Admission, MediaStage, FaultHandling):
    def __init__(self, config: ModelConfig, params, tokenizer=None, engine_config: EngineConfig = EngineConfig(),
                 *, devices: Sequence[jax.Device] | None = None, model_name: str = "model",
                 modalities: Mapping[str, Any] | None = None, moka: MokAServing | None = None,
                 fleet: RayFleet | None = None):
        """`modalities`: the model's non-text inputs (name -> `kvzip_jax.multimodal_lm.Modality`, e.g. a LLaVA
        checkpoint's `MultimodalLM.modalities`); without them the engine serves text only. `moka`: the MokA-adapted
        decoder that prefills requests with images or sounds (`params` are then its text path folded into the base
        weights, `MokAServing.text_params`). `fleet`: run the instances in actors on a Ray cluster
        (`serving.engine.ray_fleet`) instead of on this process's `devices`."""
        ec = engine_config
        self.config, self.tokenizer, self.engine_config, self.model_name = config, tokenizer, ec, model_name
        self.modalities = dict(modalities or {})
        for name, m in self.modalities.items():
            if name != m.name or not 0 <= m.token_id < config.vocab_size:
                raise ValueError(f"modalities[{name!r}]: a {m.name!r} modality with placeholder id {m.token_id}; "
                                 f"the engine takes modalities under their own name whose placeholders are in the "
                                 f"vocabulary [0, {config.vocab_size})")
        if moka is not None and not self.modalities:
            raise ValueError("moka: MokA adapts the tokens of images and sounds; give the model's modalities too")
        if moka is not None and set(self.modalities) - set(moka.moka.modalities):
            raise ValueError(f"modalities {sorted(self.modalities)}: the MokA adapter has A matrices for "
                             f"{list(moka.moka.modalities)} only")
        self.moka = moka
        devices = list(jax.devices() if devices is None else devices)
        k = ec.devices_per_instance
        if fleet is None and ec.num_instances * k > len(devices):
            raise ValueError(f"num_instances = {ec.num_instances} x devices_per_instance = {k} needs "
                             f"{ec.num_instances * k} devices; {len(devices)} exist ({devices[0].platform})")
        self.policy = make_policy(ec.policy, **dict(ec.policy_options))
        self.cost = default_cost_model() if ec.cost_profile is None else CostModel(load_profile(ec.cost_profile))
        layout = self.policy.layout(ec.num_instances, self.cost)
        self.max_model_len = ec.max_model_len or config.max_position_embeddings
        if self.max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len = {self.max_model_len} is beyond the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")
        width = -(-self.max_model_len // ec.page_size)
        pages_per_request = config.num_layers * config.num_kv_heads * width
        if pages_per_request > ec.pages_per_instance - 1:
            raise ValueError(f"one request of max_model_len = {self.max_model_len} tokens needs {pages_per_request} "
                             f"pages, but an instance has {ec.pages_per_instance - 1}; raise pages_per_instance or "
                             "lower max_model_len")
        self.shape = ExecutorShape(
            num_pages=ec.pages_per_instance, page_size=ec.page_size, decode_rows=ec.decode_rows,
            decode_steps=ec.decode_steps, prefill_rows=ec.prefill_rows, prefill_chunk=ec.prefill_chunk,
            max_table_width=width, encode_items=ec.encode_items if self.modalities else 0,
        )
        if fleet is not None:
            executors = fleet.start(config, params, self.shape, ec.num_instances, k, self.modalities, moka)
        else:
            executors = [InstanceExecutor(config, params, devices[i * k:(i + 1) * k], self.shape, self.modalities,
                                          moka) for i in range(ec.num_instances)]
        self.insts = [
            EngineInstance(iid=i, group=g, stage=s, pool=PagePool(ec.pages_per_instance), executor=ex)
            for i, ((g, s), ex) in enumerate(zip(layout, executors, strict=True))
        ]
        for inst in self.insts:
            inst.prefix = PrefixKVCache(inst.pool, ec.page_size) if ec.prefix_cache else None
        self.inline_encode = getattr(self.policy, "inline_encode", True)
        self.embedding_cache = EmbeddingCache(ec.embedding_cache_tokens)
        self.embedding_store: dict[str, np.ndarray] = {}  # the arrays of the cache's entries
        self.embedding_cache.pool.on_evict = self.embedding_store.pop
        self.q = {(g, s): deque() for g in Group for s in Stage}
        self.requests: dict[int, EngineRequest] = {}
        self.contexts: dict[str, ServedContext] = {}
        self.stats = EngineStats()
        self.lock = threading.Condition()
        self._ids = itertools.count()
        self._stopping = False
        self.switch_count = 0
        self.switch_log: list = []  # (engine time, instance, (group, stage) before, after)
        self.layout_log: list = [(0.0, self.layout_counts())]
        self.decision_times: deque[float] = deque(maxlen=RECENT)
        self.step_time: dict[str, float] = {}  # kind -> EWMA of its step's wall time (busy_until estimates)
        # (kind, features, seconds) of every step, in the cost model's terms: the calibration reads them
        #   prefill: (sum of new tokens, sum of L^2 - k^2); decode: (batch, sum of context lengths) per token step;
        #   export / import: (pages, bytes)
        self.timings: deque[tuple[str, tuple, float]] = deque(maxlen=RECENT)
        if ec.warmup:
            failed: list[BaseException] = []

            def warm(ex):
                try:
                    ex.warmup()
                except BaseException as e:  # re-raised below, once every instance has stopped compiling
                    failed.append(e)

            threads = [threading.Thread(target=warm, args=(i.executor,)) for i in self.insts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if failed:
                self._close_executors()
                raise failed[0]
        self.started = time.perf_counter()
        self.policy.start(self)
        for inst in self.insts:
            inst.thread = threading.Thread(target=self._worker, args=(inst,), name=f"instance-{inst.iid}",
                                           daemon=True)
            inst.thread.start()
        self._ticker = None
        if getattr(self.policy, "tick_interval", None):
            self._ticker = threading.Thread(target=self._tick_loop, name="scheduler-tick", daemon=True)
            self._ticker.start()

    # ---- the policies' read surface (the simulator's names) ------------------------------------------------
    @property
    def now(self) -> float:
        """Engine clock: seconds since start-up (request arrival times and policy ticks use it)."""
        return time.perf_counter() - self.started

    @property
    def N(self) -> int:  # the simulator's name, which the policies read
        return len(self.insts)

    @property
    def inflight(self) -> dict:
        """Requests between instances (their KV on its way), by id."""
        return {r.rid: r for r in self.requests.values() if r.phase == Phase.MIGRATING}

    def decode_batch(self, inst: EngineInstance) -> int:
        return len(inst.running) + len(inst.incoming)

    def _decode_kv_usage(self, g: Group) -> float:
        insts = [i for i in self.insts if i.group == g and i.stage == Stage.DECODE]
        total = sum(i.kv_total for i in insts)
        return sum(i.kv_used for i in insts) / total if total else 0.0

    # ---- the policies' act surface -------------------------------------------------------------------------
    def switch(self, inst: EngineInstance, group: Group, stage: Stage, urgent: bool = False) -> None:
        """Re-assign an instance (call under `lock`, as the policies' ticks do). It finishes the prefills it
        started, hands its decode batch to same-group decode peers (KV migration; a request waits in the group's
        decode queue, its pages staying here, while no peer has room), then takes the new role. The same checks
        as the simulator's `switch`."""
        if not check_switch(self, inst, group, stage, urgent):
            return
        old = (inst.group, inst.stage)
        if old[1] == Stage.COUPLED or stage == Stage.COUPLED:
            raise ValueError("coupled instances keep their role")
        inst.pending_target = (group, stage)
        inst.state = InstState.DRAINING
        inst.last_switch = self.now
        inst.switches += 1
        self.switch_count += 1
        self.switch_log.append((self.now, inst.iid, old, (group, stage)))
        self.lock.notify_all()

    def _drain(self, inst: EngineInstance) -> None:
        """A draining instance: its decode batch leaves (FCFS through the decode queue); once nothing of its old
        role is left, it takes the new one."""
        if inst.stage == Stage.DECODE and inst.running:
            q = self.q[(inst.group, Stage.DECODE)]
            for r in reversed(list(inst.running.values())):
                r.phase = Phase.WAIT_DECODE
                q.appendleft(r)
            inst.running.clear()
            self._drain_decode_queue(inst.group)
        if inst.prefilling or inst.encoding or inst.running or inst.outgoing or inst.incoming or inst.arriving:
            return
        inst.group, inst.stage = inst.pending_target
        inst.pending_target = None
        if inst.prefix is not None:
            inst.prefix.clear()  # another role or group: other prompts
        inst.state = InstState.ACTIVE
        inst.role_since = self.now
        self.layout_log.append((self.now, self.layout_counts()))
        if inst.stage == Stage.DECODE:
            self._drain_decode_queue(inst.group)

    def _tick_loop(self) -> None:
        interval = self.policy.tick_interval
        while True:
            time.sleep(interval)
            with self.lock:
                if self._stopping:
                    return
                t0 = time.perf_counter()
                try:
                    self.policy.on_tick(self, self.now)
                except Exception:  # a policy error must not stop serving; it is logged with its trace
                    self.stats.policy_errors += 1
                    log.exception("policy %s: tick failed", self.policy.name)
                self.decision_times.append(time.perf_counter() - t0)
                self.lock.notify_all()

    # ---- the client surface ---------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], sampling: SamplingParams, sink: Callable[[RequestOutput], None],
               context_id: str | None = None, media: Sequence[MediaInput] = (), modality_ids=None,
               key_mask=None) -> int:
        """Queue a request; `sink` receives its outputs (from a worker thread). Returns its id. With `context_id`
        (a served KVzip context) the prompt is what follows the context: the question turn. With `media` (images
        and sounds) the prompt holds one placeholder token per item, in order; the engine expands each to the
        encoder's tokens (the usage's prompt_tokens count the expanded prompt, as the model sees it). Or the prompt
        comes expanded with its `modality_ids` (`kvzip_jax.models.llava.MODALITY_IDS`, TEXT elsewhere). MokA:
        `key_mask` marks the question tokens the items' tokens attend to (default none)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty (0 tokens)")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        prompt, media, starts, key_mask = self._expand_media(prompt, tuple(media), context_id, modality_ids, key_mask)
        start = 0
        if context_id is not None:
            with self.lock:
                served = self.contexts.get(context_id)
                if served is None:
                    raise KeyError(f"context {context_id!r} does not exist (or was deleted)")
                start = served.kv.next_position
        total = start + len(prompt) + sampling.max_tokens
        if total > self.max_model_len:
            what = f"context ({start} positions) + " if context_id is not None else ""
            raise ValueError(f"{what}prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) = {total} "
                             f"is beyond the engine's max_model_len ({self.max_model_len})")
        stops = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stops |= set(self.config.eos_token_ids)
            if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
                stops.add(int(self.tokenizer.eos_token_id))
        detok = Detokenizer(self.tokenizer, sampling.stop) if self.tokenizer is not None else None
        if sampling.stop and detok is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        with self.lock:
            if self._stopping:
                raise EngineError("the engine is shutting down")
            waiting = sum(1 for r in self.requests.values() if r.phase == Phase.QUEUED)
            if waiting >= self.engine_config.max_waiting:
                raise QueueFull(f"{waiting} requests are waiting (the limit is {self.engine_config.max_waiting})")
            r = EngineRequest(rid=next(self._ids), prompt=prompt, sampling=sampling, sink=sink,
                              stop_ids=frozenset(stops), detok=detok, t_arrival=self.now, context=context_id,
                              media=media, media_starts=starts, key_mask=key_mask,
                              modality=Modality.MM if media else Modality.TEXT)
            r.group = self.policy.route(r)
            if not any(self._live(i) for i in self.insts):
                raise EngineError("no instance is left in service")
            self.requests[r.rid] = r
            self.stats.submitted += 1
            self._lookup_embeddings(r)
            if r.todo_media and not self.inline_encode:
                self.q[(r.group, Stage.ENCODE)].append(r)
            else:
                self._enqueue_prefill(r)
            self.lock.notify_all()
        return r.rid

    def _enqueue_prefill(self, r: EngineRequest, front: bool = False) -> None:
        """Into its prefill queue: a coupled policy's chosen (live) instance, else its group's prefill queue."""
        r.phase = Phase.QUEUED
        if r.group == Group.ANY and self.policy.coupled:
            live = [i for i in self.insts if self._live(i)]
            if live:
                target = self.policy.coupled_target(self, r) if not front else None
                if target is None or not self._live(target):
                    target = min(live, key=lambda i: (len(i.local_queue) + len(i.running), i.iid))
                (target.local_queue.appendleft if front else target.local_queue.append)(r)
                return
        q = self.q[(r.group, Stage.PREFILL)]
        (q.appendleft if front else q.append)(r)

    def cancel(self, rid: int) -> None:
        """Stop a request (its client went away); its pages are freed. Unknown or finished ids are ignored."""
        with self.lock:
            r = self.requests.get(rid)
            if r is None:
                return
            r.cancelled = True
            if r.phase == Phase.QUEUED:
                for queue in [*self.q.values(), *(i.local_queue for i in self.insts)]:
                    if r in queue:
                        queue.remove(r)
                self._finish(r, "cancelled")
            elif r.phase == Phase.WAIT_DECODE:
                self.q[(r.group, Stage.DECODE)].remove(r)
                self._finish(r, "cancelled")
            self.lock.notify_all()  # the owning worker drops the others at its next step

    # ---- served KVzip contexts ------------------------------------------------------------------------------------
    def add_context(self, cid: str, compressed, context_tokens: int) -> ServedContext:
        """Serve a compressed context (`kvzip_jax.kvzip.compressor.CompressedContext`, one row) under `cid`."""
        c = self.config
        cache = compressed.cache
        shape = (cache.page_table.shape[0], cache.page_table.shape[2], cache.k_pages.shape[-1])
        if shape != (c.num_layers, c.num_kv_heads, c.head_dim):
            raise ValueError(f"the context was compressed for another model (layers, kv heads, head_dim = {shape})")
        served = ServedContext.from_compressed(cid, compressed, context_tokens, self.engine_config.page_size,
                                               self.now)
        if served.kv.next_position >= self.max_model_len:
            raise ValueError(f"the context takes {served.kv.next_position} positions; the engine's max_model_len "
                             f"is {self.max_model_len}, which leaves no room for a question")
        if served.num_pages > self.insts[0].kv_total // 2:
            raise ValueError(f"the compressed context needs {served.num_pages} pages, more than half an instance's "
                             f"pool ({self.insts[0].kv_total}); raise pages_per_instance")
        with self.lock:
            if cid in self.contexts:
                raise ValueError(f"context id {cid!r} is taken")
            self.contexts[cid] = served
        return served

    def remove_context(self, cid: str) -> None:
        """Stop serving a context; requests already started keep their shares of its pages until they end."""
        with self.lock:
            served = self.contexts.pop(cid, None)
            if served is None:
                raise KeyError(f"context {cid!r} does not exist")
            for iid, kv in served.resident.items():
                self.insts[iid].pool.release(kv.owned())
            served.resident.clear()
            self.lock.notify_all()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, timeout: float = 300.0,
                 media: Sequence[Sequence[MediaInput]] | None = None, modality_ids=None, key_mask=None):
        """Blocking helper: every prompt's generated token ids (stop token included), in order. `media[b]`,
        `modality_ids[b]`, `key_mask[b]`: prompt b's, as `submit` takes them."""
        done = threading.Event()
        results: dict[int, RequestOutput] = {}
        tokens: dict[int, list[int]] = {}
        order = []

        def sink(out: RequestOutput):
            tokens.setdefault(out.rid, []).extend(out.token_ids)
            if out.finish_reason is not None:
                results[out.rid] = out
                if len(results) == len(prompts):
                    done.set()

        for b, p in enumerate(prompts):
            order.append(self.submit(p, sampling, sink, media=media[b] if media is not None else (),
                                     modality_ids=None if modality_ids is None else modality_ids[b],
                                     key_mask=None if key_mask is None else key_mask[b]))
        if not done.wait(timeout):
            raise TimeoutError(f"{len(prompts) - len(results)} of {len(prompts)} requests unfinished after {timeout}s")
        errors = [results[i].error for i in order if results[i].finish_reason == "error"]
        if errors:
            raise EngineError(errors[0])
        return [tokens.get(i, []) for i in order]

    def shutdown(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify_all()
        if self._ticker is not None:
            self._ticker.join(timeout=60)
        for inst in self.insts:
            if inst.thread is not None:
                inst.thread.join(timeout=60)
        with self.lock:
            for r in list(self.requests.values()):
                self._finish(r, "error", "the engine shut down")
        self._close_executors()

    def _close_executors(self) -> None:
        for inst in self.insts:
            inst.executor.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def snapshot(self) -> dict:
        """Counters for /metrics and /health (a consistent copy, taken under the lock)."""
        with self.lock:
            return {
                "waiting": {f"{g.name}/{s.name}": len(q) for (g, s), q in self.q.items() if q}
                | {f"instance{i.iid}/local": len(i.local_queue) for i in self.insts if i.local_queue},
                "instances": [
                    {"iid": i.iid, "location": i.executor.location, "group": i.group.name, "stage": i.stage.name,
                     "state": i.state.name, "prefilling": len(i.prefilling),
                     "running": len(i.running), "pages_used": i.pool.used, "pages_total": i.kv_total,
                     "steps": i.steps}
                    for i in self.insts
                ],
                "live_requests": len(self.requests),
                "switches": self.switch_count,
                "contexts": len(self.contexts),
                "context_kv_bytes_saved": sum(
                    s.compressed.report.dense_kv_bytes - s.compressed.report.compressed_kv_bytes
                    for s in self.contexts.values()),
                "stats": dataclasses.replace(self.stats, ttft=deque(self.stats.ttft, maxlen=RECENT),
                                             tpot=deque(self.stats.tpot, maxlen=RECENT)),
                "kv_bytes_per_page": self.insts[0].executor.kv_bytes_per_page,
                "embedding_cache": {"hits": self.embedding_cache.hits, "misses": self.embedding_cache.misses,
                                    "tokens": self.embedding_cache.pool.used},
                "prefix_cache_pages": sum(len(i.prefix.pages()) for i in self.insts if i.prefix is not None),
            }

    # ---- the worker: plan under the lock, run on the device without it, apply under the lock ----------------
    def _worker(self, inst: EngineInstance) -> None:
        while True:
            with self.lock:
                while True:
                    if self._stopping:
                        return
                    work = self._plan(inst)
                    if work is not None:
                        break
                    self.lock.wait(timeout=1.0)
                inst.busy = True
                inst.in_flight = work
                kind, payload = work
                inst.batch = [r for r, _ in payload] if kind == "prefill" else list(payload) if kind == "encode" else []
                inst.busy_until = self.now + self.step_time.get(kind, 0.0)
            t0 = time.perf_counter()
            try:
                result = self._run(inst, kind, payload)
                error = None
            except HostInputError as e:  # nothing reached the device: the step's requests fail, the instance stays
                log.warning("instance %d: a %s step's inputs were refused: %s", inst.iid, kind, e)
                with self.lock:
                    inst.busy, inst.busy_until, inst.batch, inst.in_flight = False, self.now, [], None
                    for r in self._step_requests(kind, payload):
                        self._finish(r, "error", f"the request could not be run: {e}")
                    self.lock.notify_all()
                continue
            except Exception as e:  # the instance is lost (its donated pool may be gone), never the server
                log.exception("instance %d: %s step failed; the instance leaves service", inst.iid, kind)
                result, error = None, f"{type(e).__name__}: {e}"
            with self.lock:
                took = time.perf_counter() - t0
                self.step_time[kind] = 0.8 * self.step_time.get(kind, took) + 0.2 * took
                if error is None:
                    self._record_timing(inst, kind, payload, took)
                inst.busy = False
                inst.busy_until = self.now
                inst.batch = []
                inst.in_flight = None
                inst.steps += 1
                if error is None:
                    getattr(self, f"_apply_{kind}")(inst, payload, result)
                else:
                    self._instance_failed(inst, kind, payload, error)
                if self.engine_config.check_invariants:
                    try:
                        self.check_invariants()
                    except AssertionError as e:  # fail loudly: every request ends with the broken invariant
                        log.exception("engine invariant broken")
                        self._stopping = True
                        for r in list(self.requests.values()):
                            self._finish(r, "error", f"engine invariant broken: {e}")
                        self.lock.notify_all()
                        return
                self.lock.notify_all()
                if error is not None:
                    return

    def _record_timing(self, inst: EngineInstance, kind: str, payload, took: float) -> None:
        if kind == "prefill":
            new = sum(len(chunk) for _, chunk in payload)
            sq = sum((r.prefilled + len(chunk)) ** 2 - r.prefilled ** 2 for r, chunk in payload)
            self.timings.append((kind, (new, sq), took))
        elif kind == "decode":
            steps = self.engine_config.decode_steps
            ctx = sum(int(r.kv.lengths.max()) for r in payload)  # at the dispatch's start
            # one token step of the dispatch, at its middle context (each step adds one pair per row)
            self.timings.append((kind, (len(payload), ctx + len(payload) * (steps - 1) / 2), took / steps))
        elif kind == "encode":
            tokens = [im.v_tokens for im in {im.hash: im for r in payload for im in r.todo_media}.values()]
            self.timings.append((kind, (sum(tokens), sum(t * t for t in tokens)), took))
        elif kind in ("export", "import"):
            m = payload if kind == "export" else payload[0]
            pages = len(m.new_ids)
            self.timings.append((kind, (pages, pages * inst.executor.kv_bytes_per_page), took))

    def _run(self, inst: EngineInstance, kind: str, payload):
        ex = inst.executor
        if inst.fault:
            raise InjectedFault(f"instance {inst.iid}: injected fault in a {kind} step")
        if kind == "prefill":
            for r, _ in payload:
                if r.copies is not None:
                    ex.copy_pages(*r.copies)
            hidden = self.config.hidden_size
            return ex.prefill([PrefillRow(np.asarray(chunk, np.int32), r.kv, r.sampling,
                                          r.chunk_embeddings(r.prefilled, len(chunk), hidden) if r.media else None,
                                          # the adapted step: the one chunk that holds the whole prompt
                                          r.chunk_moka(0, len(chunk)) if r.moka and r.prefilled == 0 else None)
                               for r, chunk in payload])
        if kind == "decode":
            return ex.decode([DecodeRow(r.output[-1], r.kv, r.sampling) for r in payload])
        if kind == "encode":
            return ex.encode(list({im.hash: im for r in payload for im in r.todo_media}.values()))
        if kind == "export":
            return ex.export_pages(payload.old_ids, payload.target.executor.placement)
        if kind == "import":
            migration, data = payload
            ex.import_pages(migration.new_ids, data)
            return None
        if kind == "load_context":
            served, ids = payload
            ex.import_pages(ids, served.pages(ex.padded_ids(ids)))
            return None
        raise AssertionError(kind)

    def _plan(self, inst: EngineInstance):
        self._drop_cancelled(inst)
        if inst.outgoing:
            return "export", inst.outgoing.popleft()
        if inst.incoming:
            return "import", inst.incoming.popleft()
        if inst.context_loads:
            return "load_context", inst.context_loads.popleft()
        if inst.state == InstState.DRAINING:
            self._drain(inst)
        if inst.state != InstState.ACTIVE:
            pass  # draining: finish the prefills already started, take nothing new
        elif inst.stage == Stage.ENCODE:
            self._take_encode(inst, self.q[(inst.group, Stage.ENCODE)])
        elif inst.stage == Stage.COUPLED:
            self._admit(inst, inst.local_queue, whole=True)
        elif inst.stage == Stage.PREFILL:
            queue = self.q[(inst.group, Stage.PREFILL)]
            if not queue and not inst.prefilling:
                # pooled prefill (ElasticMM): an idle prefill instance may take another group's prefill queue
                lend = getattr(self.policy, "lend_prefill", None)
                target = lend(self, inst) if lend is not None else None
                if target is not None and target[1] == Stage.PREFILL:
                    queue = self.q[target]
                elif target is not None and target[1] == Stage.ENCODE:
                    self._take_encode(inst, self.q[target])
            self._admit(inst, queue, whole=False)
        if inst.encoding:
            return "encode", list(inst.encoding)
        for r in inst.prefilling:
            if r.todo_media:  # another instance may have encoded the same image since it was admitted
                self._lookup_embeddings(r, recheck=True)
        inline = self._fit_media([r for r in inst.prefilling if r.todo_media])
        if inline:  # a blocking policy: the instance that prefills a request encodes its images first
            return "encode", inline
        if inst.prefilling:
            chunk = self.engine_config.prefill_chunk
            rows = inst.prefilling[:self.engine_config.prefill_rows]
            return "prefill", [(r, r.prefill_ids[r.prefilled:r.prefilled + chunk]) for r in rows]
        if inst.running and inst.stage in (Stage.COUPLED, Stage.DECODE):
            return "decode", list(inst.running.values())[:self.engine_config.decode_rows]
        return None

    def _drop_cancelled(self, inst: EngineInstance) -> None:
        for r in [r for r in inst.prefilling if r.cancelled]:
            self._finish(r, "cancelled")
        for r in [r for r in inst.running.values() if r.cancelled]:
            self._finish(r, "cancelled")

    # ---- applying results ------------------------------------------------------------------------------------
    def _apply_prefill(self, inst: EngineInstance, rows, first_tokens) -> None:
        for (r, chunk), tok in zip(rows, first_tokens, strict=True):
            if r.phase == Phase.DONE:
                continue
            r.kv.advance(len(chunk), self.engine_config.page_size)
            r.prefilled += len(chunk)
            r.copies = None
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            if r.prefilled < len(r.prefill_ids):
                continue
            inst.prefilling.remove(r)
            self._release_embeddings(r)  # its KV holds them now (a restart re-uses r.embeds, not the cache)
            if inst.prefix is not None and r.context is None:
                inst.prefix.insert(self._block_keys(r), r.kv)
            if r.t_first is None:
                r.t_first = self.now
                self.stats.prompt_tokens += len(r.prompt)
            if self._emit(r, [int(tok)]):
                continue
            if inst.stage == Stage.COUPLED:
                r.phase = Phase.DECODE
                inst.running[r.rid] = r
            else:
                r.phase = Phase.WAIT_DECODE
                self.q[(r.group, Stage.DECODE)].append(r)
                self._drain_decode_queue(r.group)

    def _apply_decode(self, inst: EngineInstance, rows, tokens) -> None:
        steps = self.engine_config.decode_steps
        for r, out in zip(rows, tokens, strict=True):
            if r.phase == Phase.DONE:
                continue
            r.kv.advance(steps, self.engine_config.page_size)
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            self._emit(r, [int(t) for t in out])
        self._drain_decode_queue(inst.group)

    def _apply_load_context(self, inst: EngineInstance, payload, _result) -> None:
        served, ids = payload
        served.loading.discard(inst.iid)
        if self.contexts.get(served.cid) is served:
            served.resident[inst.iid] = served.kv.relocated(ids)
        else:  # deleted while loading
            inst.pool.release(ids)

    def _apply_export(self, inst: EngineInstance, migration: Migration, data) -> None:
        if self._live(migration.target):
            migration.target.incoming.append((migration, data))
            return
        # the destination failed while the pages were on their way: the source still owns them; wait for another
        r = migration.request
        r.phase = Phase.WAIT_DECODE
        self.q[(r.group, Stage.DECODE)].appendleft(r)
        self._drain_decode_queue(r.group)

    def _apply_import(self, inst: EngineInstance, payload, _result) -> None:
        m, _ = payload
        r = m.request
        m.source.pool.release(m.old_ids)  # ownership moves now that the destination holds the copy
        r.kv = r.kv.relocated(m.new_ids)
        r.owner = inst.iid
        inst.reserved -= m.growth
        inst.arriving -= 1
        r.kv.grow(inst.pool, r.sampling.max_tokens, self.engine_config.page_size)
        r.migrations += 1
        self.stats.migrations += 1
        self.stats.migrated_pages += len(m.new_ids)
        if r.cancelled:
            self._finish(r, "cancelled")
            return
        r.phase = Phase.DECODE
        inst.running[r.rid] = r

    # ---- prefill -> decode hand-off ------------------------------------------------------------------------
    def _pick_decode(self, group: Group, copy: int, growth: int, near: EngineInstance | None = None
                     ) -> EngineInstance | None:
        """The group's decode instance with room and the most free pages; one on the host of `near` (where the KV
        is now) first, if any has room, as the simulator's `host_aware_decode` (a Ray fleet's nodes)."""
        best, best_key = None, None
        for i in self.insts:
            if i.group != group or i.stage != Stage.DECODE or i.state != InstState.ACTIVE:
                continue
            if len(i.running) + i.arriving >= self.engine_config.decode_rows or i.kv_free < copy + growth:
                continue
            key = (near is not None and i.executor.host == near.executor.host, i.kv_free)
            if best is None or key > best_key:
                best, best_key = i, key
        return best

    def _drain_decode_queue(self, group: Group) -> None:
        q = self.q[(group, Stage.DECODE)]
        page = self.engine_config.page_size
        if q and self._unservable(group, Stage.DECODE):
            self._fail_unservable("its decode instances failed")
            return
        while q:
            r = q[0]
            old_ids = r.kv.owned()
            growth = r.kv.pages_to_hold(r.sampling.max_tokens, page)
            target = self._pick_decode(group, len(old_ids), growth, near=self.insts[r.owner])
            if target is None:
                return
            q.popleft()
            new_ids = target.pool.alloc(len(old_ids))
            target.reserved += growth
            target.arriving += 1
            r.phase = Phase.MIGRATING
            source = self.insts[r.owner]
            source.outgoing.append(Migration(r, source, target, old_ids, new_ids, growth))

    # ---- outputs and the end of a request ------------------------------------------------------------------
    def _emit(self, r: EngineRequest, tokens: list[int]) -> bool:
        """Add generated tokens (in order, up to the first stop); send them to the sink. True when it finished."""
        new: list[int] = []
        text = ""
        reason = None
        for t in tokens:
            new.append(t)
            r.output.append(t)
            if t in r.stop_ids:
                reason = "stop"
                break
            if r.detok is not None:
                text += r.detok.push([t])
                if r.detok.stopped:
                    reason = "stop"
                    break
            if len(r.output) >= r.sampling.max_tokens:
                reason = "length"
                break
        self.stats.generated_tokens += len(new)
        if reason is not None:
            if r.detok is not None:
                text += r.detok.finish()
            self._finish(r, reason, new_tokens=new, text=text)
            return True
        r.sink(RequestOutput(r.rid, new, text, prompt_tokens=len(r.prompt), completion_tokens=len(r.output)))
        return False

    def _finish(self, r: EngineRequest, reason: str, error: str | None = None, new_tokens=(), text: str = "") -> None:
        if r.phase == Phase.DONE:
            return
        self._release_embeddings(r)
        if r.phase == Phase.ENCODING:
            for i in self.insts:
                if r in i.encoding:
                    i.encoding.remove(r)
        inst = self.insts[r.owner] if r.owner >= 0 else None
        if inst is not None and self._live(inst):
            if r in inst.prefilling:
                inst.prefilling.remove(r)
            inst.running.pop(r.rid, None)
            if r.kv is not None:  # the owner's pages (a migration's copies are released by its failure path)
                inst.pool.release(r.kv.owned())
        r.phase = Phase.DONE
        r.finish_reason = reason
        r.t_done = self.now
        self.requests.pop(r.rid, None)
        s = self.stats
        if reason == "cancelled":
            s.cancelled += 1
        elif reason == "error":
            s.errors += 1
        else:
            s.finished += 1
            if r.t_first is not None:
                s.ttft.append(r.t_first - r.t_arrival)
                if len(r.output) > 1:
                    s.tpot.append((r.t_done - r.t_first) / (len(r.output) - 1))
        r.sink(RequestOutput(r.rid, list(new_tokens), text, reason, len(r.prompt), len(r.output), error))

    # ---- invariants (spec 6.1, on the real engine) -------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every live request is in exactly one place; every used page has exactly its owners (call under lock)."""
        check_engine_invariants(self)
