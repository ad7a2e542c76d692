"""The robustness benchmark (serving/robustness.py): the seeded load family, its validation, a tiny end-to-end run,
and elastic's stage coverage on random loads of the family."""

import dataclasses
import math

import pytest
from serving_testutil import COST

from serving.elasticmm import ElasticConfig, ElasticMM
from serving.policies import make_policy
from serving.robustness import (
    BASELINES,
    SLO_SCALE,
    LoadFamily,
    Sizing,
    draw_loads,
    epd_candidates,
    markdown,
    run_robustness,
    validate_sizing,
    write_outputs,
)
from serving.simulator import SimConfig, simulate
from serving.workloads import ARRIVALS, generate

TINY = Sizing(target_requests=80, min_duration=2.0, max_duration=3.0, screen_fraction=0.5, finalists=1,
              check_requests=30)


def test_the_family_is_deterministic_per_seed():
    assert draw_loads(LoadFamily(n_loads=12, seed=4)) == draw_loads(LoadFamily(n_loads=12, seed=4))
    assert draw_loads(LoadFamily(n_loads=12, seed=4)) != draw_loads(LoadFamily(n_loads=12, seed=5))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_loads", [12, 30])
def test_the_family_covers_the_stated_ranges(seed, n_loads):
    fam = LoadFamily(n_loads=n_loads, seed=seed)
    loads = draw_loads(fam)
    assert [ld.load_id for ld in loads] == list(range(n_loads))
    assert {ld.arrival for ld in loads} == set(ARRIVALS)
    assert {ld.instances for ld in loads} == {8, 16, 32}
    shares = [ld.mm_share for ld in loads]
    assert 0.0 in shares and 1.0 in shares and all(0 <= s <= 1 for s in shares)
    dups = [ld.dup_rate for ld in loads]
    assert min(dups) == 0.0 and max(dups) == 0.8
    bursts = [ld.knob_value for ld in loads if ld.arrival == "mmpp"]
    assert min(bursts) == 1.0 and max(bursts) == 10.0
    assert all(ld.knob is None and ld.knob_value is None for ld in loads if ld.arrival == "poisson")
    for ld in loads:  # every load is a valid workload at any rate
        wl = ld.workload(10.0, 30.0)
        assert wl.mm_share == ld.mm_share and wl.dup_rate == ld.dup_rate


def test_epd_candidates_are_every_split_at_8_and_a_neighbourhood_beyond():
    assert len(epd_candidates(8, [(1, 1, 2, 3, 1)])) == 35
    cands = epd_candidates(16, [(2, 2, 2, 6, 4)])
    assert (2, 2, 2, 6, 4) in cands and (3, 2, 2, 5, 4) in cands and len(cands) == 21
    assert all(sum(c) == 16 and min(c) >= 1 for c in cands)


