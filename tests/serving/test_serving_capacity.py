import numpy as np
import pytest
from serving_testutil import COST

from serving.capacity import (
    ROLES,
    bounds,
    class_work,
    decode_tokens_per_s,
    phases,
    ratios,
    role_loads,
    shift_sweep,
)
from serving.experiments import RunSpec, policy_kw, run
from serving.metrics import SLO_FACTOR
from serving.model import Modality
from serving.workloads import DATASETS, WorkloadSpec

WORK = {ds: class_work(WorkloadSpec(dataset=ds), COST) for ds in DATASETS}


@pytest.mark.parametrize("arrival", ["poisson", "mmpp", "diurnal"])
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_phases_keep_the_long_run_mix(arrival, dataset):
    ph = phases(WorkloadSpec(arrival=arrival, dataset=dataset, burst_factor=5.0, diurnal_amplitude=0.7))
    w = np.array([p[0] for p in ph])
    f = DATASETS[dataset].mm_fraction
    assert w.sum() == pytest.approx(1.0)
    assert sum(wi * p[1] for wi, p in zip(w, ph, strict=True)) == pytest.approx(1 - f)
    assert sum(wi * p[2] for wi, p in zip(w, ph, strict=True)) == pytest.approx(f)


def test_decode_capacity_stays_inside_the_tpot_slo():
    ctx = 1000.0
    caps = [decode_tokens_per_s(COST, ctx, k) for k in (1, 2, 5)]
    assert caps[0] < caps[1] <= caps[2]  # looser TPOT SLOs allow bigger batches
    base = COST.decode_step_time(1, 1000)
    for k, cap in zip((1, 2, 5), caps, strict=True):
        # the chosen batch b runs steps of b / cap seconds, which must fit the SLO
        b = next(b for b in range(1, COST.decode_max_batch + 1)
                 if abs(b / COST.decode_step_time(b, round(b * ctx)) - cap) < 1e-9)
        assert COST.decode_step_time(b, round(b * ctx)) <= k * SLO_FACTOR * base
    assert decode_tokens_per_s(COST, ctx, 2, busy_fraction=0.3) < caps[1]
    assert decode_tokens_per_s(COST, ctx, 2, busy_fraction=1.0) == 0.0
    with pytest.raises(ValueError, match="slo_scale = 0"):
        decode_tokens_per_s(COST, ctx, 0)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_bound_ordering_and_steady_equivalences(dataset):
    work = WORK[dataset]
    steady = bounds(WorkloadSpec(dataset=dataset), COST, 3, work=work)
    # fractional elastic >= whole-instance elastic >= best static EPD (elastic also gets the prefix cache)
    assert steady["elastic_frac"] >= steady["elastic_int"] >= steady["static_epd_best"] > 0
    # without a load shift, bursts of factor 1 and a flat diurnal cycle are the steady load
    flat = [bounds(WorkloadSpec(arrival="mmpp", dataset=dataset, burst_factor=1.0), COST, 3, work=work),
            bounds(WorkloadSpec(arrival="diurnal", dataset=dataset, diurnal_amplitude=0.0), COST, 3, work=work)]
    for b in flat:
        for key in ("static_epd_best", "elastic_int", "elastic_frac", "static_pd_best", "coupled"):
            assert b[key] == pytest.approx(steady[key], rel=1e-6), key


def test_static_rate_is_the_tightest_role():
    """Recompute the best static EPD rate by hand from the role loads of both MMPP phases."""
    ds = "visualwebinstruct"
    spec = WorkloadSpec(arrival="mmpp", dataset=ds)
    b = bounds(spec, COST, 3, work=WORK[ds])
    split = np.array([int(x) for x in b["static_epd_split"].split("-")])
    loads = [role_loads(WORK[ds], COST, 3, tr, mr, cached=False) for _, tr, mr in phases(spec)]
    assert len(split) == len(ROLES) and split.sum() == COST.profile["num_instances"]
    assert b["static_epd_best"] == pytest.approx(min(float(np.min(split / ld)) for ld in loads))


def test_bigger_shifts_leave_more_room_for_elasticity():
    rows = shift_sweep("visualwebinstruct", COST, 3, burst_factors=(1, 8), amplitudes=(0.0, 0.9))
    by = {(r["shift"], r["level"]): r for r in rows}
    assert by[("diurnal_amplitude", 0.9)]["frac_vs_static_epd"] > by[("diurnal_amplitude", 0.0)]["frac_vs_static_epd"]
    assert by[("mmpp_burst_factor", 8.0)]["int_vs_static_epd"] >= by[("mmpp_burst_factor", 1.0)]["int_vs_static_epd"]
    r = ratios(by[("diurnal_amplitude", 0.9)])
    assert r["frac_vs_static_epd"] >= r["int_vs_static_epd"] >= 1.0


def test_bound_predicts_where_the_simulated_static_split_saturates():
    """The fluid rate is where the simulated split stops keeping up: well below it requests meet even tight
    SLOs, well above it the loose scale-5 SLO fails for most requests."""
    ds = "sharegpt4o"
    split = (1, 1, 2, 3, 1)
    b = bounds(WorkloadSpec(dataset=ds), COST, 5, work=WORK[ds])
    loads = role_loads(WORK[ds], COST, 5, 1 - DATASETS[ds].mm_fraction, DATASETS[ds].mm_fraction, cached=False)
    cap = float(np.min(np.array(split) / loads))
    assert cap <= b["static_epd_best"] + 1e-9
    rows = {}
    for f in (0.5, 2.0):
        wl = WorkloadSpec(dataset=ds, rate=round(f * cap, 2), duration=60.0, seed=3)
        rows[f] = run(RunSpec("static_epd", policy_kw(split=split), wl))
    assert rows[0.5]["attain_s3"] >= 0.9
    assert rows[2.0]["attain_s5"] < 0.5


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="at least 5 instances"):
        bounds(WorkloadSpec(), COST, 3, num_instances=4, work=WORK["sharegpt4o"])
    with pytest.raises(ValueError, match="unknown workload arrival"):
        phases(WorkloadSpec(arrival="weekly"))
    with pytest.raises(ValueError, match="slo_scale = -1"):
        bounds(WorkloadSpec(), COST, -1, work=WORK["sharegpt4o"])


def test_class_work_separates_the_modalities():
    w = WORK["sharegpt4o"]
    assert w[Modality.TEXT].encode_s == 0 and w[Modality.TEXT].preprocess_s == 0
    assert w[Modality.MM].encode_s > 0 and w[Modality.MM].preprocess_s > 0
    for c in w.values():
        assert 0 < c.prefill_cached_s < c.prefill_s  # system prompts are served from the prefix cache
