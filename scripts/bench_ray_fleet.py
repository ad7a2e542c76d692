"""What running the instances in Ray actors costs: the same requests served by the same layout in this process
and on a local two-node Ray cluster (127.0.0.1, started and stopped here), TTFT and TPOT P50 / P90 side by side.

    python scripts/bench_ray_fleet.py                 # the shipped demo model, static_pd 1P + 1D, ~3 min
    python scripts/bench_ray_fleet.py --policy coupled --rate 4 --duration 20

Each step of a Ray instance is one actor call (arguments and results through Ray), and with static_pd every
request's KV crosses the nodes through Ray's object store. On one machine both ways share its cores, so this
measures Ray's overhead per step, not a network.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# Ray keeps its nodes, its GCS and this driver on 127.0.0.1 (its single-machine mode); read when Ray is imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.setswitchinterval(0.0005)  # as serving-jax serve (see scripts/calibrate_profile.py)

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "kvzip_jax", "assets", "demo_model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--policy", choices=("static_pd", "coupled"), default="static_pd")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson, cpu_text sizes)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        print("bench_ray_fleet: --rate and --duration must be > 0", file=sys.stderr)
        return 2

    import ray
    from ray.cluster_utils import Cluster

    from kvzip_jax.lm import LanguageModel
    from serving.costmodel import CostModel, load_profile
    from serving.engine import Engine, EngineConfig
    from serving.engine.ray_fleet import RayFleet
    from serving.replay import replay
    from serving.workloads import WorkloadSpec, generate

    lm = LanguageModel.from_pretrained(args.model)
    options = (("n_prefill", 1),) if args.policy == "static_pd" else ()
    # bench_serving.py's instance shape (compiled at start-up, so no step compiles while timed)
    config = EngineConfig(policy=args.policy, policy_options=options, num_instances=2, page_size=16,
                          pages_per_instance=16384, decode_rows=8, decode_steps=4, prefill_rows=4, prefill_chunk=512,
                          max_model_len=640, warmup=True)
    spec = WorkloadSpec(arrival="poisson", rate=args.rate, duration=args.duration, dataset="cpu_text",
                        seed=args.seed)
    cost = CostModel(load_profile("demo_cpu2_coupled"))
    warm_up = generate(dataclasses.replace(spec, seed=args.seed + 1000), cost)[:8]  # first calls, untimed
    print(f"date: {datetime.date.today()}  ray {ray.__version__}  policy {args.policy}  "
          f"{len(generate(spec, cost))} requests", flush=True)
    rows = {}
    with Engine(lm.config, lm.params, lm.tokenizer, config) as engine:
        replay(engine, warm_up)
        rows["in-process"] = replay(engine, generate(spec, cost), seed=args.seed)
    node = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=200 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        fleet = RayFleet(cluster.address, resource="CPU")
        with Engine(lm.config, lm.params, lm.tokenizer, config, fleet=fleet) as engine:
            nodes = {i.executor.host for i in engine.insts}
            replay(engine, warm_up)
            rows["Ray, 2 nodes"] = replay(engine, generate(spec, cost), seed=args.seed)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(nodes) == 2, "the two instances did not land on two nodes"
    base = rows["in-process"]
    print(f"{'':14s} {'TTFT P50':>9s} {'TTFT P90':>9s} {'TPOT P50':>9s} {'TPOT P90':>9s} (ms)  errors")
    for name, s in rows.items():
        print(f"{name:14s} {s.ttft_p50 * 1e3:9.1f} {s.ttft_p90 * 1e3:9.1f} {s.tpot_p50 * 1e3:9.2f} "
              f"{s.tpot_p90 * 1e3:9.2f}       {s.errors}")
    ray_row = rows["Ray, 2 nodes"]
    print(f"ratio Ray / in-process: TTFT P50 {ray_row.ttft_p50 / base.ttft_p50:.2f}x, TPOT P50 "
          f"{ray_row.tpot_p50 / base.tpot_p50:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
