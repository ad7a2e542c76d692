"""Parametric cost model (spec section 3.3) with coefficients read from a profile file.

Forms (times in seconds inside the code, milliseconds in the profile file):
  preprocess(image) = p0 + p1 * pixels                      (CPU, one worker per image)
  encode(batch)     = e0 + e1 * sum(v) + e2 * sum(v^2)      (v = vision tokens per image)
  prefill(batch)    = a + b * sum(l) + c * sum(L^2 - k^2)   (l = uncached tokens, L = total, k = cached)
  decode step       = a' + b' * sum(ctx) + c' * B           (second coefficient set above batch threshold B*)
  transfer(bytes)   = alpha + bytes / bandwidth
The model is refittable from measured timings by least squares (`fit_*`), which is how the JAX engine's
profiles will replace the roofline-derived defaults.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Every coefficient a profile must provide, by section. Missing ones are a hard error naming them.
REQUIRED = {
    "": ["name", "num_instances", "block_size", "kv_blocks_per_instance", "bytes_kv_per_token", "bytes_ve_per_token"],
    "vision": ["patch_px", "min_pixels", "max_pixels"],
    "preprocess": ["p0_ms", "p1_ms_per_pixel", "cpu_workers"],
    "encode": ["e0_ms", "e1_ms_per_token", "e2_ms_per_token2", "max_batch_images"],
    "prefill": ["a_ms", "b_ms_per_token", "c_ms_per_token2", "max_batch_tokens", "saturation_fraction"],
    "decode": ["a_ms", "b_ms_per_ctx_token", "c_ms_per_seq", "large_a_ms", "large_b_ms_per_ctx_token",
               "large_c_ms_per_seq", "batch_threshold", "max_batch"],
    "link": ["alpha_ms", "bandwidth_GBps"],
    "switch": ["t_switch_ms"],
}

DEFAULT_PROFILE = "qwen2_5_vl_7b_a800x8"
# Located next to this module (package data, see pyproject's package-data) rather than through
# importlib.resources.files("serving"): under plain `pytest` the test folder tests/serving can shadow the package
# name as a namespace package, and then files("serving") would point into the tests.
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


class ProfileError(ValueError):
    pass


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> dict:
    """Load a profile by packaged name or by file path and validate it."""
    p = Path(name_or_path)
    if p.suffix == ".json" and p.exists():
        data = json.loads(p.read_text())
    else:
        names = available_profiles()
        if str(name_or_path) not in names:
            raise ProfileError(f"unknown cost profile {str(name_or_path)!r}: not a .json file and not one of {names}")
        data = json.loads((PROFILE_DIR / f"{name_or_path}.json").read_text())
    validate_profile(data, source=str(name_or_path))
    return data


def validate_profile(data: dict, source: str = "<dict>") -> None:
    missing = []
    for section, keys in REQUIRED.items():
        sec = data if section == "" else data.get(section)
        if not isinstance(sec, dict):
            missing.append(section)
            continue
        for k in keys:
            if k not in sec:
                missing.append(f"{section}.{k}" if section else k)
    if missing:
        raise ProfileError(f"cost profile {source} is missing coefficients: {', '.join(missing)}")
    for section, keys in REQUIRED.items():
        sec = data if section == "" else data[section]
        for k in keys:
            v = sec[k]
            if k == "name":
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ProfileError(f"cost profile {source}: {section}.{k} = {v!r} must be a finite number >= 0")
    for k, lo in (("num_instances", 1), ("block_size", 1), ("kv_blocks_per_instance", 1)):
        if data[k] < lo:
            raise ProfileError(f"cost profile {source}: {k} = {data[k]} must be >= {lo}")
    if not 0 < data["prefill"]["saturation_fraction"] < 1:
        raise ProfileError(f"cost profile {source}: prefill.saturation_fraction = "
                           f"{data['prefill']['saturation_fraction']} must be in (0, 1)")
    if data["link"]["bandwidth_GBps"] <= 0:
        raise ProfileError(f"cost profile {source}: link.bandwidth_GBps must be > 0")
    # optional: the link between hosts (the default: the one link); the destination's own share of a KV hand-off
    # (writing the pages into its pool keeps it from decoding meanwhile; the default: none)
    for optional in ("cross_host_link", "kv_import"):
        sec = data.get(optional)
        if sec is None:
            continue
        for k in ("alpha_ms", "bandwidth_GBps"):
            v = sec.get(k) if isinstance(sec, dict) else None
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (k == "bandwidth_GBps" and v == 0):
                raise ProfileError(f"cost profile {source}: {optional}.{k} = {v!r} must be a finite number "
                                   f"{'> 0' if k == 'bandwidth_GBps' else '>= 0'}")


@dataclass
class CostModel:
    profile: dict

    def __post_init__(self):
        validate_profile(self.profile, self.profile.get("name", "<dict>"))
        p = self.profile
        ms = 1e-3
        self.block_size = int(p["block_size"])
        self.kv_blocks = int(p["kv_blocks_per_instance"])
        self.bytes_kv = float(p["bytes_kv_per_token"])
        self.bytes_ve = float(p["bytes_ve_per_token"])
        pr = p["preprocess"]
        self.p0, self.p1, self.cpu_workers = pr["p0_ms"] * ms, pr["p1_ms_per_pixel"] * ms, int(pr["cpu_workers"])
        en = p["encode"]
        self.e0, self.e1, self.e2 = en["e0_ms"] * ms, en["e1_ms_per_token"] * ms, en["e2_ms_per_token2"] * ms
        self.enc_max_images = int(en["max_batch_images"])
        pf = p["prefill"]
        self.a, self.b, self.c = pf["a_ms"] * ms, pf["b_ms_per_token"] * ms, pf["c_ms_per_token2"] * ms
        self.prefill_max_tokens = int(pf["max_batch_tokens"])
        de = p["decode"]
        self.da, self.db, self.dc = de["a_ms"] * ms, de["b_ms_per_ctx_token"] * ms, de["c_ms_per_seq"] * ms
        self.dla, self.dlb, self.dlc = (de["large_a_ms"] * ms, de["large_b_ms_per_ctx_token"] * ms,
                                        de["large_c_ms_per_seq"] * ms)
        self.d_threshold = int(de["batch_threshold"])
        self.decode_max_batch = int(de["max_batch"])
        self.alpha = p["link"]["alpha_ms"] * ms
        self.bw = p["link"]["bandwidth_GBps"] * 1e9
        cross = p.get("cross_host_link")
        self.cross_alpha = cross["alpha_ms"] * ms if cross else self.alpha
        self.cross_bw = cross["bandwidth_GBps"] * 1e9 if cross else self.bw
        imp = p.get("kv_import")
        self.import_alpha = imp["alpha_ms"] * ms if imp else 0.0
        self.import_bw = imp["bandwidth_GBps"] * 1e9 if imp else math.inf
        self.t_switch = p["switch"]["t_switch_ms"] * ms
        vi = p["vision"]
        self.patch_px, self.min_pixels, self.max_pixels = vi["patch_px"], vi["min_pixels"], vi["max_pixels"]
        self.saturation_tokens = self._saturation_tokens(pf["saturation_fraction"])

    # ---- stage times ---------------------------------------------------------------------------------
    def preprocess_time(self, pixels: int) -> float:
        return self.p0 + self.p1 * pixels

    def encode_time(self, sum_v: int, sum_v2: int) -> float:
        return self.e0 + self.e1 * sum_v + self.e2 * sum_v2

    def prefill_time(self, sum_new: int, sum_sq: int) -> float:
        """sum_new: uncached tokens; sum_sq: sum over requests of (L^2 - cached^2)."""
        return self.a + self.b * sum_new + self.c * sum_sq

    def prefill_share(self, total_tokens: int, cached: int = 0) -> float:
        """One request's share of saturation-sized prefill batches: the fixed cost split by token share."""
        new = total_tokens - cached
        return (self.a * min(1.0, new / self.saturation_tokens) + self.b * new
                + self.c * (total_tokens * total_tokens - cached * cached))

    def decode_step_time(self, batch: int, sum_ctx: int) -> float:
        if batch <= self.d_threshold:
            return self.da + self.db * sum_ctx + self.dc * batch
        return self.dla + self.dlb * sum_ctx + self.dlc * batch

    def transfer_time(self, nbytes: float, cross_host: bool = False) -> float:
        if cross_host:
            return self.cross_alpha + nbytes / self.cross_bw
        return self.alpha + nbytes / self.bw

    def kv_transfer_time(self, tokens: int, cross_host: bool = False) -> float:
        return self.transfer_time(tokens * self.bytes_kv, cross_host)

    def kv_import_time(self, tokens: int) -> float:
        """What taking in a request's KV costs the destination's own worker (the engine's scatter step, part of
        `kv_transfer_time`): it decodes nothing meanwhile. 0 unless the profile has a `kv_import` section."""
        return self.import_alpha + tokens * self.bytes_kv / self.import_bw

    def vision_tokens(self, width: int, height: int) -> int:
        """Qwen2.5-VL smart resize: sides to multiples of 28 with pixels in [min, max]; 1 token per 28x28."""
        f = self.patch_px
        h = max(f, round(height / f) * f)
        w = max(f, round(width / f) * f)
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(f, math.floor(height / beta / f) * f)
            w = max(f, math.floor(width / beta / f) * f)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / f) * f
            w = math.ceil(width * beta / f) * f
        return (h // f) * (w // f)

    def _saturation_tokens(self, frac: float) -> int:
        """Batch critical point: smallest token count whose prefill throughput reaches `frac` of the peak.

        Below the critical point the batch is still overhead-bound and adding requests is cheap, above it
        adding requests only adds latency (spec 1.3a)."""
        # The quadratic attention term is per request (sum of L^2), so batching more requests does not add
        # to it: the batch-level throughput is n / (a + b n), which reaches frac of its 1/b peak here.
        if self.b <= 0:
            return self.prefill_max_tokens
        return int(min(self.prefill_max_tokens, math.ceil(frac / (1 - frac) * self.a / self.b)))

    # ---- refitting from measured timings -------------------------------------------------------------
    def refit(self, stage: str, features, times_s) -> "CostModel":
        """Return a new CostModel whose `stage` coefficients are least-squares fits to measured timings.

        stage: 'encode' (features rows = [sum_v, sum_v2]), 'prefill' ([sum_new, sum_sq]),
        'decode' ([batch, sum_ctx]; fits the small-batch set on rows with batch <= threshold and the
        large-batch set on the others). Coefficients are constrained to be >= 0 (active-set NNLS)."""
        X = np.asarray(features, dtype=np.float64)
        y = np.asarray(times_s, dtype=np.float64) * 1e3
        if X.ndim != 2 or X.shape[1] != 2 or len(X) != len(y):
            raise ValueError(f"refit({stage!r}): features must have shape [n, 2] matching times, got "
                             f"{X.shape} and {y.shape}")
        prof = copy.deepcopy(self.profile)
        if stage == "encode":
            coef = _nnls_fit(np.c_[np.ones(len(X)), X], y, stage)
            prof["encode"].update(e0_ms=coef[0], e1_ms_per_token=coef[1], e2_ms_per_token2=coef[2])
        elif stage == "prefill":
            coef = _nnls_fit(np.c_[np.ones(len(X)), X], y, stage)
            prof["prefill"].update(a_ms=coef[0], b_ms_per_token=coef[1], c_ms_per_token2=coef[2])
        elif stage == "decode":
            thr = prof["decode"]["batch_threshold"]
            small = X[:, 0] <= thr
            for mask, keys in ((small, ("a_ms", "b_ms_per_ctx_token", "c_ms_per_seq")),
                               (~small, ("large_a_ms", "large_b_ms_per_ctx_token", "large_c_ms_per_seq"))):
                if mask.sum() == 0:
                    continue
                A = np.c_[np.ones(mask.sum()), X[mask, 1], X[mask, 0]]
                coef = _nnls_fit(A, y[mask], stage)
                prof["decode"].update(dict(zip(keys, coef, strict=True)))
        else:
            raise ValueError(f"refit: unknown stage {stage!r}; expected one of 'encode', 'prefill', 'decode'")
        return CostModel(prof)


def _nnls_fit(A: np.ndarray, y: np.ndarray, stage: str) -> list[float]:
    if len(y) < A.shape[1]:
        raise ValueError(f"refit({stage!r}) needs at least {A.shape[1]} timings, got {len(y)}")
    active = list(range(A.shape[1]))
    coef = np.zeros(A.shape[1])
    # Column scaling keeps lstsq well conditioned (sum_sq features are ~1e6 times sum features).
    scale = np.maximum(np.abs(A).max(axis=0), 1e-30)
    while active:
        sol, *_ = np.linalg.lstsq(A[:, active] / scale[active], y, rcond=None)
        sol = sol / scale[active]
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return [float(c) for c in coef]


def default_cost_model() -> CostModel:
    return CostModel(load_profile(DEFAULT_PROFILE))
