"""The serving engine under load: throughput, TTFT and TPOT P50 / P90 for coupled, static PD splits and ElasticMM,
each next to the simulator's prediction for the same requests.

    python scripts/bench_serving.py                        # 8 CPU devices, the shipped demo model, ~8 min
    python scripts/bench_serving.py --devices 8 --rate 10 --duration 30 --out docs/serving_bench.csv

Workloads: text only (the engine serves no images yet), `cpu_text` sizes, a steady Poisson load and a bursty one
(Gamma inter-arrivals, CV 3), open loop (serving.replay). The simulator runs each policy on the calibrated CPU
profile of its layout (`demo_cpu2_coupled` for coupled, `demo_cpu2_static_pd` otherwise; see
scripts/calibrate_profile.py) scaled to the instance count. On a GPU host the same script runs one instance per
GPU (no profile is calibrated there yet, so the predictions use the CPU profile and say little).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.setswitchinterval(0.0005)  # as serving-jax serve (see scripts/calibrate_profile.py)

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "kvzip_jax", "assets", "demo_model")
FIELDS = ("workload", "policy", "source", "requests", "errors", "throughput_rps", "output_tps", "ttft_p50",
          "ttft_p90", "tpot_p50", "tpot_p90")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/serving_bench.csv")
    args = p.parse_args(argv)
    if args.devices < 5 or args.rate <= 0 or args.duration <= 0:
        print("bench_serving: --devices >= 5 (ElasticMM needs 5 roles), --rate and --duration > 0", file=sys.stderr)
        return 2

    import jax
    from tqdm import tqdm

    from kvzip_jax.lm import LanguageModel
    from serving.costmodel import CostModel, load_profile
    from serving.engine import Engine, EngineConfig
    from serving.policies import make_policy
    from serving.replay import replay, simulated_summary
    from serving.simulator import SimConfig, simulate
    from serving.workloads import WorkloadSpec, generate

    if len(jax.devices()) < args.devices:
        print(f"bench_serving: {args.devices} devices asked, {len(jax.devices())} exist", file=sys.stderr)
        return 2
    lm = LanguageModel.from_pretrained(args.model)
    shape = dict(num_instances=args.devices, page_size=16, pages_per_instance=16384, decode_rows=8, decode_steps=4,
                 prefill_rows=4, prefill_chunk=512, max_model_len=640, warmup=True)
    n = args.devices
    policies = [("coupled", (), "demo_cpu2_coupled"),
                (f"static_pd[{n // 4}P]", (("n_prefill", n // 4),), "demo_cpu2_static_pd"),
                (f"static_pd[{n // 2}P]", (("n_prefill", n // 2),), "demo_cpu2_static_pd"),
                ("elasticmm_no_cache", (), "demo_cpu2_static_pd")]
    workloads = {"steady": WorkloadSpec(arrival="poisson", rate=args.rate, duration=args.duration,
                                        dataset="cpu_text", seed=args.seed),
                 "bursty": WorkloadSpec(arrival="gamma", cv=3.0, rate=args.rate, duration=args.duration,
                                        dataset="cpu_text", seed=args.seed)}
    rows = []
    jobs = [(w, pol) for w in workloads for pol in policies]
    for wname, (label, options, profile_name) in tqdm(jobs, desc="bench_serving"):
        spec = workloads[wname]
        prof = copy.deepcopy(load_profile(profile_name))
        prof["num_instances"] = n
        cost = CostModel(prof)
        policy = label.split("[")[0]
        sim = simulate(make_policy(policy, **dict(options)), generate(spec, cost), cost, n,
                       SimConfig(check_invariants=False))
        config = EngineConfig(policy=policy, policy_options=options, **shape)
        with Engine(lm.config, lm.params, lm.tokenizer, config, model_name="demo") as engine:
            real = replay(engine, generate(spec, cost), seed=args.seed)
            switches = engine.switch_count
        for source, summary in (("engine", real), ("simulator", simulated_summary(sim.requests))):
            row = {"workload": wname, "policy": label, "source": source, **summary.as_dict()}
            rows.append({k: row[k] for k in FIELDS})
        tqdm.write(f"{wname:7s} {label:22s} engine: {real.throughput_rps:5.2f} req/s, TTFT P50/P90 "
                   f"{real.ttft_p50 * 1e3:6.1f}/{real.ttft_p90 * 1e3:6.1f} ms, TPOT P50/P90 "
                   f"{real.tpot_p50 * 1e3:5.1f}/{real.tpot_p90 * 1e3:5.1f} ms, {switches} switches | sim TTFT "
                   f"P50 {rows[-1]['ttft_p50'] * 1e3:6.1f} ms, TPOT P50 {rows[-1]['tpot_p50'] * 1e3:5.1f} ms")
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
