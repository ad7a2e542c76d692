"""The serving engine on a tiny random model: greedy parity with `kvzip_jax.generate` under every fixed layout
(chunked prefill and KV migration included), stop tokens, seeded sampling, cancellation, page accounting,
input validation and warm-up.

Every engine is built once per module with the same shape settings, so the jitted steps compile once per device.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import numpy as np
import pytest
from serving_testutil import random_prompts, tiny_text_model

from kvzip_jax.generate import generate as reference_generate
from serving.engine import Engine, EngineConfig, EngineError, QueueFull, SamplingParams
from serving.engine import executor as executor_mod
from serving.model import Group, Stage

MAX_MODEL_LEN = 128
SHAPE = dict(page_size=8, pages_per_instance=2048, prefill_chunk=32, max_model_len=MAX_MODEL_LEN,
             check_invariants=True, warmup=False)
PROMPT_LENS = (5, 13, 40, 21, 32)  # 40 > prefill_chunk: chunked prefill; 32 = exactly one chunk, four pages
MAX_TOKENS = 12
LONG_TOKENS = 40


@pytest.fixture(scope="module")
def model():
    return tiny_text_model()


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PROMPT_LENS)


@pytest.fixture(scope="module")
def long_reference(model, prompts):
    """40 tokens per prompt: long enough to switch roles or fail an instance in the middle of decoding."""
    cfg, params = model
    return reference_generate(params, cfg, prompts, max_new_tokens=LONG_TOKENS).tokens


@pytest.fixture(scope="module")
def reference(long_reference):
    return [t[:MAX_TOKENS] for t in long_reference]  # no stop token (eos_token_id=None): a prefix is exact


ENGINES = {
    "coupled": dict(policy="coupled", num_instances=2),
    "static_pd": dict(policy="static_pd", policy_options=(("n_prefill", 1),), num_instances=2),
    "static_epd": dict(policy="static_epd", policy_options=(("split", (1, 1, 1, 1, 1)),), num_instances=5),
    # tensor parallel: two instances of two devices each, weights sharded over each pair; KV moves between pairs
    "static_pd_tp2": dict(policy="static_pd", policy_options=(("n_prefill", 1),), num_instances=2,
                          devices_per_instance=2),
}


@pytest.fixture(scope="module")
def engines(model):
    cfg, params = model
    built: dict[str, Engine] = {}

    def get(name: str) -> Engine:
        if name not in built:
            built[name] = Engine(cfg, params, engine_config=EngineConfig(**ENGINES[name], **SHAPE))
        return built[name]

    yield get
    for e in built.values():
        e.shutdown()


def assert_idle(engine: Engine) -> None:
    """Nothing live, no page leaked or promised anywhere."""
    with engine.lock:
        assert engine.requests == {}
        for inst in engine.insts:
            if inst.state.name == "FAILED":  # its pool was abandoned with its device
                continue
            leak = inst.pool.used - inst.cached_pages  # the prefix cache keeps prompt blocks for later requests
            assert leak == 0, f"instance {inst.iid} leaks {leak} pages"
            assert (inst.reserved, inst.arriving) == (0, 0)
            assert not inst.running and not inst.prefilling and not inst.incoming and not inst.outgoing
        engine.check_invariants()


def run_one(engine: Engine, prompt, sampling: SamplingParams, on_output=None, timeout=120.0):
    """Submit one request; returns (token ids, the final RequestOutput)."""
    done = threading.Event()
    tokens: list[int] = []
    final = []

    def sink(out):
        tokens.extend(out.token_ids)
        if on_output is not None:
            on_output(out)
        if out.finish_reason is not None:
            final.append(out)
            done.set()

    engine.submit(prompt, sampling, sink)
    assert done.wait(timeout), "the request did not finish"
    return tokens, final[0]


# ---- greedy parity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ENGINES))
def test_greedy_matches_reference_generate(engines, name, prompts, reference):
    engine = engines(name)
    before = engine.stats.migrations
    out = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert out == reference
    assert all(len(t) == MAX_TOKENS for t in out)
    if name == "coupled":
        assert engine.stats.migrations == before == 0
    else:
        assert engine.stats.migrations - before == len(prompts)
    if name == "static_pd_tp2":
        ex = engine.insts[1].executor
        assert len({d for i in engine.insts for d in i.executor.devices}) == 4
        q = ex.params["layers"]["attn"]["q_proj"]["kernel"][...]
        assert q.sharding.shard_shape(q.shape)[-1] == q.shape[-1] // 2  # the heads are split over the pair
    assert_idle(engine)


def test_a_layout_needing_more_devices_than_exist_is_refused(model):
    cfg, params = model
    config = EngineConfig(policy="coupled", num_instances=5, devices_per_instance=2, **SHAPE)
    with pytest.raises(ValueError, match=r"num_instances = 5 x devices_per_instance = 2 needs 10 devices; 8 exist"):
        Engine(cfg, params, engine_config=config)


# ---- stop tokens and lengths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["coupled", "static_pd"])
def test_stop_token_and_length(engines, name, prompts, reference):
    engine = engines(name)
    ref = reference[2]
    # a token whose first occurrence is in the middle of the output
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])
    tokens, final = run_one(engine, prompts[2], SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=(ref[k],)))
    assert tokens == ref[:k + 1]  # the stop token is included, nothing after it
    assert final.finish_reason == "stop"
    assert final.completion_tokens == k + 1 and final.prompt_tokens == len(prompts[2])

    tokens, final = run_one(engine, prompts[2], SamplingParams(max_tokens=5))
    assert tokens == ref[:5]
    assert final.finish_reason == "length" and final.completion_tokens == 5

    tokens, final = run_one(engine, prompts[2], SamplingParams(max_tokens=1))  # the prefill's token alone
    assert tokens == ref[:1] and final.finish_reason == "length"

    # the very first (prefill) token as the stop token
    tokens, final = run_one(engine, prompts[2], SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=(ref[0],)))
    assert tokens == ref[:1] and final.finish_reason == "stop"
    assert_idle(engine)


# ---- seeded sampling -------------------------------------------------------------------------------------------
def test_sampling_seed_is_independent_of_the_batch(engines, prompts):
    coupled, pd = engines("coupled"), engines("static_pd")
    n = 24
    sp = SamplingParams(max_tokens=n, temperature=1.0, seed=1234)
    alone, _ = run_one(coupled, prompts[1], sp)
    assert len(alone) == n
    others = [SamplingParams(max_tokens=n, temperature=1.0, seed=s) for s in (1, 2, 3)]
    ids, batch_out, done = submit_all(coupled, [prompts[0], prompts[2], prompts[3], prompts[1]], [*others, sp])
    mine, ids = ids[-1], ids[:-1]
    assert done.wait(120)
    assert batch_out[mine] == alone
    # the same seed on another layout (prefill on one device, decode on another) draws the same tokens
    via_pd, _ = run_one(pd, prompts[1], sp)
    assert via_pd == alone
    # another seed: other tokens (24 draws from a near-flat 128-way distribution)
    other, _ = run_one(coupled, prompts[1], SamplingParams(max_tokens=n, temperature=1.0, seed=4321))
    assert other != alone
    assert all(len(batch_out[i]) == n for i in ids)
    assert_idle(coupled)
    assert_idle(pd)


# ---- cancellation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["coupled", "static_pd"])
def test_cancel_after_first_output_frees_everything(engines, name, prompts):
    engine = engines(name)
    seen = []

    def on_output(out):
        seen.append(out)
        if len(seen) == 1:
            # from inside the sink (a worker thread holding the engine's re-entrant lock): deterministic timing
            engine.cancel(out.rid)

    prompt = prompts[0]
    tokens, final = run_one(engine, prompt, SamplingParams(max_tokens=MAX_MODEL_LEN - len(prompt)),
                            on_output=on_output)
    assert final.finish_reason == "cancelled"
    assert 1 <= len(tokens) < MAX_MODEL_LEN - len(prompt)
    assert engine.stats.cancelled >= 1
    assert_idle(engine)
    engine.cancel(final.rid)  # a finished id is ignored
    engine.cancel(10**9)  # so is an unknown one


def test_cancel_from_the_client_thread(engines, prompts):
    engine = engines("coupled")
    first = threading.Event()
    prompt = prompts[0]

    def on_output(out):
        first.set()

    done = threading.Event()
    final = []

    def sink(out):
        on_output(out)
        if out.finish_reason is not None:
            final.append(out)
            done.set()

    rid = engine.submit(prompt, SamplingParams(max_tokens=MAX_MODEL_LEN - len(prompt)), sink)
    assert first.wait(60)
    engine.cancel(rid)
    assert done.wait(60)
    # it may have finished on its own before the cancel landed; either way nothing is left behind
    assert final[0].finish_reason in ("cancelled", "length")
    assert_idle(engine)


# ---- bad input -------------------------------------------------------------------------------------------------
def test_bad_requests_raise(engines):
    engine = engines("coupled")
    sink = lambda out: None  # noqa: E731
    sp = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], sp, sink)
    with pytest.raises(ValueError, match="token id 128"):
        engine.submit([1, 128, 2], sp, sink)
    with pytest.raises(ValueError, match="token id -1"):
        engine.submit([-1], sp, sink)
    with pytest.raises(ValueError, match=rf"= {MAX_MODEL_LEN + 1}.*max_model_len \({MAX_MODEL_LEN}\)"):
        engine.submit([1] * 100, SamplingParams(max_tokens=MAX_MODEL_LEN - 99), sink)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.submit([1], SamplingParams(max_tokens=4, stop=("x",)), sink)
    assert_idle(engine)


def test_bad_engine_configs_raise(model):
    cfg, params = model
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"num_instances = {n + 1}"):
        Engine(cfg, params, engine_config=EngineConfig(policy="coupled", num_instances=n + 1, **SHAPE))
    with pytest.raises(ValueError, match="'no_such_policy'"):
        Engine(cfg, params, engine_config=EngineConfig(policy="no_such_policy", num_instances=2, **SHAPE))
    with pytest.raises(ValueError, match="impossible instance count 4"):  # its groups need 5 roles
        Engine(cfg, params, engine_config=EngineConfig(policy="elasticmm", num_instances=4, **SHAPE))
    small = dict(SHAPE, pages_per_instance=40)  # one 128-token request needs 2 * 2 * 16 = 64 pages
    with pytest.raises(ValueError, match=r"needs 64 pages.*has 39"):
        Engine(cfg, params, engine_config=EngineConfig(policy="coupled", num_instances=1, **small))
    with pytest.raises(ValueError, match="max_model_len = 1024"):
        Engine(cfg, params, engine_config=EngineConfig(policy="coupled", **dict(SHAPE, max_model_len=1024)))
    with pytest.raises(ValueError, match=r"page_size.*got 0"):
        EngineConfig(page_size=0)
    with pytest.raises(ValueError, match=r"max_waiting.*-1"):
        EngineConfig(max_waiting=-1)
    with pytest.raises(ValueError, match=r"unknown cost profile 'no_such_profile'.*demo_cpu2_coupled"):
        Engine(cfg, params, engine_config=EngineConfig(cost_profile="no_such_profile", **SHAPE))


def test_the_policy_plans_with_the_cost_profile_it_is_given(model):
    """A profile fitted to this engine (scripts/calibrate_profile.py) instead of the simulator's default."""
    cfg, params = model
    config = EngineConfig(policy="static_pd", policy_options=(("n_prefill", 1),), num_instances=2,
                          cost_profile="demo_cpu2_static_pd", **SHAPE)
    with Engine(cfg, params, engine_config=config) as engine:
        assert engine.cost.profile["name"] == "demo_cpu2_static_pd"
    with Engine(cfg, params, engine_config=dataclasses.replace(config, cost_profile=None)) as engine:
        assert engine.cost.profile["name"] == "qwen2.5-vl-7b-a800x8"


