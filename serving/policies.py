"""Scheduling policies behind one interface, and the registry that builds them by name.

A policy is an object the simulator (and later the JAX engine) calls:
  layout(n, cost)            initial (group, stage) of every instance
  group_stages[g]            the stages a group runs
  route(request)             modality group of a new request
  prefill_budget(sim, inst)  token budget of the next prefill batch
  coupled_target(sim, req)   (coupled only) which instance takes a new request
  start(sim) / on_tick(sim, now)  periodic decisions (elastic policies), acting via sim.switch(...)
Flags: coupled, inline_encode (preprocess + encode inside the prefill step, i.e. blocking),
prefix_cache, tick_interval, cooldown.
"""

from __future__ import annotations

from .model import Group, Modality, Stage

ANY_STAGES = (Stage.PREFILL, Stage.DECODE, Stage.COUPLED)
ANY_GROUP_STAGES = {Group.ANY: ANY_STAGES}  # shared, never mutated (like EPD_STAGES)
EPD_STAGES = {Group.TEXT: (Stage.PREFILL, Stage.DECODE), Group.MM: (Stage.ENCODE, Stage.PREFILL, Stage.DECODE)}


class Policy:
    name = "base"
    coupled = False
    inline_encode = True
    prefix_cache = False
    tick_interval = None
    cooldown = 0.0
    group_stages = ANY_GROUP_STAGES

    def layout(self, n, cost):
        raise NotImplementedError

    def route(self, r):
        return Group.ANY

    def prefill_budget(self, sim, inst):
        return sim.cost.prefill_max_tokens

    def start(self, sim):
        pass

    def on_tick(self, sim, now):
        pass


class Coupled(Policy):
    """vLLM-like: every instance does encode + prefill + decode; encoding inline (blocks the step)."""

    name = "coupled"
    coupled = True

    def __init__(self, prefix_cache: bool = False):
        self.prefix_cache = prefix_cache  # on when compared with elasticmm: cache hits are not elasticity

    def layout(self, n, cost):
        return [(Group.ANY, Stage.COUPLED)] * n

    def coupled_target(self, sim, r):
        # least outstanding requests (a front-end load balancer in front of independent vLLM replicas)
        return min(sim.insts, key=lambda i: (len(i.local_queue) + len(i.running), i.iid))


class StaticPD(Policy):
    """DistServe-like: fixed prefill:decode split, encoder colocated (inline) with prefill."""

    name = "static_pd"

    def __init__(self, n_prefill: int, prefix_cache: bool = False):
        self.n_prefill = n_prefill
        self.prefix_cache = prefix_cache
        self.name = f"static_pd[{n_prefill}P]"

    def layout(self, n, cost):
        if not 1 <= self.n_prefill <= n - 1:
            raise ValueError(f"static_pd: n_prefill = {self.n_prefill} impossible with {n} instances "
                             f"(need 1 <= n_prefill <= {n - 1})")
        return [(Group.ANY, Stage.PREFILL)] * self.n_prefill + [(Group.ANY, Stage.DECODE)] * (n - self.n_prefill)


def epd_preset(preset: str, n: int) -> tuple[int, int, int, int, int]:
    """(text P, text D, mm E, mm P, mm D) for the named static split of n instances."""
    if n < 5:
        raise ValueError(f"static_epd needs at least 5 instances (TEXT P+D, MM E+P+D), got {n}")
    if preset == "mm_first":  # the official code's default placement: TEXT 1P+1D, the rest MM
        rest = n - 2
        e = rest // 3
        d = rest // 3
        return (1, 1, e, rest - e - d, d)
    if preset == "equal":
        t = n // 2
        m = n - t
        e = max(1, m // 4)
        d = max(1, m // 4)
        return (t - t // 2, t // 2, e, m - e - d, d)
    if preset == "text_first":
        t = n - 3
        return (t - t // 2, t // 2, 1, 1, 1)
    raise ValueError(f"unknown static_epd preset {preset!r}; expected 'text_first', 'equal' or 'mm_first'")


def all_epd_splits(n: int):
    """Every (tP, tD, mE, mP, mD) with each part >= 1 summing to n (for the best-static search)."""
    out = []
    for tp in range(1, n):
        for td in range(1, n - tp):
            for me in range(1, n - tp - td):
                for mp in range(1, n - tp - td - me):
                    md = n - tp - td - me - mp
                    if md >= 1:
                        out.append((tp, td, me, mp, md))
    return out


class StaticEPD(Policy):
    """Modality groups with a fixed (TEXT P, D | MM E, P, D) split; non-blocking encode on E instances."""

    inline_encode = False
    group_stages = EPD_STAGES

    def __init__(self, split, prefix_cache: bool = False):
        if isinstance(split, str):
            self.preset = split
            self.split = None
        else:
            self.preset = None
            self.split = tuple(int(x) for x in split)
            if len(self.split) != 5 or min(self.split) < 1:
                raise ValueError(f"static_epd split {split!r} must be 5 counts >= 1 (tP, tD, mE, mP, mD)")
        self.prefix_cache = prefix_cache
        self.name = f"static_epd[{split if isinstance(split, str) else '-'.join(map(str, self.split))}]"

    def layout(self, n, cost):
        split = epd_preset(self.preset, n) if self.split is None else self.split
        if sum(split) != n:
            raise ValueError(f"static_epd split {split} uses {sum(split)} instances, but there are {n}")
        tp, td, me, mp, md = split
        return ([(Group.TEXT, Stage.PREFILL)] * tp + [(Group.TEXT, Stage.DECODE)] * td
                + [(Group.MM, Stage.ENCODE)] * me + [(Group.MM, Stage.PREFILL)] * mp + [(Group.MM, Stage.DECODE)] * md)

    def route(self, r):
        return Group.MM if r.modality == Modality.MM else Group.TEXT


POLICIES = ("coupled", "static_pd", "static_epd", "elasticmm", "elasticmm_no_cache", "elasticmm_no_nonblocking",
            "elasticmm_emp_only")


def make_policy(name: str, **kw) -> Policy:
    """Build a policy by name. static_pd takes n_prefill=; static_epd takes split= (preset name or 5-tuple);
    coupled, static_pd and static_epd take prefix_cache= (default off; elasticmm has it on); the elasticmm
    family takes ElasticConfig fields as keywords."""
    from .elasticmm import ElasticConfig, ElasticMM

    if name == "coupled":
        return Coupled(prefix_cache=kw.get("prefix_cache", False))
    if name == "static_pd":
        if "n_prefill" not in kw:
            raise ValueError("static_pd needs n_prefill= (use experiments.best_static_pd to search it)")
        return StaticPD(kw["n_prefill"], prefix_cache=kw.get("prefix_cache", False))
    if name == "static_epd":
        return StaticEPD(kw.get("split", "equal"), prefix_cache=kw.get("prefix_cache", False))
    variants = {"elasticmm": (True, True), "elasticmm_no_cache": (False, True),
                "elasticmm_no_nonblocking": (True, False), "elasticmm_emp_only": (False, False)}
    if name in variants:
        cache, nb = variants[name]
        cfg = ElasticConfig(prefix_cache=cache, nonblocking=nb, **kw)
        return ElasticMM(cfg, name=name)
    raise ValueError(f"unknown policy {name!r}; expected one of {list(POLICIES)}")
