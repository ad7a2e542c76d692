"""Content hashes of preprocessed inputs: the keys of the serving prefix / embedding cache (ElasticMM section 1.4).

The hash covers the array's dtype, shape and bytes and a canonical JSON of the preprocessing parameters, so the same
image under another processor config (or the same bytes under another shape) gets another key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np


def canonical_json(params: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace, no NaN: equal parameter dicts give equal strings."""
    try:
        return json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"preprocessing parameters are not plain JSON (str/int/float/bool/None/list/dict): {e}") from e


def content_hash(array: np.ndarray, params: Mapping[str, Any]) -> str:
    """Hex SHA-256 of (dtype, shape, params) and the array's C-order bytes."""
    arr = np.asarray(array)
    if arr.dtype.hasobject:
        raise ValueError(f"cannot hash an array of dtype {arr.dtype}: its bytes are pointers, not content")
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping (e.g. processor.params()), got {type(params).__name__}")
    # The header is JSON, which never holds a raw NUL, so header and payload cannot be confused.
    header = canonical_json({"dtype": arr.dtype.str, "shape": list(arr.shape), "params": params})
    h = hashlib.sha256()
    h.update(header.encode("ascii"))
    h.update(b"\0")
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
