import numpy as np
import pytest

from serving.experiments import Runner, goodput, rate_grid
from serving.metrics import SLO_FACTOR, attainment
from serving.workloads import WorkloadSpec


def test_attainment_counts_both_slos_and_unfinished_as_failures():
    pr = dict(ttft=np.array([1.0, 1.0, 5.0, np.inf]), tpot=np.array([0.01, 0.05, 0.01, np.inf]),
              base_ttft=np.ones(4) / SLO_FACTOR, base_tpot=np.full(4, 0.01) / SLO_FACTOR)
    assert attainment(pr, 1) == 0.25  # only the first meets both TTFT <= 1 and TPOT <= 0.01
    assert attainment(pr, 5) == 0.75
    assert attainment(pr, 1e9) == 0.75  # the unfinished request never counts


class StubRunner(Runner):
    """Attainment falls linearly with the rate; knee at `knee * scale`."""

    def __init__(self, knee):
        super().__init__(jobs=1, progress=False)
        self.knee = knee
        self.calls = 0

    def many(self, specs, desc=""):
        rows = []
        for s in specs:
            if s not in self.cache:
                self.calls += 1
                r = s.workload.rate
                self.cache[s] = {f"attain_s{k}": 1.0 if r <= self.knee * k else 0.5 for k in range(1, 6)}
            rows.append(self.cache[s])
        return rows


def test_goodput_search_brackets_and_refines():
    run = StubRunner(knee=7.0)
    grid = rate_grid(1, 64, 7)  # 1, 2, 4, ..., 64
    gp = goodput(run, "coupled", (), WorkloadSpec(), grid, refine=4)
    assert gp[1][0] <= 7.0 and gp[1][0] >= 7.0 / (8 / 4) ** (1 / 16) * 0.99  # within the refined bracket
    assert gp[5][0] <= 35.0 and gp[5][0] > 28.0
    assert not gp[1][1]
    assert goodput(StubRunner(knee=0.5), "coupled", (), WorkloadSpec(), grid)[1] == (0.0, False)
    assert goodput(StubRunner(knee=100), "coupled", (), WorkloadSpec(), grid)[1] == (64.0, True)
    with pytest.raises(ValueError, match="lo"):
        rate_grid(5, 2, 3)
