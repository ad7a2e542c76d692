"""The serving engine over a real local Ray cluster of two nodes (127.0.0.1, started and stopped here): each node
hosts instance actors with their own CPU devices, the engine stays in this process.

- Prefill on one node, decode on the other: every request's KV crosses nodes through Ray's object store; greedy
  answers equal the in-process engine's and `kvzip_jax.generate`'s.
- An instance's actor killed in the middle of decoding: its requests restart on the other node and complete with
  the same answers; nothing is lost.
- Clusters that cannot host the instances (no GPU / TPU, too few CPUs) and addresses that cannot be reached: clear
  errors in bounded time.

Starting a cluster and its JAX actors takes ~30 s on 2 cores, so the cluster tests are marked `slow`
(`make test-cluster`); the address checks run in the default suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from serving_testutil import (
    free_port,
    png_data_uri,
    random_prompts,
    stop_server,
    tiny_text_model,
    wait_until_healthy,
    wav_base64,
)

from kvzip_jax.generate import generate as reference_generate
from serving.engine import Engine, EngineConfig, SamplingParams
from serving.engine.ray_fleet import FleetError, RayFleet

# Ray would put the nodes and the driver on the host's network address; this keeps them all on 127.0.0.1 (Ray's
# single-machine mode, the default on macOS and Windows). Set before Ray is imported: Ray reads it at import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

SHAPE = dict(page_size=8, pages_per_instance=1024, prefill_chunk=32, max_model_len=128, check_invariants=True,
             warmup=False)
PROMPT_LENS = (5, 13, 40, 21)
MAX_TOKENS = 24
CPUS_PER_NODE = 2


@pytest.fixture(scope="module")
def model():
    return tiny_text_model()


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PROMPT_LENS)


@pytest.fixture(scope="module")
def reference(model, prompts):
    cfg, params = model
    return reference_generate(params, cfg, prompts, max_new_tokens=MAX_TOKENS).tokens


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on 127.0.0.1 with CPUS_PER_NODE CPUs each; this process is the driver."""
    import ray
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=CPUS_PER_NODE, node_ip_address="127.0.0.1", object_store_memory=80 * 2**20)
    c = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    try:
        c.add_node(**node)
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def node_of(location: str) -> str:
    return location.split()[1]


def ray_engine(model, cluster, **engine_config) -> Engine:
    cfg, params = model
    fleet = RayFleet(cluster.address, resource="CPU", timeout_s=240)
    return Engine(cfg, params, engine_config=EngineConfig(**engine_config, **SHAPE), fleet=fleet)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_prefill_on_one_node_decode_on_the_other_gives_the_single_host_answers(model, cluster, prompts, reference,
                                                                                tp):
    """tp 2: each instance's weights sharded over the two CPU devices of its node's actor."""
    cfg, params = model
    greedy = SamplingParams(max_tokens=MAX_TOKENS)
    layout = dict(policy="static_pd", policy_options=(("n_prefill", 1),), num_instances=2, devices_per_instance=tp)
    with Engine(cfg, params, engine_config=EngineConfig(**layout, **SHAPE)) as local:
        single_host = local.generate(prompts, greedy)
    with ray_engine(model, cluster, **layout) as e:
        where = [i["location"] for i in e.snapshot()["instances"]]
        assert len({node_of(w) for w in where}) == 2, where  # spread: the prefill and the decode node differ
        assert all(w.endswith("cpu:0" if tp == 1 else "cpu:0,1") for w in where), where
        answers = e.generate(prompts, greedy, timeout=240)
        stats = e.snapshot()["stats"]
        used = [i["pages_used"] for i in e.snapshot()["instances"]]
    assert answers == single_host == reference
    assert stats.migrations == len(prompts) and stats.finished == len(prompts) and stats.errors == 0
    assert used == [e.insts[0].cached_pages, 0]  # only the prefill instance's prefix cache keeps pages


