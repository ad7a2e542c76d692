import copy

import pytest
from serving_testutil import COST, checked_run, tiny_spec

from serving.costmodel import CostModel, load_profile
from serving.elasticmm import ElasticConfig, ElasticMM
from serving.model import Group, Image, Modality, Request, Stage
from serving.policies import make_policy
from serving.simulator import InvariantError, SimConfig, Simulator
from serving.workloads import generate


class ForcedSwitches(ElasticMM):
    """elasticmm whose only decisions are scripted switches (to drive migrations deterministically)."""

    def __init__(self, script):
        super().__init__(ElasticConfig(cooldown=0.0))
        self.script = list(script)

    def on_tick(self, sim, now):
        while self.script and self.script[0][0] <= now:
            _, role, dest = self.script.pop(0)
            inst = max(sim.role_insts(*role), key=lambda i: (len(i.running), i.iid))
            sim.switch(inst, *dest)


def test_kv_migration_under_invariant_checks():
    pol = ForcedSwitches([(3.0, (Group.MM, Stage.DECODE), (Group.MM, Stage.PREFILL)),
                          (5.0, (Group.MM, Stage.PREFILL), (Group.MM, Stage.DECODE)),
                          (7.0, (Group.MM, Stage.DECODE), (Group.TEXT, Stage.DECODE)),
                          (9.0, (Group.TEXT, Stage.DECODE), (Group.MM, Stage.DECODE))])
    res, reqs = checked_run(pol, tiny_spec(rate=12.0, duration=14.0))
    assert res.migrations > 0 and res.migrated_bytes > 0
    assert any(r.migrations > 0 for r in reqs)
    assert all(r.t_done is not None and r.produced == r.output_len for r in reqs)


def _zero_migration_cost():
    prof = copy.deepcopy(load_profile())
    prof["link"]["alpha_ms"] = 0.0
    prof["link"]["bandwidth_GBps"] = 1e18
    prof["switch"]["t_switch_ms"] = 0.0
    return CostModel(prof)


def _backlogged_state(w, cost):
    """MM prefill has a queue and every prefill instance is busy; only MM decode instances may move
    (everything else is inside its cooldown), and decode holds a small running batch."""
    pol = ElasticMM(ElasticConfig(w=w, cooldown=1.0, proactive=False))
    reqs = []
    for i in range(12):
        im = Image(hash=100 + i, pixels=10**6, v_tokens=1024)
        reqs.append(Request(rid=i, modality=Modality.MM, t_arrival=0.0, text_tokens=60, output_len=200,
                            images=(im,), sys_len=20))
    sim = Simulator(pol, [], cost, config=SimConfig())
    pol.start(sim)
    now = 10.0
    sim.now = now
    for inst in sim.insts:
        if inst.group == Group.MM and inst.stage == Stage.DECODE:
            inst.last_switch = -100.0
        else:
            inst.last_switch = now
        if inst.stage == Stage.PREFILL:
            inst.busy, inst.busy_until = True, now + 0.5
    for r in reqs[:8]:
        r.group = Group.MM
        r.todo_imgs = ()
        sim.q[(Group.MM, Stage.PREFILL)].append(r)
    decs = sim.role_insts(Group.MM, Stage.DECODE)
    for k, r in enumerate(reqs[8:]):
        r.produced = 1
        sim._join_decode(decs[k % len(decs)], r)
    return pol, sim, now


def test_zero_cost_preemption_always_happens_and_infinite_penalty_never():
    cost = _zero_migration_cost()
    pol, sim, now = _backlogged_state(0.0, cost)
    pol._memo = {}
    pol._grow_stage(sim, Group.MM, Stage.PREFILL, now)
    assert pol.stats["eq2_preempt_decode"] == 1
    assert sim.switch_log[-1][2] == (Group.MM, Stage.DECODE)
    pol, sim, now = _backlogged_state(1e18, cost)
    pol._memo = {}
    pol._grow_stage(sim, Group.MM, Stage.PREFILL, now)
    assert pol.stats["eq2_preempt_decode"] == 0 and not sim.switch_log


def test_infinite_penalty_never_preempts_in_a_run():
    spec = tiny_spec(arrival="mmpp", rate=20.0, duration=15.0, burst_gap_mean=3.0, burst_len=(2.0, 5.0))
    pol = make_policy("elasticmm", w=1e18)
    res, _ = checked_run(pol, spec)
    assert pol.stats["eq2_preempt_decode"] == 0
    # every switch into decode is an auto-scaling decision (decode never preempts while dispatching)
    into_decode = sum(1 for _, _, old, new in res.switch_log if new[1] == Stage.DECODE)
    assert into_decode == pol.stats["eq3_scale_decode"]


