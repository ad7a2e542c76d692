import math

import pytest
from serving_testutil import COST, checked_run, tiny_spec

from serving.metrics import summarize, unloaded_ttft
from serving.model import Group, Image, Modality, ReqState, Request, Stage
from serving.policies import make_policy
from serving.simulator import InvariantError, SimConfig, Simulator, simulate
from serving.workloads import generate

POLICY_CASES = [("coupled", {}), ("static_pd", {"n_prefill": 3}), ("static_epd", {"split": "mm_first"}),
                ("static_epd", {"split": (2, 1, 1, 3, 1)}), ("elasticmm", {}), ("elasticmm_no_cache", {}),
                ("elasticmm_no_nonblocking", {}), ("elasticmm_emp_only", {})]


@pytest.mark.parametrize("name,kw", POLICY_CASES)
def test_invariants_hold_at_every_event_and_all_requests_finish(name, kw):
    spec = tiny_spec(arrival="mmpp", rate=14.0, duration=10.0, burst_gap_mean=3.0, burst_len=(2.0, 4.0),
                     dup_rate=0.3)
    res, reqs = checked_run(make_policy(name, **kw), spec)
    assert len(reqs) > 50
    assert all(r.state == ReqState.DONE and r.t_done is not None for r in reqs)
    assert all(i.kv_used == 0 and not i.running for i in res.instances)
    # tokens: every request produced exactly its output length
    assert all(r.produced == r.output_len for r in reqs)


def test_determinism_same_trace_and_metrics():
    spec = tiny_spec(arrival="mmpp", rate=15.0, burst_gap_mean=3.0, burst_len=(2.0, 4.0), dup_rate=0.3)
    a, _ = checked_run(make_policy("elasticmm"), spec, check_invariants=False)
    b, _ = checked_run(make_policy("elasticmm"), spec, check_invariants=False)
    assert a.trace_hash == b.trace_hash and a.n_events == b.n_events
    sa, sb = summarize(a, COST), summarize(b, COST)
    for k in sa:
        if k not in ("sim_wall_s",) and not k.startswith("decision_ms"):
            assert sa[k] == sb[k] or (isinstance(sa[k], float) and math.isnan(sa[k]) and math.isnan(sb[k])), k
    c, _ = checked_run(make_policy("elasticmm"), tiny_spec(seed=99), check_invariants=False)
    assert c.trace_hash != a.trace_hash


def _one(mm: bool):
    imgs = (Image(hash=5, pixels=800 * 600, v_tokens=COST.vision_tokens(800, 600)),) if mm else ()
    return Request(rid=0, modality=Modality.MM if mm else Modality.TEXT, t_arrival=1.0, text_tokens=60,
                   output_len=40, images=imgs, sys_len=20)


@pytest.mark.parametrize("mm", [False, True])
def test_single_request_latency_equals_cost_model(mm):
    """Alone on an idle coupled node, TTFT is exactly preprocess + encode + prefill and TPOT one decode step."""
    r = _one(mm)
    simulate(make_policy("coupled"), [r], COST, config=SimConfig(check_invariants=True))
    assert r.t_first - r.t_arrival == pytest.approx(unloaded_ttft(r, COST), rel=1e-9)
    steps = [COST.decode_step_time(1, r.input_len + k) for k in range(r.output_len - 1)]
    assert r.t_done - r.t_first == pytest.approx(sum(steps), rel=1e-9)


def test_decode_in_dispatches_of_several_steps_rides_to_the_end_of_the_last():
    """Decode in dispatches of 4 steps (the engine's decode_steps): 39 tokens after the first take 10 dispatches, 40
    steps, and the request finishes when the last dispatch ends; its tokens and pages are accounted exactly."""
    r = _one(False)
    res = simulate(make_policy("coupled"), [r], COST, config=SimConfig(check_invariants=True, decode_steps=4))
    assert r.output_len - 1 == 39 and r.produced == r.output_len
    steps = [COST.decode_step_time(1, r.input_len + k) for k in range(40)]
    assert r.t_done - r.t_first == pytest.approx(sum(steps), rel=1e-9)
    assert all(i.kv_used == 0 and not i.running and i.sum_ctx == 0 for i in res.instances)