def test_queue_full(model):
    cfg, params = model
    with Engine(cfg, params, engine_config=EngineConfig(policy="coupled", num_instances=1, max_waiting=0,
                                                        **SHAPE)) as engine:
        with pytest.raises(QueueFull, match="limit is 0"):
            engine.submit([1, 2, 3], SamplingParams(max_tokens=2), lambda out: None)
        assert engine.requests == {} and engine.stats.submitted == 0


# ---- warm-up ---------------------------------------------------------------------------------------------------
def test_warmup_compiles_every_step_before_serving(model, prompts, reference):
    cfg, params = model
    # the last device: no other engine of this module runs there, so nothing was compiled for it before
    with Engine(cfg, params, engine_config=EngineConfig(policy="coupled", num_instances=1,
                                                        **dict(SHAPE, warmup=True)),
                devices=jax.devices()[-1:]) as engine:
        assert engine.insts[0].executor.devices == [jax.devices()[-1]]
        sizes = (executor_mod._decode_steps._cache_size(), executor_mod._prefill_step._cache_size())
        out = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
        assert out == reference
        sampled, _ = run_one(engine, prompts[1], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=20,
                                                                top_p=0.9, seed=5))
        assert len(sampled) == MAX_TOKENS
        longest = [3] * (MAX_MODEL_LEN - 8)  # the widest page table and a full prefill chunk
        run_one(engine, longest, SamplingParams(max_tokens=8))
        assert (executor_mod._decode_steps._cache_size(), executor_mod._prefill_step._cache_size()) == sizes
        assert_idle(engine)


