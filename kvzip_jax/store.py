"""Persistence of compressed contexts: compress offline, answer later (possibly in another process).

Layout of a saved context directory::

    <dir>/arrays/      Orbax StandardCheckpointer tree: every PagedKVCache field + base_lengths/base_next_position
    <dir>/kvzip.json   format/version, ModelConfig, KVzipPrompt ids, headroom, ratio, level, MemoryReport,
                       array shapes/dtypes and an optional model fingerprint (written last: it marks completeness)

    save_compressed("ctx_dir", ctx, model_fingerprint={...})
    ctx = load_compressed("ctx_dir", config)     # config: the loaded model's, checked against the saved shape

Saving copies the cache to the host first and waits for Orbax to finish, so the live context is neither donated
nor deleted and can be asked further questions right away. A restored context holds bit-identical arrays and
therefore gives bit-identical answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from typing import Any

import jax
import numpy as np

from kvzip_jax.cache import PagedKVCache
from kvzip_jax.config import ModelConfig, RopeConfig
from kvzip_jax.kvzip.compressor import CompressedContext, MemoryReport
from kvzip_jax.kvzip.prompts import KVzipPrompt

FORMAT = "kvzip-jax/compressed-context"
FORMAT_VERSION = 1
METADATA_FILE = "kvzip.json"
ARRAYS_DIR = "arrays"
CACHE_FIELDS = tuple(f.name for f in dataclasses.fields(PagedKVCache))
# Config fields a compressed cache depends on: a model that differs in any of them cannot use the cache.
SHAPE_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "num_heads", "layer_types", "sliding_window")


# ------------------------------------------------------------------------------------------------ config <-> json
def _config_fields(config: ModelConfig) -> dict[str, Any]:
    """Every dataclass field, JSON-ready (the exact fallback when the HF dict does not round-trip)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "rope":
            value = [[kind, dataclasses.asdict(r)] for kind, r in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _config_from_fields(d: dict[str, Any]) -> ModelConfig:
    kw = dict(d)
    kw["rope"] = tuple((kind, RopeConfig(**r)) for kind, r in kw["rope"])
    for name in ("layer_types", "eos_token_ids"):
        kw[name] = tuple(kw[name])
    return ModelConfig(**kw)


def config_to_json(config: ModelConfig) -> dict[str, Any]:
    """{"hf": config.to_hf_dict()} when ``ModelConfig.from_hf_dict`` rebuilds an equal config from it (the usual
    case), plus the raw dataclass fields under "fields" when it does not."""
    hf = config.to_hf_dict()
    out: dict[str, Any] = {"hf": hf}
    try:
        with warnings.catch_warnings():  # e.g. "attn_logit_softcapping is ignored for gemma3": lossy, handled here
            warnings.simplefilter("ignore")
            exact = ModelConfig.from_hf_dict(json.loads(json.dumps(hf))) == config
    except (ValueError, KeyError, TypeError):
        exact = False
    if not exact:
        out["fields"] = _config_fields(config)
    return out


def config_from_json(d: dict[str, Any]) -> ModelConfig:
    if "fields" in d:
        return _config_from_fields(d["fields"])
    return ModelConfig.from_hf_dict(d["hf"])


# ------------------------------------------------------------------------------------------------------ save / load
def _host(x) -> np.ndarray:
    """A host copy (never a view of a device buffer that a later donating call could delete)."""
    return np.array(jax.device_get(x), copy=True)


def save_compressed(
    path: str | os.PathLike,
    ctx: CompressedContext,
    *,
    model_fingerprint: dict | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``ctx`` to directory ``path`` (created if needed). An existing saved context there is a
    FileExistsError unless ``overwrite``. ``model_fingerprint``: JSON-serializable facts identifying the model
    (stored as given; see :func:`read_metadata`)."""
    if model_fingerprint is not None:
        # Checked first: a TypeError now, rather than after an overwrite removed the old files or the arrays are
        # written; json's own message does not say which argument it was.
        try:
            json.dumps(model_fingerprint)
        except TypeError as e:
            raise TypeError(f"model_fingerprint must be JSON-serializable: {e}") from e
    path = os.path.abspath(os.fspath(path))
    meta_path = os.path.join(path, METADATA_FILE)
    arrays_path = os.path.join(path, ARRAYS_DIR)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    if os.path.exists(meta_path) or os.path.exists(arrays_path):
        if not overwrite:
            raise FileExistsError(f"{path} already holds a saved compressed context (pass overwrite=True)")
        if os.path.exists(meta_path):
            os.unlink(meta_path)
        shutil.rmtree(arrays_path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)

    context = ctx.context_cache  # not the free pages that questions borrowed
    tree = {name: _host(getattr(context, name)) for name in CACHE_FIELDS}
    tree["base_lengths"] = _host(ctx.base_lengths)
    tree["base_next_position"] = _host(ctx.base_next_position)

    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(arrays_path, tree)
        checkpointer.wait_until_finished()

    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config_to_json(ctx.config),
        "prompt": {k: list(v) for k, v in dataclasses.asdict(ctx.prompt).items()},
        "headroom": int(ctx.headroom),
        "ratio": float(ctx.ratio),
        "level": ctx.level,
        "report": {**ctx.report.as_dict(), "kept_ratios": list(ctx.report.kept_ratios)},
        "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in tree.items()},
        "model_fingerprint": model_fingerprint,
    }
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".kvzip.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        os.replace(tmp, meta_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON sidecar of a saved context (format, config, prompt, report, model_fingerprint, ...)."""
    path = os.fspath(path)
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no compressed context directory at {path}")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path} is not a saved compressed context (no {METADATA_FILE})")
    with open(meta_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format version {meta.get('version')!r} is not supported "
                         f"(this kvzip-jax reads versions <= {FORMAT_VERSION})")
    return meta


def _check_compatible(saved: ModelConfig, config: ModelConfig, saved_dtype: np.dtype, dtype) -> None:
    diffs = [f"{name}: saved {getattr(saved, name)!r} vs model {getattr(config, name)!r}"
             for name in SHAPE_FIELDS if getattr(saved, name) != getattr(config, name)]
    if dtype is not None and np.dtype(dtype) != saved_dtype:
        diffs.append(f"dtype: saved {saved_dtype.name} vs model {np.dtype(dtype).name}")
    if diffs:
        raise ValueError("the compressed context was made for a model of another shape (" + "; ".join(diffs) + ")")


def load_compressed(
    path: str | os.PathLike, config: ModelConfig | None = None, *, dtype=None
) -> CompressedContext:
    """Restore a context saved by :func:`save_compressed` onto the default device.

    ``config``: the config of the model that will answer; ValueError naming both values when its num_layers,
    num_kv_heads, head_dim, num_heads, layer_types or sliding_window differ from the saved one (and when ``dtype``,
    the model's parameter dtype, differs from the saved cache dtype). The returned context uses ``config`` when
    given, else the saved config."""
    meta = read_metadata(path)
    saved_config = config_from_json(meta["config"])
    specs = meta["arrays"]
    kv_dtype = np.dtype(jax.numpy.dtype(specs["k_pages"]["dtype"]))
    if config is not None:
        _check_compatible(saved_config, config, kv_dtype, dtype)
    elif dtype is not None:
        _check_compatible(saved_config, saved_config, kv_dtype, dtype)

    import orbax.checkpoint as ocp

    # Restore to host numpy, then place with jnp.asarray: uncommitted arrays like those of a fresh compression,
    # so the restored context reuses the same compiled decode functions (committed ones would recompile).
    target = {k: np.empty(tuple(s["shape"]), jax.numpy.dtype(s["dtype"])) for k, s in specs.items()}
    arrays_path = os.path.join(os.path.abspath(os.fspath(path)), ARRAYS_DIR)
    if not os.path.isdir(arrays_path):
        raise FileNotFoundError(f"{path}: the array checkpoint {ARRAYS_DIR}/ is missing")
    with ocp.StandardCheckpointer() as checkpointer:
        host = checkpointer.restore(arrays_path, target)
    tree = {k: jax.numpy.asarray(v) if k in CACHE_FIELDS else np.asarray(v) for k, v in host.items()}
    missing = [k for k in (*CACHE_FIELDS, "base_lengths", "base_next_position") if k not in tree]
    if missing:
        raise ValueError(f"{path}: the saved arrays lack {missing}")
    cache = PagedKVCache(**{k: tree[k] for k in CACHE_FIELDS})
    r = meta["report"]
    report = MemoryReport(
        dense_kv_bytes=int(r["dense_kv_bytes"]), compressed_kv_bytes=int(r["compressed_kv_bytes"]),
        kept_kv_bytes=int(r["kept_kv_bytes"]), metadata_bytes=int(r["metadata_bytes"]),
        # Contexts saved before kept_ratios existed stored the per-row list as kept_ratio (and no batch ratio).
        kept_ratios=tuple(float(x) for x in r.get("kept_ratios", r["kept_ratio"])),
        kept_ratio=float(np.mean(r["kept_ratio"])) if isinstance(r["kept_ratio"], list) else float(r["kept_ratio"]),
        times={k: float(v) for k, v in r["times"].items()},
    )
    prompt = KVzipPrompt(**{k: tuple(int(i) for i in v) for k, v in meta["prompt"].items()})
    return CompressedContext(
        config=config if config is not None else saved_config,
        prompt=prompt,
        cache=cache,
        base_lengths=np.asarray(tree["base_lengths"]),
        base_next_position=np.asarray(tree["base_next_position"]),
        headroom=int(meta["headroom"]),
        ratio=float(meta["ratio"]),
        level=str(meta["level"]),
        report=report,
    )
