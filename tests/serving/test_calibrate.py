"""Calibration: the engine's step timings refit the simulator's cost model (known coefficients come back exactly),
and a workload replays open loop on the engine, every request doing exactly the work the simulator models."""

from __future__ import annotations

import numpy as np
import pytest

from kvzip_jax.config import ModelConfig
from kvzip_jax.models.decoder import init_params
from serving.calibrate import compare, fit_profile
from serving.costmodel import CostModel, default_cost_model
from serving.engine import Engine, EngineConfig
from serving.replay import replay
from serving.workloads import WorkloadSpec, generate

SHAPE = dict(page_size=16, pages_per_instance=8192, prefill_chunk=512, max_model_len=640, warmup=False)


@pytest.fixture(scope="module")
def engine():
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_id=None))
    config = EngineConfig(policy="static_pd", policy_options=(("n_prefill", 1),), num_instances=2, **SHAPE)
    with Engine(cfg, init_params(cfg, seed=2), engine_config=config) as e:
        yield e


def test_fit_recovers_known_coefficients(engine):
    rng = np.random.default_rng(0)
    new = rng.integers(16, 512, 40)
    sq = new ** 2 + rng.integers(0, 5000, 40)
    batch = rng.integers(1, 9, 40)
    ctx = batch * rng.integers(16, 600, 40)
    nbytes = rng.integers(1, 400, 40) * 4096
    timings = [("prefill", (n, s), (12.0 + 0.1 * n + 2e-5 * s) / 1e3) for n, s in zip(new, sq, strict=True)]
    timings += [("decode", (b, c), (2.0 + 1e-3 * c + 0.05 * b) / 1e3) for b, c in zip(batch, ctx, strict=True)]
    timings += [(k, (int(n) // 4096, int(n)), (0.5 + n / 1e6) / 1e3) for n in nbytes for k in ("export", "import")]
    prof = fit_profile(engine, timings, name="fitted")
    p, d = prof["prefill"], prof["decode"]
    assert (p["a_ms"], p["b_ms_per_token"], p["c_ms_per_token2"]) == pytest.approx((12.0, 0.1, 2e-5), rel=1e-6)
    assert (d["a_ms"], d["b_ms_per_ctx_token"], d["c_ms_per_seq"]) == pytest.approx((2.0, 1e-3, 0.05), rel=1e-6)
    # two transfers per migration (gather + device_put, then scatter): alpha and 1/bandwidth add up
    assert prof["link"]["alpha_ms"] == pytest.approx(1.0, rel=1e-6)
    assert prof["link"]["bandwidth_GBps"] == pytest.approx(0.5, rel=1e-6)
    c = engine.config
    assert prof["num_instances"] == 2 and prof["block_size"] == 16
    assert prof["kv_blocks_per_instance"] == 8191 // (c.num_layers * c.num_kv_heads)
    assert prof["bytes_kv_per_token"] == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    assert prof["decode"]["max_batch"] == engine.engine_config.decode_rows
    CostModel(prof)  # a valid profile
    with pytest.raises(ValueError, match="too few decode timings"):
        fit_profile(engine, timings[:40], name="x")


def test_replay_does_the_simulated_work_and_calibrates(engine):
    spec = WorkloadSpec(arrival="poisson", rate=20.0, duration=1.0, dataset="cpu_text", seed=3)
    requests = generate(spec, default_cost_model())
    assert requests and all(r.modality.name == "TEXT" for r in requests)
    before = engine.stats.generated_tokens
    summary = replay(engine, requests)
    assert summary.requests == len(requests) and summary.errors == 0
    assert engine.stats.generated_tokens - before == sum(r.output_len for r in requests)  # ignore_eos: all of it
    assert 0 < summary.ttft_p50 <= summary.ttft_p90 and 0 < summary.tpot_p50 <= summary.tpot_p90
    assert engine.stats.migrations >= len(requests)  # static_pd: every request moved to the decode instance
    prof = fit_profile(engine, list(engine.timings), name="tiny")
    sim, real = compare(prof, engine, generate(spec, CostModel(prof)), generate(spec, CostModel(prof)),
                        policy="static_pd", policy_options=(("n_prefill", 1),))
    assert sim.requests == real.requests == len(requests) and sim.errors == real.errors == 0
