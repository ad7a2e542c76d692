"""Fused flash-attention forward for float32 on x86-64 CPUs: an XLA FFI custom call built from C++ on first use.

XLA:CPU has no fused attention: jnp attention materialises the [T, S] logits, which for long encoder sequences
(Whisper's 1,500 frames) makes attention memory-bound. `csrc/cpu_attention.cc` runs an online-softmax (flash)
forward with AVX2 + FMA micro-kernels over key blocks, so no [T, S] array exists.

The library is compiled the first time `cpu_attention_available()` (or `fused_attention_cpu`) is called, with
`$CXX` (else `c++`), into a cache folder (`$KVZIP_KERNELS_CACHE`, else `$XDG_CACHE_HOME/kvzip_kernels`, else
`~/.cache/kvzip_kernels`), under a name keyed by the source, the flags and jax's version, so a changed source or
jax rebuilds and an unchanged one loads the cached file. Any failure (no compiler, a build error, a CPU without
AVX2/FMA) makes `cpu_attention_available()` False with one warning saying why; importing never raises.
`KVZIP_KERNELS_NO_CPU_ATTENTION=1` turns it off (no build, no warning): callers then take their jnp path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET_NAME = "kvzip_cpu_attention_f32"
_SYMBOL = "KvzipCpuAttentionF32"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_attention.cc"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx2", "-mfma", "-pthread")
MAX_HEAD_DIM = 256

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once decided; "lib": the loaded CDLL (kept alive); "reason": str


def _cache_dir() -> Path:
    if os.environ.get("KVZIP_KERNELS_CACHE"):
        return Path(os.environ["KVZIP_KERNELS_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "kvzip_kernels"
    return Path.home() / ".cache" / "kvzip_kernels"


def _cpu_supported() -> tuple[bool, str]:
    """Whether the CPU has AVX2 and FMA. Linux reads /proc/cpuinfo; elsewhere the answer is "try": an x86-64
    machine builds and loads, and the kernel is only run when that succeeded."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "x64"):
        return False, f"the CPU is {machine!r}, not x86-64 (the kernel uses AVX2 and FMA intrinsics)"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True, ""
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            missing = [f for f in ("avx2", "fma") if f not in flags]
            if missing:
                return False, f"the CPU lacks {' and '.join(missing)}"
            return True, ""
    return True, ""


def _library_path(compiler: str, flags: tuple[str, ...]) -> Path:
    digest = hashlib.sha256()
    digest.update(_SOURCE.read_bytes())
    digest.update("\0".join((compiler, *flags)).encode())
    digest.update(jax.__version__.encode())
    digest.update(jaxlib.__version__.encode())  # the FFI headers compiled against come from jaxlib
    return _cache_dir() / f"cpu_attention_{digest.hexdigest()[:24]}.so"


def _build() -> ctypes.CDLL:
    """Compile (unless cached) and load the library; raises RuntimeError with the reason otherwise."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set $CXX)")
    flags = (*_FLAGS, f"-I{jax.ffi.include_dir()}")
    target = _library_path(compiler, flags)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name in the same folder, then an atomic rename: concurrent builders (pytest-xdist
        # workers) never load a half-written file, and the last rename wins with identical content.
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise RuntimeError(f"compiling {_SOURCE.name} failed (exit {proc.returncode}):\n{tail}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    if not lib.KvzipCpuAttentionCpuSupported():  # the library's own check (cpuid), where /proc/cpuinfo is absent
        raise RuntimeError("the CPU lacks AVX2 or FMA")
    return lib


def _ensure_loaded() -> bool:
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        ok, reason = _cpu_supported()
        if ok:
            try:
                lib = _build()
                jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(getattr(lib, _SYMBOL)), platform="cpu")
                _state["lib"] = lib
            except Exception as e:  # any failure means "not available", never an import-time or call-site crash
                ok, reason = False, f"{type(e).__name__}: {e}"
        _state["ok"] = ok
        if not ok:
            _state["reason"] = reason
            warnings.warn(f"kvzip_kernels.cpu_attention: the fused CPU attention is unavailable: {reason}",
                          RuntimeWarning, stacklevel=3)
        return ok


DISABLE_ENV = "KVZIP_KERNELS_NO_CPU_ATTENTION"


def cpu_attention_available() -> bool:
    """True when the fused kernel is built and loaded (building it on the first call) and the CPU has AVX2 and
    FMA. False, with one warning per process saying why, otherwise; False without a word when $DISABLE_ENV is set
    to anything but "" or "0" (read on every call; jitted callers read it when they trace)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    return _ensure_loaded()


def _check(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"fused_attention_cpu: {name} must have rank 4 ([B, N, T|S, D]), got shape {x.shape}")
        if x.dtype != jnp.float32:
            raise ValueError(f"fused_attention_cpu: {name} must be float32, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"fused_attention_cpu: k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"fused_attention_cpu: q {q.shape} and k {k.shape} must agree in B, N and D")
    d = q.shape[3]
    if d % 8 != 0 or d > MAX_HEAD_DIM or d == 0:
        raise ValueError(f"fused_attention_cpu: head size D={d} must be a positive multiple of 8 and at most "
                         f"{MAX_HEAD_DIM}")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError("fused_attention_cpu: S=0 keys; at least 1 is needed")


def fused_attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v, no mask, in float32: q [B, N, T, D], k, v [B, N, S, D] -> [B, N, T, D].

    Raises ValueError (naming the value and the limit) for a dtype other than float32, D not a multiple of 8 or
    above 256, or mismatched ranks and shapes; RuntimeError when the kernel is unavailable (see
    `cpu_attention_available`). Works eagerly and under jit, on the CPU backend."""
    q, k, v = (x if hasattr(x, "dtype") and hasattr(x, "ndim") else jnp.asarray(x) for x in (q, k, v))
    _check(q, k, v)
    if not _ensure_loaded():
        raise RuntimeError(f"fused_attention_cpu: the kernel is unavailable: {_state.get('reason')}")
    if q.size == 0:
        return jnp.zeros(q.shape, jnp.float32)
    # vmap runs the call once per mapped element (the kernel already spreads B x N heads over the cores).
    call = jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k, v, scale=np.float32(scale))
