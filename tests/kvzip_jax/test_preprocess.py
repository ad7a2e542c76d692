"""Host-side preprocessing (kvzip_jax.preprocess) against transformers' processors, content hashes, bad input.

transformers is only the reference here: the runtime path imports neither it nor torch (checked in a subprocess).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from kvzip_jax.preprocess import ImageProcessor, WhisperFeatureExtractor, content_hash, mel_filter_bank

TOL = 1e-5
SR = 16000


@pytest.fixture(scope="module")
def tf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("transformers")


def _images() -> dict[str, object]:
    """Odd sizes, gray and RGBA, as numpy HWC arrays and as PIL images."""
    rng = np.random.default_rng(0)
    return {
        "np_rgb_37x53": rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
        "pil_rgb_300x200": Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)),
        "pil_gray_45x29": Image.fromarray(rng.integers(0, 256, (45, 29), dtype=np.uint8)),
        "pil_rgba_64x40": Image.fromarray(rng.integers(0, 256, (40, 64, 4), dtype=np.uint8), "RGBA"),
        "np_rgba_64x40": rng.integers(0, 256, (40, 64, 4), dtype=np.uint8),
        "np_gray_31x22x1": rng.integers(0, 256, (31, 22, 1), dtype=np.uint8),
    }


IMAGES = _images()
CLIP = {
    "image_processor_type": "CLIPImageProcessor",
    "size": {"shortest_edge": 32},
    "crop_size": {"height": 28, "width": 28},
    "do_center_crop": True,
}
SIGLIP = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 32}}
IMAGE_CONFIGS = {
    "clip": CLIP,
    # crop larger than the resized short side: transformers zero-pads, so must we
    "clip_crop_pads": {**CLIP, "size": {"shortest_edge": 20}, "crop_size": {"height": 28, "width": 36}},
    "clip_int_size_no_rescale": {**CLIP, "size": 30, "crop_size": 26, "do_rescale": False},
    "clip_no_crop_no_normalize": {**CLIP, "do_center_crop": False, "do_normalize": False},
    "clip_no_resize": {**CLIP, "do_resize": False, "crop_size": {"height": 21, "width": 33}},
    "clip_legacy_name_bilinear": {
        **CLIP,
        "image_processor_type": None,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "resample": 2,
    },
    "siglip": SIGLIP,
    "siglip_bilinear_rect": {**SIGLIP, "size": {"height": 32, "width": 48}, "resample": 2},
    "siglip_fast_name_scalar_mean": {
        **SIGLIP,
        "image_processor_type": "SiglipImageProcessorFast",
        "image_mean": 0.25,
        "image_std": 0.75,
        "rescale_factor": 0.002,
    },
}


def _write_config(tmp_path, cfg) -> str:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return str(tmp_path)


def _hf_pixels(hf_proc, image) -> np.ndarray:
    # numpy inputs: say HWC, else transformers guesses the channel axis from the shape.
    kw = {"input_data_format": "channels_last"} if isinstance(image, np.ndarray) else {}
    return hf_proc(image, return_tensors="np", **kw)["pixel_values"]


@pytest.mark.parametrize("name", list(IMAGE_CONFIGS))
def test_image_processor_matches_transformers_pil_backend(name, tmp_path, tf):
    path = _write_config(tmp_path, IMAGE_CONFIGS[name])
    # backend="pil" is the slow, Pillow-based processor (what use_fast=False selects); see image.py for why.
    hf_proc = tf.AutoImageProcessor.from_pretrained(path, backend="pil")
    assert type(hf_proc).__name__ in ("CLIPImageProcessorPil", "SiglipImageProcessorPil")
    ours = ImageProcessor.from_pretrained(path)
    for image_name, image in IMAGES.items():
        ref = _hf_pixels(hf_proc, image)
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == ref.shape, (image_name, got.shape, ref.shape)
        diff = float(np.abs(got - ref.astype(np.float32)).max())
        assert diff <= TOL, f"{name}/{image_name}: max |diff| {diff}"


def test_image_batch_and_file_path_match_transformers(tmp_path, tf):
    hf_proc = tf.AutoImageProcessor.from_pretrained(_write_config(tmp_path, CLIP), backend="pil")
    ours = ImageProcessor.from_dict(CLIP)
    images = [IMAGES["pil_rgb_300x200"], IMAGES["pil_gray_45x29"], IMAGES["pil_rgba_64x40"]]
    got = ours(images)
    ref = hf_proc(images, return_tensors="np")["pixel_values"]
    assert got.shape == (3, 3, 28, 28)
    assert float(np.abs(got - ref).max()) <= TOL
    # A file path is opened with Pillow and processed like the PIL image it holds.
    file = tmp_path / "rgba.png"
    IMAGES["pil_rgba_64x40"].save(file)
    from_file = ours(str(file))
    assert float(np.abs(from_file - _hf_pixels(hf_proc, Image.open(file))).max()) <= TOL
    np.testing.assert_array_equal(from_file, got[2:3])


def test_image_comparison_is_discriminating(tf):
    """The parity checks above can fail: a different filter or alpha handling is far outside the tolerance."""
    hf_proc = tf.CLIPImageProcessorPil(**{k: v for k, v in CLIP.items() if k != "image_processor_type"})
    ref = _hf_pixels(hf_proc, IMAGES["np_rgb_37x53"])
    bilinear = ImageProcessor.from_dict({**CLIP, "resample": 2})(IMAGES["np_rgb_37x53"])
    assert float(np.abs(bilinear - ref).max()) > 1e-2
    # Alpha is composited onto white, not dropped; the RGBA parity above would catch either.
    ours = ImageProcessor.from_dict(CLIP)
    rgba = IMAGES["np_rgba_64x40"]
    dropped = ours(np.ascontiguousarray(rgba[..., :3]))
    assert float(np.abs(ours(rgba) - dropped).max()) > 1e-2
    np.testing.assert_array_equal(ours(rgba), ours(Image.fromarray(rgba, "RGBA")))


def test_image_processor_from_dict_fields():
    p = ImageProcessor.from_dict(CLIP)
    expected = ("CLIPImageProcessor", 32, 28, 28, 3)
    assert (p.processor_type, p.shortest_edge, p.crop_height, p.crop_width, p.resample) == expected
    assert p.do_center_crop and p.image_mean == (0.48145466, 0.4578275, 0.40821073)
    s = ImageProcessor.from_dict(SIGLIP)
    assert (s.height, s.width, s.shortest_edge, s.do_center_crop, s.image_std) == (32, 32, None, False, (0.5,) * 3)
    assert p.output_size(37, 53) == (32, 45) and p.output_size(300, 200) == (48, 32)
    gray = IMAGES["np_gray_31x22x1"]
    np.testing.assert_array_equal(p(gray[..., 0]), p(gray))  # (H, W) is grayscale too


def test_image_without_rgb_conversion_matches_transformers(tf):
    cfg = {**SIGLIP, "do_convert_rgb": False}
    hf_proc = tf.SiglipImageProcessorPil(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
    ours = ImageProcessor.from_dict(cfg)
    for image in (IMAGES["np_rgb_37x53"], IMAGES["pil_rgb_300x200"]):
        assert float(np.abs(ours(image) - _hf_pixels(hf_proc, image)).max()) <= TOL


# ---------------------------------------------------------------- audio


def _tone() -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * 440.0 * np.arange(2 * SR) / SR)).astype(np.float32)


def _noise() -> np.ndarray:
    return (0.1 * np.random.default_rng(1).standard_normal(3 * SR + 77)).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filter_bank_matches_transformers(n_mels, tf):
    from transformers.audio_utils import mel_filter_bank as hf_mel

    ref = hf_mel(201, n_mels, 0.0, 8000.0, SR, norm="slaney", mel_scale="slaney")
    got = mel_filter_bank(201, n_mels, 0.0, 8000.0, SR)
    assert got.shape == ref.shape == (201, n_mels)
    assert float(np.abs(got - ref).max()) <= 1e-12


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_features_match_transformers(n_mels, tmp_path, tf):
    cfg = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": n_mels,
        "sampling_rate": SR,
        "hop_length": 160,
        "chunk_length": 30,
        "n_fft": 400,
        "padding_value": 0.0,
        "dither": 0.0,
        "n_samples": 480000,
        "nb_max_frames": 3000,
    }
    path = _write_config(tmp_path, cfg)
    hf_fe = tf.WhisperFeatureExtractor.from_pretrained(path)
    ours = WhisperFeatureExtractor.from_pretrained(path)
    for audio in (_tone(), _noise()):
        got = ours(audio, sampling_rate=SR)
        assert got.shape == (1, n_mels, 3000) and got.dtype == np.float32
        padded = np.pad(audio, (0, ours.n_samples - audio.size))
        # transformers' numpy (float64 FFT) path, the one it takes without torch: equal to within float32 rounding.
        ref_np = hf_fe._np_extract_fbank_features(padded[None], "cpu")
        assert float(np.abs(got - ref_np).max()) <= TOL
        # Its default path with torch installed runs the STFT in float32; that path itself is up to ~2.5e-5 from its
        # numpy path on the tone (low-energy bins), so the bound against it is looser.
        ref_torch = hf_fe(audio, sampling_rate=SR, return_tensors="np")["input_features"]
        assert float(np.abs(got - ref_torch).max()) <= 5e-5
    # Batches: each waveform is padded and scaled (max - 8) on its own.
    batch = ours([_tone(), _noise()], sampling_rate=SR)
    np.testing.assert_array_equal(batch[1], ours(_noise(), sampling_rate=SR)[0])
    # Discriminating: a 441 Hz tone is far from the 440 Hz features.
    shifted = (0.5 * np.sin(2 * np.pi * 441.0 * np.arange(2 * SR) / SR)).astype(np.float32)
    assert float(np.abs(ours(shifted, sampling_rate=SR) - batch[:1]).max()) > 1e-2


def test_whisper_exact_window_length_is_accepted_and_longer_is_an_error():
    fe = WhisperFeatureExtractor()
    full = np.zeros(fe.n_samples, np.float32)
    assert fe(full, sampling_rate=SR).shape == (1, 80, 3000)
    with pytest.raises(ValueError, match=r"480001 samples .*480000-sample \(30 s\) window"):
        fe(np.zeros(fe.n_samples + 1, np.float32), sampling_rate=SR)


def test_whisper_bad_input():
    fe = WhisperFeatureExtractor()
    with pytest.raises(ValueError, match=r"44100 Hz.*16000 Hz"):
        fe(_tone(), sampling_rate=44100)
    with pytest.raises(ValueError, match=r"dtype int16"):
        fe(np.zeros(100, np.int16), sampling_rate=SR)
    with pytest.raises(ValueError, match=r"shape \(10, 2, 5\)"):
        fe(np.zeros((10, 2, 5), np.float32), sampling_rate=SR)
    with pytest.raises(ValueError, match="NaN"):
        fe(np.array([0.0, np.nan], np.float32), sampling_rate=SR)
    with pytest.raises(ValueError, match=r"'Wav2Vec2FeatureExtractor' is not supported.*WhisperFeatureExtractor"):
        WhisperFeatureExtractor.from_dict({"feature_extractor_type": "Wav2Vec2FeatureExtractor"})
    with pytest.raises(ValueError, match="dither"):
        WhisperFeatureExtractor.from_dict({"feature_extractor_type": "WhisperFeatureExtractor", "dither": 1e-4})
    with pytest.raises(ValueError, match="nb_max_frames=1500"):
        WhisperFeatureExtractor.from_dict({"feature_extractor_type": "WhisperFeatureExtractor", "nb_max_frames": 1500})


# ---------------------------------------------------------------- hashing


def test_content_hash_same_input_same_hash_and_changes_change_it():
    proc = ImageProcessor.from_dict(CLIP)
    a = proc(IMAGES["np_rgb_37x53"])
    b = proc(IMAGES["np_rgb_37x53"].copy())
    params = proc.params()
    h = content_hash(a, params)
    assert len(h) == 64 and h == content_hash(b, dict(reversed(list(params.items()))))  # key order is irrelevant
    changed = IMAGES["np_rgb_37x53"].copy()
    changed[18, 26, 1] ^= 1
    assert content_hash(proc(changed), params) != h
    other = ImageProcessor.from_dict({**CLIP, "resample": 2})
    assert other.params() != params and content_hash(a, other.params()) != h
    # Same bytes, another shape or dtype: another key.
    assert content_hash(a.reshape(1, 3, 14, 56), params) != h
    assert content_hash(a.view(np.int32), params) != h
    audio = WhisperFeatureExtractor()
    assert content_hash(a, audio.params()) != h
    assert content_hash(a, audio.params()) != content_hash(a, WhisperFeatureExtractor(feature_size=128).params())


def test_content_hash_is_stable():
    # Cache keys must not drift between releases: pin one, and spell out the format it hashes.
    digest = content_hash(np.arange(6, dtype=np.uint8).reshape(2, 3), {"size": 32, "kind": "image"})
    assert digest == "fc6526feb3e0fa3ba117b8701fb2cc30bbfc595a58fdaaf0500c17c049db6c47"
    spelled = b'{"dtype":"|u1","params":{"kind":"image","size":32},"shape":[2,3]}' + b"\0" + bytes(range(6))
    assert digest == hashlib.sha256(spelled).hexdigest()
    with pytest.raises(ValueError, match="not plain JSON"):
        content_hash(np.zeros(2), {"bad": object()})
    with pytest.raises(ValueError, match="not plain JSON"):
        content_hash(np.zeros(2), {"bad": float("nan")})


# ---------------------------------------------------------------- bad image input


def test_image_bad_input(tmp_path):
    proc = ImageProcessor.from_dict(CLIP)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png"):
        proc(str(bad))
    with pytest.raises(ValueError, match=r"cannot read image file .*missing\.png"):
        proc(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"2 channels .*supported: 1 \(gray\), 3 \(RGB\), 4 \(RGBA\)"):
        proc(np.zeros((20, 20, 2), np.uint8))
    no_convert = ImageProcessor.from_dict({**CLIP, "do_convert_rgb": False})
    with pytest.raises(ValueError, match=r"4 channels .*do_convert_rgb=False"):
        no_convert(np.zeros((20, 20, 4), np.uint8))
    with pytest.raises(ValueError, match=r"mode 'L'.*do_convert_rgb=False"):
        no_convert(IMAGES["pil_gray_45x29"])
    with pytest.raises(ValueError, match="dtype float32"):
        proc(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ValueError, match=r"type int"):
        proc(3)
    with pytest.raises(ValueError, match=r"'ViTImageProcessor' is not supported.*CLIPImageProcessor.*Siglip"):
        ImageProcessor.from_dict({"image_processor_type": "ViTImageProcessor"})
    with pytest.raises(ValueError, match=r"size=\{'longest_edge': 64\}"):
        ImageProcessor.from_dict({**CLIP, "size": {"longest_edge": 64}})
    with pytest.raises(ValueError, match=r"no preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different shapes"):
        ImageProcessor.from_dict({**CLIP, "do_center_crop": False})([IMAGES["np_rgb_37x53"], IMAGES["np_rgba_64x40"]])


def test_runtime_path_imports_neither_torch_nor_transformers(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from kvzip_jax.preprocess import ImageProcessor, WhisperFeatureExtractor, content_hash\n"
        f"p = ImageProcessor.from_dict({SIGLIP!r})\n"
        "x = p(np.zeros((10, 12, 3), np.uint8))\n"
        "f = WhisperFeatureExtractor()(np.zeros(1600, np.float32), sampling_rate=16000)\n"
        "content_hash(x, p.params())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'torchvision'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
