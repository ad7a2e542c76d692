"""One training job over many processes (multi-controller JAX): `jax.distributed` joins them, one global mesh
spans every process's devices, and each process feeds only its own rows of every batch.

A process per host, as on a TPU pod slice or a GPU cluster; on one CPU box the tests start several processes, each
with its own CPU devices (`cpu_devices`), whose collectives go over gloo. Data parallel: the trainable state is
replicated, every batch is split over the mesh's "data" axis, and XLA inserts the gradient all-reduce. The global
batch of step i is the same rows in the same order whatever the process count (`data.make_dataset`'s
`process_index` / `process_count`), so 2 processes x 4 devices train like 1 process x 8 devices.

What JAX does not let us catch: when the processes that registered with the coordinator are fewer than
`num_processes` when `timeout_s` runs out, JAX's distributed service terminates the process (a fatal error from
C++, DEADLINE_EXCEEDED). So `initialize` says on stderr what it waits for before it waits, and a process that
cannot reach the coordinator at all gets a Python error after `timeout_s` instead (a TCP probe first).
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kvzip_jax.sharding import make_mesh

DEFAULT_TIMEOUT_S = 120


class ClusterError(RuntimeError):
    """The processes of a job cannot form the cluster they were told to form."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How this process joins its job. All None (the default): one process, nothing to join.

    coordinator: "host:port" of process 0's coordination service; num_processes, process_id: this job's size and
    this process's rank. `auto=True` leaves all three to JAX's cluster detection (SLURM, Open MPI, Kubernetes, TPU
    pods). cpu_devices: CPU devices this process exposes (CPU only; default: the platform's). timeout_s: how long
    every process waits for the others.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    cpu_devices: int | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if self.auto and any(v is not None for v in explicit):
            raise ValueError("auto cluster detection takes no coordinator, num_processes or process_id")
        if not self.auto and any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise ValueError(f"a multi-process job needs coordinator, num_processes and process_id together, got "
                             f"coordinator={self.coordinator!r}, num_processes={self.num_processes}, "
                             f"process_id={self.process_id}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}) for num_processes="
                             f"{self.num_processes}, got {self.process_id}")
        if self.coordinator is not None:
            coordinator_host_port(self.coordinator)
        if self.cpu_devices is not None and self.cpu_devices < 1:
            raise ValueError(f"cpu_devices must be >= 1, got {self.cpu_devices}")
        if self.timeout_s < 1:
            raise ValueError(f"timeout_s must be >= 1, got {self.timeout_s}")

    @property
    def multi_process(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1


def coordinator_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator must be host:port with a port in [1, 65535], got {address!r}")
    return host.strip("[]"), int(port)


def wait_for_tcp(address: str, timeout_s: float, what: str = "the coordinator") -> None:
    """Wait until `what` at HOST:PORT accepts TCP connections (it may start a little after this process): a clear
    error after `timeout_s` instead of a hang inside a client library."""
    host, port = coordinator_host_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ClusterError(f"{what} at {address} cannot be reached within {timeout_s:g} s "
                                   f"({e.strerror or e})") from None
            time.sleep(0.2)


def initialize(cluster: ClusterConfig) -> None:
    """Join the job (before any JAX computation in this process). One process: only `cpu_devices` applies."""
    if cluster.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cluster.cpu_devices)
    if not cluster.multi_process:
        return
    if not cluster.auto and cluster.process_id != 0:
        wait_for_tcp(cluster.coordinator, cluster.timeout_s)
    # CPU processes exchange their collectives over gloo; other platforms use their own (NCCL, ICI).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster.auto:
        print(f"joining the job found in the environment (timeout {cluster.timeout_s} s)", file=sys.stderr)
        jax.distributed.initialize(initialization_timeout=cluster.timeout_s)
        return
    print(f"process {cluster.process_id} of {cluster.num_processes}: waiting up to {cluster.timeout_s} s for all "
          f"{cluster.num_processes} processes at {cluster.coordinator}", file=sys.stderr, flush=True)
    jax.distributed.initialize(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                               process_id=cluster.process_id, initialization_timeout=cluster.timeout_s)
    if jax.process_count() != cluster.num_processes:  # cannot happen with explicit arguments; checked anyway
        raise ClusterError(f"the job has {jax.process_count()} processes, not num_processes={cluster.num_processes}")


def data_mesh() -> Mesh:
    """Every device of every process on the "data" axis (data parallel)."""
    return make_mesh(data=jax.device_count(), model=1)


def replicate(tree, mesh: Mesh):
    """The same value on every device of `mesh` (each process passes the same host values)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    # the global shape given, so that JAX need not ask the other processes for theirs
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x, x.shape), host_copy(tree))


def global_batch(tree, mesh: Mesh):
    """This process's rows of a batch (leading axis) -> global arrays split over the mesh's "data" axis."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * jax.process_count(), *x.shape[1:]))

    return jax.tree.map(one, tree)


def host_copy(tree):
    """Numpy copies of replicated (or single-process) arrays, readable on every process."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"an array of shape {x.shape} is split over processes; gather it first")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def is_primary() -> bool:
    """The process that writes files every process would write alike (exports, logs, plots)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process reaches `name` before any goes on (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def shutdown() -> None:
    if jax.process_count() > 1:
        jax.distributed.shutdown()

