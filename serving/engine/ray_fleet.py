"""Instances on many hosts: each instance's executor lives in a Ray actor that owns its devices on one node; the
engine (scheduler, queues, page accounting, HTTP front end) stays one process and drives the actors through the
same interface as the in-process executors.

- Placement: an instance asks Ray for `devices_per_instance` units of one resource (GPU, TPU, or CPU cores on a
  CPU-only cluster), spread over the nodes. On CPU the actor's XLA exposes that many host devices, on GPU Ray's
  CUDA_VISIBLE_DEVICES gives it its own. The weights go into Ray's object store once and every actor places them
  on its devices.
- KV hand-off between instances (prefill -> decode, role switches) stays two-phase: the source's export puts the
  gathered pages into its node's object store (the step ends once they are there); the destination's import
  pulls them (Ray moves them between nodes) and scatters them into the pages it reserved; only then does the
  engine move ownership and free the source's pages. Served KVzip contexts reach an actor the same way.
- Faults: a dead actor (process or node gone) fails its step; the engine takes the instance out of service and
  restarts its requests on the live ones, as for a device error. A transfer whose source node died before the
  destination read it fails the import step: that destination leaves service too and its requests restart (the
  requests are never lost, one instance is).

Ray is an optional dependency (`pip install .[ray]`): only this module imports it, and only when a fleet starts.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping

import jax
import numpy as np

from kvzip_jax.config import ModelConfig
from serving.engine.executor import ExecutorShape, InstanceExecutor

RESOURCES = ("GPU", "TPU", "CPU")


class FleetError(ValueError):
    """The Ray cluster cannot host the instances as asked (names the address, the resource and the counts): a
    setting to change, as for any other bad serving option."""


def _ray():
    try:
        import ray
    except ImportError as e:
        raise FleetError("serving on a Ray cluster needs Ray: pip install '.[ray]'") from e
    return ray


class InstanceActor:
    """The device side of one instance, inside a Ray actor (one process on one node)."""

    def __init__(self, config: ModelConfig, params, shape: ExecutorShape, devices_per_instance: int,
                 modalities=None, moka=None):
        devices = jax.devices()
        if len(devices) < devices_per_instance:
            raise FleetError(f"the actor sees {len(devices)} device(s) ({devices[0].platform}); the instance needs "
                             f"{devices_per_instance}")
        self.executor = InstanceExecutor(config, params, devices[:devices_per_instance], shape, modalities, moka)

    def describe(self) -> tuple[str, int, str]:
        """(where it runs: node, address, process and devices; its KV pool's bytes per element; its node's id)."""
        import ray

        ctx = ray.get_runtime_context()
        devices = ",".join(str(d.id) for d in self.executor.devices)
        where = f"node {ctx.get_node_id()[:8]} ({ray.util.get_node_ip_address()}) pid {os.getpid()} " \
                f"{self.executor.devices[0].platform}:{devices}"
        return where, self.executor.kv_itemsize, ctx.get_node_id()

    def prefill(self, rows):
        return self.executor.prefill(rows)

    def decode(self, rows):
        return self.executor.decode(rows)

    def encode(self, items):
        return self.executor.encode(items)

    def warmup(self) -> None:
        self.executor.warmup()

    def copy_pages(self, src, dst) -> None:
        self.executor.copy_pages(src, dst)

    def export_pages(self, ids):
        """(True, the pages as host arrays): two return values, so the engine learns that the export succeeded
        without fetching the pages, which stay in this node's object store until the destination pulls them."""
        data = self.executor.export_pages(ids, self.executor.placement)
        return True, tuple(np.asarray(x) for x in data)

    def import_pages(self, ids, data) -> None:
        self.executor.import_pages(ids, data)


class RemoteExecutor:
    """The engine's handle on an `InstanceActor`: the `InstanceExecutor` methods the engine calls, each a blocking
    call on the instance's worker thread (Ray releases the GIL while it waits, so the instances overlap)."""

    padded_ids = staticmethod(InstanceExecutor.padded_ids)

    def __init__(self, actor, config: ModelConfig, shape: ExecutorShape, location: str, kv_itemsize: int,
                 host: str):
        self.actor, self.config, self.shape, self.location = actor, config, shape, location
        self.kv_itemsize = kv_itemsize
        self.host = host  # its node: a KV hand-off to an instance of the same node stays in its object store
        self.placement = self  # where an export is headed: the destination's handle (Ray moves the pages)

    @property
    def kv_bytes_per_page(self) -> int:
        return 2 * self.shape.page_size * self.config.head_dim * self.kv_itemsize

    def _call(self, method: str, *args):
        ray = _ray()
        return ray.get(getattr(self.actor, method).remote(*args))

    def prefill(self, rows):
        return self._call("prefill", rows)

    def decode(self, rows):
        return self._call("decode", rows)

    def encode(self, items):
        return self._call("encode", items)

    def warmup(self) -> None:
        self._call("warmup")

    def copy_pages(self, src, dst) -> None:
        self._call("copy_pages", src, dst)

    def export_pages(self, ids, destination):
        """A reference to the pages in the source node's object store (`destination` is only the engine's
        in-process form; Ray finds the way)."""
        ray = _ray()
        done, data = self.actor.export_pages.options(num_returns=2).remote(ids)
        ray.get(done)  # raises here, in the source's step, if the source failed
        return data

    def import_pages(self, ids, data) -> None:
        ray = _ray()
        if not isinstance(data, ray.ObjectRef):  # pages from this process (a served context): send them as numpy
            data = tuple(np.asarray(x) for x in data)
        self._call("import_pages", ids, data)

    def close(self) -> None:
        ray = _ray()
        try:
            ray.kill(self.actor)
        except Exception:  # already gone with its node, or Ray itself is down: nothing left to free
            pass


