"""Proactive modality-level balancing: maximise the minimum burst tolerance across groups.

bt_i(n_i) = n_i / N_i^avg, where N_i^avg = max(1, ceil(lambda_i^avg / mu_i)) is the number of instances
group i needs for its predicted average load and n_i the instances it commands (spec 1.2; the official
code's bt ignores the allocation, which makes its greedy degenerate, so we do not copy it).

Because every bt_i is increasing in n_i and the groups are independent, handing the next instance to the
group with the lowest current bt (water-filling) is max-min optimal: if some allocation had a larger
minimum, it would give more instances to every group whose bt is at the greedy minimum, and therefore
fewer to a group the greedy last raised above that minimum, whose bt before that last instance was
already <= the greedy minimum (exchange argument). `brute_force_allocation` checks this in the tests.
"""

from __future__ import annotations

import itertools
import math


def burst_tolerance(n: int, n_avg: float) -> float:
    return n / n_avg


def needed_instances(rate_avg: float, mu: float) -> int:
    """N^avg: instances needed for the average load (at least one)."""
    if mu <= 0:
        raise ValueError(f"per-instance service rate mu = {mu} must be > 0")
    return max(1, math.ceil(rate_avg / mu - 1e-9))


def greedy_allocation(n_total: int, n_avg: dict, floors: dict, peak_ratio: dict | None = None) -> dict:
    """Give each group its floor, then repeatedly give one instance to the group with the lowest bt.

    Ties go to the group with the larger predicted peak/avg ratio (it needs the headroom more), then to
    the lower key for determinism."""
    keys = sorted(n_avg)
    if set(floors) != set(keys):
        raise ValueError(f"floors {sorted(floors)} and groups {keys} differ")
    need = sum(floors.values())
    if n_total < need:
        raise ValueError(f"impossible instance count {n_total}: the group floors need at least {need}")
    peak_ratio = peak_ratio or {}
    alloc = dict(floors)
    for _ in range(n_total - need):
        g = min(keys, key=lambda k: (burst_tolerance(alloc[k], n_avg[k]), -peak_ratio.get(k, 1.0), k))
        alloc[g] += 1
    return alloc


def brute_force_allocation(n_total: int, n_avg: dict, floors: dict) -> tuple[float, list[dict]]:
    """All allocations maximising min bt (for tests)."""
    keys = sorted(n_avg)
    best, arg = -math.inf, []
    ranges = [range(floors[k], n_total + 1) for k in keys]
    for combo in itertools.product(*ranges):
        if sum(combo) != n_total:
            continue
        v = min(burst_tolerance(c, n_avg[k]) for c, k in zip(combo, keys, strict=True))
        if v > best + 1e-12:
            best, arg = v, [dict(zip(keys, combo, strict=True))]
        elif abs(v - best) <= 1e-12:
            arg.append(dict(zip(keys, combo, strict=True)))
    return best, arg
