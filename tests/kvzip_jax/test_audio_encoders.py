"""Whisper's encoder and the Audio Spectrogram Transformer against transformers (fp32, perturbed tiny models), plus
their input, config and checkpoint errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_testutil import check_close, perturbed
from safetensors import safe_open

from kvzip_jax.config import UnsupportedModelError
from kvzip_jax.models import CheckpointError, audio
from kvzip_jax.preprocess import WhisperFeatureExtractor

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
BATCH = 2
# max_source_positions 20 fixes the input at 40 frames; the decoder is there only to be skipped by the loader.
WHISPER_CFG = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    num_mel_bins=16,
    max_source_positions=20,
    decoder_layers=1,
    decoder_attention_heads=2,
    decoder_ffn_dim=32,
    vocab_size=64,
    max_target_positions=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=3,
    begin_suppress_tokens=None,
)
# 37 frames x 24 mel bins, patch 16, strides 8 (frequency) / 10 (time): a 2 x 3 patch grid (the last frame is
# dropped), so a swapped axis or stride cannot pass.
AST_CFG = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=16,
    frequency_stride=8,
    time_stride=10,
    max_length=37,
    num_mel_bins=24,
    num_labels=3,
)

_encode_whisper = jax.jit(audio.encode_whisper, static_argnames=("config",))
_encode_ast = jax.jit(audio.encode_ast, static_argnames=("config",))


def _inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _whisper_features(seed: int = 0) -> np.ndarray:
    return _inputs((BATCH, WHISPER_CFG["num_mel_bins"], 2 * WHISPER_CFG["max_source_positions"]), seed)


def _spectrogram(seed: int = 0) -> np.ndarray:
    return _inputs((BATCH, AST_CFG["max_length"], AST_CFG["num_mel_bins"]), seed)


def _keys(path) -> list[str]:
    with safe_open(f"{path}/model.safetensors", framework="numpy") as f:
        return list(f.keys())


def _check(name: str, ours, ref, diffs: dict):
    check_close(name, ours, ref, diffs, atol=ATOL)


def _same(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """A perturbed WhisperForConditionalGeneration saved whole, as WhisperModel and as a bare WhisperEncoder."""
    config = transformers.WhisperConfig(**WHISPER_CFG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = perturbed(transformers.WhisperForConditionalGeneration(config))
    paths = {}
    for name, part in [("generation", model), ("model", model.model), ("encoder", model.model.encoder)]:
        paths[name] = str(tmp_path_factory.mktemp(f"whisper_{name}"))
        part.save_pretrained(paths[name])
    cfg, params = audio.load_whisper_encoder_params(paths["generation"])
    return model, paths, cfg, params


@pytest.fixture(scope="module")
def ast(tmp_path_factory):
    """A perturbed ASTForAudioClassification saved as transformers writes it (hub names), and its ASTModel saved
    with transformers 5's own names."""
    config = transformers.ASTConfig(**AST_CFG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = perturbed(transformers.ASTForAudioClassification(config))
    paths = {"classification": str(tmp_path_factory.mktemp("ast_classification"))}
    model.save_pretrained(paths["classification"])
    paths["model"] = str(tmp_path_factory.mktemp("ast_model"))
    model.audio_spectrogram_transformer.save_pretrained(paths["model"], save_original_format=False)
    cfg, params = audio.load_ast_params(paths["classification"])
    return model, paths, cfg, params


def test_whisper_matches_transformers(whisper):
    model, _, config, params = whisper
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_frames) == (32, 2, 2, 40)
    assert "bias" not in params["layers"]["attn"]["k_proj"]  # Whisper's keys have no bias
    # Random features, and our feature extractor's log-mels of two clips (40 frames: 1 s at hop 400).
    extractor = WhisperFeatureExtractor(feature_size=16, hop_length=400, chunk_length=1)
    clips = [np.sin(np.arange(16000) * 0.05).astype(np.float32), _inputs((9000,), seed=3) * 0.3]
    diffs: dict[str, float] = {}
    for name, features in [("random", _whisper_features()), ("log-mel", extractor(clips, sampling_rate=16000))]:
        with torch.no_grad():
            ref = model.model.encoder(torch.as_tensor(features)).last_hidden_state
        _check(f"whisper {name}", _encode_whisper(params, features, config=config), ref, diffs)
    print("whisper max |diff|:", diffs)


def test_whisper_prefixes(whisper):
    _, paths, config, params = whisper
    assert any(k.startswith("model.decoder.") for k in _keys(paths["generation"]))
    assert "encoder.conv1.weight" in _keys(paths["model"]) and "conv1.weight" in _keys(paths["encoder"])
    for name in ("model", "encoder"):  # prefix found: "encoder." and none
        _, ours = audio.load_whisper_encoder_params(paths[name])
        assert _same(ours, params), name
    _, explicit = audio.load_whisper_encoder_params(paths["generation"], config, prefix="model.encoder.")
    assert _same(explicit, params)


