"""Calibrate the simulator's cost model from the engine's own step timings, then check that the simulator, run on
the calibrated profile, predicts what the engine does on the same workload.

    replay(engine, calibration_requests)            # the engine records every step it takes under real load
    prof = fit_profile(engine, engine.timings, name="...")   # least squares (serving.costmodel.CostModel.refit)
    sim, real = compare(prof, engine, requests, copy)         # other requests, simulated and replayed

Timings come from serving a workload, not from isolated sweeps: under load the instances share the host's cores
and the host's Python work, and a step then takes longer than alone (the fit's intercepts absorb that).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from serving.costmodel import CostModel, _nnls_fit, default_cost_model, validate_profile
from serving.engine import Engine
from serving.policies import make_policy
from serving.replay import LatencySummary, replay, simulated_summary
from serving.simulator import SimConfig, simulate


def fit_profile(engine: Engine, timings: list, *, name: str, base: CostModel | None = None,
                description: str = "") -> dict:
    """A cost profile for `engine`: prefill and decode coefficients (and encode, when it served images) fitted
    to `timings` (`Engine.timings` of one or more engines of this shape), the KV link to their migrations (when
    there were any), and the engine's structure (instances, pages, batch limits, KV bytes per token)."""
    base = base or default_cost_model()
    steps = {k: ([f for kind, f, _ in timings if kind == k], [s for kind, _, s in timings if kind == k])
             for k in ("encode", "prefill", "decode", "export", "import")}
    for k in ("prefill", "decode"):
        if len(steps[k][0]) < 4:
            raise ValueError(f"too few {k} timings ({len(steps[k][0])}) to fit: serve a workload first")
    ec, c = engine.engine_config, engine.config
    prof = copy.deepcopy(base.profile)
    prof["decode"].update(batch_threshold=ec.decode_rows, max_batch=ec.decode_rows)
    cost = CostModel(prof).refit("prefill", *steps["prefill"])
    decode_x = [(b, ctx) for b, ctx in steps["decode"][0]]
    cost = cost.refit("decode", decode_x, steps["decode"][1])
    if len(steps["encode"][0]) >= 4:  # a model with an image encoder that served images
        cost = cost.refit("encode", *steps["encode"])
    prof = copy.deepcopy(cost.profile)
    d = prof["decode"]
    d.update(large_a_ms=d["a_ms"], large_b_ms_per_ctx_token=d["b_ms_per_ctx_token"],
             large_c_ms_per_seq=d["c_ms_per_seq"])
    itemsize = engine.insts[0].executor.kv_itemsize
    prof.update(
        name=name, description=description or f"fitted to the engine's step timings ({engine.model_name})",
        num_instances=len(engine.insts), block_size=ec.page_size,
        # the simulator counts blocks of block_size tokens per request; a request holds one page per (layer, head)
        kv_blocks_per_instance=(ec.pages_per_instance - 1) // (c.num_layers * c.num_kv_heads),
        bytes_kv_per_token=2 * c.num_layers * c.num_kv_heads * c.head_dim * itemsize,
    )
    prof["prefill"]["max_batch_tokens"] = ec.prefill_rows * ec.prefill_chunk
    if steps["export"][0] and steps["import"][0]:
        alpha = slope = 0.0
        for k in ("export", "import"):
            x = np.asarray([b for _, b in steps[k][0]], np.float64)
            a, s = _nnls_fit(np.c_[np.ones(len(x)), x], np.asarray(steps[k][1]) * 1e3, k)
            alpha, slope = alpha + a, slope + s
            if k == "import":  # the destination's worker does this part: it decodes nothing meanwhile
                prof["kv_import"] = {"alpha_ms": a, "bandwidth_GBps": 1e-6 / max(s, 1e-15)}
        prof["link"] = {"alpha_ms": alpha, "bandwidth_GBps": 1e-6 / max(slope, 1e-15)}
    validate_profile(prof, name)
    return prof


def compare(prof: dict, engine: Engine, requests, simulated_requests, *, policy: str, policy_options=(),
            seed: int = 0) -> tuple[LatencySummary, LatencySummary]:
    """(simulated, measured) latencies of the same workload: the simulator on `prof`, the engine replaying it.
    `requests` and `simulated_requests` are two copies of one workload (the simulator mutates its own)."""
    cost = CostModel(prof)
    sim = simulate(make_policy(policy, **dict(policy_options)), simulated_requests, cost, len(engine.insts),
                   SimConfig(check_invariants=False, decode_steps=engine.engine_config.decode_steps))
    return simulated_summary(sim.requests), replay(engine, requests, seed=seed)


def write_profile(prof: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(prof, indent=1, sort_keys=False) + "\n")
