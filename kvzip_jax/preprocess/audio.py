"""Whisper log-mel features in numpy, equal to transformers' `WhisperFeatureExtractor` for the same config.

Per waveform: zero-pad to the 30 s window (`n_samples`), reflect-pad n_fft // 2 on both sides, periodic Hann window,
|rfft|^2 in float64, Slaney mel filters, floor 1e-10, log10, drop the last frame, clamp to (max - 8), (x + 4) / 4.

Unlike transformers (which truncates by default) audio longer than the window is an error: silently dropping
speech is worse than asking the caller to chunk it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from kvzip_jax.preprocess.image import read_config

SUPPORTED_FEATURE_EXTRACTORS = ("WhisperFeatureExtractor",)


def hertz_to_mel_slaney(freq: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa / transformers `mel_scale="slaney"`)."""
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    logstep = 27.0 / np.log(6.4)
    log_mels = 15.0 + np.log(np.maximum(freq, 1e-300) / 1000.0) * logstep
    return np.where(freq >= 1000.0, log_mels, mels)


def mel_to_hertz_slaney(mels: np.ndarray | float) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = 200.0 * mels / 3.0
    logstep = np.log(6.4) / 27.0
    log_freq = 1000.0 * np.exp(logstep * (mels - 15.0))
    return np.where(mels >= 15.0, log_freq, freq)


def mel_filter_bank(
    num_frequency_bins: int, num_mel_filters: int, min_frequency: float, max_frequency: float, sampling_rate: int
) -> np.ndarray:
    """[num_frequency_bins, num_mel_filters] float64 triangular filters, Slaney scale and Slaney (area) norm.

    The formula of transformers' `audio_utils.mel_filter_bank(norm="slaney", mel_scale="slaney")`.
    """
    mel_freqs = np.linspace(hertz_to_mel_slaney(min_frequency), hertz_to_mel_slaney(max_frequency), num_mel_filters + 2)
    filter_freqs = mel_to_hertz_slaney(mel_freqs)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    filter_diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    enorm = 2.0 / (filter_freqs[2 : num_mel_filters + 2] - filter_freqs[:num_mel_filters])
    return filters * enorm[None, :]


@dataclasses.dataclass(frozen=True, kw_only=True)
class WhisperFeatureExtractor:
    """Raw 16 kHz mono audio -> log-mel features `[B, feature_size, nb_max_frames]` float32."""

    feature_size: int = 80
    sampling_rate: int = 16000
    hop_length: int = 160
    chunk_length: int = 30
    n_fft: int = 400
    padding_value: float = 0.0
    mel_filters: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if not math.isfinite(self.padding_value):
            raise ValueError(f"padding_value={self.padding_value!r} must be finite")
        # transformers fixes the mel range at 0..8000 Hz whatever the sampling rate; so do we.
        filters = mel_filter_bank(1 + self.n_fft // 2, self.feature_size, 0.0, 8000.0, self.sampling_rate)
        filters.setflags(write=False)
        object.__setattr__(self, "mel_filters", filters)

    @property
    def n_samples(self) -> int:
        """Samples in one window (30 s at 16 kHz = 480000)."""
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        """Feature frames per window (3000)."""
        return self.n_samples // self.hop_length

    # ---- construction ----

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> WhisperFeatureExtractor:
        """From an HF `preprocessor_config.json` dict (missing keys take transformers' defaults)."""
        ftype = config.get("feature_extractor_type")
        if ftype not in SUPPORTED_FEATURE_EXTRACTORS:
            raise ValueError(
                f"feature extractor type {ftype!r} is not supported; supported: {SUPPORTED_FEATURE_EXTRACTORS}"
            )
        dither = config.get("dither", 0.0) or 0.0
        if dither != 0.0:
            raise ValueError(f"dither={dither} is not supported (random noise would make features non-reproducible)")
        kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.init and config.get(f.name) is not None}
        if "padding_value" in kwargs:
            kwargs["padding_value"] = float(kwargs["padding_value"])
        fe = cls(**kwargs)
        for name in ("n_samples", "nb_max_frames"):
            if config.get(name) is not None and config[name] != getattr(fe, name):
                raise ValueError(
                    f"{name}={config[name]} in the config disagrees with {getattr(fe, name)} derived from "
                    f"chunk_length={fe.chunk_length}, sampling_rate={fe.sampling_rate}, hop_length={fe.hop_length}"
                )
        return fe

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> WhisperFeatureExtractor:
        """From a directory holding `preprocessor_config.json` (or the path of that file)."""
        return cls.from_dict(read_config(path))

    def params(self) -> dict[str, Any]:
        """Every parameter that changes the output, JSON-ready: the key material for `content_hash`."""
        return {
            "kind": "whisper_log_mel",
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init},
        }

    # ---- features ----

    def _check(self, audio: Any) -> np.ndarray:
        arr = np.asarray(audio)
        if arr.ndim != 1:
            raise ValueError(f"audio has shape {arr.shape}; expected mono samples of shape (T,)")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"audio has dtype {arr.dtype}; expected float samples in [-1, 1]")
        if arr.size == 0:
            raise ValueError("audio is empty")
        if arr.size > self.n_samples:
            raise ValueError(
                f"audio has {arr.size} samples ({arr.size / self.sampling_rate:.2f} s), over the "
                f"{self.n_samples}-sample ({self.chunk_length} s) window; split it into chunks of at most that"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError("audio has NaN or infinite samples")
        # transformers casts to float32 before padding; keep that rounding.
        return arr.astype(np.float32)

    def log_mel(self, audio: np.ndarray) -> np.ndarray:
        """One waveform (already checked) -> [feature_size, nb_max_frames] float32."""
        x = np.full(self.n_samples, self.padding_value, dtype=np.float32)
        x[: audio.size] = audio
        half = self.n_fft // 2
        x = np.pad(x.astype(np.float64), (half, half), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(x, self.n_fft)[:: self.hop_length]
        # Periodic Hann window (np.hanning(n + 1)[:-1]), as transformers' window_function(n, "hann").
        window = np.hanning(self.n_fft + 1)[:-1]
        power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
        mel = np.maximum(1e-10, self.mel_filters.T @ power.T)
        log_spec = np.log10(mel).astype(np.float32)[:, :-1]
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0

    def __call__(self, audio: Any, *, sampling_rate: int) -> np.ndarray:
        """One waveform (T,) or a batch (a sequence of waveforms, or a [B, T] array) -> [B, n_mels, 3000] float32.

        `sampling_rate` is required: audio at another rate gives wrong features silently, so it is checked here.
        """
        if sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz, but this feature extractor expects {self.sampling_rate} Hz; "
                "resample it first"
            )
        if isinstance(audio, np.ndarray) and audio.ndim == 2:
            batch = list(audio)
        elif isinstance(audio, list | tuple) and audio and isinstance(audio[0], np.ndarray | list | tuple):
            batch = list(audio)
        else:
            batch = [audio]
        return np.stack([self.log_mel(self._check(a)) for a in batch])
