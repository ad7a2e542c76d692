"""`moka-jax train` over many processes (multi-controller JAX): real local clusters of `moka-jax train` processes on
127.0.0.1, each with its own CPU devices, started and stopped here.

- 2 processes x 4 devices train like 1 process x 8 devices: the same losses and adapter weights, to float32
  rounding (the gradient all-reduce runs over gloo between processes, in-process otherwise).
- Both processes killed (SIGKILL) after a checkpoint and started again: they resume from it and end bit-identical
  to an uninterrupted run; resumed by one process of 8 devices instead, it ends within float32 rounding of it.
- Bad cluster settings: a clear error in bounded time.

The cluster runs take minutes on 2 cores, so they are marked `slow`: `make test-cluster` runs them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from moka_jax import cli, data
from moka_jax.cluster import ClusterConfig

# tiny stages: the point is the cluster, not the model
TRAIN = ["--method", "moka", "--encoder-steps", "2", "--encoder-samples", "128", "--align-steps", "2",
         "--batch-size", "8", "--checkpoint-every", "4"]
STEPS = 12
LOSS_RTOL = 1e-5  # measured 3e-6: float32 sums in another order (gloo between processes, in-process otherwise)
WEIGHT_ATOL = 2e-5  # measured 3.7e-6 after 8 steps, weights up to 0.09


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    # each process gets its devices from --cpu-devices, not from the test session's forced 8
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def start(work: str, *, processes: int, devices: int, steps: int = STEPS) -> list[subprocess.Popen]:
    argv = [sys.executable, "-m", "moka_jax.cli", "train", "--work", work, *TRAIN, "--steps", str(steps),
            "--cpu-devices", str(devices)]
    if processes > 1:
        argv += ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(processes),
                 "--cluster-timeout", "60"]
    return [subprocess.Popen(argv + (["--process-id", str(i)] if processes > 1 else []), env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]


def finish(procs: list[subprocess.Popen], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, f"a training process exited with {p.returncode}:\n{out[-3000:]}"
    finally:
        kill(procs)


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)


def run_dir(work) -> str:
    return os.path.join(work, "moka-seed0")


def losses(work) -> dict[int, float]:
    with open(os.path.join(run_dir(work), "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def adapter(work) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(run_dir(work), "adapter", "adapter_model.safetensors"))


def assert_same_adapter(work, reference, atol: float = 0.0) -> None:
    """The two runs' exported adapters: the same tensors, equal within `atol` (0: bit for bit)."""
    got, want = adapter(work), adapter(reference)
    assert got.keys() == want.keys() and len(want) > 0
    for name in want:
        if atol:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def checkpoint_steps(work) -> list[int]:
    folder = os.path.join(run_dir(work), "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


@pytest.fixture(scope="module")
def two_by_four(tmp_path_factory):
    """An uninterrupted run of 2 processes x 4 devices; it also trains the shared stages 0-1 (`base/`)."""
    work = str(tmp_path_factory.mktemp("cluster") / "two_by_four")
    finish(start(work, processes=2, devices=4))
    return work


def with_base(work_from: str, work: str) -> str:
    import shutil

    shutil.copytree(os.path.join(work_from, "base"), os.path.join(work, "base"))
    return work


@pytest.mark.slow
def test_two_processes_of_four_devices_train_like_one_of_eight(two_by_four, tmp_path):
    one_by_eight = with_base(two_by_four, str(tmp_path / "one_by_eight"))
    finish(start(one_by_eight, processes=1, devices=8))
    a, b = losses(two_by_four), losses(one_by_eight)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=LOSS_RTOL)
    assert a[STEPS] < a[1]  # it trains
    assert_same_adapter(one_by_eight, two_by_four, atol=WEIGHT_ATOL)


def interrupted_run(two_by_four: str, work: str) -> str:
    """A 2 x 4 run killed (SIGKILL, both processes) once its first checkpoint is on disk."""
    work = with_base(two_by_four, work)
    procs = start(work, processes=2, devices=4)
    deadline = time.monotonic() + 300
    try:
        while not checkpoint_steps(work):
            assert all(p.poll() is None for p in procs), "a process exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in 300 s"
            time.sleep(0.05)
    finally:
        kill(procs)
    kept = checkpoint_steps(work)
    assert kept and kept[-1] < STEPS, f"the run was not interrupted (checkpoints {kept})"
    assert not os.path.exists(os.path.join(run_dir(work), "adapter"))
    return work


