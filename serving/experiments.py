"""The paper's experiment matrix (spec 6.2) on the simulator: runs, goodput search, best-static search.

Everything scripts/simulate.py prints or writes comes from here. Runs are independent, so grids are
spread over worker processes; the timing measurements (decision time, simulation speed) run alone in the
calling process so they measure one core.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .costmodel import CostModel, default_cost_model, load_profile
from .metrics import ATTAINMENT_TARGET, SLO_SCALES, per_request, summarize
from .policies import all_epd_splits, make_policy
from .simulator import SimConfig, simulate
from .workloads import WorkloadSpec, generate

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a declared dependency; degrade to no bar
    def tqdm(x, **_):
        return x


@dataclass(frozen=True)
class RunSpec:
    policy: str
    policy_kw: tuple  # sorted (key, value) pairs, hashable for caching
    workload: WorkloadSpec
    profile: str = "qwen2_5_vl_7b_a800x8"
    num_instances: int | None = None
    check_invariants: bool = False


def policy_kw(**kw) -> tuple:
    return tuple(sorted(kw.items()))


def run(spec: RunSpec) -> dict:
    """One simulation -> one flat metrics row (with the workload and policy parameters)."""
    cost = CostModel(load_profile(spec.profile))
    reqs = generate(spec.workload, cost)
    pol = make_policy(spec.policy, **dict(spec.policy_kw))
    res = simulate(pol, reqs, cost, spec.num_instances, SimConfig(check_invariants=spec.check_invariants))
    row = summarize(res, cost)
    row.update(policy_name=spec.policy, policy_kw=dict(spec.policy_kw), rate=spec.workload.rate,
               arrival=spec.workload.arrival, dataset=spec.workload.dataset, dup_rate=spec.workload.dup_rate,
               duration=spec.workload.duration, seed=spec.workload.seed)
    row["decisions"] = dict(getattr(pol, "stats", {}))
    pr = per_request(res.requests, cost)
    row["_ttft_hit"] = float(np.mean(pr["ttft"][pr["enc_hits"] > 0])) if (pr["enc_hits"] > 0).any() else float("nan")
    row["_ttft_miss_mm"] = float(np.mean(pr["ttft"][(pr["enc_hits"] == 0) & pr["mm"]])) if pr["mm"].any() else \
        float("nan")
    return row


class Runner:
    """Runs RunSpecs (in parallel when jobs > 1) and caches rows, so searches never repeat a run."""

    def __init__(self, jobs: int = 1, progress: bool = True):
        self.jobs = max(1, jobs)
        self.cache: dict[RunSpec, dict] = {}
        self.progress = progress
        self.pool = ProcessPoolExecutor(self.jobs) if self.jobs > 1 else None

    def close(self):
        if self.pool:
            self.pool.shutdown()

    def many(self, specs: list[RunSpec], desc: str = "") -> list[dict]:
        todo = [s for s in dict.fromkeys(specs) if s not in self.cache]
        if todo:
            it = self.pool.map(run, todo) if self.pool else map(run, todo)
            for s, row in tqdm(zip(todo, it, strict=True), total=len(todo), desc=desc, disable=not self.progress,
                               leave=False):
                self.cache[s] = row
        return [self.cache[s] for s in specs]


def rate_grid(lo: float, hi: float, points: int) -> list[float]:
    if not 0 < lo < hi:
        raise ValueError(f"rate grid needs 0 < lo < hi, got lo={lo}, hi={hi}")
    return [float(round(x, 3)) for x in np.geomspace(lo, hi, points)]


def goodput(runner: Runner, policy: str, kw: tuple, wl: WorkloadSpec, grid: list[float], refine: int = 0,
            scales=SLO_SCALES, desc: str = "") -> dict:
    """Highest rate with >= 90% SLO attainment, per SLO scale: scan the grid, then bisect `refine` times
    between the last passing and the first failing rate. 0 if even the lowest rate fails; the top of the
    grid (flagged censored) if nothing fails."""
    specs = [RunSpec(policy, kw, wl.with_rate(r)) for r in grid]
    rows = runner.many(specs, desc=desc)
    out = {}
    for k in scales:
        att = [row[f"attain_s{k}"] for row in rows]
        if att[0] < ATTAINMENT_TARGET:
            out[k] = (0.0, False)
            continue
        j = next((i for i, a in enumerate(att) if a < ATTAINMENT_TARGET), None)
        if j is None:
            out[k] = (grid[-1], True)
            continue
        lo, hi = grid[j - 1], grid[j]
        for _ in range(refine):
            mid = round(math.sqrt(lo * hi), 3)
            row = runner.many([RunSpec(policy, kw, wl.with_rate(mid))])[0]
            if row[f"attain_s{k}"] >= ATTAINMENT_TARGET:
                lo = mid
            else:
                hi = mid
        out[k] = (lo, False)
    return out


def best_static_pd(runner: Runner, wl: WorkloadSpec, n: int, probe_rates: list[float], scale: int = 3,
                   num_instances: int | None = None, extra_kw: tuple = ()):
    """static_pd splits ranked by attainment (then lowest mean normalised TTFT) at the probe rates, best first.

    num_instances: run on this many instances (None: the profile's, which must then be n); extra_kw: keywords
    every candidate gets (e.g. prefix_cache)."""
    cands = [policy_kw(n_prefill=p, **dict(extra_kw)) for p in range(1, n)]
    return _best(runner, "static_pd", cands, wl, probe_rates, scale, "search static_pd", num_instances)


def best_static_epd(runner: Runner, wl: WorkloadSpec, n: int, probe_rates: list[float], scale: int = 3,
                    num_instances: int | None = None, extra_kw: tuple = (), splits: list | None = None):
    """static_epd splits ranked like best_static_pd; splits: the candidates (default every split of n)."""
    cands = [policy_kw(split=s, **dict(extra_kw)) for s in (all_epd_splits(n) if splits is None else splits)]
    return _best(runner, "static_epd", cands, wl, probe_rates, scale, "search static_epd", num_instances)


def _best(runner, name, cands, wl, probe_rates, scale, desc, num_instances=None):
    specs = [RunSpec(name, kw, wl.with_rate(r), num_instances=num_instances) for kw in cands for r in probe_rates]
    rows = runner.many(specs, desc=desc)
    m = len(probe_rates)
    scored = []
    for i, _kw in enumerate(cands):
        rs = rows[i * m:(i + 1) * m]
        att = sum(r[f"attain_s{scale}"] for r in rs)
        lat = sum(r["norm_ttft_mean"] for r in rs)
        scored.append((-att, lat, i))
    scored.sort()
    return [cands[i] for _, _, i in scored]


# ---- overhead measurements (single process, one core) ----------------------------------------------------
def measure_decision_time(num_instances: int = 64, rate_per_instance: float = 4.0, duration: float = 30.0,
                          dataset: str = "sharegpt4o", seed: int = 0) -> dict:
    cost = default_cost_model()
    wl = WorkloadSpec(arrival="mmpp", rate=rate_per_instance * num_instances, duration=duration, dataset=dataset,
                      seed=seed, burst_gap_mean=10.0, burst_len=(5.0, 10.0))
    reqs = generate(wl, cost)
    pol = make_policy("elasticmm")
    res = simulate(pol, reqs, cost, num_instances)
    dt = np.asarray(res.decision_times) * 1e3
    ct = np.asarray(res.decision_cpu_times) * 1e3
    return dict(num_instances=num_instances, rate=wl.rate, ticks=len(dt), decision_ms_p50=float(np.percentile(dt, 50)),
                decision_ms_p99=float(np.percentile(dt, 99)), decision_ms_max=float(dt.max()),
                decision_cpu_ms_p50=float(np.percentile(ct, 50)), decision_cpu_ms_p99=float(np.percentile(ct, 99)),
                decision_cpu_ms_max=float(ct.max()), switches=res.switches)


def measure_sim_speed(rate: float = 50.0, duration: float = 3600.0, dataset: str = "visualwebinstruct",
                      policy: str = "elasticmm", seed: int = 0) -> dict:
    cost = default_cost_model()
    t0, c0 = time.perf_counter(), time.process_time()
    reqs = generate(WorkloadSpec(arrival="poisson", rate=rate, duration=duration, dataset=dataset, seed=seed), cost)
    res = simulate(make_policy(policy), reqs, cost)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    row = summarize(res, cost)
    return dict(dataset=dataset, policy=policy, rate=rate, traffic_s=duration, requests=len(reqs),
                completed=row["completed"], events=res.n_events, generate_s=wall - res.wall_s, simulate_s=res.wall_s,
                total_s=wall, cpu_s=cpu, ttft_p99=row["ttft_p99"])
