"""ElasticMM over many hosts, in the simulator: how the scheduler's decision time and the KV traffic grow with the
instance count when instances sit on hosts of `instances_per_host` and KV crosses a slower link between hosts.

Each size runs the same bursty multimodal load per instance (MMPP, as the decision-time target of the matrix) in
four layouts: every instance on one host (the profile's one link); on hosts of 8 with the cross-host link (a
prefill -> decode hand-off or a migration to an instance on another host takes it), the decode instance picked by
free KV alone, as on one host; the same with the KV's own host first (`SimConfig.host_aware_decode`); and that with
every role spread over the hosts (`SimConfig.spread_over_hosts`: instance i on host i mod H, where the policies
give each role a contiguous range of ids). Driven by `scripts/simulate.py --scale`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from .costmodel import CostModel, default_cost_model
from .metrics import summarize
from .policies import make_policy
from .simulator import SimConfig, simulate
from .workloads import WorkloadSpec, generate

# 200 Gb/s between hosts (one InfiniBand / RoCE NIC per GPU node), against the profile's 150 GB/s NVLink inside one
CROSS_HOST_LINK = {"alpha_ms": 0.02, "bandwidth_GBps": 25.0}


@dataclass(frozen=True)
class ScaleConfig:
    sizes: tuple[int, ...] = (8, 64, 256, 1024)
    instances_per_host: int = 8
    rate_per_instance: float = 4.0
    duration: float = 30.0
    dataset: str = "sharegpt4o"
    seed: int = 0
    cross_host_link: tuple[float, float] = (CROSS_HOST_LINK["alpha_ms"], CROSS_HOST_LINK["bandwidth_GBps"])


QUICK = ScaleConfig(sizes=(8, 32), duration=10.0)


def nodes(num_instances: int) -> int:
    """How many of the default profile's nodes (8 instances each) `num_instances` make."""
    return -(-num_instances // default_cost_model().profile["num_instances"])


def cost_for(cfg: ScaleConfig, num_instances: int) -> CostModel:
    """The default profile (8 instances on one node) with the cross-host link, and a host CPU pool (image
    preprocessing) per node: a fixed pool of 8 workers would be the bottleneck of any larger size."""
    profile = copy.deepcopy(default_cost_model().profile)
    profile["cross_host_link"] = {"alpha_ms": cfg.cross_host_link[0], "bandwidth_GBps": cfg.cross_host_link[1]}
    profile["preprocess"]["cpu_workers"] *= nodes(num_instances)
    return CostModel(profile)


# name: (on hosts of `instances_per_host`, host-aware decode, roles spread over hosts)
LAYOUTS = {"one host": (False, True, False), "hosts, decode by free KV": (True, False, False),
           "hosts, same host first": (True, True, False), "hosts, roles spread, same host first": (True, True, True)}


def sim_config(cfg: ScaleConfig, num_instances: int, layout: str) -> SimConfig:
    """The caches are per group and sized for one node: they grow with the node count."""
    base, n = SimConfig(), nodes(num_instances)
    hosts, aware, spread = LAYOUTS[layout]
    return SimConfig(instances_per_host=cfg.instances_per_host if hosts else 0, host_aware_decode=aware,
                     spread_over_hosts=spread, emb_cache_tokens=base.emb_cache_tokens * n,
                     prefix_cache_blocks=base.prefix_cache_blocks * n)


def run_one(cfg: ScaleConfig, num_instances: int, layout: str) -> dict:
    cost = cost_for(cfg, num_instances)
    spec = WorkloadSpec(arrival="mmpp", rate=cfg.rate_per_instance * num_instances, duration=cfg.duration,
                        dataset=cfg.dataset, seed=cfg.seed, burst_gap_mean=10.0, burst_len=(5.0, 10.0))
    requests = generate(spec, cost)
    per_host = cfg.instances_per_host if LAYOUTS[layout][0] else 0
    t0 = time.perf_counter()
    res = simulate(make_policy("elasticmm"), requests, cost, num_instances, sim_config(cfg, num_instances, layout))
    wall = time.perf_counter() - t0
    row = summarize(res, cost)
    dt = np.asarray(res.decision_cpu_times) * 1e3
    moved = res.handoff_bytes + res.migrated_bytes
    return dict(
        layout=layout, instances=num_instances, hosts=-(-num_instances // per_host) if per_host else 1,
        rate=spec.rate, requests=len(requests), completed=row["completed"], ticks=len(dt),
        decision_cpu_ms_p50=float(np.percentile(dt, 50)), decision_cpu_ms_p99=float(np.percentile(dt, 99)),
        decision_cpu_ms_max=float(dt.max()), ttft_p50=row["ttft_p50"], ttft_p90=row["ttft_p90"],
        tpot_p90=row["tpot_p90"], switches=res.switches, migrations=res.migrations,
        handoff_GB=res.handoff_bytes / 1e9, migrated_GB=res.migrated_bytes / 1e9,
        cross_host_GB=res.cross_host_bytes / 1e9, cross_host_share=res.cross_host_bytes / moved if moved else 0.0,
        simulate_s=wall)


def run_scale(cfg: ScaleConfig, progress=print) -> list[dict]:
    rows = []
    for n in cfg.sizes:
        for layout in LAYOUTS:
            rows.append(run_one(cfg, n, layout))
            r = rows[-1]
            progress(f"{n} instances, {layout} ({r['hosts']}): decision P99 {r['decision_cpu_ms_p99']:.2f} ms, "
                     f"TTFT P90 {r['ttft_p90']:.3f} s, cross-host {r['cross_host_GB']:.1f} GB "
                     f"({r['simulate_s']:.0f} s)")
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| instances | layout (hosts) | req/s | requests | decision CPU ms P50 / P99 / max | TTFT P50 / P90 s "
            "| TPOT P90 ms | KV hand-off GB | migrated GB | cross-host GB (share) | simulate s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['instances']} | {r['layout']} ({r['hosts']}) | {r['rate']:.0f} | {r['requests']} | "
            f"{r['decision_cpu_ms_p50']:.2f} / {r['decision_cpu_ms_p99']:.2f} / {r['decision_cpu_ms_max']:.2f} | "
            f"{r['ttft_p50']:.3f} / {r['ttft_p90']:.3f} | {r['tpot_p90'] * 1e3:.1f} | {r['handoff_GB']:.1f} | "
            f"{r['migrated_GB']:.2f} | {r['cross_host_GB']:.1f} ({r['cross_host_share']:.0%}) | "
            f"{r['simulate_s']:.0f} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: str) -> None:
    """Decision time and KV traffic between hosts against the instance count (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for layout, marker in zip(LAYOUTS, "os^D", strict=True):
        sel = [r for r in rows if r["layout"] == layout]
        n = [r["instances"] for r in sel]
        a.plot(n, [r["decision_cpu_ms_p99"] for r in sel], marker + "-", label=f"P99, {layout}")
        if LAYOUTS[layout][0]:  # sizes of one host move nothing between hosts: left out of the log scale
            many = [r for r in sel if r["hosts"] > 1]
            b.plot([r["instances"] for r in many], [r["cross_host_GB"] for r in many], marker + "-",
                   label=f"between hosts, {layout}")
    sel = [r for r in rows if r["layout"] == "one host"]
    b.plot([r["instances"] for r in sel], [r["handoff_GB"] + r["migrated_GB"] for r in sel], "k--",
           label="all KV moved (one host)")
    a.set(xscale="log", yscale="log", xlabel="instances", ylabel="policy tick CPU time (ms)",
          title="ElasticMM decision time (tick: 50 ms)")
    b.set(xscale="log", yscale="log", xlabel="instances", ylabel="GB over the run", title="KV traffic")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict], out) -> tuple:
    from pathlib import Path

    from .matrix import write_csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "elasticmm_scale.csv", out / "elasticmm_scale.png"
    write_csv(csv_path, rows)
    figure(rows, str(png_path))
    return csv_path, png_path
