"""Synthetic workloads: arrival processes x request-size distributions, deterministic by seed.

The two datasets of the paper cannot be downloaded here, so their shapes are imitated (documented in
docs/elasticmm.md, 'Workloads'):
  sharegpt4o          vision-heavy: 80% of requests carry high-resolution images (most hit the max_pixels cap
                      of 1024 vision tokens), short instructions, long detailed answers.
  visualwebinstruct   text-heavy: 60% text-only with longer prompts, web-sized images (~400 vision tokens).
Arrival processes: Poisson, Gamma (CV > 1), MMPP bursts of multimodal traffic, a compressed diurnal cycle.
`rate` is always the long-run mean request rate (req/s) of the whole mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from .costmodel import CostModel
from .model import Image, Modality, Request


@dataclass(frozen=True)
class Dataset:
    name: str
    mm_fraction: float
    images_per_req: tuple  # probabilities of 1, 2, ... images
    img_width_median: float
    img_width_sigma: float
    img_aspect_median: float  # height / width
    mm_prompt: tuple  # (median, sigma, cap) of user text tokens in multimodal requests (lognormal)
    text_prompt: tuple  # same for text-only requests
    output: tuple  # same for output tokens
    sys_prompts: tuple = (20, 64, 200)  # lengths of the shared system prompts (chat template, two app prompts)
    sys_probs: tuple = (0.7, 0.2, 0.1)


DATASETS = {
    "sharegpt4o": Dataset("sharegpt4o", mm_fraction=0.8, images_per_req=(0.9, 0.1), img_width_median=1280,
                          img_width_sigma=0.4, img_aspect_median=0.75, mm_prompt=(40, 0.8, 1024),
                          text_prompt=(120, 1.0, 4096), output=(280, 0.5, 512)),
    "visualwebinstruct": Dataset("visualwebinstruct", mm_fraction=0.4, images_per_req=(1.0,),
                                 img_width_median=640, img_width_sigma=0.5, img_aspect_median=0.75,
                                 mm_prompt=(120, 0.8, 2048), text_prompt=(300, 0.9, 4096),
                                 output=(350, 0.6, 512)),
    # Text only and CPU-sized: what the engine serves on host CPU devices (calibration and the serving benchmark).
    "cpu_text": Dataset("cpu_text", mm_fraction=0.0, images_per_req=(1.0,), img_width_median=640,
                        img_width_sigma=0.5, img_aspect_median=0.75, mm_prompt=(96, 0.6, 384),
                        text_prompt=(96, 0.6, 384), output=(48, 0.5, 128), sys_prompts=(16, 32, 64)),
    # cpu_text's sizes with half the requests carrying one or two images (the serving benchmark's multimodal load;
    # the engine's encoder fixes each image's token count, see serving.replay.engine_images).
    "cpu_mm": Dataset("cpu_mm", mm_fraction=0.5, images_per_req=(0.8, 0.2), img_width_median=640,
                      img_width_sigma=0.5, img_aspect_median=0.75, mm_prompt=(48, 0.6, 256),
                      text_prompt=(96, 0.6, 384), output=(48, 0.5, 128), sys_prompts=(16, 32, 64)),
}

ARRIVALS = ("poisson", "gamma", "mmpp", "diurnal")


@dataclass(frozen=True)
class WorkloadSpec:
    arrival: str = "poisson"
    rate: float = 10.0  # long-run mean req/s
    duration: float = 60.0  # seconds of traffic
    dataset: str = "sharegpt4o"
    cv: float = 2.0  # gamma: coefficient of variation of inter-arrival times
    burst_factor: float = 4.0  # mmpp: multimodal rate multiplier inside a burst
    burst_len: tuple = (30.0, 120.0)  # mmpp: burst duration ~ U(lo, hi) seconds
    burst_gap_mean: float = 150.0  # mmpp: mean gap between bursts (exponential)
    diurnal_period: float = 1800.0  # diurnal: one compressed day (2 h compressed to 30 min)
    diurnal_amplitude: float = 0.6
    dup_rate: float = 0.0  # probability an image repeats an earlier one
    dup_window: int = 200  # ... drawn uniformly from this many most recent distinct images (popular content)
    seed: int = 0
    mm_share: float | None = None  # fraction of multimodal requests; None: the dataset's own (0: text only)

    def with_rate(self, rate: float) -> "WorkloadSpec":
        return replace(self, rate=rate)


def validate_spec(spec: WorkloadSpec) -> None:
    if spec.arrival not in ARRIVALS:
        raise ValueError(f"unknown workload arrival process {spec.arrival!r}; expected one of {list(ARRIVALS)}")
    if spec.dataset not in DATASETS:
        raise ValueError(f"unknown workload dataset {spec.dataset!r}; expected one of {sorted(DATASETS)}")
    for name, val in (("rate", spec.rate), ("duration", spec.duration), ("cv", spec.cv),
                      ("diurnal_period", spec.diurnal_period), ("burst_gap_mean", spec.burst_gap_mean)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise ValueError(f"workload {name} = {val!r} must be a finite number > 0")
    if spec.mm_share is not None and not (isinstance(spec.mm_share, (int, float)) and 0 <= spec.mm_share <= 1):
        raise ValueError(f"workload mm_share = {spec.mm_share!r} must be in [0, 1]")
    if not (isinstance(spec.burst_factor, (int, float)) and spec.burst_factor >= 1):
        raise ValueError(f"workload burst_factor = {spec.burst_factor} must be >= 1")
    if not (isinstance(spec.dup_rate, (int, float)) and 0 <= spec.dup_rate < 1):
        raise ValueError(f"workload dup_rate = {spec.dup_rate} must be in [0, 1)")
    if not (isinstance(spec.dup_window, int) and spec.dup_window >= 1):
        raise ValueError(f"workload dup_window = {spec.dup_window!r} must be an integer >= 1")
    if not 0 <= spec.diurnal_amplitude < 1:
        raise ValueError(f"workload diurnal_amplitude = {spec.diurnal_amplitude} must be in [0, 1)")
    lo, hi = spec.burst_len
    if not 0 < lo <= hi:
        raise ValueError(f"workload burst_len = {spec.burst_len} must satisfy 0 < lo <= hi")


# ---- arrival processes -------------------------------------------------------------------------------
def _poisson(rng, rate, duration):
    n = rng.poisson(rate * duration * 1.2 + 20)
    t = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while t[-1] < duration:  # rare: extend
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))])
    return t[t < duration]


def _gamma(rng, rate, duration, cv):
    k = 1.0 / cv**2
    n = int(rate * duration * 1.5 + 50)
    t = np.cumsum(rng.gamma(k, 1.0 / (rate * k), size=n))
    while t[-1] < duration:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.gamma(k, 1.0 / (rate * k), size=n))])
    return t[t < duration]


def _thinned(rng, rate_fn, rate_max, duration):
    t = _poisson(rng, rate_max, duration)
    keep = rng.random(len(t)) * rate_max < rate_fn(t)
    return t[keep]


def burst_intervals(spec: WorkloadSpec, rng) -> list[tuple[float, float]]:
    out, t = [], rng.exponential(spec.burst_gap_mean) * 0.5
    while t < spec.duration:
        length = rng.uniform(*spec.burst_len)
        out.append((t, min(t + length, spec.duration)))
        t += length + rng.exponential(spec.burst_gap_mean)
    return out


def arrivals(spec: WorkloadSpec, rng) -> tuple[np.ndarray, np.ndarray]:
    """Return (sorted arrival times, is_multimodal flags)."""
    ds = DATASETS[spec.dataset]
    f = ds.mm_fraction if spec.mm_share is None else spec.mm_share
    if spec.arrival in ("poisson", "gamma"):
        t = _poisson(rng, spec.rate, spec.duration) if spec.arrival == "poisson" else \
            _gamma(rng, spec.rate, spec.duration, spec.cv)
        mm = rng.random(len(t)) < f
        return t, mm
    if spec.arrival == "mmpp":
        # Multimodal traffic is modulated by an on/off chain; the base MM rate is chosen so the long-run
        # mean stays f * rate (bursts add load, quiet periods run below it).
        mean_burst = 0.5 * sum(spec.burst_len)
        mult = (spec.burst_gap_mean + spec.burst_factor * mean_burst) / (spec.burst_gap_mean + mean_burst)
        base_mm = f * spec.rate / mult
        bursts = burst_intervals(spec, rng)
        starts = np.array([b[0] for b in bursts] + [np.inf])
        ends = np.array([b[1] for b in bursts] + [np.inf])

        def mm_rate(t):
            i = np.searchsorted(starts, t, side="right") - 1
            inside = (i >= 0) & (t < ends[np.maximum(i, 0)])
            return np.where(inside, base_mm * spec.burst_factor, base_mm)

        tt = _poisson(rng, (1 - f) * spec.rate, spec.duration) if f < 1 else np.zeros(0)
        tm = _thinned(rng, mm_rate, base_mm * spec.burst_factor, spec.duration) if f > 0 else np.zeros(0)
    else:  # diurnal: text and multimodal peak in anti-phase, so the best group split drifts over the day
        A, P = spec.diurnal_amplitude, spec.diurnal_period

        def text_rate(t):
            return (1 - f) * spec.rate * (1 + A * np.sin(2 * np.pi * t / P))

        def mm_rate(t):
            return f * spec.rate * (1 - A * np.sin(2 * np.pi * t / P))

        tt = _thinned(rng, text_rate, (1 - f) * spec.rate * (1 + A), spec.duration) if f < 1 else np.zeros(0)
        tm = _thinned(rng, mm_rate, f * spec.rate * (1 + A), spec.duration) if f > 0 else np.zeros(0)
    t = np.concatenate([tt, tm])
    mm = np.concatenate([np.zeros(len(tt), bool), np.ones(len(tm), bool)])
    order = np.argsort(t, kind="stable")
    return t[order], mm[order]


# ---- request sizes -----------------------------------------------------------------------------------
def _lognormal(rng, spec3, n):
    median, sigma, cap = spec3
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), 1, cap).astype(np.int64)


def generate(spec: WorkloadSpec, cost: CostModel) -> list[Request]:
    """Materialise the requests of a workload. Same spec and seed => identical requests."""
    validate_spec(spec)
    ds = DATASETS[spec.dataset]
    ss = np.random.SeedSequence(spec.seed)
    rng_arr, rng_size, rng_img = (np.random.default_rng(s) for s in ss.spawn(3))
    t, mm = arrivals(spec, rng_arr)
    n = len(t)
    out_len = _lognormal(rng_size, ds.output, n)
    mm_text = _lognormal(rng_size, ds.mm_prompt, n)
    txt_text = _lognormal(rng_size, ds.text_prompt, n)
    sys_idx = rng_size.choice(len(ds.sys_prompts), size=n, p=ds.sys_probs)
    n_img = rng_size.choice(np.arange(1, len(ds.images_per_req) + 1), size=n, p=ds.images_per_req)
    seen: list[Image] = []  # unique images so far (duplicates are drawn from the most recent `dup_window`)
    reqs = []
    for i in range(n):
        s = int(sys_idx[i])
        sys_len = ds.sys_prompts[s]
        if mm[i]:
            imgs = []
            for _ in range(int(n_img[i])):
                if seen and rng_img.random() < spec.dup_rate:
                    k = len(seen) - 1 - int(rng_img.integers(0, min(len(seen), spec.dup_window)))
                    imgs.append(seen[k])
                else:
                    w = max(28.0, rng_img.lognormal(math.log(ds.img_width_median), ds.img_width_sigma))
                    h = max(28.0, w * rng_img.lognormal(math.log(ds.img_aspect_median), 0.25))
                    im = Image(hash=int(rng_img.integers(1, 2**62)), pixels=int(w * h),
                               v_tokens=cost.vision_tokens(int(w), int(h)))
                    seen.append(im)
                    imgs.append(im)
            reqs.append(Request(rid=i, modality=Modality.MM, t_arrival=float(t[i]),
                                text_tokens=sys_len + int(mm_text[i]), output_len=int(out_len[i]),
                                images=tuple(imgs), sys_prompt=s, sys_len=sys_len))
        else:
            reqs.append(Request(rid=i, modality=Modality.TEXT, t_arrival=float(t[i]),
                                text_tokens=sys_len + int(txt_text[i]), output_len=int(out_len[i]),
                                sys_prompt=s, sys_len=sys_len))
    return reqs


@dataclass
class WorkloadSummary:
    n: int
    mm_fraction: float
    mean_input: float
    mean_vision: float
    mean_output: float
    dup_image_fraction: float
    extra: dict = field(default_factory=dict)


def summarize(reqs: list[Request]) -> WorkloadSummary:
    n = len(reqs)
    if n == 0:
        return WorkloadSummary(0, 0, 0, 0, 0, 0)
    seen, dups, total = set(), 0, 0
    for r in reqs:
        for im in r.images:
            total += 1
            if im.hash in seen:
                dups += 1
            seen.add(im.hash)
    mm = [r for r in reqs if r.modality == Modality.MM]
    return WorkloadSummary(n=n, mm_fraction=len(mm) / n, mean_input=float(np.mean([r.input_len for r in reqs])),
                           mean_vision=float(np.mean([r.v_tokens for r in mm])) if mm else 0.0,
                           mean_output=float(np.mean([r.output_len for r in reqs])),
                           dup_image_fraction=dups / total if total else 0.0)
