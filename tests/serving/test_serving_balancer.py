import numpy as np
import pytest

from serving.balancer import brute_force_allocation, burst_tolerance, greedy_allocation, needed_instances


def test_greedy_equals_brute_force_max_min():
    rng = np.random.default_rng(0)
    for _ in range(400):
        k = int(rng.integers(2, 4))
        groups = [f"g{i}" for i in range(k)]
        n_avg = {g: int(rng.integers(1, 7)) for g in groups}
        floors = {g: int(rng.integers(1, 4)) for g in groups}
        n = sum(floors.values()) + int(rng.integers(0, 10))
        alloc = greedy_allocation(n, n_avg, floors)
        assert sum(alloc.values()) == n and all(alloc[g] >= floors[g] for g in groups)
        best, argmax = brute_force_allocation(n, n_avg, floors)
        got = min(burst_tolerance(alloc[g], n_avg[g]) for g in groups)
        assert got == pytest.approx(best)
        assert alloc in argmax


def test_needed_instances_and_bad_counts():
    assert needed_instances(0.0, 5.0) == 1
    assert needed_instances(11.0, 5.0) == 3
    with pytest.raises(ValueError, match="mu"):
        needed_instances(1.0, 0.0)
    with pytest.raises(ValueError, match="impossible instance count 4"):
        greedy_allocation(4, {"t": 1, "m": 1}, {"t": 2, "m": 3})


def test_tie_goes_to_the_burstier_group():
    alloc = greedy_allocation(5, {"t": 2, "m": 2}, {"t": 2, "m": 2}, peak_ratio={"t": 1.0, "m": 3.0})
    assert alloc == {"t": 2, "m": 3}
