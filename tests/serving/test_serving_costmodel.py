import copy
import json

import numpy as np
import pytest

from serving.costmodel import CostModel, ProfileError, available_profiles, load_profile, validate_profile


def test_packaged_profile_loads_and_is_roofline_sane():
    assert "qwen2_5_vl_7b_a800x8" in available_profiles()
    c = CostModel(load_profile())
    # prefill ~0.09 ms/token (2 * 7.6 GFLOP at ~55% of 312 TFLOP/s), decode step >= weights / HBM bandwidth
    assert 0.05e-3 < c.b < 0.2e-3
    assert c.decode_step_time(1, 1000) >= 15.2e9 / 2.039e12
    # the batch critical point: 95% of the linear-regime prefill throughput
    n = c.saturation_tokens
    assert n / (c.a + c.b * n) >= 0.95 / c.b > (n - 1) / (c.a + c.b * (n - 1))


def test_vision_tokens_match_qwen_readme_example():
    c = CostModel(load_profile())
    # README: grid [1, 24, 36] of 14-px patches -> 864 patches -> 216 merged tokens
    assert c.vision_tokens(36 * 14, 24 * 14) == 216
    assert c.vision_tokens(4000, 3000) <= c.max_pixels // (28 * 28)
    assert c.vision_tokens(10, 10) >= 1


@pytest.mark.parametrize("path", [("prefill", "b_ms_per_token"), ("decode", "large_c_ms_per_seq"), ("", "block_size")])
def test_missing_coefficient_is_named(path):
    prof = copy.deepcopy(load_profile())
    sec, key = path
    del (prof[sec] if sec else prof)[key]
    with pytest.raises(ProfileError, match=key):
        validate_profile(prof, "p.json")


def test_bad_values_and_unknown_profile(tmp_path):
    prof = copy.deepcopy(load_profile())
    prof["encode"]["e1_ms_per_token"] = -1
    with pytest.raises(ProfileError, match="e1_ms_per_token"):
        CostModel(prof)
    with pytest.raises(ProfileError, match="nope"):
        load_profile("nope")
    prof = copy.deepcopy(load_profile())
    del prof["link"]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(prof))
    with pytest.raises(ProfileError, match="link"):
        load_profile(p)


@pytest.mark.parametrize("section", ["cross_host_link", "kv_import"])
@pytest.mark.parametrize(("link", "message"), [
    ({"alpha_ms": 0.02}, ".bandwidth_GBps = None must be a finite number > 0"),
    ({"alpha_ms": 0.02, "bandwidth_GBps": 0}, ".bandwidth_GBps = 0 must be a finite number > 0"),
    ({"alpha_ms": -1, "bandwidth_GBps": 25}, ".alpha_ms = -1 must be a finite number >= 0"),
])
def test_a_bad_optional_link_is_named(section, link, message):
    message = section + message
    prof = copy.deepcopy(load_profile())
    prof[section] = link
    with pytest.raises(ProfileError) as e:
        CostModel(prof)
    assert message in str(e.value)


def test_the_cross_host_link_defaults_to_the_one_link():
    c = CostModel(load_profile())
    assert c.kv_transfer_time(1000, cross_host=True) == c.kv_transfer_time(1000)
    prof = copy.deepcopy(load_profile())
    prof["cross_host_link"] = {"alpha_ms": 0.02, "bandwidth_GBps": 25.0}
    slow = CostModel(prof)
    assert slow.kv_transfer_time(1000, cross_host=True) == pytest.approx(0.02e-3 + 1000 * slow.bytes_kv / 25e9)


def test_refit_recovers_coefficients_from_timings():
    c = CostModel(load_profile())
    rng = np.random.default_rng(0)
    # prefill: synthetic "measurements" from known coefficients (+ tiny noise) must be recovered
    n_tok = rng.integers(16, 8000, 60)
    sq = n_tok ** 2
    truth = (5e-3, 0.12e-3, 2e-9)
    t = truth[0] + truth[1] * n_tok + truth[2] * sq
    t = t * (1 + rng.normal(0, 1e-4, len(t)))
    c2 = c.refit("prefill", np.c_[n_tok, sq], t)
    assert c2.a == pytest.approx(truth[0], rel=0.02)
    assert c2.b == pytest.approx(truth[1], rel=0.01)
    assert c2.c == pytest.approx(truth[2], rel=0.05)
    # decode: both regimes refit separately around the batch threshold
    B = rng.integers(1, 256, 200)
    ctx = B * rng.integers(100, 3000, 200)
    small = B <= c.d_threshold
    t = np.where(small, 9e-3 + 3e-8 * ctx + 2e-5 * B, 3e-3 + 3e-8 * ctx + 9e-5 * B)
    c3 = c.refit("decode", np.c_[B, ctx], t)
    assert c3.da == pytest.approx(9e-3, rel=1e-3) and c3.dlc == pytest.approx(9e-5, rel=1e-3)
    with pytest.raises(ValueError, match="stage"):
        c.refit("vision", np.c_[B, ctx], t)


def test_the_destination_s_import_costs_nothing_unless_profiled():
    assert CostModel(load_profile()).kv_import_time(1000) == 0.0
    prof = copy.deepcopy(load_profile())
    prof["kv_import"] = {"alpha_ms": 2.0, "bandwidth_GBps": 0.5}
    c = CostModel(prof)
    assert c.kv_import_time(1000) == pytest.approx(2e-3 + 1000 * c.bytes_kv / 0.5e9, rel=1e-12)