@pytest.mark.slow
def test_both_processes_killed_after_a_checkpoint_resume_bit_identically(two_by_four, tmp_path):
    work = interrupted_run(two_by_four, str(tmp_path / "killed"))
    finish(start(work, processes=2, devices=4))
    assert_same_adapter(work, two_by_four)
    assert losses(work)[STEPS] == losses(two_by_four)[STEPS]


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_in_one(two_by_four, tmp_path):
    work = interrupted_run(two_by_four, str(tmp_path / "regrouped"))
    finish(start(work, processes=1, devices=8))
    assert_same_adapter(work, two_by_four, atol=WEIGHT_ATOL)


def test_a_missing_process_ends_the_job_in_bounded_time_with_the_count_named(tmp_path):
    """One process of a job of 2 waits `--cluster-timeout` seconds for the other, then ends (JAX terminates it)."""
    port = free_port()
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "moka_jax.cli", "train", "--work", str(tmp_path), *TRAIN,
                          "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0",
                          "--cluster-timeout", "3"], env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert time.monotonic() - t0 < 60
    assert f"waiting up to 3 s for all 2 processes at 127.0.0.1:{port}" in out.stderr


def test_an_unreachable_coordinator_is_a_clear_error(tmp_path, capsys):
    port = free_port()  # nobody listens there
    t0 = time.monotonic()
    assert cli.main(["train", "--work", str(tmp_path), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                     "--process-id", "1", "--cluster-timeout", "1"]) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert f"the coordinator at 127.0.0.1:{port} cannot be reached within 1 s" in err and err.count("\n") == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(coordinator="127.0.0.1:1", num_processes=2), "needs coordinator, num_processes and process_id together"),
    (dict(coordinator="127.0.0.1:1", num_processes=2, process_id=2), "process_id must be in [0, 2)"),
    (dict(coordinator="127.0.0.1:1", num_processes=0, process_id=0), "num_processes must be >= 1, got 0"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator="h:70000", num_processes=2, process_id=0), "got 'h:70000'"),
    (dict(auto=True, num_processes=2), "auto cluster detection takes no"),
    (dict(cpu_devices=0), "cpu_devices must be >= 1, got 0"),
    (dict(timeout_s=0), "timeout_s must be >= 1, got 0"),
])
def test_bad_cluster_settings_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=None) as e:
        ClusterConfig(**kwargs)
    assert message in str(e.value)


def test_the_cli_refuses_bad_cluster_flags_before_loading_anything(capsys):
    assert cli.main(["train", "--work", "W", "--coordinator", "127.0.0.1:5", "--num-processes", "2",
                     "--process-id", "5"]) == 2
    assert "process_id must be in [0, 2) for num_processes=2, got 5" in capsys.readouterr().err


def test_a_batch_that_does_not_split_over_the_devices_is_refused_before_training(tmp_path, capsys):
    import jax

    assert cli.main(["train", "--work", str(tmp_path), "--batch-size", "12"]) == 2
    err = capsys.readouterr().err
    assert f"--batch-size 12 does not split over the job's {jax.device_count()} devices" in err


def _batches(process_index: int, process_count: int, n: int, state=None):
    ds = data.make_dataset(seed=3, num_samples=64, batch_size=8, seq_len=128, n_image_tokens=4, n_audio_tokens=4,
                           num_epochs=None, process_index=process_index, process_count=process_count)
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return [next(it) for _ in range(n)], it.get_state()


def test_processes_read_disjoint_slices_that_make_the_single_process_batches():
    whole, _ = _batches(0, 1, 10)  # 10 batches of 8 from 64 samples: crosses an epoch
    parts = [_batches(p, 4, 10)[0] for p in range(4)]
    for i, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([part[i][key] for part in parts]), batch[key])


def test_an_iterator_state_resumes_on_another_process_count():
    _, state = _batches(1, 2, 3)  # process 1 of 2, after 3 batches
    after, _ = _batches(0, 1, 2, state=state)  # resumed by a single process
    expected, _ = _batches(0, 1, 5)
    for got, want in zip(after, expected[3:], strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(batch_size=8, process_count=3, process_index=0), "batch_size=8 must split evenly over process_count=3"),
    (dict(batch_size=8, process_count=2, process_index=2), "process_index=2 must be in [0, 2)"),
    (dict(batch_size=8, process_count=2, process_index=0, num_epochs=1, num_samples=60),
     "1 epoch(s) of 60 samples do not fill whole batches of 8 over 2 processes"),
])
def test_bad_process_slices_are_refused(kwargs, message):
    args = dict(seed=0, num_samples=64, seq_len=128, n_image_tokens=4, n_audio_tokens=4) | kwargs
    with pytest.raises(ValueError) as e:
        data.make_dataset(**args)
    assert message in str(e.value)
