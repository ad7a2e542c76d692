"""Metrics of a simulation run: latencies, normalised latencies, SLO attainment, utilisation, overheads.

SLO definition (spec 6.2; the paper's exact base is unknown, docs/elasticmm.md 'Metrics'): a request meets
the SLO at scale k when TTFT <= k * SLO_FACTOR * unloaded_ttft(r) and TPOT <= k * SLO_FACTOR * unloaded_tpot(r),
where the unloaded latencies are the request alone on an idle node (preprocess + encode + prefill; one
decode step at its mean context), independent of the policy. A request that did not finish fails.
"""

from __future__ import annotations

import numpy as np

from .costmodel import CostModel
from .model import Modality, Stage

SLO_FACTOR = 2.0
SLO_SCALES = (1, 2, 3, 4, 5)
ATTAINMENT_TARGET = 0.9


def unloaded_ttft(r, cost: CostModel) -> float:
    t = 0.0
    for im in r.images:
        t += cost.preprocess_time(im.pixels)
    if r.images:
        sv = sum(im.v_tokens for im in r.images)
        t += cost.encode_time(sv, sum(im.v_tokens ** 2 for im in r.images))
    L = r.input_len
    return t + cost.prefill_time(L, L * L)


def unloaded_tpot(r, cost: CostModel) -> float:
    return cost.decode_step_time(1, r.input_len + r.output_len // 2)


def per_request(reqs, cost: CostModel) -> dict[str, np.ndarray]:
    n = len(reqs)
    ttft = np.full(n, np.inf)
    tpot = np.full(n, np.inf)
    e2e = np.full(n, np.inf)
    base_ttft = np.empty(n)
    base_tpot = np.empty(n)
    mm = np.empty(n, bool)
    inp = np.empty(n)
    cached = np.zeros(n)
    hits = np.zeros(n)
    for j, r in enumerate(reqs):
        base_ttft[j] = unloaded_ttft(r, cost)
        base_tpot[j] = unloaded_tpot(r, cost)
        mm[j] = r.modality == Modality.MM
        inp[j] = r.input_len
        cached[j] = r.cached_tokens
        hits[j] = r.enc_hits
        if r.t_first is not None:
            ttft[j] = r.t_first - r.t_arrival
        if r.t_done is not None:
            e2e[j] = r.t_done - r.t_arrival
            tpot[j] = (r.t_done - r.t_first) / (r.output_len - 1) if r.output_len > 1 else 0.0
    return dict(ttft=ttft, tpot=tpot, e2e=e2e, base_ttft=base_ttft, base_tpot=base_tpot, mm=mm, input_len=inp,
                cached=cached, enc_hits=hits)


def attainment(pr: dict, scale: float) -> float:
    if len(pr["ttft"]) == 0:
        return 1.0
    ok = (pr["ttft"] <= scale * SLO_FACTOR * pr["base_ttft"]) & (pr["tpot"] <= scale * SLO_FACTOR * pr["base_tpot"])
    return float(ok.mean())


def _pct(x, q):
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if len(x) else float("nan")


def summarize(res, cost: CostModel) -> dict:
    """Flat dict of every metric of one run (one CSV row)."""
    pr = per_request(res.requests, cost)
    n = len(res.requests)
    done = int(np.isfinite(pr["e2e"]).sum())
    out = dict(policy=res.policy, n_requests=n, completed=done, unfinished=n - done)
    for name in ("ttft", "tpot"):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = _pct(pr[name], q)
        fin = pr[name][np.isfinite(pr[name])]
        out[f"{name}_mean"] = float(fin.mean()) if len(fin) else float("nan")
    for label, mask in (("text", ~pr["mm"]), ("mm", pr["mm"])):
        out[f"ttft_p99_{label}"] = _pct(pr["ttft"][mask], 99)
    nt = pr["ttft"] / pr["base_ttft"]
    no = pr["tpot"] / pr["base_tpot"]
    out["norm_ttft_mean"] = float(np.mean(nt[np.isfinite(nt)])) if done else float("nan")
    out["norm_ttft_p99"] = _pct(nt, 99)
    out["norm_tpot_mean"] = float(np.mean(no[np.isfinite(no)])) if done else float("nan")
    out["norm_tpot_p99"] = _pct(no, 99)
    out["ttft_per_input_token_ms"] = float(np.nanmean(np.where(np.isfinite(pr["ttft"]), pr["ttft"], np.nan)
                                                      / pr["input_len"])) * 1e3 if done else float("nan")
    for k in SLO_SCALES:
        out[f"attain_s{k}"] = attainment(pr, k)
    busy, assigned = res.stage_busy, res.stage_time
    for s in Stage:
        out[f"util_{s.name.lower()}"] = busy[s] / assigned[s] if assigned[s] > 0 else float("nan")
    out["switches"] = res.switches
    out["migrations"] = res.migrations
    out["migrated_GB"] = res.migrated_bytes / 1e9
    tot = res.emb_hits + res.emb_misses
    out["image_hit_rate"] = res.emb_hits / tot if tot else 0.0
    out["prefix_token_hit_rate"] = res.prefix_hit_tokens / res.prefix_query_tokens if res.prefix_query_tokens else 0.0
    out["encoded_tokens"] = res.encoded_tokens
    dt = np.asarray(res.decision_times) * 1e3
    out["decision_ms_p50"] = float(np.percentile(dt, 50)) if len(dt) else 0.0
    out["decision_ms_p99"] = float(np.percentile(dt, 99)) if len(dt) else 0.0
    out["decision_ms_max"] = float(dt.max()) if len(dt) else 0.0
    out["sim_wall_s"] = res.wall_s
    out["events"] = res.n_events
    out["sim_end_s"] = res.end_time
    return out
