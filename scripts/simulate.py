#!/usr/bin/env python
"""ElasticMM discrete-event simulator: one run, or the paper's experiment matrix.

  python scripts/simulate.py --policy elasticmm --arrival mmpp --dataset sharegpt4o --rate 20 --duration 300
  python scripts/simulate.py --matrix --quick          # CSVs + figures in docs/ in a few minutes
  python scripts/simulate.py --matrix                  # the full matrix (tens of minutes on 2 cores)
  python scripts/simulate.py --robustness --jobs 2     # elastic vs the best baseline on a seeded family of loads
  python scripts/simulate.py --scale                   # ElasticMM at 8 to 1024 instances over hosts of 8

The logic lives in serving/ (experiments.py, matrix.py, robustness.py); this file only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.costmodel import CostModel, load_profile
from serving.matrix import FULL, QUICK, environment, measure_overheads, run_matrix, targets, write_csv
from serving.metrics import summarize
from serving.policies import POLICIES, make_policy
from serving.robustness import FULL as ROBUSTNESS_FULL
from serving.robustness import QUICK as ROBUSTNESS_QUICK
from serving.robustness import markdown, run_robustness, verdict, write_outputs
from serving.simulator import SimConfig, simulate
from serving.workloads import ARRIVALS, DATASETS, WorkloadSpec, generate


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", action="store_true", help="run the experiment matrix and write docs/")
    p.add_argument("--robustness", action="store_true",
                   help="elastic vs coupled and the best static PD / EPD splits on a seeded family of loads")
    p.add_argument("--quick", action="store_true", help="small matrix or robustness family (short traces)")
    p.add_argument("--overheads", action="store_true", help="only measure decision time and simulation speed")
    p.add_argument("--scale", action="store_true",
                   help="ElasticMM at 8-1024 instances, on one host and on hosts of 8 with a cross-host link")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="worker processes for the matrix and the robustness runs")
    p.add_argument("--out", default="docs", help="output folder for CSVs and figures")
    p.add_argument("--bench-md", default="docs/benchmarks.md", help="markdown file the results append to")
    p.add_argument("--policy", default="elasticmm", help=f"one of {list(POLICIES)}")
    p.add_argument("--n-prefill", type=int, default=None, help="static_pd prefill instances")
    p.add_argument("--split", default="equal", help="static_epd preset or tP,tD,mE,mP,mD")
    p.add_argument("--arrival", default="poisson", help=f"one of {list(ARRIVALS)}")
    p.add_argument("--dataset", default="sharegpt4o", help=f"one of {sorted(DATASETS)}")
    p.add_argument("--rate", type=float, default=10.0, help="mean request rate (req/s), > 0")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of traffic, > 0")
    p.add_argument("--dup-rate", type=float, default=0.0, help="probability an image repeats an earlier one")
    p.add_argument("--mm-share", type=float, default=None, help="multimodal fraction in [0, 1] (default: dataset's)")
    p.add_argument("--burst-factor", type=float, default=4.0, help="mmpp: multimodal rate multiplier in a burst")
    p.add_argument("--burst-len", type=float, nargs=2, default=(30.0, 120.0), help="mmpp: burst length range (s)")
    p.add_argument("--burst-gap", type=float, default=150.0, help="mmpp: mean gap between bursts (s)")
    p.add_argument("--instances", type=int, default=None, help="instances (default: the profile's)")
    p.add_argument("--profile", default="qwen2_5_vl_7b_a800x8", help="packaged profile name or a .json path")
    p.add_argument("--seed", type=int, default=0, help="workload seed; with --robustness, the load family's seed")
    p.add_argument("--check", action="store_true", help="check the invariants at every event (slow)")
    return p.parse_args(argv)


def single(args):
    cost = CostModel(load_profile(args.profile))
    kw = {}
    if args.policy == "static_pd":
        kw["n_prefill"] = args.n_prefill if args.n_prefill is not None else cost.profile["num_instances"] // 2
    if args.policy == "static_epd":
        kw["split"] = tuple(int(x) for x in args.split.split(",")) if "," in args.split else args.split
    pol = make_policy(args.policy, **kw)
    spec = WorkloadSpec(arrival=args.arrival, dataset=args.dataset, rate=args.rate, duration=args.duration,
                        dup_rate=args.dup_rate, seed=args.seed, mm_share=args.mm_share,
                        burst_factor=args.burst_factor, burst_len=tuple(args.burst_len), burst_gap_mean=args.burst_gap)
    reqs = generate(spec, cost)
    res = simulate(pol, reqs, cost, args.instances, SimConfig(check_invariants=args.check))
    row = summarize(res, cost)
    row["decisions"] = dict(getattr(pol, "stats", {}))
    print(json.dumps(row, indent=1, default=str))


def matrix(args):
    t0 = time.time()
    out = Path(args.out)
    res = run_matrix(out, args.quick, args.jobs, args.seed)
    over = measure_overheads(QUICK if args.quick else FULL)
    rows = targets(res, over)
    write_csv(out / "elasticmm_targets.csv", rows)
    env = environment()
    wall = time.time() - t0
    cmd = "python scripts/simulate.py --matrix" + (" --quick" if args.quick else "") + f" --jobs {args.jobs}"
    lines = [f"\n## ElasticMM simulator ({'quick' if args.quick else 'full'} matrix)\n",
             f"- command: `{cmd}` ({wall / 60:.1f} min wall)",
             f"- date: {env['date']}; machine: {env['machine']}; Python {env['python']}, numpy {env['numpy']}, "
             f"matplotlib {env['matplotlib']}",
             "- CSVs and figures: docs/elasticmm_*.csv, docs/elasticmm_*.png; baselines measured in the same run\n",
             "| dataset | target | SLO scale | measured | threshold | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        v = r["value"]
        vs = f"{v:.3g}" if isinstance(v, float) else str(v)
        lines.append(f"| {r['dataset']} | {r['target']} | {r['slo_scale']} | {vs} | {r['threshold']} | "
                     f"{'yes' if r['met'] else 'no'} |")
    lines += ["", "Goodput (req/s at >= 90% SLO attainment; 'c' = censored at the top of the rate grid):", "",
              "| dataset | workload | system | " + " | ".join(f"s{k}" for k in range(1, 6)) + " |",
              "|---|---|---|" + "---|" * 5]
    by = {}
    for r in res["gp_rows"]:  # searched-best systems name their split at every scale (it may differ by scale)
        split = f" {r['chosen'][r['chosen'].index('['):]}" if r.get("chosen") else ""
        by.setdefault((r["dataset"], r["workload"], r["system"]), []).append(
            f"{r['goodput']:.3g}" + ("c" if r["censored"] else "") + split)
    for (ds, wl, sysname), vals in by.items():
        lines.append(f"| {ds} | {wl} | {sysname} | " + " | ".join(vals) + " |")
    lines += ["", *overhead_lines(over)]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.bench_md, "a") as f:
        f.write(text)


def overhead_lines(over) -> list[str]:
    d = over["decision"]
    lines = [f"Decision time ({d['num_instances']} instances, {d['rate']:.0f} req/s MMPP, {d['ticks']} ticks): "
             f"wall P50 {d['decision_ms_p50']:.3f} ms, P99 {d['decision_ms_p99']:.3f} ms, max "
             f"{d['decision_ms_max']:.3f} ms; CPU time P50 {d['decision_cpu_ms_p50']:.3f} ms, P99 "
             f"{d['decision_cpu_ms_p99']:.3f} ms, max {d['decision_cpu_ms_max']:.3f} ms."]
    for sp in over["speed"]:
        lines.append(f"Simulation speed ({sp['dataset']}, {sp['policy']}, 50 req/s, {sp['traffic_s']:.0f} s of "
                     f"traffic, {sp['requests']} requests, {sp['events']} events): {sp['total_s']:.1f} s wall "
                     f"(generate {sp['generate_s']:.1f} s + simulate {sp['simulate_s']:.1f} s), "
                     f"{sp['cpu_s']:.1f} s CPU.")
    return lines


def overheads(args):
    """Only the overhead targets (decision time at 64 instances, simulation speed), on one core."""
    t0 = time.time()
    over = measure_overheads(QUICK if args.quick else FULL)
    env = environment()
    cmd = "python scripts/simulate.py --overheads" + (" --quick" if args.quick else "")
    lines = [f"\n### Overheads (`{cmd}`, {(time.time() - t0) / 60:.1f} min wall)\n",
             f"- date: {env['date']}; machine: {env['machine']} (load average at start "
             f"{os.getloadavg()[0]:.1f}); Python {env['python']}, numpy {env['numpy']}", ""]
    lines += overhead_lines(over)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.bench_md, "a") as f:
        f.write(text)


def robustness(args):
    t0 = time.time()
    family, sizing = ROBUSTNESS_QUICK if args.quick else ROBUSTNESS_FULL
    family = dataclasses.replace(family, seed=args.seed)
    rows = run_robustness(family, sizing, args.jobs)
    csv_path, png_path = write_outputs(rows, Path(args.out))
    env = environment()
    v = verdict(rows)
    cmd = "python scripts/simulate.py --robustness" + (" --quick" if args.quick else "") + \
        f" --jobs {args.jobs} --seed {args.seed}"
    header = "\n".join([
        f"\n## ElasticMM robustness ({'quick' if args.quick else 'full'}, {v['loads']} loads)\n",
        f"- command: `{cmd}` ({(time.time() - t0) / 60:.1f} min wall)",
        f"- date: {env['date']}; machine: {env['machine']}; Python {env['python']}, numpy {env['numpy']}",
        f"- CSV and figure: {csv_path}, {png_path}; prefix cache on for every policy\n"])
    print(markdown(rows, header))


def scale(args):
    from serving import scale as scale_study

    t0 = time.time()
    cfg = dataclasses.replace(scale_study.QUICK if args.quick else scale_study.ScaleConfig(), seed=args.seed)
    rows = scale_study.run_scale(cfg)
    csv_path, png_path = scale_study.write_outputs(rows, Path(args.out))
    env = environment()
    cmd = "python scripts/simulate.py --scale" + (" --quick" if args.quick else "") + f" --seed {args.seed}"
    print("\n".join([
        f"\n## ElasticMM over many hosts ({'quick' if args.quick else 'full'})\n",
        f"- command: `{cmd}` ({time.time() - t0:.0f} s wall)",
        f"- date: {env['date']}; machine: {env['machine']}; Python {env['python']}, numpy {env['numpy']}",
        f"- CSV and figure: {csv_path}, {png_path}\n", scale_study.markdown(rows)]))


def main(argv=None):
    args = parse(argv)
    if args.scale:
        scale(args)
    elif args.robustness:
        robustness(args)
    elif args.matrix:
        matrix(args)
    elif args.overheads:
        overheads(args)
    else:
        single(args)


if __name__ == "__main__":
    main()
