"""Host-side multimodal preprocessing in numpy + Pillow (no torch, no transformers at run time).

- `ImageProcessor`: CLIP / SigLIP pixel values, equal to transformers' PIL-backend image processors.
- `WhisperFeatureExtractor`: Whisper log-mel features, equal to transformers' `WhisperFeatureExtractor`.
- `content_hash`: SHA-256 keys of preprocessed inputs plus their processor's `params()`.
"""

from kvzip_jax.preprocess.audio import WhisperFeatureExtractor, mel_filter_bank
from kvzip_jax.preprocess.hashing import canonical_json, content_hash
from kvzip_jax.preprocess.image import SUPPORTED_PROCESSORS, ImageProcessor, read_config

__all__ = [
    "SUPPORTED_PROCESSORS",
    "ImageProcessor",
    "WhisperFeatureExtractor",
    "canonical_json",
    "content_hash",
    "mel_filter_bank",
    "read_config",
]