# ---- role switches: the policies' act surface ------------------------------------------------------------------
def wait_for(predicate, engine: Engine, timeout: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.lock:
            if predicate():
                return
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def submit_all(engine: Engine, prompts, sampling: SamplingParams | list[SamplingParams]):
    """Submit every prompt (with one sampling for all, or one each); returns (request ids, tokens by id, an event
    set when all finished)."""
    tokens: dict[int, list[int]] = {}
    finished: set[int] = set()
    done = threading.Event()
    lock = threading.Lock()

    def sink(out):
        with lock:
            tokens.setdefault(out.rid, []).extend(out.token_ids)
            if out.finish_reason is not None:
                finished.add(out.rid)
                if len(finished) == len(prompts):
                    done.set()

    each = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    ids = [engine.submit(p, sp, sink) for p, sp in zip(prompts, each, strict=True)]
    return ids, tokens, done


def test_a_switch_in_the_middle_of_decoding_migrates_the_batch(model, prompts, long_reference):
    cfg, params = model
    n_tokens, expected = LONG_TOKENS, long_reference
    config = EngineConfig(policy="static_epd", policy_options=(("split", (1, 2, 1, 1, 1)),), num_instances=6, **SHAPE)
    with Engine(cfg, params, engine_config=config) as engine:
        decoders = [i for i in engine.insts if (i.group, i.stage) == (Group.TEXT, Stage.DECODE)]
        ids, tokens, done = submit_all(engine, prompts, SamplingParams(max_tokens=n_tokens))
        # as soon as a decode instance is a few tokens into its batch, move it to prefill (the switch drains it)
        wait_for(lambda: any(any(3 <= r.produced < 20 for r in i.running.values()) for i in decoders), engine,
                 what="a decode batch in progress")
        with engine.lock:
            victim = max(decoders, key=lambda i: len(i.running))
            moved = len(victim.running) + victim.arriving  # its batch and the requests on their way to it
            engine.switch(victim, Group.TEXT, Stage.PREFILL)
            assert victim.state.name == "DRAINING" and engine.layout_counts()[(Group.TEXT, Stage.DECODE)] == 1
        assert done.wait(120)
        assert [tokens[i] for i in ids] == expected
        assert moved >= 1 and engine.switch_count == 1
        assert (victim.group, victim.stage, victim.state.name) == (Group.TEXT, Stage.PREFILL, "ACTIVE")
        # every request moved once from prefill to decode, and the drained batch once more
        assert engine.stats.migrations == len(prompts) + moved
        assert_idle(engine)


def test_switch_refuses_what_the_simulator_refuses(engines):
    epd = engines("static_epd")
    with epd.lock:
        text_prefill = next(i for i in epd.insts if (i.group, i.stage) == (Group.TEXT, Stage.PREFILL))
        with pytest.raises(ValueError, match="stage ENCODE is not valid in group TEXT"):
            epd.switch(text_prefill, Group.TEXT, Stage.ENCODE)
        with pytest.raises(ValueError, match="last TEXT/PREFILL instance"):
            epd.switch(text_prefill, Group.TEXT, Stage.DECODE)
        assert epd.switch_count == 0 and text_prefill.state.name == "ACTIVE"
    coupled = engines("coupled")
    with coupled.lock, pytest.raises(ValueError, match="coupled instances keep their role"):
        coupled.switch(coupled.insts[0], Group.ANY, Stage.DECODE)


def test_elasticmm_lends_an_idle_group_and_answers_the_same(model, prompts, reference):
    cfg, params = model
    # no multimodal traffic: after dormant_after the MM group lends its instances to the text group
    options = (("dormant_after", 0.3), ("cooldown", 0.2))
    config = EngineConfig(policy="elasticmm", policy_options=options, num_instances=5, **SHAPE)
    with Engine(cfg, params, engine_config=config) as engine:
        assert engine.layout_counts()[(Group.MM, Stage.ENCODE)] == 1
        assert engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS)) == reference
        wait_for(lambda: all(i.group == Group.TEXT and i.state.name == "ACTIVE" for i in engine.insts), engine,
                 timeout=30, what="the MM group's instances to join the text group")
        assert engine.switch_count >= 3 and engine.decision_times
        assert engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS)) == reference
        assert_idle(engine)


