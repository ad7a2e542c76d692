"""Fit the simulator's cost model to the engine, then check the simulator's predictions against the engine.

    python scripts/calibrate_profile.py                      # the shipped demo model on 2 CPU devices
    python scripts/calibrate_profile.py --rate 6 --duration 40 --name demo_cpu2

1. record: a calibration workload (Poisson text, `cpu_text`, seed + 1000) is served by a coupled and by a
   static_pd engine (instance 0 prefills, instance 1 decodes, so every request migrates); every step's timing
   is recorded;
2. fit: prefill (a + b*new + c*sq), decode (a + b*ctx + c*batch) and the KV link (alpha + bytes/bandwidth) by
   non-negative least squares, one profile per layout (on a shared host the instances' contention differs);
   written as cost profiles (`serving/profiles/<name>_<policy>.json`, loadable by name);
3. check: another workload of the same spec (seed), replayed open loop on both engines and simulated on the
   fitted profile; TTFT and TPOT P50 / P90 side by side (target: within 25%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The engine's threads hand the GIL to each other at every step; Python's default 5 ms switch interval would add
# up to that much to each hand-off (serving-jax serve sets the same interval).
sys.setswitchinterval(0.0005)

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "kvzip_jax", "assets", "demo_model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--rate", type=float, default=6.0, help="requests per second of the check workload")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals in the check workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="demo_cpu2", help="profiles are written as <name>_<policy>.json")
    p.add_argument("--out-dir", default=None, help="where the profiles go (default: serving/profiles, where "
                   "`simulate.py --profile NAME` finds them)")
    p.add_argument("--results", default="docs/serving_calibration.json")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        print("calibrate_profile: --rate and --duration must be > 0", file=sys.stderr)
        return 2

    from kvzip_jax.lm import LanguageModel
    from serving.calibrate import compare, fit_profile, write_profile
    from serving.costmodel import PROFILE_DIR, CostModel, default_cost_model
    from serving.engine import Engine, EngineConfig
    from serving.replay import replay
    from serving.workloads import WorkloadSpec, generate

    lm = LanguageModel.from_pretrained(args.model)
    # prefill_chunk 512 > the longest prompt: one prefill step per prompt, as the simulator models prefill
    shape = dict(num_instances=2, page_size=16, pages_per_instance=16384, decode_rows=8, decode_steps=4,
                 prefill_rows=4, prefill_chunk=512, max_model_len=640, warmup=True)
    policies = (("coupled", ()), ("static_pd", (("n_prefill", 1),)))
    spec = WorkloadSpec(arrival="poisson", rate=args.rate, duration=args.duration, dataset="cpu_text",
                        seed=args.seed)
    calibration = WorkloadSpec(**{**spec.__dict__, "seed": args.seed + 1000})
    args.out_dir = args.out_dir or str(PROFILE_DIR)
    engines = [Engine(lm.config, lm.params, lm.tokenizer, EngineConfig(policy=p, policy_options=o, **shape),
                      model_name="demo") for p, o in policies]
    rows, profiles = [], {}
    try:
        for (policy, options), engine in zip(policies, engines, strict=True):
            # one profile per layout: on a shared host the instances' contention differs between layouts
            replay(engine, generate(calibration, default_cost_model()), seed=args.seed + 1000)
            name = f"{args.name}_{policy}"
            prof = fit_profile(engine, list(engine.timings), name=name)
            out = os.path.join(args.out_dir, f"{name}.json")
            write_profile(prof, out)
            profiles[policy] = {k: prof[k] for k in ("prefill", "decode", "link")}
            print(f"{policy}: profile written to {out}")
            cost = CostModel(prof)
            sim, real = compare(prof, engine, generate(spec, cost), generate(spec, cost), policy=policy,
                                policy_options=options, seed=args.seed)
            row = {"policy": policy, "profile": name, "requests": real.requests, "errors": real.errors}
            for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "throughput_rps"):
                row[f"engine_{k}"], row[f"sim_{k}"] = getattr(real, k), getattr(sim, k)
                row[f"ratio_{k}"] = getattr(sim, k) / getattr(real, k) if getattr(real, k) else float("nan")
            rows.append(row)
            print(f"{policy:10s} n={real.requests}  " + "  ".join(
                f"{k} engine {row[f'engine_{k}'] * 1e3:6.1f} ms sim {row[f'sim_{k}'] * 1e3:6.1f} ms "
                f"({row[f'ratio_{k}']:.2f}x)" for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")))
    finally:
        for engine in engines:
            engine.shutdown()
    with open(args.results, "w") as f:
        json.dump({"workload": spec.__dict__ | {"burst_len": list(spec.burst_len)}, "profiles": profiles,
                   "rows": rows}, f, indent=1)
    print(f"results written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
