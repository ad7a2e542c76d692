import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.matrix import DATASETS, targets

ROOT = Path(__file__).resolve().parents[2]


def _fake(elastic, coupled, static):
    gp = {lab: {k: v for k in range(1, 6)} for lab, v in
          (("elasticmm", elastic), ("coupled", coupled), ("static_pd_best", static), ("static_epd_best", static))}
    gs = {lab: {k: static for k in range(1, 6)} for lab in ("static_epd[equal]", "static_epd_best")}
    gs["elasticmm"] = {k: elastic for k in range(1, 6)}
    res = dict(gp_main={(ds, wl): gp for ds in DATASETS for wl in ("steady", "bursty")},
               gp_static={(ds, wl): gs for ds in DATASETS for wl in ("steady", "bursty")}, lat_rows=[])
    over = dict(decision=dict(decision_ms_p99=0.5, decision_cpu_ms_p99=0.4),
                speed=[dict(dataset="x", traffic_s=300.0, total_s=6.0, cpu_s=4.0)])
    return targets(res, over)


def test_targets_can_pass_and_fail():
    good = _fake(elastic=40.0, coupled=10.0, static=20.0)
    bad = _fake(elastic=20.0, coupled=19.0, static=22.0)
    by = lambda rows, t: [r["met"] for r in rows if r["target"].startswith(t)]  # noqa: E731
    assert all(by(good, "bursty goodput vs coupled")) and not any(by(bad, "bursty goodput vs coupled"))
    assert all(by(good, "bursty goodput vs best static")) and not any(by(bad, "bursty goodput vs best static"))
    assert all(by(good, "steady goodput")) and not any(by(bad, "steady goodput"))  # 20/22 = 0.91 < 0.95
    assert by(good, "decision") == [True, True]
    wall, cpu = [r for r in good if r["target"].startswith("simulate")]
    assert wall["value"] == pytest.approx(72.0) and wall["met"] is False  # 6 s per 300 s of traffic = 72 s per hour
    assert cpu["value"] == pytest.approx(48.0) and cpu["met"] is True


def test_cli_single_run_and_bad_input():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/simulate.py"), "--policy", "static_epd", "--split",
                          "1,1,2,3,1", "--rate", "4", "--duration", "5"], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout)
    assert row["completed"] == row["n_requests"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/simulate.py"), "--policy", "vllm"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown policy 'vllm'" in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/simulate.py"), "--rate", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "rate = -1.0 must be" in bad.stderr


def test_best_static_is_chosen_per_slo_scale(monkeypatch):
    """Each SLO scale gets the candidate with the highest goodput at that scale, duplicates searched once."""
    import serving.matrix as m

    table = {(("split", (1, 1, 2, 3, 1)),): {1: 10.0, 2: 12.0, 3: 13.0, 4: 14.0, 5: 15.0},
             (("split", (2, 2, 1, 2, 1)),): {1: 8.0, 2: 12.0, 3: 16.0, 4: 18.0, 5: 19.0}}
    calls = []

    def fake_goodput(runner, name, kw, wl, grid, refine, desc=""):
        calls.append(kw)
        return {k: (v, False) for k, v in table[kw].items()}

    monkeypatch.setattr(m, "goodput", fake_goodput)
    cands = [*table, next(iter(table))]  # a duplicate candidate (probe screen and capacity bound agree)
    by_scale, chosen, kw3 = m.search_best_static(None, "static_epd", cands, None, [], 0)
    assert len(calls) == 2
    assert [by_scale[k][0] for k in range(1, 6)] == [10.0, 12.0, 16.0, 18.0, 19.0]
    assert chosen[1] == "static_epd[1-1-2-3-1]" and chosen[3] == "static_epd[2-2-1-2-1]"
    assert kw3 == (("split", (2, 2, 1, 2, 1)),)


def test_capacity_bound_cli(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/capacity_bound.py"), "--out", str(tmp_path),
                          "--goodput-csv", str(tmp_path / "missing.csv")], capture_output=True, text=True, check=True)
    assert "| visualwebinstruct | diurnal | 3 |" in out.stdout
    for name in ("elasticmm_capacity_bound.csv", "elasticmm_capacity_sweep.csv", "elasticmm_capacity_bound.png"):
        assert (tmp_path / name).stat().st_size > 0