# ---- faults: an instance's step fails mid-decode ---------------------------------------------------------------
@pytest.mark.parametrize("policy, options, n", [("coupled", (), 2), ("static_pd", (("n_prefill", 1),), 3)])
def test_a_failed_instance_hands_its_requests_on_and_they_finish_the_same(model, prompts, long_reference, policy,
                                                                          options, n):
    cfg, params = model
    n_tokens, expected = LONG_TOKENS, long_reference
    sampled = SamplingParams(max_tokens=n_tokens, temperature=1.0, seed=99)
    config = EngineConfig(policy=policy, policy_options=options, num_instances=n, **SHAPE)
    with Engine(cfg, params, engine_config=config) as engine:
        calm, _ = run_one(engine, prompts[1], sampled)  # the seeded answer with no fault
        decoders = [i for i in engine.insts if i.stage in (Stage.COUPLED, Stage.DECODE)]
        ids, tokens, done = submit_all(engine, prompts, SamplingParams(max_tokens=n_tokens))
        extra, extra_tokens, extra_done = submit_all(engine, [prompts[1]], sampled)
        wait_for(lambda: any(any(3 <= r.produced < 20 for r in i.running.values()) for i in decoders), engine,
                 what="a decode batch in progress")
        with engine.lock:
            victim = max(decoders, key=lambda i: len(i.running))
            held = len(victim.running)
        engine.inject_fault(victim.iid)
        assert done.wait(120) and extra_done.wait(120)
        assert [tokens[i] for i in ids] == expected  # recomputed, not lost: the same greedy tokens
        assert extra_tokens[extra[0]] == calm  # and the same seeded draws
        assert victim.state.name == "FAILED" and held >= 1
        assert engine.stats.finished == len(prompts) + 2 and engine.stats.errors == 0
        # the engine goes on serving on the instances left
        assert engine.generate(prompts[:2], SamplingParams(max_tokens=MAX_TOKENS)) == [e[:MAX_TOKENS]
                                                                                     for e in expected[:2]]
        assert_idle(engine)