@pytest.mark.parametrize("bad, name", [
    (dict(n_loads=0), "n_loads = 0"),
    (dict(n_loads=2.5), "n_loads = 2.5"),
    (dict(seed=-1), "seed = -1"),
    (dict(mm_share=(0.0, 1.5)), "mm_share = (0.0, 1.5)"),
    (dict(mm_share=(0.8, 0.2)), "mm_share = (0.8, 0.2)"),
    (dict(dup_rate=(0.0, 1.0)), "dup_rate = (0.0, 1.0)"),
    (dict(burst_factor=(0.5, 10.0)), "burst_factor = (0.5, 10.0)"),
    (dict(cv=(0.0, 2.0)), "cv = (0.0, 2.0)"),
    (dict(diurnal_amplitude=(0.2, 1.0)), "diurnal_amplitude = (0.2, 1.0)"),
    (dict(instance_counts=(8, 4)), "instance_counts = (8, 4)"),
    (dict(arrivals=("poisson", "bursty")), "arrivals = ('poisson', 'bursty')"),
    (dict(datasets=("coco",)), "datasets = ('coco',)"),
    (dict(mm_share=0.5), "mm_share = 0.5"),
])
def test_bad_family_parameters_name_the_value(bad, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        draw_loads(LoadFamily(**bad))


@pytest.mark.parametrize("bad, name", [
    (dict(target_requests=0), "target_requests = 0"),
    (dict(min_duration=10.0, max_duration=5.0), "durations"),
    (dict(screen_fraction=0.0), "screen_fraction = 0.0"),
    (dict(finalists=0), "finalists = 0"),
    (dict(check_requests=0), "check_requests = 0"),
    (dict(rate_factor=-1.0), "rate_factor = -1.0"),
])
def test_bad_sizing_names_the_value(bad, name):
    with pytest.raises(ValueError, match=name):
        validate_sizing(dataclasses.replace(TINY, **bad))


def test_every_baseline_can_run_with_the_prefix_cache_under_invariant_checks():
    """The cache the robustness runs give the baselines: on, hit (shared system prompts, repeated images), and
    every invariant (cache refcounts and LRU pools included) holds at every event."""
    loads = draw_loads(LoadFamily(n_loads=12, seed=0))
    ld = next(x for x in loads if x.instances == 8 and 0.2 < x.mm_share < 0.9 and x.dup_rate > 0.2)
    reqs = generate(ld.workload(12.0, 6.0), COST)
    for name, kw in (("coupled", {}), ("static_pd", dict(n_prefill=4)), ("static_epd", dict(split=(1, 1, 2, 3, 1)))):
        pol = make_policy(name, prefix_cache=True, **kw)
        res = simulate(pol, [dataclasses.replace(r) for r in reqs], COST, 8, SimConfig(check_invariants=True))
        assert res.prefix_hit_tokens > 0 and res.emb_hits > 0, name
        assert all(r.t_done is not None for r in res.requests), name
    assert make_policy("coupled").prefix_cache is False  # the default elsewhere is unchanged


def test_a_tiny_run_finishes_every_request_and_gives_one_row_per_load(tmp_path):
    rows = run_robustness(LoadFamily(n_loads=2, seed=1, instance_counts=(8,)), TINY, jobs=1, log=lambda *_: None)
    assert [r["load"] for r in rows] == [0, 1]
    for r in rows:
        att = {p: r[f"attain_s{SLO_SCALE}_{p}"] for p in ("elasticmm", *BASELINES)}
        best = max(att[p] for p in BASELINES)
        assert r["best_other"] in BASELINES and att[r["best_other"]] == best
        assert math.isclose(r["ratio"], att["elasticmm"] / best)
        assert r["all_finished"] and all(r[f"unfinished_{p}"] == 0 for p in att)
        assert r["prefix_cache_on_all"] is True
        assert r["invariants"].startswith("ok")
        assert r["static_pd_best_split"].startswith("static_pd[") and r["static_epd_best_split"].startswith(
            "static_epd[")
    csv_path, png_path = write_outputs(rows, tmp_path)
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 3 and "prefix_cache_on_all" in lines[0] and "ratio" in lines[0]
    assert png_path.stat().st_size > 0
    assert "elastic / best other" in markdown(rows)


@pytest.mark.parametrize("seed", range(3))
def test_elastic_never_leaves_queued_work_without_an_instance_for_more_than_a_tick(seed):
    """Property over random loads of the family (any arrival, MM share and burstiness, 8 instances, short
    dormancy so groups really shrink to zero): the checker raises InvariantError whenever a stage has had queued
    work and no instance for longer than one scheduler tick; every request finishes."""
    loads = [ld for ld in draw_loads(LoadFamily(n_loads=12, seed=seed)) if ld.instances == 8]
    for ld in loads[:2]:
        reqs = generate(ld.workload(8.0, 6.0), COST)
        pol = ElasticMM(ElasticConfig(dormant_after=1.0))
        res = simulate(pol, reqs, COST, 8, SimConfig(check_invariants=True))
        assert all(r.t_done is not None for r in res.requests), ld
