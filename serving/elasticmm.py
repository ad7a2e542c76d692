"""ElasticMM policy: modality groups + elastic stage partitioning driven by the gain-cost model.

Per tick (spec 1.3, reconstructed algorithm):
  1. decode auto-scaling (eq. 3): under decode pressure (waiting requests, KV use > theta_D or a step time
     above target) grow decode with the candidate of highest gain - cost: an idle instance, a prefill
     instance of the group, or an instance of the other group;
  2. encode / prefill growth (eq. 2): when a stage has a queue and no idle instance, take the candidate with
     the highest gain - cost among: idle instances of the group, the decode instance e_max of the group
     (most free KV; its KV migrates to decode peers), the other stage of the group, and -- reactive
     cross-group move -- the cheapest instance of each role of the other group. Intra-group re-partition
     and cross-group preemption are thus compared by the same gain-cost numbers and the winner applied;
  3. decode shrink-to-minimum: when decode would still meet its step-time target on one instance fewer,
     release the least loaded decode instance (KV migrates) to encode / prefill;
  4. proactive (every `proactive_interval`): max-min burst tolerance greedy on the predicted group loads,
     realised by moving idle instances only.
  0. shrink to zero (before 1-4): a group with no live request and no arrival for `dormant_after` (5 s) lends all
     its instances to the other group (none pinned; instances inside their cooldown follow later). Its first
     request brings back one instance per stage at the next tick (preferring donors past their cooldown; an
     urgent move ignores it only if all are inside it -- an empty stage with work is a liveness failure);
  pooled prefill (simulator dispatch, `lend_prefill`): an idle prefill instance serves a batch of the other
     group's prefill queue or of the encode queue when that queue has no free instance of its own.
Dispatch inside a stage is FCFS up to the prefill saturation point (`prefill_budget`). Every switch but an
urgent bring-back is subject to a cooldown (no instance switches twice within it), and steps 1-4 never take a
group's last instance of a stage (only step 0 empties an idle group). Decode never grows by preemption while
dispatching: only the auto-scaler grows it.

Gain and cost are in seconds per token (eq. 2: Gain per input token, Cost per output token, and the
reverse for eq. 3), w is the preemption penalty. T(R, E) is computed by list scheduling the FCFS queue
(first `gain_window` requests) in saturation-sized batches onto the stage's instances, using the cost model.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass

from .balancer import greedy_allocation, needed_instances
from .model import Group, InstState, Modality, Stage
from .policies import EPD_STAGES, Policy


@dataclass(frozen=True)
class ElasticConfig:
    w: float = 0.004  # preemption penalty (the official calibration's value)
    cooldown: float = 2.0  # s: minimum dwell time of an instance in a role (5 s blocked burst response)
    tick: float = 0.1  # s: scheduling period
    proactive_interval: float = 30.0  # s
    gain_window: int = 32  # requests of a queue looked at by T(R, E)
    repartition_margin: float = 1.25  # encode/prefill <-> encode/prefill moves need gain > margin x loss
    donor_max_util: float = 0.8  # an encode/prefill instance may leave only if its peers stay below this load
    util_window: float = 5.0  # s: time constant of the per-instance busy-fraction average
    decode_kv_threshold: float = 0.9  # theta_D
    # decode step-time target = factor x the unloaded step (the SLO at scale k allows TPOT up to 2k x unloaded).
    # At 2.0, the scale-1 TPOT SLO, a text-only load near capacity kept more decode instances than the scale-3
    # SLO the experiments score needs while prefill queued (attainment 0.808 vs static PD's 0.952); 3.0 (scale
    # 1.5, half the scale-3 limit) gave 0.955 there and >= 0.99x the best baseline on every robustness load.
    decode_step_factor: float = 3.0
    shrink_hysteresis: float = 0.8  # shrink only if one instance fewer stays below this x target ...
    shrink_dwell: float = 10.0  # ... and decode has been free of pressure for this many seconds
    prefix_cache: bool = True
    nonblocking: bool = True
    proactive: bool = True
    reactive: bool = True
    # reactive cross-group candidates enter the gain-cost comparison when the target stage's mean busy fraction
    # is at least this (0: whenever the stage has a queue and no free instance; the donor guard still applies)
    cross_group_util: float = 0.0
    # an idle prefill instance serves batches of the other group's prefill queue when that group has no free
    # prefill instance (pooled prefill at batch granularity, no role switch; docs/elasticmm.md)
    pooled_prefill: bool = True
    # shrink to zero: a group with no live request and no arrival for this many seconds lends ALL its instances
    # to the other group (0 disables); its first new request gets an instance per stage at the next tick
    dormant_after: float = 5.0
    # record every decision with the state it saw in ElasticMM.trace (debugging; off in the experiments)
    trace: bool = False


class ElasticMM(Policy):
    def __init__(self, cfg: ElasticConfig | None = None, name: str = "elasticmm"):
        cfg = cfg or ElasticConfig()
        for k in ("w", "cooldown", "gain_window", "proactive_interval", "shrink_dwell", "decode_step_factor",
                  "dormant_after"):
            v = getattr(cfg, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"elasticmm {k} = {v!r} must be a finite number >= 0")
        if not cfg.tick > 0:
            raise ValueError(f"elasticmm tick = {cfg.tick!r} must be > 0")
        self.cfg = cfg
        self.name = name
        self.inline_encode = not cfg.nonblocking
        self.prefix_cache = cfg.prefix_cache
        self.tick_interval = cfg.tick
        self.cooldown = cfg.cooldown
        self.group_stages = EPD_STAGES if cfg.nonblocking else {Group.TEXT: (Stage.PREFILL, Stage.DECODE),
                                                                Group.MM: (Stage.PREFILL, Stage.DECODE)}
        self.stats = Counter()
        self.win_count = {Group.TEXT: 0, Group.MM: 0}
        self.win_work = {Group.TEXT: 0.0, Group.MM: 0.0}
        self.rate_avg = {Group.TEXT: None, Group.MM: None}
        self.rate_hist = {Group.TEXT: [], Group.MM: []}
        self.work_avg = {Group.TEXT: None, Group.MM: None}
        self.targets = None
        self._memo = {}
        self.util = {}  # instance id -> EWMA of its busy fraction
        # (group, stage) -> EWMA of the number of busy instances in the role. The donor guard needs the role's
        # load, and a sum of per-instance averages loses the history of every instance that leaves: after a move
        # the remaining peers' averages still show the old, lower per-instance load, so successive moves 3 -> 2 -> 1
        # each saw the role as lightly loaded (docs/elasticmm.md, 'Bursts inside one group').
        self.role_load = {}
        self.last_pressure = {}  # group -> last time its decode stage was under pressure
        self.may_empty_stages = cfg.dormant_after > 0  # the simulator lets this policy empty an idle stage
        self.last_arrival = {Group.TEXT: -math.inf, Group.MM: -math.inf}
        self.last_work = {Group.TEXT: 0.0, Group.MM: 0.0}  # last tick at which the group had a live request
        self.trace = [] if cfg.trace else None  # (time, why, iid, from role, to role, {role: (instances, queue)})

    # ---- static parts ------------------------------------------------------------------------------------
    def layout(self, n, cost):
        need = sum(len(s) for s in self.group_stages.values())
        if n < need:
            raise ValueError(f"{self.name}: impossible instance count {n}; the modality groups need at least {need}")
        rest = n - 2  # TEXT starts at 1P + 1D (the official default placement); the rest is MM
        if self.cfg.nonblocking:
            e = max(1, rest // 3)
            d = max(1, rest // 3)
            mm = [(Group.MM, Stage.ENCODE)] * e + [(Group.MM, Stage.PREFILL)] * (rest - e - d) \
                + [(Group.MM, Stage.DECODE)] * d
        else:
            d = max(1, rest // 2)
            mm = [(Group.MM, Stage.PREFILL)] * (rest - d) + [(Group.MM, Stage.DECODE)] * d
        return [(Group.TEXT, Stage.PREFILL), (Group.TEXT, Stage.DECODE), *mm]

    def route(self, r):
        g = Group.MM if r.modality == Modality.MM else Group.TEXT
        self.last_arrival[g] = r.t_arrival
        self.win_count[g] += 1
        self.win_work[g] += self._work(r)
        return g

    def prefill_budget(self, sim, inst):
        return sim.cost.saturation_tokens

    def lend_prefill(self, sim, inst):
        """(group, stage) whose queue the idle prefill instance `inst` may serve one batch of, or None.

        Called by the simulator when `inst` has nothing of its own group to prefill. A role switch costs a cooldown
        and is only taken when the donor role can spare a whole instance; a prefill instance at 60% load cannot,
        but its idle 40% can serve the other group's prefill queue, or the encode queue (every instance holds the
        encoder), batch by batch, as a pooled PD prefill stage with inline encode would. Only queues with no free
        instance of their own are served, so a group's own instances always come first."""
        if not self.cfg.pooled_prefill or inst.stage != Stage.PREFILL or inst.state != InstState.ACTIVE:
            return None
        order = [(g, Stage.PREFILL) for g in self.group_stages if g != inst.group]
        order += [(g, Stage.ENCODE) for g, stages in self.group_stages.items() if Stage.ENCODE in stages]
        for g, s in order:
            if s not in self.group_stages[g] or not sim.q[(g, s)]:
                continue
            if any(i.group == g and i.stage == s and i.state == InstState.ACTIVE and not i.busy for i in sim.insts):
                continue  # the role's own free instance takes it
            return g, s
        return None

    def start(self, sim):
        c = sim.cost
        self.cost = c
        self.step_target = self.cfg.decode_step_factor * c.decode_step_time(1, 1024)
        self.last_proactive = 0.0
        self.floors = {g: len(s) for g, s in self.group_stages.items()}

    def _work(self, r) -> float:
        """Instance-seconds one request costs (for mu in the burst-tolerance model)."""
        c = getattr(self, "cost", None)
        if c is None:
            return 0.0
        w = 0.0
        for im in r.images:
            w += c.encode_time(im.v_tokens, im.v_tokens ** 2) - c.e0 * (1 - 1 / 8)
        L = r.input_len
        w += c.prefill_share(L)
        w += r.output_len * (c.da / 64 + c.db * (L + r.output_len / 2) + c.dc)
        return w

    # ---- helpers -----------------------------------------------------------------------------------------
    def _roles(self, sim) -> dict:
        """(group, stage) -> instances holding or heading to that role; memoised per tick (O(N) once)."""
        roles = self._memo.get("roles")
        if roles is None:
            roles = self._memo["roles"] = {}
            for i in sim.insts:
                roles.setdefault(sim.effective_role(i), []).append(i)
        return roles

    def _movable(self, sim, inst, now) -> bool:
        if inst.state != InstState.ACTIVE or inst.pending_target is not None:
            return False
        if now - inst.last_switch < self.cooldown:
            return False
        peers = self._roles(sim).get((inst.group, inst.stage), ())
        if len(peers) <= 1:
            return False
        if inst.stage in (Stage.ENCODE, Stage.PREFILL):
            # "the instance whose removal hurts least": never strip a stage its remaining peers could not carry
            load = self.role_load.get((inst.group, inst.stage), 0.0)
            return load / (len(peers) - 1) <= self.cfg.donor_max_util
        return True

    def _idle(self, sim, inst) -> bool:
        if inst.busy:
            return False
        if inst.stage == Stage.DECODE:
            return not inst.running and not inst.pending
        return not sim.q[(inst.group, inst.stage)]

    def _finish_times(self, sim, g, s, now, add_at=None, remove=None):
        """FCFS list schedule of the first gain_window queued requests of (g, s): finish time of each."""
        q = sim.q[(g, s)]
        k = min(len(q), self.cfg.gain_window)
        if k == 0:
            return [], []
        free = [max(now, i.busy_until) if i.busy else now for i in sim.insts
                if i.group == g and i.stage == s and i.state == InstState.ACTIVE and i is not remove]
        if add_at is not None:
            free.append(add_at)
        if not free:
            return [math.inf] * k, [q[j].input_len for j in range(k)]
        heapq.heapify(free)
        c = self.cost
        fins, lens = [], []
        j = 0
        if s == Stage.ENCODE:
            cap = c.enc_max_images
            while j < k:
                sv = sv2 = n_img = 0
                start_j = j
                while j < k and (j == start_j or n_img + len(q[j].todo_imgs) <= cap):
                    for im in q[j].todo_imgs:
                        sv += im.v_tokens
                        sv2 += im.v_tokens * im.v_tokens
                        n_img += 1
                    j += 1
                t = heapq.heappop(free) + c.encode_time(sv, sv2)
                heapq.heappush(free, t)
                for jj in range(start_j, j):
                    fins.append(t)
                    lens.append(q[jj].input_len)
        else:
            budget = c.saturation_tokens
            while j < k:
                tok = sq = 0
                start_j = j
                while j < k and (j == start_j or tok + q[j].input_len <= budget):
                    L = q[j].input_len
                    tok += L
                    sq += L * L
                    j += 1
                t = heapq.heappop(free) + c.prefill_time(tok, sq)
                heapq.heappush(free, t)
                for jj in range(start_j, j):
                    fins.append(t)
                    lens.append(q[jj].input_len)
        return fins, lens

    def _decode_state(self, sim, g):
        """(n instances, batch size, sum ctx, sum 1/out, sum remaining/out) of a group's decode stage."""
        hit = self._memo.get(("dec", g))
        if hit is None:
            hit = self._memo[("dec", g)] = self._decode_state_uncached(sim, g)
        return hit

    def _decode_state_uncached(self, sim, g):
        n = b = ctx = 0
        s1 = srem = 0.0
        for i in sim.insts:
            if i.group != g or i.stage != Stage.DECODE:
                continue
            if i.state == InstState.ACTIVE:
                n += 1
            nb = len(i.running)
            b += nb
            ctx += i.sum_ctx
            s1 += i.inv_out
            srem += nb - (i.prog + i.iters * i.inv_out)
            for r in i.pending:
                b += 1
                ctx += r.input_len + r.produced
                s1 += 1.0 / r.output_len
                srem += (r.output_len - r.produced) / r.output_len
        q = sim.q[(g, Stage.DECODE)]
        if q:
            # requests waiting for a decode slot: summed over the first gain_window and scaled to the queue
            # length, so a tick stays O(instances) however long an overloaded decode queue grows
            k = min(len(q), max(1, self.cfg.gain_window))
            qc = qi = 0.0
            for j in range(k):
                r = q[j]
                qc += r.input_len
                qi += 1.0 / r.output_len
            f = len(q) / k
            b += len(q)
            ctx += qc * f
            s1 += qi * f
            srem += len(q)
        return n, b, ctx, s1, srem

    def _step(self, n, b, ctx) -> float:
        """Per-token decode latency when a batch of b (total ctx) is spread over n instances."""
        if n <= 0:
            return math.inf
        if b == 0:
            return 0.0
        per = b / n
        cap = self.cost.decode_max_batch
        step = self.cost.decode_step_time(min(per, cap), ctx / n * min(1.0, cap / per))
        return step * max(1.0, per / cap)  # requests beyond the batch cap wait for a slot

    def _migration_time(self, inst) -> float:
        if inst.stage == Stage.DECODE:
            ctx = inst.sum_ctx + sum(r.input_len + r.produced for r in inst.pending)
            return self.cost.kv_transfer_time(ctx) + self.cost.t_switch if ctx else self.cost.t_switch
        return max(0.0, inst.busy_until - self._now) + self.cost.t_switch if inst.busy else self.cost.t_switch

    def _removal_cost(self, sim, inst, now, for_decode: bool = False) -> float:
        """Cost of taking `inst` away from its role.

        decode victim: eq. (2) cost, sum over B_d of (M(e) + w L(B_d, E_d - e)) / out_r;
        encode/prefill victim for decode growth: eq. (3) cost, sum over R'_p of (M(e) + w L(R'_p, E'_p - e)) / in_r;
        encode/prefill victim for another encode/prefill stage (intra-group re-partition or cross-group move):
        like-for-like loss, sum over its queue of (T(R', E' - e) - T(R', E')) / in_r, the same units as the gain.
        """
        m = self._migration_time(inst)
        w = self.cfg.w
        if inst.stage == Stage.DECODE:
            n, b, ctx, s1, srem = self._decode_state(sim, inst.group)
            step_red = self._step(n - 1, b, ctx)
            if math.isinf(step_red):
                return math.inf
            return m * s1 + w * step_red * srem
        fins, lens = self._finish_times(sim, inst.group, inst.stage, now, remove=inst)
        if for_decode:
            return sum((m + w * (f - now)) / L for f, L in zip(fins, lens, strict=True))
        base, _ = self._finish_times(sim, inst.group, inst.stage, now)
        return self.cfg.repartition_margin * sum((f - b) / L for f, b, L in zip(fins, base, lens, strict=True))

    def _overloaded(self, sim, g, s) -> bool:
        """Gate of the reactive cross-group candidates: the role's mean busy fraction reaches cross_group_util.
        The default 0 admits them whenever _grow_stage runs (a queue and no free instance): a scale-1 TTFT SLO
        (2x the unloaded time) is already missed at 40-60% utilisation, so an 80% gate reacted ~10 s late; the
        gain-cost comparison and the donor guard (donor_max_util) decide whether a move pays."""
        insts = self._roles(sim).get((g, s), ())
        return bool(insts) and self.role_load.get((g, s), 0.0) / len(insts) >= self.cfg.cross_group_util

    def _candidates(self, sim, g, target_stage, now, cross: bool = True):
        """One representative per (group, stage) role other than the target: idle first, else e_max."""
        best = {}
        for i in sim.insts:
            role = (i.group, i.stage)
            if role == (g, target_stage):
                continue
            if i.group != g and not (self.cfg.reactive and cross):
                continue
            if not self._movable(sim, i, now):
                continue
            idle = self._idle(sim, i)
            # e_max for decode: most free KV (cheapest to drain); for E/P: the one free soonest
            key = (0 if idle else 1, -i.kv_free if i.stage == Stage.DECODE else (i.busy_until if i.busy else now))
            if role not in best or key < best[role][0]:
                best[role] = (key, i, idle)
        return [(i, idle) for (_, i, idle) in best.values()]

    def _apply(self, sim, inst, g, s, why, urgent: bool = False):
        cross = inst.group != g
        if self.trace is not None:
            self.trace.append((sim.now, why, inst.iid, (inst.group.name, inst.stage.name), (g.name, s.name),
                               self._snapshot(sim)))
        sim.switch(inst, g, s, urgent=urgent) if urgent else sim.switch(inst, g, s)
        self._memo.clear()
        self.stats[why] += 1
        if cross:
            self.stats["cross_group"] += 1

    def _snapshot(self, sim) -> dict:
        """'GROUP/STAGE' -> (instances holding or heading to the role, queued requests), for the trace."""
        out = {}
        for g, stages in self.group_stages.items():
            for s in stages:
                n = sum(1 for i in sim.insts if sim.effective_role(i) == (g, s))
                out[f"{g.name}/{s.name}"] = (n, len(sim.q[(g, s)]))
        return out

    # ---- the tick ----------------------------------------------------------------------------------------
    def on_tick(self, sim, now):
        self._now = now
        self._memo = {}
        beta = min(1.0, self.cfg.tick / self.cfg.util_window)
        for i in sim.insts:  # EWMA of the busy fraction, sampled once per tick
            self.util[i.iid] = (1 - beta) * self.util.get(i.iid, 0.0) + beta * (1.0 if i.busy else 0.0)
        busy = Counter((i.group, i.stage) for i in sim.insts if i.busy)
        for g, stages in self.group_stages.items():
            for s in stages:
                self.role_load[(g, s)] = (1 - beta) * self.role_load.get((g, s), 0.0) + beta * busy[(g, s)]
        if self.may_empty_stages:
            for g in (Group.TEXT, Group.MM):
                if self.last_arrival[g] >= now - self.cfg.tick or self._has_work(sim, g):
                    self.last_work[g] = now
            self._cover_empty_stages(sim, now)
            self._lend_dormant(sim, now)
        for g in (Group.TEXT, Group.MM):
            self._decode_autoscale(sim, g, now)
        for g in (Group.TEXT, Group.MM):
            for s in self.group_stages[g]:
                if s != Stage.DECODE:
                    self._grow_stage(sim, g, s, now)
        for g in (Group.TEXT, Group.MM):
            self._shrink_decode(sim, g, now)
        if self.cfg.proactive and now - self.last_proactive >= self.cfg.proactive_interval:
            self._proactive(sim, now)

    # ---- shrink to zero ------------------------------------------------------------------------------------
    def _has_work(self, sim, g) -> bool:
        """Any live request of group g: queued, in a batch or decode batch, or in flight (preprocessing,
        transfer, migration). Arrivals since the last tick are counted by the caller."""
        if any(sim.q[(g, s)] for s in self.group_stages[g]):
            return True
        for i in sim.insts:
            if i.group == g and (i.running or i.pending):
                return True
            if i.batch and any(r.group == g for r in i.batch):  # a lent prefill instance serves the other group
                return True
        return any(r.group == g for r in sim.inflight.values())

    def dormant(self, g, now) -> bool:
        return self.may_empty_stages and now - self.last_work[g] >= self.cfg.dormant_after

    def _lend_dormant(self, sim, now):
        """Shrink to zero: a dormant group lends every instance to the other group, as long as that one is not
        dormant too (with no traffic at all nothing gains). Only instances past their cooldown move; the rest
        follow at later ticks. They join the other group's busiest encode/prefill stage; its auto-scaler and
        re-partition then place them."""
        for g in (Group.TEXT, Group.MM):
            dst = Group.MM if g == Group.TEXT else Group.TEXT
            if not self.dormant(g, now) or self.dormant(dst, now):
                continue
            stages = [s for s in self.group_stages[dst] if s != Stage.DECODE]
            for inst in sim.insts:
                if (inst.group != g or inst.state != InstState.ACTIVE or inst.pending_target is not None
                        or now - inst.last_switch < self.cooldown):
                    continue
                dest = max(stages, key=lambda s: (len(sim.q[(dst, s)]), s == Stage.PREFILL))
                self._apply(sim, inst, dst, dest, "lend_dormant")

    def _cover_empty_stages(self, sim, now):
        """Bring back: a group with a live request (or an arrival since the last tick) gets one instance in every
        stage it has none in, at this tick, taken from the other group. Every instance holds the whole model
        (encoder included), so a switched instance starts encoding after t_switch.

        Donor: a role of the other group that keeps at least one instance; idle before busy, encode/prefill
        before decode (a decode donor migrates its KV), then the one free soonest. An instance past its cooldown
        is preferred; if every candidate is inside it, the move is urgent and ignores it: a stage with work and
        no instance is a liveness failure, and the move cannot oscillate (the group lends again only after
        dormant_after of no work, which is longer than the cooldown)."""
        for g in (Group.TEXT, Group.MM):
            if self.last_work[g] != now:
                continue  # no live request: nothing to cover
            for s in self.group_stages[g]:
                roles = self._roles(sim)
                if roles.get((g, s)):
                    continue
                best, best_key = None, None
                for inst in sim.insts:
                    role = (inst.group, inst.stage)
                    if (inst.group == g or inst.state != InstState.ACTIVE or inst.pending_target is not None
                            or len(roles.get(role, ())) <= 1):
                        continue
                    if inst.stage == Stage.DECODE and not self._decode_can_shrink(sim, inst.group, inst):
                        continue
                    key = (now - inst.last_switch < self.cooldown, not self._idle(sim, inst),
                           inst.stage == Stage.DECODE, inst.busy_until if inst.busy else now, inst.iid)
                    if best_key is None or key < best_key:
                        best, best_key = inst, key
                if best is not None:
                    self._apply(sim, best, g, s, "cover_empty_stage", urgent=best_key[0])

    def _grow_stage(self, sim, g, s, now):
        q = sim.q[(g, s)]
        if not q:
            return
        if any(i.group == g and i.stage == s and i.state == InstState.ACTIVE and not i.busy for i in sim.insts):
            return  # an instance of the stage is free: dispatch will use it, nothing to decide
        base, lens = self._finish_times(sim, g, s, now)
        best, best_net = None, 0.0
        # reactive cross-group moves only when the stage is overloaded (paper: "a group is suddenly overloaded")
        for inst, idle in self._candidates(sim, g, s, now, cross=self._overloaded(sim, g, s)):
            if inst.stage == Stage.DECODE and not self._decode_can_lose(sim, inst.group, inst):
                continue
            avail = now + self._migration_time(inst)
            fins, _ = self._finish_times(sim, g, s, now, add_at=avail)
            gain = sum((b - f) / L for b, f, L in zip(base, fins, lens, strict=True))
            cost = 0.0 if idle and inst.stage != Stage.DECODE else self._removal_cost(sim, inst, now)
            if gain > cost and gain - cost > best_net:
                best, best_net = inst, gain - cost
        if best is not None:
            why = "idle_move" if self._idle(sim, best) else ("eq2_preempt_decode" if best.stage == Stage.DECODE
                                                            else "repartition")
            self._apply(sim, best, g, s, why)

    def _decode_can_shrink(self, sim, g, inst) -> bool:
        """A decode instance may leave only if its peers can hold its KV (the simulator migrates it)."""
        need = inst.kv_used
        free = sum(i.kv_free for i in sim.insts if i.group == g and i.stage == Stage.DECODE
                   and i.state == InstState.ACTIVE and i is not inst)
        return free >= need and any(i.group == g and i.stage == Stage.DECODE and i.state == InstState.ACTIVE
                                    and i is not inst for i in sim.insts)

    def _decode_can_lose(self, sim, g, inst) -> bool:
        """Preempting decode must not push it into the pressure that makes the auto-scaler grow it back
        (otherwise eq. 2 and eq. 3 would hand the same instance back and forth)."""
        if not self._decode_can_shrink(sim, g, inst):
            return False
        n, b, ctx, _, _ = self._decode_state(sim, g)
        return (not sim.q[(g, Stage.DECODE)]
                and self._step(n - 1, b, ctx) <= self.cfg.shrink_hysteresis * self.step_target)

    def _decode_pressure(self, sim, g, n, b, ctx) -> bool:
        if sim.q[(g, Stage.DECODE)]:
            return True
        if sim._decode_kv_usage(g) > self.cfg.decode_kv_threshold:
            return True
        return self._step(n, b, ctx) > self.step_target

    def _decode_autoscale(self, sim, g, now):
        n, b, ctx, s1, srem = self._decode_state(sim, g)
        if b == 0 or not self._decode_pressure(sim, g, n, b, ctx):
            return
        self.last_pressure[g] = now
        cur = self._step(n, b, ctx)
        best, best_net = None, 0.0
        for inst, idle in self._candidates(sim, g, Stage.DECODE, now):
            if inst.stage == Stage.DECODE:
                continue  # only the other group's decode could be a candidate; never take decode from decode
            if inst.stage == Stage.DECODE:
                continue
            delay = self._migration_time(inst)
            new = self._step(n + 1, b, ctx)
            # eq. (3) gain: sum over B_d of (AvgLat_d - T(B_d, E_d + e)) / out_r, counting only the tokens
            # each request still has to produce once the new instance is ready (delay / cur steps later)
            gain = (cur - new) * max(0.0, srem - (delay / cur) * s1)
            cost = 0.0 if idle else self._removal_cost(sim, inst, now, for_decode=True)
            if gain > cost and gain - cost > best_net:
                best, best_net = inst, gain - cost
        if best is not None:
            self._apply(sim, best, g, Stage.DECODE, "eq3_scale_decode")

    def _shrink_decode(self, sim, g, now):
        n, b, ctx, _, _ = self._decode_state(sim, g)
        if n <= 1 or self._decode_pressure(sim, g, n, b, ctx):
            return
        if now - self.last_pressure.get(g, -math.inf) < self.cfg.shrink_dwell:
            return  # time hysteresis: do not undo a scale-up while the load that caused it may still be there
        if self._step(n - 1, b, ctx) > self.cfg.shrink_hysteresis * self.step_target:
            return
        decs = [i for i in sim.insts if i.group == g and i.stage == Stage.DECODE and self._movable(sim, i, now)]
        if not decs:
            return
        victim = min(decs, key=lambda i: (len(i.running) + len(i.pending), i.iid))
        if not self._decode_can_shrink(sim, g, victim):
            return
        stages = [s for s in self.group_stages[g] if s != Stage.DECODE]
        dest = max(stages, key=lambda s: (len(sim.q[(g, s)]), s == Stage.PREFILL))
        self._apply(sim, victim, g, dest, "shrink_decode")

    def _proactive(self, sim, now):
        dt = now - self.last_proactive
        self.last_proactive = now
        if dt <= 0:
            return
        n_avg, peak = {}, {}
        for g in (Group.TEXT, Group.MM):
            rate = self.win_count[g] / dt
            work = self.win_work[g] / self.win_count[g] if self.win_count[g] else None
            self.win_count[g], self.win_work[g] = 0, 0.0
            self.rate_avg[g] = rate if self.rate_avg[g] is None else 0.5 * self.rate_avg[g] + 0.5 * rate
            self.rate_hist[g] = (self.rate_hist[g] + [rate])[-10:]
            if work is not None:
                self.work_avg[g] = work if self.work_avg[g] is None else 0.5 * self.work_avg[g] + 0.5 * work
            mu = 1.0 / self.work_avg[g] if self.work_avg[g] else 1e9
            n_avg[g] = needed_instances(self.rate_avg[g], mu)
            peak[g] = max(self.rate_hist[g]) / self.rate_avg[g] if self.rate_avg[g] else 1.0
        if any(self.dormant(g, now) for g in (Group.TEXT, Group.MM)):
            return  # shrink to zero owns the split while a group is dormant (its floor would pin instances)
        target = greedy_allocation(sim.N, n_avg, self.floors, peak)
        self.targets = target
        have = {g: sum(1 for i in sim.insts if sim.effective_role(i)[0] == g) for g in target}
        for src in (Group.TEXT, Group.MM):
            dst = Group.MM if src == Group.TEXT else Group.TEXT
            surplus = min(have[src] - target[src], target[dst] - have[dst])
            if surplus <= 0:
                continue
            idle = [i for i in sim.insts if i.group == src and self._movable(sim, i, now) and self._idle(sim, i)]
            for inst in idle[:surplus]:
                if not self._movable(sim, inst, now):  # an earlier move may have made it the last of its role
                    continue
                stages = [s for s in self.group_stages[dst] if s != Stage.DECODE]
                dest = max(stages, key=lambda s: (len(sim.q[(dst, s)]), s == Stage.PREFILL))
                self._apply(sim, inst, dst, dest, "proactive")
