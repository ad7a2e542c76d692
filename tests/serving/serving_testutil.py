"""Tiny shared fixtures for the serving tests (a plain module: tests/conftest.py belongs to the core package)."""

from serving.costmodel import default_cost_model
from serving.simulator import SimConfig, simulate
from serving.workloads import WorkloadSpec, generate

COST = default_cost_model()


def tiny_spec(**kw):
    base = dict(arrival="poisson", rate=6.0, duration=12.0, dataset="sharegpt4o", seed=7)
    base.update(kw)
    return WorkloadSpec(**base)


def checked_run(policy, spec=None, num_instances=None, **cfg):
    """Run with every spec-6.1 invariant checked after every event; small caches so eviction happens."""
    reqs = generate(spec or tiny_spec(), COST)
    conf = dict(check_invariants=True, prefix_cache_blocks=400, emb_cache_tokens=4000)
    conf.update(cfg)
    return simulate(policy, reqs, COST, num_instances, SimConfig(**conf)), reqs