@pytest.mark.slow
def test_an_actor_killed_mid_decode_its_requests_finish_on_the_other_node(model, cluster, prompts, reference):
    import ray

    with ray_engine(model, cluster, policy="coupled", num_instances=2) as e:
        victim = e.insts[0]
        killed = []
        outputs: dict[int, list[int]] = {}
        finished = []

        def sink(out):
            # called by the instance's worker (engine lock held) after each step; the first decode tokens of a
            # request on instance 0 kill its actor: the next step there finds it dead
            outputs.setdefault(out.rid, []).extend(out.token_ids)
            if out.finish_reason is not None:
                finished.append(out)
            r = e.requests.get(out.rid)
            if not killed and r is not None and r.owner == victim.iid and len(r.output) > 1:
                ray.kill(victim.executor.actor)
                killed.append(out.rid)

        rids = [e.submit(p, SamplingParams(max_tokens=MAX_TOKENS), sink) for p in prompts]
        deadline = time.monotonic() + 240
        while len(finished) < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.05)
        snap = e.snapshot()
    assert killed, "no request decoded on instance 0"
    assert len(finished) == len(prompts), f"{len(finished)} of {len(prompts)} requests finished"
    assert {o.finish_reason for o in finished} == {"length"}
    # a restarted request re-sends nothing: its tokens so far are prefilled again and it continues after them
    assert [outputs[r] for r in rids] == reference
    assert [i["state"] for i in snap["instances"]] == ["FAILED", "ACTIVE"]
    assert snap["stats"].errors == 0 and snap["stats"].finished == len(prompts)


@pytest.mark.slow
def test_a_cluster_without_the_devices_asked_for_is_refused_by_name(model, cluster):
    cfg, params = model
    with pytest.raises(FleetError, match=rf"at {cluster.address} has no node with 1 GPU or TPU device"):
        Engine(cfg, params, engine_config=EngineConfig(num_instances=1, **SHAPE), fleet=RayFleet(cluster.address))
    capacity = 2 * CPUS_PER_NODE
    with pytest.raises(FleetError, match=rf"room for {capacity} instance\(s\) of 1 CPU device\(s\).*"
                                         rf"\[{CPUS_PER_NODE}, {CPUS_PER_NODE}\] CPU\); {capacity + 1} were asked"):
        Engine(cfg, params, engine_config=EngineConfig(num_instances=capacity + 1, **SHAPE),
               fleet=RayFleet(cluster.address, resource="CPU"))
    with pytest.raises(FleetError, match=r"room for 0 instance\(s\) of 4 CPU device\(s\)"):
        Engine(cfg, params, engine_config=EngineConfig(num_instances=1, devices_per_instance=4, **SHAPE),
               fleet=RayFleet(cluster.address, resource="CPU"))


def test_an_address_that_cannot_be_reached_is_one_line_in_bounded_time():
    """`serving-jax serve --ray` in its own process (this one may be connected to the test cluster)."""
    port = free_port()  # closed again: nothing listens there
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--ray", f"127.0.0.1:{port}",
                           "--ray-timeout", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"serving-jax: error: the Ray cluster at 127.0.0.1:{port} cannot be reached within 1 s " \
                          "(Connection refused)\n"
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("kw, message", [
    (dict(address="127.0.0.1:1", resource="gpu"), r"resource must be 'auto' or one of \['GPU', 'TPU', 'CPU'\], "
                                                  r"got 'gpu'"),
    (dict(address="127.0.0.1:1", timeout_s=0), r"timeout_s must be > 0, got 0"),
])
def test_bad_fleet_settings_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        RayFleet(**kw)


@pytest.mark.slow
def test_a_driver_connected_to_another_cluster_is_told_so(model, cluster):
    cfg, params = model
    with pytest.raises(FleetError, match=rf"connected to the Ray cluster at {cluster.address}, not 127.0.0.1:1$"):
        Engine(cfg, params, engine_config=EngineConfig(**SHAPE), fleet=RayFleet("127.0.0.1:1", resource="CPU"))


@pytest.mark.slow
def test_serve_over_the_cluster_and_ask_the_moka_demo_about_a_picture_and_a_sound(cluster):
    """`serving-jax serve --ray` as users start it: the HTTP front end here, the demo's instances (encoders and MokA
    adapters included) in actors on both nodes, asked through the openai client, streaming."""
    import httpx
    import openai

    from moka_jax.demo import held_out_samples

    sample = held_out_samples(1, start=5)[0]  # one the demo answers right (test_serving_cli.py)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--model", "moka-demo", "--devices", "2",
                               "--policy", "static_pd", "--no-warmup", "--max-model-len", "128", "--port", str(port),
                               "--ray", cluster.address, "--ray-resource", "CPU"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(server, port, timeout=240)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        content = [{"type": "image_url", "image_url": {"url": png_data_uri(sample.image)}},
                   {"type": "input_audio", "input_audio": {"data": wav_base64(sample.audio), "format": "wav"}},
                   {"type": "text", "text": sample.question}]
        stream = client.chat.completions.create(model="moka-avqa-demo", max_tokens=6, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": content}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == sample.answer
        where = [i["location"] for i in httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["placement"]]
    finally:
        stop_server(server, timeout=60)
    assert len({node_of(w) for w in where}) == 2, where