def test_taking_in_a_request_s_kv_holds_up_the_decode_instance():
    """With a profiled `kv_import` (the engine's scatter on the destination), a static_pd request's decode starts
    that much later: its first dispatch on the decode instance includes writing its pages."""
    import copy

    from serving.costmodel import CostModel

    done = []
    for imp in (None, {"alpha_ms": 3.0, "bandwidth_GBps": 0.2}):
        prof = copy.deepcopy(COST.profile)
        if imp is not None:
            prof["kv_import"] = imp
        r = _one(False)
        cost = CostModel(prof)
        simulate(make_policy("static_pd", n_prefill=1), [r], cost, 2, SimConfig(check_invariants=True))
        done.append((r.t_done, cost.kv_import_time(r.input_len)))
    (plain, none), (held, took) = done
    assert none == 0.0 and took > 3e-3
    assert held - plain == pytest.approx(took, rel=1e-9)


def test_dispatches_of_several_steps_keep_every_invariant_under_load():
    spec = tiny_spec(arrival="mmpp", rate=14.0, duration=10.0, burst_gap_mean=3.0, burst_len=(2.0, 4.0))
    for name, kw in (("coupled", {}), ("static_pd", {"n_prefill": 3}), ("elasticmm", {})):
        res, reqs = checked_run(make_policy(name, **kw), spec, decode_steps=4)
        assert all(r.state == ReqState.DONE and r.produced == r.output_len for r in reqs)
        assert all(i.kv_used == 0 and not i.running for i in res.instances)
    with pytest.raises(ValueError, match="decode_steps must be an integer >= 1, got 0"):
        SimConfig(decode_steps=0)


def test_disaggregated_path_adds_transfers_and_nonblocking_overlaps():
    r = _one(True)
    simulate(make_policy("static_epd", split="equal"), [r], COST, config=SimConfig(check_invariants=True))
    c = COST
    v = r.v_tokens
    expect = (c.preprocess_time(r.images[0].pixels) + c.encode_time(v, v * v) + c.transfer_time(v * c.bytes_ve)
              + c.prefill_time(r.input_len, r.input_len ** 2))
    assert r.t_first - r.t_arrival == pytest.approx(expect, rel=1e-9)
    assert r.t_enc_start < r.t_enc_end <= r.t_pre_start < r.t_pre_end == r.t_first < r.t_done


def _cost_with_cross_host_link(bandwidth_gbps: float):
    import copy

    from serving.costmodel import CostModel

    profile = copy.deepcopy(COST.profile)
    profile["cross_host_link"] = {"alpha_ms": 0.05, "bandwidth_GBps": bandwidth_gbps}
    return CostModel(profile)


def test_a_hand_off_to_another_host_takes_the_cross_host_link():
    """Static PD on 2 instances (prefill on 0, decode on 1): on one host, or on two; the request ends later by
    exactly the cross-host link's extra time for its KV."""
    cost = _cost_with_cross_host_link(2.0)
    done = {}
    for per_host in (0, 1):
        r = _one(False)
        res = simulate(make_policy("static_pd", n_prefill=1), [r], cost, 2,
                       SimConfig(check_invariants=True, instances_per_host=per_host))
        done[per_host] = r.t_done
        assert res.handoff_bytes == r.input_len * cost.bytes_kv
        assert res.cross_host_bytes == (res.handoff_bytes if per_host else 0.0)
    extra = cost.kv_transfer_time(r.input_len, cross_host=True) - cost.kv_transfer_time(r.input_len)
    assert extra > 0 and done[1] - done[0] == pytest.approx(extra, rel=1e-9)