def test_losing_the_last_decode_instance_fails_requests_with_the_reason(model, prompts):
    cfg, params = model
    config = EngineConfig(policy="static_pd", policy_options=(("n_prefill", 1),), num_instances=2, **SHAPE)
    with Engine(cfg, params, engine_config=config) as engine:
        engine.inject_fault(1)  # the only decode instance
        _, final = run_one(engine, prompts[0], SamplingParams(max_tokens=MAX_TOKENS))
        assert final.finish_reason == "error" and "no live ANY/DECODE instance" in final.error
        engine.inject_fault(0)
        _, final = run_one(engine, prompts[0], SamplingParams(max_tokens=2))
        assert final.finish_reason == "error"
        with pytest.raises(EngineError, match="no instance is left in service"):
            engine.submit(prompts[0], SamplingParams(max_tokens=2), lambda out: None)


def test_a_step_whose_inputs_cannot_be_built_fails_its_requests_not_the_instance(engines, prompts, reference,
                                                                                 monkeypatch):
    engine = engines("coupled")
    real = executor_mod.RowSampling.from_params

    def refuse(params, rows):
        if any(p is not None and p.seed == 4242 for p in params):
            raise OverflowError("a value does not fit int32")
        return real(params, rows)

    monkeypatch.setattr(executor_mod.RowSampling, "from_params", staticmethod(refuse))
    _, final = run_one(engine, prompts[0], SamplingParams(max_tokens=4, seed=4242))
    assert final.finish_reason == "error" and "OverflowError" in final.error
    assert all(i.state.name == "ACTIVE" for i in engine.insts)
    monkeypatch.undo()
    assert engine.generate(prompts[:2], SamplingParams(max_tokens=MAX_TOKENS)) == reference[:2]
    assert_idle(engine)


