"""Fluid capacity bounds: the highest request rate each kind of layout can sustain on a workload, from the cost
model alone, with no queueing.

Why this exists: elastic partitioning can only beat a well-chosen static split when the workload's phases need
different layouts. Here every workload is cut into phases (MMPP: calm and burst; diurnal: points of the cycle;
Poisson/Gamma: one phase), each phase gives the instance-seconds per second every role needs per unit of
request rate, and then
  * a static EPD split sustains rate r if every role has enough instances in every phase;
  * an idealised elastic system re-partitions at every phase boundary instantly and at no cost, either in whole
    instances (`elastic_int`) or in fractions of instances (`elastic_frac`, time-sharing; the loosest bound);
  * static PD pools encode (inline, with host preprocessing on the instance) and prefill of both modalities on its
    prefill instances, decode on the rest;
  * coupled runs everything on every instance; its decode steps wait while the instance encodes or prefills.
Decode capacity depends on the SLO scale: the batch may only grow while the step stays within the TPOT SLO.

The ratio elastic / best static is the sustainable-throughput gain re-partitioning can buy on a workload. It is
not a strict bound on simulated goodput ratios: below capacity, queueing decides, and elastic moves also absorb
short-term queues, which a fluid model does not see (the simulated ratios land up to ~0.2 above the whole-instance
ratio). The elastic side is given every advantage: system prompts always hit the prefix cache, encode batches are
always full, migrations and switches are free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .costmodel import CostModel
from .metrics import SLO_FACTOR
from .model import Modality
from .policies import all_epd_splits
from .workloads import DATASETS, WorkloadSpec, generate, validate_spec

ROLES = ("text_prefill", "text_decode", "mm_encode", "mm_prefill", "mm_decode")  # all_epd_splits order
SAMPLE_RATE, SAMPLE_DURATION = 50.0, 400.0  # ~20k requests to estimate per-request work
DIURNAL_PHASES = 64


@dataclass(frozen=True)
class ClassWork:
    """Mean per-request work of one modality class (seconds of one instance, tokens)."""

    prefill_s: float  # prefill, system prompt recomputed (static and coupled systems)
    prefill_cached_s: float  # prefill with the system prompt served from the prefix cache (elastic)
    encode_s: float  # encode, full batches
    preprocess_s: float  # host preprocessing of the images
    output_tokens: float
    decode_ctx: float  # mean context length over the request's decode steps


def class_work(spec: WorkloadSpec, cost: CostModel) -> dict[Modality, ClassWork]:
    """Estimate each class's mean work from a large Poisson sample of the spec's dataset (same seed)."""
    sample = replace(spec, arrival="poisson", rate=SAMPLE_RATE, duration=SAMPLE_DURATION)
    reqs = generate(sample, cost)
    out = {}
    for mod in Modality:
        rs = [r for r in reqs if r.modality == mod]
        if not rs:
            out[mod] = ClassWork(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
            continue
        pf, pfc, enc, pre, o, ctx = (np.zeros(len(rs)) for _ in range(6))
        for j, r in enumerate(rs):
            L, s = r.input_len, r.sys_len
            pf[j] = cost.prefill_share(L)
            pfc[j] = cost.prefill_share(L, s)
            for im in r.images:
                enc[j] += cost.e0 / cost.enc_max_images + cost.e1 * im.v_tokens + cost.e2 * im.v_tokens ** 2
                pre[j] += cost.preprocess_time(im.pixels)
            o[j] = r.output_len
            ctx[j] = r.output_len * (L + r.output_len / 2)  # summed over the steps; divided by tokens below
        out[mod] = ClassWork(prefill_s=float(pf.mean()), prefill_cached_s=float(pfc.mean()),
                             encode_s=float(enc.mean()), preprocess_s=float(pre.mean()),
                             output_tokens=float(o.mean()), decode_ctx=float(ctx.sum() / o.sum()))
    return out


def phases(spec: WorkloadSpec) -> list[tuple[float, float, float]]:
    """(time weight, text rate, MM rate) per phase, per unit of the spec's mean rate."""
    validate_spec(spec)
    f = DATASETS[spec.dataset].mm_fraction if spec.mm_share is None else spec.mm_share
    if spec.arrival in ("poisson", "gamma"):
        return [(1.0, 1 - f, f)]
    if spec.arrival == "mmpp":  # same modulation as workloads.arrivals
        mean_burst = 0.5 * sum(spec.burst_len)
        mult = (spec.burst_gap_mean + spec.burst_factor * mean_burst) / (spec.burst_gap_mean + mean_burst)
        w_burst = mean_burst / (spec.burst_gap_mean + mean_burst)
        return [(1 - w_burst, 1 - f, f / mult), (w_burst, 1 - f, spec.burst_factor * f / mult)]
    A = spec.diurnal_amplitude
    th = 2 * np.pi * (np.arange(DIURNAL_PHASES) + 0.5) / DIURNAL_PHASES
    return [(1 / DIURNAL_PHASES, (1 - f) * (1 + A * math.sin(t)), f * (1 - A * math.sin(t))) for t in th]


