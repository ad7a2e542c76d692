import itertools

import numpy as np
import pytest
from serving_testutil import COST

from serving.model import Modality
from serving.workloads import DATASETS, WorkloadSpec, burst_intervals, generate, summarize


def _key(reqs):
    return [(r.t_arrival, r.modality, r.text_tokens, r.output_len, tuple(im.hash for im in r.images)) for r in reqs]


@pytest.mark.parametrize("arrival", ["poisson", "gamma", "mmpp", "diurnal"])
def test_deterministic_by_seed(arrival):
    spec = WorkloadSpec(arrival=arrival, rate=20, duration=60, seed=3, diurnal_period=60)
    a, b = generate(spec, COST), generate(spec, COST)
    assert _key(a) == _key(b)
    c = generate(WorkloadSpec(arrival=arrival, rate=20, duration=60, seed=4, diurnal_period=60), COST)
    assert _key(a) != _key(c)
    assert all(x.t_arrival <= y.t_arrival for x, y in itertools.pairwise(a))


def test_rates_and_mixes():
    for ds in DATASETS:
        reqs = generate(WorkloadSpec(rate=50, duration=200, dataset=ds, seed=1), COST)
        assert len(reqs) / 200 == pytest.approx(50, rel=0.05)
        s = summarize(reqs)
        assert s.mm_fraction == pytest.approx(DATASETS[ds].mm_fraction, abs=0.03)
    # vision-heavy images are larger (max_pixels cap = 1024 tokens) than web images
    v1 = summarize(generate(WorkloadSpec(rate=20, duration=100, dataset="sharegpt4o"), COST)).mean_vision
    v2 = summarize(generate(WorkloadSpec(rate=20, duration=100, dataset="visualwebinstruct"), COST)).mean_vision
    assert v1 > 1.5 * v2 and v1 <= 2 * 1024


def test_gamma_has_requested_cv():
    reqs = generate(WorkloadSpec(arrival="gamma", cv=3.0, rate=40, duration=300, seed=2), COST)
    gaps = np.diff([r.t_arrival for r in reqs])
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)
    assert len(reqs) / 300 == pytest.approx(40, rel=0.15)


def test_mmpp_bursts_raise_multimodal_rate_only():
    spec = WorkloadSpec(arrival="mmpp", rate=20, duration=1200, burst_factor=4, burst_gap_mean=60, seed=5)
    reqs = generate(spec, COST)
    bursts = burst_intervals(spec, np.random.default_rng(np.random.SeedSequence(5).spawn(3)[0]))
    inside = lambda t: any(a <= t < b for a, b in bursts)  # noqa: E731
    t_in = sum(b - a for a, b in bursts)
    t_out = spec.duration - t_in
    mm_in = sum(1 for r in reqs if r.modality == Modality.MM and inside(r.t_arrival)) / t_in
    mm_out = sum(1 for r in reqs if r.modality == Modality.MM and not inside(r.t_arrival)) / t_out
    tx_in = sum(1 for r in reqs if r.modality == Modality.TEXT and inside(r.t_arrival)) / t_in
    tx_out = sum(1 for r in reqs if r.modality == Modality.TEXT and not inside(r.t_arrival)) / t_out
    assert mm_in / mm_out == pytest.approx(4.0, rel=0.2)
    assert tx_in / tx_out == pytest.approx(1.0, rel=0.25)
    assert len(reqs) / spec.duration == pytest.approx(20, rel=0.2)  # rate is the long-run mean


def test_duplicate_image_rate():
    s = summarize(generate(WorkloadSpec(rate=30, duration=200, dup_rate=0.3, seed=1), COST))
    assert s.dup_image_fraction == pytest.approx(0.3, abs=0.03)
    assert summarize(generate(WorkloadSpec(rate=30, duration=100, seed=1), COST)).dup_image_fraction == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(rate=0), "rate"), (dict(rate=-3), "rate"), (dict(duration=0), "duration"),
    (dict(arrival="weibull"), "weibull"), (dict(dataset="coco"), "coco"), (dict(dup_rate=1.0), "dup_rate"),
    (dict(cv=0), "cv"), (dict(burst_factor=0.5), "burst_factor"),
    # the message names the offending value, not just the field
    (dict(mm_share=1.5), r"mm_share = 1\.5 must be in \[0, 1\]"), (dict(mm_share=-0.1), r"mm_share = -0\.1"),
    (dict(mm_share=float("nan")), r"mm_share = nan"), (dict(burst_factor=0.9), r"burst_factor = 0\.9 must be >= 1"),
    (dict(dup_rate=1.0), r"dup_rate = 1\.0 must be in \[0, 1\)"), (dict(dup_rate=-0.2), r"dup_rate = -0\.2")])
def test_bad_workloads_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        generate(WorkloadSpec(**kw), COST)


@pytest.mark.parametrize("arrival", ["poisson", "mmpp", "diurnal"])
def test_mm_share_overrides_the_dataset_mix(arrival):
    """mm_share=0 is a text-only load, 1 a multimodal-only one, on every arrival process."""
    for share, want in ((0.0, 0.0), (1.0, 1.0)):
        s = summarize(generate(WorkloadSpec(arrival=arrival, rate=20, duration=30, mm_share=share, seed=3), COST))
        assert s.n > 0 and s.mm_fraction == want