@pytest.mark.parametrize("name,kw", [("elasticmm", {}), ("static_pd", {"n_prefill": 3})])
def test_instances_on_hosts_keep_every_invariant(name, kw):
    cost = _cost_with_cross_host_link(0.5)  # slow enough that hand-offs are still in flight at later events
    spec = tiny_spec(arrival="mmpp", rate=14.0, duration=10.0, burst_gap_mean=3.0, burst_len=(2.0, 4.0))
    reqs = generate(spec, cost)
    res = simulate(make_policy(name, **kw), reqs, cost, 8, SimConfig(check_invariants=True, instances_per_host=2))
    assert all(r.state == ReqState.DONE and r.produced == r.output_len for r in reqs)
    assert all(i.kv_used == 0 and i.incoming == 0 for i in res.instances)
    assert 0 < res.cross_host_bytes <= res.handoff_bytes + res.migrated_bytes
    # every instance on one host: the run of a single-host simulation, event for event
    one = simulate(make_policy(name, **kw), generate(spec, cost), cost, 8, SimConfig(instances_per_host=8))
    ref = simulate(make_policy(name, **kw), generate(spec, cost), cost, 8, SimConfig())
    assert one.trace_hash == ref.trace_hash and one.cross_host_bytes == 0.0


def test_cache_hit_skips_encode_and_prefill_of_the_prefix():
    a, b = _one(True), _one(True)
    b.rid, b.t_arrival = 1, 5.0
    res = simulate(make_policy("elasticmm"), [a, b], COST, config=SimConfig(check_invariants=True))
    assert b.enc_hits == 1 and b.t_enc_start is None  # no encode stage at all
    assert b.cached_tokens >= r_prefix(b) - COST.block_size
    assert b.t_first - b.t_arrival < 0.5 * (a.t_first - a.t_arrival)
    assert res.emb_hits == 1 and res.emb_misses == 1


def r_prefix(r):
    return (r.sys_len + r.v_tokens) // COST.block_size * COST.block_size


def test_invariant_checker_catches_corruption():
    reqs = [_one(False)]
    sim = Simulator(make_policy("static_pd", n_prefill=4), reqs, COST, config=SimConfig())
    sim.n_arrived = 1  # a request that arrived but is nowhere
    with pytest.raises(InvariantError, match="live"):
        sim.check_invariants()
    sim.n_arrived = 0
    sim.insts[0].kv_used = 3  # blocks without an owner
    with pytest.raises(InvariantError, match="kv_used"):
        sim.check_invariants()


def test_impossible_instance_counts():
    reqs = [_one(False)]
    with pytest.raises(ValueError, match="num_instances = 0"):
        Simulator(make_policy("coupled"), reqs, COST, num_instances=0)
    with pytest.raises(ValueError, match="n_prefill = 8"):
        Simulator(make_policy("static_pd", n_prefill=8), reqs, COST)
    with pytest.raises(ValueError, match="at least 5"):
        Simulator(make_policy("static_epd", split="equal"), reqs, COST, num_instances=4)
    with pytest.raises(ValueError, match="impossible instance count 4"):
        Simulator(make_policy("elasticmm"), reqs, COST, num_instances=4)
    with pytest.raises(ValueError, match="uses 9 instances"):
        Simulator(make_policy("static_epd", split=(2, 2, 2, 2, 1)), reqs, COST)


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="'vllm'"):
        make_policy("vllm")


def test_switch_guards():
    sim = Simulator(make_policy("static_epd", split="mm_first"), [_one(False)], COST)
    text_p = sim.role_insts(Group.TEXT, Stage.PREFILL)[0]
    with pytest.raises(ValueError, match="last TEXT/PREFILL"):
        sim.switch(text_p, Group.MM, Stage.PREFILL)
    mm_e = sim.role_insts(Group.MM, Stage.ENCODE)[0]
    with pytest.raises(ValueError, match="not valid"):
        sim.switch(mm_e, Group.TEXT, Stage.ENCODE)
