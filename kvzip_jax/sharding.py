"""One mesh convention for the library: Auto axis types, logical axis names on params and caches, one rules table.

A logical axis maps to a mesh axis only when the dimension divides evenly; otherwise that dimension is
replicated (e.g. 2 kv heads on an 8-way model axis), which is always correct.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis (None = replicated). Caches shard over kv heads first.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("layers", None),
    ("length", None),
    ("head_dim", None),
    ("norm", None),
)

# Param path (joined with '/') -> logical axes. The first matching pattern wins.
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"^embed$", ("vocab", "embed")),
    (r"^lm_head$", ("embed", "vocab")),
    (r"^final_norm/scale$", ("norm",)),
    (r"attn/q_proj/kernel$", ("layers", "embed", "heads")),
    (r"attn/(k|v)_proj/kernel$", ("layers", "embed", "kv_heads")),
    (r"attn/o_proj/kernel$", ("layers", "heads", "embed")),
    (r"attn/q_proj/bias$", ("layers", "heads")),
    (r"attn/(k|v)_proj/bias$", ("layers", "kv_heads")),
    (r"attn/o_proj/bias$", ("layers", "embed")),
    (r"mlp/(gate|up)_proj/kernel$", ("layers", "embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"mlp/(gate|up)_proj/bias$", ("layers", "mlp")),
    (r"mlp/down_proj/bias$", ("layers", "embed")),
    (r"norm/scale$", ("layers", "norm")),
)


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh with Auto axis types (GSPMD style, see research notes: pick one mode)."""
    devices = list(devices if devices is not None else jax.devices())
    if model is None:
        model = len(devices) // data
    if data * model > len(devices) or data < 1 or model < 1:
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; {len(devices)} available")
    grid = np.array(devices[: data * model]).reshape(data, model)
    auto = (jax.sharding.AxisType.Auto,) * 2
    return Mesh(grid, ("data", "model"), axis_types=auto)


# A table of (param path pattern, logical axes): PARAM_LOGICAL_AXES for the decoder; each encoder and projector
# family defines its own next to its module (their param paths differ), and passes it as `table`.
AxesTable = tuple[tuple[str, tuple[str | None, ...]], ...]


def logical_axes_for(path: str, table: AxesTable = PARAM_LOGICAL_AXES) -> tuple[str | None, ...]:
    for pattern, axes in table:
        if re.search(pattern, path):
            return axes
    raise KeyError(f"no logical axes known for parameter {path!r}")


def spec_for(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    parts: list[str | None] = []
    for name, dim in zip(logical, shape, strict=True):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            parts.append(None)
        else:
            parts.append(axis)
            used.add(axis)
    return PartitionSpec(*parts)


def sharding_for(
    path: str, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES, table: AxesTable = PARAM_LOGICAL_AXES
) -> NamedSharding:
    axes = logical_axes_for(path, table)
    if len(axes) != len(shape):  # a pattern written for a stacked param matched an unstacked one, or the reverse
        raise ValueError(f"parameter {path!r} has shape {tuple(shape)} but its logical axes are {axes}")
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))


def path_str(key_path) -> str:
    """'layers/attn/q_proj/kernel' from a jax key path over an nnx.State."""
    parts = []
    for k in key_path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if name in ("value", "raw_value"):
            continue
        parts.append(str(name))
    return "/".join(parts)


def shard_params(params, mesh: Mesh, rules=DEFAULT_RULES, table: AxesTable = PARAM_LOGICAL_AXES):
    """Place every param on the mesh by its logical axes (`table`: the model family's, the decoder's by default)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, sharding_for(path_str(p), x.shape, mesh, rules, table)), params
    )


def cache_sharding(cache, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a DenseKVCache: batch over data, kv heads over model (when they divide)."""
    kv_axes = ("layers", "batch", "kv_heads", "length", "head_dim")
    kv = NamedSharding(mesh, spec_for(kv_axes, cache.k.shape, mesh, rules))
    length = NamedSharding(mesh, spec_for(("batch",), cache.length.shape, mesh, rules))
    return type(cache)(k=kv, v=kv, length=length)