def test_ast_matches_transformers(ast):
    model, _, config, params = ast
    assert (config.frequency_patches, config.time_patches, config.num_positions) == (2, 3, 8)
    spectrogram = _spectrogram()
    with torch.no_grad():
        ref = model.audio_spectrogram_transformer(torch.as_tensor(spectrogram))
    out = _encode_ast(params, spectrogram, config=config)
    diffs: dict[str, float] = {}
    _check("ast last_hidden_state", out.last_hidden_state, ref.last_hidden_state, diffs)
    _check("ast pooled", out.pooled, ref.pooler_output, diffs)
    print("ast max |diff|:", diffs)


def test_ast_layouts(ast):
    _, paths, config, params = ast
    # transformers 5 writes the hub (ViT) names by default, its module names with save_original_format=False.
    hub, modern = _keys(paths["classification"]), _keys(paths["model"])
    assert "audio_spectrogram_transformer.encoder.layer.1.attention.attention.query.weight" in hub
    assert "layers.1.attention.q_proj.weight" in modern
    _, ours = audio.load_ast_params(paths["model"])  # no prefix, transformers 5 names
    assert _same(ours, params)
    _, explicit = audio.load_ast_params(paths["classification"], config, prefix="audio_spectrogram_transformer.")
    assert _same(explicit, params)


def test_bf16_params(whisper, ast):
    cases = [
        ("whisper", whisper, audio.load_whisper_encoder_params, _encode_whisper, _whisper_features()),
        ("ast", ast, audio.load_ast_params, _encode_ast, _spectrogram()),
    ]
    for name, (_, paths, config, params32), load, encode, inputs in cases:
        path = paths["generation" if name == "whisper" else "classification"]
        _, params16 = load(path, dtype=jnp.bfloat16)
        assert {a.dtype for a in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}, name
        ours16 = jax.tree.leaves(encode(params16, inputs, config=config))
        ours32 = jax.tree.leaves(encode(params32, inputs, config=config))  # compiled by the parity tests
        for a, b in zip(ours16, ours32, strict=True):
            assert a.dtype == jnp.bfloat16, name
            err = np.abs(np.asarray(a, np.float32) - np.asarray(b)).max()
            assert err < 0.05 * np.abs(np.asarray(b)).max(), f"bf16 {name} strays {err:.3g} from fp32"


def test_abstract_params_and_sinusoids():
    # init_params builds these same modules with random values: their structure is checked here without paying
    # for its compile. Whisper's init fills the position table from audio.sinusoids, checked against transformers'.
    from transformers.models.whisper.modeling_whisper import sinusoids

    np.testing.assert_allclose(audio.sinusoids(20, 32), sinusoids(20, 32).numpy(), atol=1e-6)
    whisper_abstract = audio.abstract_params(audio.WhisperEncoderConfig.from_hf_dict(WHISPER_CFG))
    assert whisper_abstract["pos_embed"].shape == (20, 32) and whisper_abstract["conv1"]["kernel"].shape == (3, 16, 32)
    assert "bias" not in whisper_abstract["layers"]["attn"]["k_proj"]
    ast_abstract = audio.abstract_params(audio.ASTConfig.from_hf_dict(AST_CFG), jnp.bfloat16)
    assert ast_abstract["pos_embed"].shape == (8, 32) and ast_abstract["pos_embed"].dtype == jnp.bfloat16
    assert ast_abstract["patch_embed"]["kernel"].shape == (16, 16, 1, 32)
    assert ast_abstract["layers"]["attn"]["k_proj"]["bias"].shape == (2, 32)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((BATCH, 16, 39), r"39 frames; the encoder expects exactly 40 \(2 \* max_source_positions 20\)"),
        ((BATCH, 16, 3000), r"3000 frames; the encoder expects exactly 40"),
        ((BATCH, 12, 40), r"12 mel bins.*expected 16"),
        ((BATCH, 40, 16), r"40 mel bins.*expected 16.*transpose"),
        ((16, 40), r"must be \[batch, 16, 40\]"),
    ],
    ids=["frames", "full-window", "mel", "transposed", "rank"],
)
def test_bad_whisper_features(whisper, shape, match):
    _, _, config, params = whisper
    with pytest.raises(ValueError, match=match):
        audio.encode_whisper(params, np.zeros(shape, np.float32), config=config)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((BATCH, 36, 24), r"36 frames x 24 mel bins; the model expects 37 x 24"),
        ((BATCH, 37, 16), r"37 frames x 16 mel bins; the model expects 37 x 24"),
        ((BATCH, 24, 37), r"expects 37 x 24.*transpose"),
        ((37, 24), r"must be \[batch, 37, 24\]"),
    ],
    ids=["frames", "mel", "transposed", "rank"],
)
def test_bad_ast_spectrogram(ast, shape, match):
    _, _, config, params = ast
    with pytest.raises(ValueError, match=match):
        audio.encode_ast(params, np.zeros(shape, np.float32), config=config)