def test_cooldown_is_enforced():
    pol = make_policy("elasticmm", cooldown=5.0)
    spec = tiny_spec(arrival="mmpp", rate=18.0, duration=15.0, burst_gap_mean=3.0, burst_len=(2.0, 5.0))
    res, _ = checked_run(pol, spec)
    assert res.switches > 0
    last = {}
    for t, iid, _, _ in res.switch_log:
        assert t - last.get(iid, -1e9) >= 5.0 - 1e-9
        last[iid] = t
    sim = Simulator(make_policy("elasticmm", cooldown=5.0), [], COST)
    inst = sim.role_insts(Group.MM, Stage.PREFILL)[0]
    sim.switch(inst, Group.MM, Stage.ENCODE)
    sim._on_switch_done(inst)
    sim.now = 1.0
    with pytest.raises(InvariantError, match="cooldown"):
        sim.switch(inst, Group.MM, Stage.PREFILL)


def test_elastic_moves_capacity_towards_a_multimodal_burst():
    """Under an MM burst the elastic policy grows MM encode/prefill (intra- or cross-group)."""
    spec = tiny_spec(arrival="mmpp", rate=25.0, duration=20.0, burst_gap_mean=4.0, burst_len=(4.0, 8.0),
                     burst_factor=5.0)
    pol = make_policy("elasticmm")
    res, _ = checked_run(pol, spec, check_invariants=False)
    grew = [new for _, _, old, new in res.switch_log if new[0] == Group.MM and new[1] != Stage.DECODE]
    assert grew, res.switch_log


def test_bad_elastic_config():
    with pytest.raises(ValueError, match="w = -1"):
        make_policy("elasticmm", w=-1)
    with pytest.raises(ValueError, match="tick"):
        make_policy("elasticmm", tick=0)
    with pytest.raises(ValueError, match="n_prefill"):
        make_policy("static_pd")
    with pytest.raises(ValueError, match="preset 'half'"):
        Simulator(make_policy("static_epd", split="half"), generate(tiny_spec(), COST), COST)


def test_migration_waits_when_every_peer_is_at_its_batch_cap():
    prof = copy.deepcopy(load_profile())
    prof["decode"]["max_batch"] = 3
    cost = CostModel(prof)
    pol = ForcedSwitches([(2.0, (Group.MM, Stage.DECODE), (Group.MM, Stage.PREFILL)),
                          (4.0, (Group.MM, Stage.PREFILL), (Group.MM, Stage.DECODE))])
    reqs = generate(tiny_spec(rate=10.0, duration=8.0), cost)
    from serving.simulator import simulate
    res = simulate(pol, reqs, cost, config=SimConfig(check_invariants=True))
    assert all(r.t_done is not None and r.produced == r.output_len for r in reqs)
    assert res.switches == 2


def test_decode_runs_one_iteration_at_a_time():
    """Regression: a decode step ending with a queued request used to start two steps (parallel step chains),
    so decode ran several iterations per step time (TPOT 2.9 ms < the 9.8 ms weight read). Under a load that
    queues decode, every finished request's TPOT must be at least the single-sequence step time."""
    spec = tiny_spec(dataset="visualwebinstruct", rate=80.0, duration=15.0)
    res, _ = checked_run(make_policy("static_epd", split=(3, 1, 1, 2, 1)), spec)  # checks the completion events
    done = [r for r in res.requests if r.t_done is not None and r.output_len > 1]
    assert len(done) > 100
    for r in done:
        tpot = (r.t_done - r.t_first) / (r.output_len - 1)
        assert tpot >= COST.decode_step_time(1, r.input_len) - 1e-12, (r.rid, tpot)


def test_cross_group_move_fires_before_the_stage_is_80_percent_busy():
    """TEXT starts at 1P (official MM-heavy layout); on a text-heavy load its prefill queue misses the TTFT SLO
    at ~40-60% utilisation, so the reactive gain-cost comparison must move an MM instance over within seconds,
    not wait for the old 80%-busy gate (which took ~11 s at this load)."""
    spec = tiny_spec(dataset="visualwebinstruct", rate=32.5, duration=6.0)
    res, _ = checked_run(make_policy("elasticmm"), spec)
    to_text = [t for t, _, old, new in res.switch_log if old[0] == Group.MM and new == (Group.TEXT, Stage.PREFILL)]
    assert to_text and to_text[0] < 5.0, res.switch_log
    gated, _ = checked_run(make_policy("elasticmm", cross_group_util=0.8), spec, check_invariants=False)
    assert not any(old[0] == Group.MM and new[0] == Group.TEXT for _, _, old, new in gated.switch_log)
