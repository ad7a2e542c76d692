"""What a Pallas kernel asks of the hardware, read from its jaxpr without a device.

`pallas_calls(fn, *args)` traces `fn` (arrays or `jax.ShapeDtypeStruct`s, so real-size shapes cost nothing) and
returns one `PallasCallInfo` per `pallas_call` in it: the grid and its step count, the bytes of the scalar-prefetch
operands (SMEM on TPU), and the operand shapes of every matmul inside the kernel body (loops and branches
included). The lowering tests assert the hardware's limits on these numbers; tracing is not compiling.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr


@dataclasses.dataclass(frozen=True)
class PallasCallInfo:
    name: str
    grid: tuple[int, ...]
    scalar_prefetch_bytes: int
    dot_operands: tuple  # (lhs, rhs) avals of each dot_general
    dot_precisions: tuple  # the `precision` parameter of each dot_general (None: the platform's default)

    @property
    def grid_steps(self) -> int:
        return math.prod(self.grid)


def lowered_text(fn, *args, platform: str) -> str:
    """The StableHLO of `fn` lowered for `platform` ("cuda" | "tpu") on this host, lower-cased: the real Triton /
    Mosaic lowering runs (block-shape rules, supported ops), their compilers do not. Skips the test when this
    jaxlib was built without that platform's lowering."""
    try:
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
    except (ImportError, NotImplementedError) as err:
        pytest.skip(f"no {platform} lowering in this jaxlib: {err}")
    return lowered.as_text().lower()


def _sub_jaxprs(value):
    if isinstance(value, ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in its equations' parameters, depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from _eqns(sub)


def _dots(kernel_jaxpr):
    return [e for e in _eqns(kernel_jaxpr) if e.primitive.name == "dot_general"]


def pallas_calls(fn, *args, **kwargs) -> list[PallasCallInfo]:
    closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
    infos = []
    for eqn in _eqns(closed.jaxpr):
        if eqn.primitive.name != "pallas_call":
            continue
        mapping = eqn.params["grid_mapping"]
        prefetch = eqn.invars[: mapping.num_index_operands]
        prefetch_bytes = sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize for v in prefetch)
        kernel = eqn.params["jaxpr"]
        dots = _dots(getattr(kernel, "jaxpr", kernel))
        name = getattr(eqn.params.get("name_and_src_info"), "name", "") or str(eqn.params.get("name", ""))
        infos.append(PallasCallInfo(
            name=name, grid=tuple(int(x) for x in mapping.grid), scalar_prefetch_bytes=int(prefetch_bytes),
            dot_operands=tuple((e.invars[0].aval, e.invars[1].aval) for e in dots),
            dot_precisions=tuple(e.params.get("precision") for e in dots),
        ))
    return infos
