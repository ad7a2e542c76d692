#!/usr/bin/env python
"""Fluid capacity bounds of the ElasticMM experiments: how much throughput re-partitioning can buy.

  python scripts/capacity_bound.py                       # table + CSV + figure in docs/
  python scripts/capacity_bound.py --diurnal-goodput     # also simulate goodput on the diurnal cycle (~10 min, 2 cores)

For each dataset and workload of the matrix (steady Poisson, MMPP bursts, and the diurnal text/MM cycle) it
prints, per SLO scale, the sustainable rate of the best static EPD split, the best static PD split, coupled
serving and an idealised elastic system (free, instant re-partitioning per phase), and the ratios. The simulated
goodput ratios of docs/elasticmm_goodput.csv (written by `scripts/simulate.py --matrix`) stand next to them.
The logic lives in serving/capacity.py; the model and its limits are described in docs/elasticmm.md.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import figures
from serving.capacity import bounds, class_work, ratios, shift_sweep
from serving.costmodel import CostModel, load_profile
from serving.experiments import Runner, best_static_epd, best_static_pd, goodput, rate_grid
from serving.matrix import DATASETS, FULL, bursty, environment, fluid_best_splits, search_best_static, steady, write_csv
from serving.metrics import SLO_SCALES
from serving.workloads import WorkloadSpec


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="qwen2_5_vl_7b_a800x8", help="packaged profile name or a .json path")
    p.add_argument("--goodput-csv", default="docs/elasticmm_goodput.csv",
                   help="simulated goodputs to compare with (skipped if the file does not exist)")
    p.add_argument("--out", default="docs", help="folder for the CSV and the figure")
    p.add_argument("--diurnal-goodput", action="store_true",
                   help="simulate elastic vs searched static goodput on the diurnal cycle (visualwebinstruct)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for --diurnal-goodput")
    return p.parse_args(argv)


def diurnal(ds: str) -> WorkloadSpec:
    return WorkloadSpec(arrival="diurnal", dataset=ds, duration=FULL.diurnal_duration,
                        diurnal_period=FULL.diurnal_duration, seed=0)


def simulated_ratios(path: Path) -> dict:
    """(dataset, workload, scale) -> simulated elastic / best static EPD and / best static PD goodput."""
    if not path.exists():
        return {}
    gp = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            gp[(r["dataset"], r["workload"], int(r["slo_scale"]), r["system"])] = float(r["goodput"])
    out = {}
    for (ds, wl, k, system), g in gp.items():
        if system != "elasticmm":
            continue
        epd = max(v for (d, w, kk, s), v in gp.items() if (d, w, kk) == (ds, wl, k) and s.startswith("static_epd"))
        pd = gp.get((ds, wl, k, "static_pd_best"), 0.0)
        out[(ds, wl, k)] = dict(sim_vs_static_epd=g / epd if epd else float("inf"),
                                sim_vs_static_pd=g / pd if pd else float("inf"))
    return out


def bound_table(cost: CostModel, sim: dict) -> list[dict]:
    rows = []
    for ds in DATASETS:
        work = class_work(steady(ds, 1.0, 0), cost)
        for wl_name, wl in (("steady", steady(ds, 1.0, 0)), ("bursty", bursty(ds, 1.0, 0)), ("diurnal", diurnal(ds))):
            for k in SLO_SCALES:
                b = bounds(wl, cost, k, work=work)
                rows.append(dict(b, workload=wl_name, **ratios(b), **sim.get((ds, wl_name, k), {})))
    return rows


def print_table(rows: list[dict]):
    print("| dataset | workload | SLO scale | best static EPD (req/s) | best static PD | coupled | elastic, whole "
          "instances | elastic, fractional | bound: elastic/static EPD (whole / frac) | bound: elastic/static PD "
          "(whole / frac) | simulated: elastic/static EPD | simulated: elastic/static PD |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sim_e = f"{r['sim_vs_static_epd']:.2f}" if "sim_vs_static_epd" in r else "-"
        sim_p = f"{r['sim_vs_static_pd']:.2f}" if "sim_vs_static_pd" in r else "-"
        print(f"| {r['dataset']} | {r['workload']} | {r['slo_scale']} | {r['static_epd_best']:.1f} "
              f"({r['static_epd_split']}) | {r['static_pd_best']:.1f} ({r['static_pd_split']}) | {r['coupled']:.1f} | "
              f"{r['elastic_int']:.1f} | {r['elastic_frac']:.1f} | {r['int_vs_static_epd']:.2f} / "
              f"{r['frac_vs_static_epd']:.2f} | {r['int_vs_static_pd']:.2f} / {r['frac_vs_static_pd']:.2f} | "
              f"{sim_e} | {sim_p} |")


def diurnal_goodput(jobs: int, n: int) -> list[dict]:
    """Simulated goodput on the diurnal cycle: elastic against the searched best static EPD and PD splits."""
    runner = Runner(jobs=jobs)
    grid = rate_grid(FULL.rate_lo, FULL.rate_hi, FULL.grid_points)
    rows = []
    try:
        ds = "visualwebinstruct"
        wl = diurnal(ds)
        gps = {"elasticmm": goodput(runner, "elasticmm", (), wl, grid, FULL.refine, desc="diurnal elasticmm")}
        probe = [max(FULL.rate_lo, gps["elasticmm"][3][0] * 0.8)]
        fluid = fluid_best_splits(wl)
        chosen = {}
        for name, rank in (("static_epd", best_static_epd(runner, wl, n, probe)),
                           ("static_pd", best_static_pd(runner, wl, n, probe))):
            gps[f"{name}_best"], chosen[f"{name}_best"], _ = search_best_static(
                runner, name, rank[:FULL.static_probe_top] + fluid[name], wl, grid, FULL.refine,
                desc=f"diurnal {name}")
        for system, by_scale in gps.items():
            for k in SLO_SCALES:
                rows.append(dict(dataset=ds, workload="diurnal", system=system, slo_scale=k, goodput=by_scale[k][0],
                                 censored=by_scale[k][1], chosen=chosen.get(system, {}).get(k, ""),
                                 probe_rate=probe[0]))
    finally:
        runner.close()
    return rows


def main(argv=None):
    args = parse(argv)
    cost = CostModel(load_profile(args.profile))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"date {env['date']}; machine {env['machine']}; Python {env['python']}, numpy {env['numpy']}; "
          f"profile {cost.profile['name']}\n")
    rows = bound_table(cost, simulated_ratios(Path(args.goodput_csv)))
    print_table(rows)
    write_csv(out / "elasticmm_capacity_bound.csv", rows)
    sweep = [r for ds in DATASETS for r in shift_sweep(ds, cost, 3)]
    write_csv(out / "elasticmm_capacity_sweep.csv", sweep)
    figures.capacity_bound(sweep, str(out / "elasticmm_capacity_bound.png"))
    print("\nshift sweep at SLO scale 3 (bound: elastic with whole instances / best static EPD, / best static PD):")
    for r in sweep:
        print(f"  {r['dataset']:18s} {r['shift']:18s} {r['level']:5.2f}: {r['int_vs_static_epd']:.2f} (frac "
              f"{r['frac_vs_static_epd']:.2f}), vs PD {r['int_vs_static_pd']:.2f}")
    if args.diurnal_goodput:
        gp = diurnal_goodput(args.jobs, int(cost.profile["num_instances"]))
        write_csv(out / "elasticmm_diurnal_goodput.csv", gp)
        print("\nsimulated goodput on the diurnal cycle (req/s at >= 90% attainment), SLO scales 1-5:")
        for system in dict.fromkeys(r["system"] for r in gp):
            vals = [f"{r['goodput']:.3g}" + ("c" if r["censored"] else "") for r in gp if r["system"] == system]
            split = [r["chosen"] for r in gp if r["system"] == system and r["chosen"]]
            print(f"  {system:28s} " + " / ".join(vals) + (f"  {split}" if split else ""))


if __name__ == "__main__":
    main()
