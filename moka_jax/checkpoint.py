"""Training checkpoints (Orbax) and adapter export (safetensors + JSON), with checks that name what does not fit.

A training checkpoint holds the trainable state (adapters + projectors), the optimizer state and the data
iterator's state, so a resumed run continues exactly where it stopped. The frozen base is not in it: it is
rebuilt from its own checkpoint. An exported adapter is what a user ships: `adapter_model.safetensors` (every
trainable tensor under its param path) and `adapter_config.json` (the MokAConfig and the shapes it was trained on).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from kvzip_jax.models.safetensors_index import place_tensors
from kvzip_jax.sharding import path_str
from moka_jax.cluster import host_copy
from moka_jax.config import MokAConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _manager(directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.abspath(directory),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))


def save_training(directory: str, step: int, trainable: nnx.State, opt_state, data_state: dict) -> None:
    import orbax.checkpoint as ocp

    manager = _manager(directory)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
        data=ocp.args.JsonSave(data_state)))
    manager.wait_until_finished()


def latest_step(directory: str) -> int | None:
    return _manager(directory).latest_step() if os.path.isdir(directory) else None


def restore_training(directory: str, trainable: nnx.State, opt_state, step: int | None = None):
    """(step, trainable, opt_state, data_state) of the latest (or the given) checkpoint; `trainable` and
    `opt_state` are targets with the right structure (a fresh run's initial values)."""
    import orbax.checkpoint as ocp

    manager = _manager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no training checkpoint in {directory}")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"trainable": trainable, "opt_state": opt_state}),
            data=ocp.args.JsonRestore()))
    except ValueError as e:  # Orbax names the mismatch (shapes, or the tree) but not the checkpoint
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"the training checkpoint {directory} (step {step}) does not fit this run's state: {first} "
                         "(it was written for another model, method or adapter size; resume with the settings it "
                         "was written with, or train in another directory)") from e
    return step, restored["state"]["trainable"], restored["state"]["opt_state"], restored["data"]


def _flat(state) -> dict[str, np.ndarray]:
    """Host copies by param path (arrays replicated over many processes read from this process's copy)."""
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(host_copy(state))}


def save_state(path: str, state) -> None:
    """A param State as one safetensors file (tensors named by param path)."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(_flat(state), path)


def load_state(path: str, target):
    """`target` (a State of the right structure) filled from `save_state`'s file; a mismatch names the tensor."""
    from safetensors.numpy import load_file

    return place_tensors(load_file(path), target)


def save_adapter(directory: str, trainable: nnx.State, moka: MokAConfig, **extra) -> None:
    """Write the trainable tensors and the adapter config (plus `extra` JSON-able facts, e.g. the base model)."""
    os.makedirs(directory, exist_ok=True)
    save_state(os.path.join(directory, ADAPTER_WEIGHTS), trainable)
    shapes = {k: list(v) for k, v in _flat_shapes(trainable).items()}  # from the arrays' shapes: no second copy
    config = {"moka": dataclasses.asdict(moka), "shapes": shapes, **extra}
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter_config(directory: str) -> MokAConfig:
    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        saved = json.load(f)["moka"]
    for key in ("modalities", "query_modalities"):
        if saved.get(key) is not None:
            saved[key] = tuple(saved[key])
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = tuple(saved["target_modules"])
    if isinstance(saved.get("cross_attn_weight"), list):
        saved["cross_attn_weight"] = tuple(tuple(kv) for kv in saved["cross_attn_weight"])
    return MokAConfig(**saved)


def load_adapter(directory: str, target: nnx.State, moka: MokAConfig) -> nnx.State:
    """The exported tensors placed into `target` (the trainable state of the model they are loaded into). An
    adapter for another modality list, method or rank, or for another model's shapes, is an error naming it."""
    from safetensors.numpy import load_file

    saved = load_adapter_config(directory)
    for field in ("method", "modalities", "text_modality", "rank"):
        if getattr(saved, field) != getattr(moka, field):
            raise ValueError(f"the adapter in {directory} has {field}={getattr(saved, field)!r}; the model is "
                             f"adapted with {field}={getattr(moka, field)!r}")
    loaded = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    wanted = set(_flat_shapes(target))
    unexpected = sorted(set(loaded) - wanted)
    if unexpected:
        raise ValueError(f"the adapter in {directory} has {len(unexpected)} tensors this model does not have, "
                         f"e.g. {unexpected[0]}")
    return place_tensors(loaded, target)


def _flat_shapes(state) -> dict[str, tuple[int, ...]]:
    return {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(state)}
