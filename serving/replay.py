"""Replay a workload (`serving.workloads`) on the real engine, open loop: each request is submitted at its arrival
time, whatever the engine's state, and measured as the simulator measures it (TTFT: arrival to first token;
TPOT: the time per output token after the first). The prompts are random token ids of each request's length and
every request generates exactly its output length (`ignore_eos`), so the engine does the work the simulator
models."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from serving.engine import Engine, SamplingParams
from serving.model import Modality, Request

FIRST_TOKEN_ID = 16  # random prompts avoid the low ids, where tokenizers keep their special tokens


@dataclasses.dataclass
class LatencySummary:
    requests: int
    errors: int
    duration_s: float  # first arrival to last completion
    ttft_p50: float
    ttft_p90: float
    tpot_p50: float
    tpot_p90: float
    throughput_rps: float
    output_tps: float  # generated tokens per second

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(t_arrival, t_first, t_done, output_len, errors: int = 0) -> LatencySummary:
    """Percentiles over finished requests (seconds)."""
    a, f, d, n = (np.asarray(x, np.float64) for x in (t_arrival, t_first, t_done, output_len))
    ttft = f - a
    multi = n > 1
    tpot = (d[multi] - f[multi]) / (n[multi] - 1)
    span = float(d.max() - a.min()) if len(a) else 0.0

    def pct(x, q):
        return float(np.percentile(x, q)) if len(x) else float("nan")

    return LatencySummary(len(a), errors, span, pct(ttft, 50), pct(ttft, 90), pct(tpot, 50), pct(tpot, 90),
                          len(a) / span if span else 0.0, float(n.sum()) / span if span else 0.0)


def simulated_summary(requests: list[Request]) -> LatencySummary:
    done = [r for r in requests if r.t_done is not None]
    return summarize([r.t_arrival for r in done], [r.t_first for r in done], [r.t_done for r in done],
                     [r.output_len for r in done], errors=len(requests) - len(done))


def prompts_for(requests: list[Request], vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    if any(r.modality != Modality.TEXT for r in requests):
        raise ValueError("the engine replays text requests only (images are not served yet)")
    return [rng.integers(FIRST_TOKEN_ID, vocab_size, r.input_len).tolist() for r in requests]


def replay(engine: Engine, requests: list[Request], *, seed: int = 0, timeout: float = 600.0) -> LatencySummary:
    """Submit every request at its arrival time; returns the measured latencies once all have finished."""
    prompts = prompts_for(requests, engine.config.vocab_size, seed)
    lock = threading.Lock()
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    failed: list[int] = []
    finished = threading.Event()
    total = len(requests)

    def sink_for(i: int):
        def sink(out):
            now = time.perf_counter()
            with lock:
                if out.token_ids and i not in first:
                    first[i] = now
                if out.finish_reason is not None:
                    done[i] = now
                    if out.finish_reason != "length":
                        failed.append(i)
                    if len(done) == total:
                        finished.set()
        return sink

    arrived = np.zeros(total)
    start = time.perf_counter()
    for i, (r, prompt) in enumerate(zip(requests, prompts, strict=True)):
        delay = start + r.t_arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrived[i] = time.perf_counter()
        engine.submit(prompt, SamplingParams(max_tokens=r.output_len, ignore_eos=True), sink_for(i))
    if total and not finished.wait(timeout):
        raise TimeoutError(f"{total - len(done)} of {total} requests unfinished {timeout}s after the last arrival")
    ok = [i for i in range(total) if i not in failed]
    return summarize(arrived[ok] - start, [first[i] - start for i in ok], [done[i] - start for i in ok],
                     [requests[i].output_len for i in ok], errors=len(failed))