def decode_tokens_per_s(cost: CostModel, ctx: float, slo_scale: float, busy_fraction: float = 0.0) -> float:
    """Tokens/s one decode instance sustains with steps inside the TPOT SLO (k * SLO_FACTOR * unloaded step).

    busy_fraction: share of the instance's time spent on other work (coupled); decode steps stretch by
    1 / (1 - busy_fraction) as seen by a request, and only the rest of the time produces tokens."""
    if slo_scale <= 0:
        raise ValueError(f"slo_scale = {slo_scale} must be > 0")
    if not 0 <= busy_fraction < 1:
        return 0.0
    limit = slo_scale * SLO_FACTOR * cost.decode_step_time(1, round(ctx)) * (1 - busy_fraction)
    kv_cap = cost.kv_blocks * cost.block_size
    best = 0.0
    for b in range(1, cost.decode_max_batch + 1):
        if b * ctx > kv_cap:
            break
        t = cost.decode_step_time(b, round(b * ctx))
        if t <= limit:
            best = max(best, b / t)
    return best * (1 - busy_fraction)


def role_loads(work: dict[Modality, ClassWork], cost: CostModel, slo_scale: float, text_rate: float,
               mm_rate: float, cached: bool) -> np.ndarray:
    """Instances each EPD role needs at the given class rates (ROLES order)."""
    t, m = work[Modality.TEXT], work[Modality.MM]
    pf = (lambda w: w.prefill_cached_s) if cached else (lambda w: w.prefill_s)
    loads = [text_rate * pf(t), 0.0, mm_rate * m.encode_s, mm_rate * pf(m), 0.0]
    for idx, w, rate in ((1, t, text_rate), (4, m, mm_rate)):
        if rate > 0 and w.output_tokens > 0:
            loads[idx] = rate * w.output_tokens / decode_tokens_per_s(cost, w.decode_ctx, slo_scale)
    return np.asarray(loads)


def bounds(spec: WorkloadSpec, cost: CostModel, slo_scale: float, num_instances: int | None = None,
           work: dict | None = None) -> dict:
    """Sustainable mean rate (req/s) of each layout kind on the spec's phases at one SLO scale."""
    n = num_instances or int(cost.profile["num_instances"])
    if n < 5:
        raise ValueError(f"capacity bounds need at least 5 instances (TEXT P+D, MM E+P+D), got {n}")
    work = work or class_work(spec, cost)
    ph = phases(spec)
    static_loads = np.array([role_loads(work, cost, slo_scale, tr, mr, cached=False) for _, tr, mr in ph])
    elastic_loads = np.array([role_loads(work, cost, slo_scale, tr, mr, cached=True) for _, tr, mr in ph])
    # host preprocessing pool (EPD and elastic): cpu_workers images in parallel
    pre = max(mr * work[Modality.MM].preprocess_s for _, _, mr in ph)
    r_cpu = cost.cpu_workers / pre if pre > 0 else math.inf

    splits = np.array(all_epd_splits(n), dtype=float)

    def rate_of(split_counts, loads):  # loads [phases, roles]; highest r with r * loads <= counts everywhere
        with np.errstate(divide="ignore"):
            return np.min(np.where(loads > 0, split_counts / np.maximum(loads, 1e-300), np.inf), axis=-1)

    per_split = np.min(np.stack([rate_of(splits, ld) for ld in static_loads]), axis=0)  # [splits]
    best = int(np.argmax(per_split))
    r_static = min(float(per_split[best]), r_cpu)
    r_el_int = min(min(float(np.max(rate_of(splits, ld))) for ld in elastic_loads), r_cpu)
    r_el_frac = min(min(n / float(ld.sum()) for ld in elastic_loads), r_cpu)
    r_pd, n_pd = _static_pd(work, cost, slo_scale, ph, n)
    return dict(dataset=spec.dataset, arrival=spec.arrival, slo_scale=slo_scale, coupled=_coupled(work, cost,
                slo_scale, ph, n), static_pd_best=r_pd, static_pd_split=f"{n_pd}P",
                static_epd_best=r_static, static_epd_split="-".join(str(int(x)) for x in splits[best]),
                elastic_int=r_el_int, elastic_frac=r_el_frac, cpu_pool=r_cpu)


