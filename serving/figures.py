"""Matplotlib figures of the experiment matrix (Agg backend: no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .metrics import SLO_SCALES

STYLE = {"coupled": ("tab:red", "o"), "static_pd": ("tab:orange", "s"), "static_epd": ("tab:purple", "^"),
         "elasticmm": ("tab:green", "D"), "elasticmm_no_cache": ("tab:olive", "v")}


def _style(label):
    for k in sorted(STYLE, key=len, reverse=True):
        if label.startswith(k):
            return STYLE[k]
    return ("tab:gray", "x")


def latency_vs_rate(rows_by_ds: dict, path: str):
    """rows_by_ds[dataset][label] = list of metric rows sorted by rate."""
    dss = list(rows_by_ds)
    fig, axes = plt.subplots(len(dss), 3, figsize=(15, 4 * len(dss)), squeeze=False)
    for i, ds in enumerate(dss):
        for label, rows in rows_by_ds[ds].items():
            c, m = _style(label)
            rates = [r["rate"] for r in rows]
            for j, (key, ylabel) in enumerate((("ttft_p99", "P99 TTFT (s)"), ("tpot_p99", "P99 TPOT (s)"),
                                              ("norm_ttft_mean", "mean normalised TTFT"))):
                axes[i, j].plot(rates, [r[key] for r in rows], marker=m, color=c, label=label)
                axes[i, j].set_yscale("log")
                axes[i, j].set_xlabel("request rate (req/s)")
                axes[i, j].set_ylabel(ylabel)
                axes[i, j].set_title(f"{ds}: {ylabel}")
        axes[i, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goodput_vs_scale(gp: dict, path: str, title: str):
    """gp[(dataset, workload)][label] = {scale: goodput}."""
    keys = list(gp)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for j, key in enumerate(keys):
        ax = axes[0, j]
        for label, by_scale in gp[key].items():
            c, m = _style(label)
            ax.plot(list(SLO_SCALES), [by_scale[k] for k in SLO_SCALES], marker=m, color=c, label=label)
        ax.set_xlabel("SLO scale")
        ax.set_ylabel("goodput (req/s at >= 90% SLO attainment)")
        ax.set_title(f"{key[0]} / {key[1]}")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cache_ablation(rows: list, path: str):
    """rows: dicts with dup_rate, policy_name, ttft_mean, ttft_p99, encoded_tokens."""
    dups = sorted({r["dup_rate"] for r in rows})
    labels = list(dict.fromkeys(r["policy_name"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / len(labels)
    for k, (key, ylabel) in enumerate((("ttft_mean", "mean TTFT (s)"), ("ttft_p99", "P99 TTFT (s)"),
                                       ("encoded_tokens", "vision tokens encoded"))):
        ax = axes[k]
        for i, lab in enumerate(labels):
            vals = [next((r[key] for r in rows if r["policy_name"] == lab and r["dup_rate"] == d), 0) for d in dups]
            ax.bar([x + i * width for x in range(len(dups))], vals, width, label=lab)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(dups))])
        ax.set_xticklabels([f"dup={d}" for d in dups])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layout_timeline(log: list, end_time: float, arrivals_mm, path: str, title: str):
    """Instances per (group, stage) over time for one run (stacked areas), with the multimodal arrival rate."""
    roles = sorted({k for _, counts in log for k in counts}, key=lambda k: (k[0], k[1]))
    ts = [t for t, _ in log] + [end_time]
    fig, ax = plt.subplots(figsize=(12, 4))
    series = [[counts.get(role, 0) for _, counts in log] + [log[-1][1].get(role, 0)] for role in roles]
    ax.stackplot(ts, *series, step="post", labels=[f"{g.name}/{s.name}" for g, s in roles], alpha=0.8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("instances (stacked)")
    ax.set_xlim(0, end_time)
    if arrivals_mm is not None:
        ax2 = ax.twinx()
        ax2.plot(*arrivals_mm, color="black", alpha=0.6, label="MM req/s")
        ax2.set_ylabel("multimodal arrivals (req/s, 5 s bins)")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def capacity_bound(rows: list, path: str, targets=(1.8, 2.3)):
    """Bound ratios (elastic / best static EPD and / best static PD) against the size of the load shift.

    rows: `capacity.shift_sweep` rows of one or more datasets."""
    shifts = list(dict.fromkeys(r["shift"] for r in rows))
    fig, axes = plt.subplots(1, len(shifts), figsize=(6 * len(shifts), 4), squeeze=False)
    for j, shift in enumerate(shifts):
        ax = axes[0, j]
        for ds, color in (("sharegpt4o", "tab:blue"), ("visualwebinstruct", "tab:orange")):
            rs = sorted((r for r in rows if r["shift"] == shift and r["dataset"] == ds), key=lambda r: r["level"])
            if not rs:
                continue
            x = [r["level"] for r in rs]
            ax.plot(x, [r["int_vs_static_epd"] for r in rs], "-o", color=color,
                    label=f"{ds}: elastic (whole instances) / best static EPD")
            ax.plot(x, [r["frac_vs_static_epd"] for r in rs], "--^", color=color, alpha=0.6,
                    label=f"{ds}: elastic (fractional) / best static EPD")
            ax.plot(x, [r["int_vs_static_pd"] for r in rs], ":s", color=color, alpha=0.8,
                    label=f"{ds}: elastic (whole instances) / best static PD")
        for t in targets:
            ax.axhline(t, color="gray", lw=0.8, ls="-.")
            ax.text(x[0], t, f" issue target {t}x", fontsize=7, va="bottom", color="gray")
        ax.set_xlabel("MMPP burst factor (MM rate x in bursts)" if shift.startswith("mmpp")
                      else "diurnal amplitude (text / MM anti-phase)")
        ax.set_ylabel("capacity ratio (sustainable req/s)")
        ax.set_title(f"fluid capacity bound: {shift}, SLO scale {rs[0]['slo_scale'] if rs else ''}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