def _same_endpoint(a: str, b: str) -> bool:
    """host:port a and b name the same address (host names resolved)."""
    try:
        (ha, _, pa), (hb, _, pb) = a.rpartition(":"), b.rpartition(":")
        return pa == pb and socket.gethostbyname(ha.strip("[]")) == socket.gethostbyname(hb.strip("[]"))
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class RayFleet:
    """Where the instances run: the Ray cluster at `address` ("HOST:PORT", "auto", or "ray://HOST:PORT"), each
    instance on `devices_per_instance` units of `resource` ("auto": GPUs, else TPUs; "CPU" must be asked for)."""

    address: str
    resource: str = "auto"
    timeout_s: float = 300.0  # to reach the cluster and to start every actor

    def __post_init__(self):
        if self.resource != "auto" and self.resource not in RESOURCES:
            raise ValueError(f"resource must be 'auto' or one of {list(RESOURCES)}, got {self.resource!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    def connect(self) -> None:
        """Join the cluster at `address`, or keep this process's connection when it is to that cluster."""
        ray = _ray()
        host_port = self.address.removeprefix("ray://")
        if ray.is_initialized():
            connected = ray.get_runtime_context().gcs_address
            if self.address in ("auto", connected) or _same_endpoint(host_port, connected):
                return
            raise FleetError(f"this process is connected to the Ray cluster at {connected}, not {self.address}")
        if self.address != "auto":
            from moka_jax.cluster import ClusterError, wait_for_tcp

            try:
                wait_for_tcp(host_port, min(self.timeout_s, 30.0), what="the Ray cluster")
            except (ClusterError, ValueError) as e:
                raise FleetError(str(e)) from None
        ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)

    def pick_resource(self, nodes: list[dict], per_instance: int, instances: int) -> str:
        """The resource to place the instances on, checked against the live nodes: each instance needs
        `per_instance` units of it on one node."""
        def fits(res: str) -> int:
            return sum(int(n.get("Resources", {}).get(res, 0)) // per_instance for n in nodes)

        if self.resource == "auto":
            found = [r for r in ("GPU", "TPU") if fits(r)]
            if not found:
                raise FleetError(f"the Ray cluster at {self.address} has no node with {per_instance} GPU or TPU "
                                 f"device(s) ({len(nodes)} live node(s)); start its nodes with their devices, or "
                                 "place the instances on CPU devices (resource 'CPU', --ray-resource CPU)")
            res = found[0]
        else:
            res = self.resource
        if fits(res) < instances:
            per_node = [int(n.get("Resources", {}).get(res, 0)) for n in nodes]
            raise FleetError(f"the Ray cluster at {self.address} has room for {fits(res)} instance(s) of "
                             f"{per_instance} {res} device(s) (its live nodes have {per_node} {res}); "
                             f"{instances} were asked for")
        return res

    def start(self, config: ModelConfig, params, shape: ExecutorShape, instances: int, devices_per_instance: int,
              modalities: Mapping | None = None, moka=None) -> list[RemoteExecutor]:
        """One actor per instance, spread over the nodes; returns once every actor holds its weights."""
        ray = _ray()
        self.connect()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = self.pick_resource(nodes, devices_per_instance, instances)
        options: dict = dict(scheduling_strategy="SPREAD", max_restarts=0, max_concurrency=1)
        if res == "CPU":
            env = {"JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_instance}"}
            for name in ("JAX_DISABLE_MOST_OPTIMIZATIONS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION"):
                if name in os.environ:  # the engine's numerics settings hold in its actors too
                    env[name] = os.environ[name]
            options.update(num_cpus=devices_per_instance, runtime_env={"env_vars": env})
        elif res == "GPU":
            options.update(num_cpus=0, num_gpus=devices_per_instance)
        else:
            options.update(num_cpus=0, resources={res: devices_per_instance})
        host = jax.tree.map(np.asarray, params)  # once into the object store, shared by the actors of a node
        ref = ray.put(host)
        actor_cls = ray.remote(InstanceActor)
        actors = [actor_cls.options(**options).remote(config, ref, shape, devices_per_instance, modalities, moka)
                  for _ in range(instances)]
        try:
            described = ray.get([a.describe.remote() for a in actors], timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            for a in actors:
                ray.kill(a)
            raise FleetError(f"{instances} instance actor(s) on {res} did not start within {self.timeout_s:g} s on "
                             f"the Ray cluster at {self.address}") from None
        except Exception:
            for a in actors:
                ray.kill(a)
            raise
        return [RemoteExecutor(a, config, shape, *d) for a, d in zip(actors, described, strict=True)]