@pytest.mark.parametrize(
    ("cls", "hf", "match"),
    [
        ("whisper", {"activation_function": "relu"}, r"activation_function 'relu'.*supported: quick_gelu, gelu"),
        ("whisper", {"model_type": "wav2vec2"}, r"model_type 'wav2vec2'.*supported: whisper"),
        ("ast", {"hidden_act": "relu"}, r"hidden_act 'relu'.*supported: quick_gelu, gelu"),
        ("ast", {"model_type": "vit"}, r"model_type 'vit'.*supported: audio-spectrogram-transformer"),
        ("ast", {"qkv_bias": False}, r"qkv_bias False.*supported: True"),
        ("ast", {"patch_size": [16, 16]}, r"patch_size \[16, 16\].*supported: an int"),
    ],
    ids=["whisper-act", "whisper-type", "ast-act", "ast-type", "ast-qkv-bias", "ast-patch"],
)
def test_unsupported_config_is_rejected(cls, hf, match):
    config_cls = audio.WhisperEncoderConfig if cls == "whisper" else audio.ASTConfig
    with pytest.raises(UnsupportedModelError, match=match):
        config_cls.from_hf_dict(hf)


def test_config_errors():
    with pytest.raises(ValueError, match=r"hidden_size 30 is not a multiple of the 4 attention heads"):
        audio.WhisperEncoderConfig.from_hf_dict({"d_model": 30, "encoder_attention_heads": 4})
    with pytest.raises(ValueError, match=r"num_mel_bins 8 is smaller than patch_size 16"):
        audio.ASTConfig.from_hf_dict({"num_mel_bins": 8})
    with pytest.raises(TypeError, match=r"expected a WhisperEncoderConfig, got ASTConfig"):
        audio.encode_whisper({}, np.zeros((1, 128, 1024)), config=audio.ASTConfig())


def test_checkpoint_errors(whisper, ast):
    _, paths, config, _ = whisper
    with pytest.raises(CheckpointError, match=r"lacks tensor encoder\.conv1\.weight"):
        audio.load_whisper_encoder_params(paths["generation"], config, prefix="encoder.")
    # A config with fewer layers than the file: the extra layer's tensors are reported, not silently dropped.
    fewer = audio.WhisperEncoderConfig.from_hf_dict({**config.to_hf_dict(), "encoder_layers": 1})
    with pytest.raises(CheckpointError, match=r"does not use, e\.g\. model\.encoder\.layers\.1\."):
        audio.load_whisper_encoder_params(paths["generation"], fewer)
    _, ast_paths, ast_config, _ = ast
    fewer_ast = audio.ASTConfig.from_hf_dict({**ast_config.to_hf_dict(), "num_hidden_layers": 1})
    with pytest.raises(CheckpointError, match=r"does not use, e\.g\. audio_spectrogram_transformer\.encoder\.layer\.1"):
        audio.load_ast_params(ast_paths["classification"], fewer_ast)
    # 47 frames make a 2 x 4 grid: the stored position table (2 x 3 + 2 rows) no longer fits.
    longer = audio.ASTConfig.from_hf_dict({**ast_config.to_hf_dict(), "max_length": 47})
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \(8, 32\) but the config expects \(10, 32\)"):
        audio.load_ast_params(ast_paths["model"], longer)


def test_encoders_on_a_mesh(whisper, ast):
    """Loaded straight onto a 2 x 4 mesh (heads and MLP over "model"), both encoders give one device's output."""
    from kvzip_jax.sharding import make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 host devices)")
    mesh = make_mesh(data=2, model=4)
    cases = [
        (whisper, audio.load_whisper_encoder_params, _encode_whisper, _whisper_features(), "generation"),
        (ast, audio.load_ast_params, _encode_ast, _spectrogram(), "classification"),
    ]
    for (_, paths, config, params), load, encode, inputs, which in cases:
        _, sharded = load(paths[which], mesh=mesh)
        fc1 = sharded["layers"]["mlp"]["fc1"]["kernel"][...]
        assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
        for a, b in zip(jax.tree.leaves(encode(sharded, inputs, config=config)),
                        jax.tree.leaves(encode(params, inputs, config=config)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