def _inline_prefill_work(w: ClassWork) -> float:
    """Prefill-instance seconds per request when preprocessing and encoding run inline (PD, coupled)."""
    return w.preprocess_s + w.encode_s + w.prefill_s


def _mixed_decode(work, text_rate, mm_rate):
    """(token rate, token-weighted mean decode context) of the modality-mixed decode stream."""
    t, m = work[Modality.TEXT], work[Modality.MM]
    toks = text_rate * t.output_tokens + mm_rate * m.output_tokens
    ctx = (text_rate * t.output_tokens * t.decode_ctx + mm_rate * m.output_tokens * m.decode_ctx) / toks
    return toks, ctx


def _static_pd(work, cost, slo_scale, ph, n) -> tuple[float, int]:
    best = (0.0, 1)
    for n_p in range(1, n):
        r = math.inf
        for _, tr, mr in ph:
            p = tr * _inline_prefill_work(work[Modality.TEXT]) + mr * _inline_prefill_work(work[Modality.MM])
            toks, ctx = _mixed_decode(work, tr, mr)
            d = toks / decode_tokens_per_s(cost, ctx, slo_scale)
            r = min(r, n_p / p, (n - n_p) / d)
        best = max(best, (r, n_p))
    return best


def _coupled(work, cost, slo_scale, ph, n) -> float:
    """Highest r at which every instance (1/n of the traffic) fits its encode + prefill time and its decode
    tokens, with decode steps stretched by the time the instance spends on encode and prefill."""

    def feasible(r):
        for _, tr, mr in ph:
            busy = r / n * (tr * _inline_prefill_work(work[Modality.TEXT])
                            + mr * _inline_prefill_work(work[Modality.MM]))
            toks, ctx = _mixed_decode(work, tr, mr)
            if busy >= 1 or r / n * toks > decode_tokens_per_s(cost, ctx, slo_scale, busy):
                return False
        return True

    lo, hi = 0.0, 1.0
    while feasible(hi):
        hi *= 2
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def ratios(b: dict) -> dict:
    """The bound's gain ratios of one `bounds` row."""
    return dict(int_vs_static_epd=b["elastic_int"] / b["static_epd_best"],
                frac_vs_static_epd=b["elastic_frac"] / b["static_epd_best"],
                int_vs_static_pd=b["elastic_int"] / b["static_pd_best"],
                frac_vs_static_pd=b["elastic_frac"] / b["static_pd_best"],
                int_vs_coupled=b["elastic_int"] / b["coupled"], frac_vs_coupled=b["elastic_frac"] / b["coupled"])


def shift_sweep(dataset: str, cost: CostModel, slo_scale: float, burst_factors=(1, 2, 3, 4, 6, 8),
                amplitudes=(0.0, 0.2, 0.4, 0.6, 0.8, 0.95)) -> list[dict]:
    """Bound ratios as the load shift grows: MMPP burst factor, and diurnal text/MM anti-phase amplitude."""
    work = class_work(WorkloadSpec(dataset=dataset), cost)
    rows = []
    for bf in burst_factors:
        b = bounds(WorkloadSpec(arrival="mmpp", dataset=dataset, burst_factor=float(bf)), cost, slo_scale, work=work)
        rows.append(dict(b, shift="mmpp_burst_factor", level=float(bf), **ratios(b)))
    for a in amplitudes:
        b = bounds(WorkloadSpec(arrival="diurnal", dataset=dataset, diurnal_amplitude=a), cost, slo_scale, work=work)
        rows.append(dict(b, shift="diurnal_amplitude", level=a, **ratios(b)))
    return rows