# ---- the token-block prefix cache ------------------------------------------------------------------------------
def test_prompts_that_share_a_prefix_share_its_blocks_and_answer_the_same(model):
    cfg, params = model
    rng = np.random.default_rng(3)
    system = rng.integers(0, 128, 43).tolist()  # 5 full blocks of 8, and 3 tokens of a sixth
    prompts = [system + rng.integers(0, 128, n).tolist() for n in (4, 9, 1)] + [system[:40]]
    expected = reference_generate(params, cfg, prompts, max_new_tokens=MAX_TOKENS).tokens
    # a pool of 6 requests' worth of pages: admitting them all needs the cache to give pages back
    per_request = cfg.num_layers * cfg.num_kv_heads * -(-(53 + MAX_TOKENS) // SHAPE["page_size"])
    shape = {**SHAPE, "pages_per_instance": 6 * per_request + 1}
    config = EngineConfig(policy="static_pd", policy_options=(("n_prefill", 1),), num_instances=2, **shape)
    with Engine(cfg, params, engine_config=config) as engine:
        prefill = engine.insts[0]
        assert engine.generate(prompts[:1], SamplingParams(max_tokens=MAX_TOKENS)) == expected[:1]
        assert prefill.cached_pages == 5 * cfg.num_layers * cfg.num_kv_heads and engine.stats.prefix_hit_tokens == 0
        assert engine.generate(prompts[1:], SamplingParams(max_tokens=MAX_TOKENS)) == expected[1:]
        # 40 tokens each for the next two; the prompt of exactly 40 keeps its last block to prefill (its logits)
        assert engine.stats.prefix_hit_tokens == 40 + 40 + 32
        # unrelated prompts fill the pool: unused blocks are evicted for them, least recently used first
        others = [rng.integers(0, 128, 50).tolist() for _ in range(8)]
        assert engine.generate(others, SamplingParams(max_tokens=MAX_TOKENS), timeout=60) == \
            reference_generate(params, cfg, others, max_new_tokens=MAX_TOKENS).tokens
        assert prefill.prefix.evicted > 0
        assert_idle(engine)
    config = EngineConfig(policy="coupled", num_instances=1, prefix_cache=False, **SHAPE)
    with Engine(cfg, params, engine_config=config) as engine:
        assert engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS)) == expected
        assert engine.insts[0].prefix is None and engine.stats.prefix_hit_tokens == 0
        assert_idle(engine)


def test_a_hand_off_prefers_a_decode_instance_on_the_prefill_instance_s_host(model, prompts, reference):
    """On a Ray fleet each instance has its node; a request's KV goes to a decode instance of its own node first
    (while one has room), as the simulator's host_aware_decode. Here the hosts are assigned by hand."""
    cfg, params = model
    config = EngineConfig(policy="static_pd", policy_options=(("n_prefill", 1),), num_instances=3, **SHAPE)
    with Engine(cfg, params, engine_config=config) as engine:
        for inst, host in zip(engine.insts, ("node-a", "node-b", "node-a"), strict=True):
            inst.executor.host = host
        assert [(i.stage, i.executor.host) for i in engine.insts] == [
            (Stage.PREFILL, "node-a"), (Stage.DECODE, "node-b"), (Stage.DECODE, "node-a")]
        assert engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS)) == reference
        assert engine.stats.migrations == len(prompts)
        assert [i.steps > 0 for i in engine.insts] == [True, False, True]  # node-b's decode instance never ran
        assert_idle(engine)
