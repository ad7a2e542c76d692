"""Reading HF safetensors checkpoints by name: which file holds each tensor (single file or sharded index), and
filling a param State from tensors named by rules, with clear errors for missing, misshapen or unused tensors.
The decoder's loader (`hf_io`) and the encoders' and projectors' loaders all read through here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open

from kvzip_jax.sharding import DEFAULT_RULES, AxesTable, path_str, sharding_for

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as the config describes."""


class TensorIndex:
    """Which file holds each tensor, with clear errors for missing or corrupt shards."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, INDEX_FILE)
        single_path = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path} is not a valid safetensors index: {e}") from e
        elif os.path.exists(single_path):
            weight_map = {name: SINGLE_FILE for name in self._keys(single_path)}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
        for shard in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(path, shard)):
                raise CheckpointError(f"shard {shard} named in {INDEX_FILE} is missing from {path}")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    @staticmethod
    def _keys(file: str) -> list[str]:
        try:
            with safe_open(file, framework="numpy") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read safetensors file {file}: {e}") from e

    def subset(self, keep: Callable[[str], bool]) -> TensorIndex:
        """The same files, showing only the tensors `keep` accepts: one part of a multimodal checkpoint (its text
        model) then loads with the checks that every shown tensor is used."""
        view = object.__new__(TensorIndex)
        view.path, view._handles = self.path, self._handles
        view.weight_map = {name: file for name, file in self.weight_map.items() if keep(name)}
        return view

    def resolve(self, name: str, prefixes: tuple[str, ...]) -> str | None:
        for prefix in prefixes:
            if prefix + name in self.weight_map:
                return prefix + name
        return None

    def get(self, full_name: str) -> np.ndarray:
        shard = self.weight_map[full_name]
        file = os.path.join(self.path, shard)
        try:
            if shard not in self._handles:
                self._handles[shard] = safe_open(file, framework="numpy")
            return self._handles[shard].get_tensor(full_name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {full_name} from shard {file}: {e}") from e


def np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype).name)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Our param path <- HF tensor name (after the prefix; '{i}' marks per-layer tensors), with a layout fix."""

    ours: str
    hf: str
    fn: Callable[[np.ndarray], np.ndarray] | None = None


def transposed(a: np.ndarray) -> np.ndarray:
    return a.T


def open_index(path: str | os.PathLike) -> tuple[str, TensorIndex]:
    path = os.fspath(path)
    directory = os.path.dirname(path) if os.path.isfile(path) else path
    return directory, TensorIndex(directory)


def find_prefix(index: TensorIndex, prefix: str | None, candidates: Sequence[str], probe: str) -> str:
    if prefix is not None:
        if prefix + probe not in index.weight_map:
            raise CheckpointError(f"checkpoint {index.path} lacks tensor {prefix + probe}")
        return prefix
    for p in candidates:
        if p + probe in index.weight_map:
            return p
    raise CheckpointError(
        f"checkpoint {index.path} has no tensor {probe} under any known prefix ("
        + ", ".join(repr(p) for p in candidates)
        + "); pass prefix="
    )


def load_tensors(
    index: TensorIndex,
    rules: Sequence[TensorRule],
    abstract: nnx.State,
    *,
    prefix: str,
    num_layers: int = 0,
    owned: Sequence[str] = (),
    ignored: Sequence[str] = (),
    mesh: Mesh | None = None,
    axes: AxesTable | None = None,
    mesh_rules=DEFAULT_RULES,
) -> nnx.State:
    """Fill `abstract` (whose dtype is the target) from the tensors named by `rules` under `prefix`. A missing
    tensor, a wrong shape, or an unused tensor under prefix + one of `owned` raises CheckpointError.

    With a `mesh`, each tensor goes straight onto its sharding, from the family's logical-axes table `axes`."""
    if mesh is not None and axes is None:
        raise ValueError("loading onto a mesh needs the model family's logical-axes table (axes=)")
    loaded: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for rule in rules:
        names = [rule.hf.format(i=i) for i in range(num_layers)] if "{i}" in rule.hf else [rule.hf]
        missing = [prefix + n for n in names if prefix + n not in index.weight_map]
        if missing:
            raise CheckpointError(
                f"checkpoint {index.path} lacks tensor {missing[0]} needed by the config"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        arrays = [index.get(prefix + n) for n in names]
        if rule.fn is not None:
            arrays = [rule.fn(a) for a in arrays]
        loaded[rule.ours] = np.stack(arrays) if "{i}" in rule.hf else arrays[0]
        used.update(prefix + n for n in names)
    unexpected = [
        n
        for n in index.weight_map
        if n not in used and n.startswith(tuple(prefix + o for o in owned)) and n[len(prefix) :] not in ignored
    ]
    if unexpected:
        raise CheckpointError(
            f"checkpoint {index.path} has {len(unexpected)} tensors the config does not use, e.g. {unexpected[0]}"
            " (is config.json the one saved with these weights?)"
        )

    return place_tensors(loaded, abstract, mesh=mesh, axes=axes, mesh_rules=mesh_rules)


def place_tensors(
    loaded: dict[str, np.ndarray], abstract: nnx.State, *, mesh: Mesh | None = None, axes: AxesTable | None = None,
    mesh_rules=DEFAULT_RULES,
) -> nnx.State:
    """`abstract` filled from `loaded` (our param path -> array), each cast to the leaf's dtype and, with a mesh,
    put straight onto its sharding (`axes`: the model family's logical-axes table). A param with no tensor, or a
    tensor of the wrong shape, raises CheckpointError naming it."""

    def fill(key_path, leaf):
        name = path_str(key_path)
        if name not in loaded:
            raise CheckpointError(f"no checkpoint tensor maps to parameter {name}")
        array = loaded[name]
        if tuple(array.shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"tensor for {name} has shape {tuple(array.shape)} but the config expects {tuple(leaf.shape)}"
            )
        array = np.ascontiguousarray(array).astype(np_dtype(leaf.dtype))
        if mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, sharding_for(name, array.shape, mesh, mesh_rules, axes))

    return jax.tree_util.tree_map_with_path(fill, abstract)
