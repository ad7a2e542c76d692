"""Replay a workload (`serving.workloads`) on the real engine, open loop: each request is submitted at its arrival
time, whatever the engine's state, and measured as the simulator measures it (TTFT: arrival to first token;
TPOT: the time per output token after the first). The prompts are random token ids of each request's length (and
its images, as the served model's encoder takes them: `engine_images`), and every request generates exactly its
output length (`ignore_eos`), so the engine does the work the simulator models."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from serving.engine import Engine, MediaInput, SamplingParams
from serving.model import Image, Request

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


def engine_images(requests: list[Request], tokens_per_image: int) -> list[Request]:
    """The workload with every image as the engine's encoder sees it: `tokens_per_image` tokens each (a served
    model's encoder has one input size), so the simulator, given these requests, models the work the engine does."""
    return [dataclasses.replace(r, images=tuple(Image(im.hash, im.pixels, tokens_per_image) for im in r.images))
            if r.images else r for r in requests]


def inputs_for(requests: list[Request], engine: Engine, seed: int = 0) -> list[tuple[list[int], tuple]]:
    """(prompt, images) per request: random token ids for its text; for a multimodal request one image
    placeholder per image right after its system prompt (where a chat template puts a user's images), and
    pixels drawn from the image's content hash (an image that repeats has the same pixels, so the engine's
    embedding cache sees the repeats the workload has)."""
    rng = np.random.default_rng(seed)
    image = engine.modalities.get("image")
    out = []
    for r in requests:
        text = rng.integers(FIRST_TOKEN_ID, engine.config.vocab_size, r.text_tokens)
        if not r.images:
            out.append((text.tolist(), ()))
            continue
        if image is None:
            raise ValueError(f"request {r.rid} has images; the engine's model takes none")
        if any(im.v_tokens != image.tokens_per_item for im in r.images):
            raise ValueError(f"request {r.rid}: its images have {[im.v_tokens for im in r.images]} tokens; the "
                             f"engine's encoder gives {image.tokens_per_item} (use engine_images)")
        text[text == image.token_id] = image.token_id + 1 if image.token_id + 1 < engine.config.vocab_size \
            else FIRST_TOKEN_ID
        prompt = [*text[:r.sys_len].tolist(), *[image.token_id] * len(r.images), *text[r.sys_len:].tolist()]
        media = tuple(MediaInput(f"workload-image-{im.hash}", _pixels(im.hash, image.input_shape), "image")
                      for im in r.images)
        out.append((prompt, media))
    return out


def _pixels(content: int, shape: tuple) -> np.ndarray:
    return np.random.default_rng(content).standard_normal(shape).astype(np.float32)


def replay(engine: Engine, requests: list[Request], *, seed: int = 0, timeout: float = 600.0) -> LatencySummary:
    """Submit every request at its arrival time; returns the measured latencies once all have finished."""
    inputs = inputs_for(requests, engine, seed)
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
    for i, (r, (prompt, media)) in enumerate(zip(requests, inputs, strict=True)):
        delay = start + r.t_arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrived[i] = time.perf_counter()
        engine.submit(prompt, SamplingParams(max_tokens=r.output_len, ignore_eos=True), sink_for(i), media=media)
    if total and not finished.wait(timeout):
        raise TimeoutError(f"{total - len(done)} of {total} requests unfinished {timeout}s after the last arrival")
    ok = [i for i in range(total) if i not in failed]
    return summarize(arrived[ok] - start, [first[i] - start for i in ok], [done[i] - start for i in ok],
                     [requests[i].output_len for i in ok], errors=len(failed))
