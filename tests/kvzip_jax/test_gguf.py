"""GGUF in: tiny files written here per quant type, the real SmolLM2 Q4_1 file, bad input, and `convert`.

Reference: transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`), which dequantizes with the same
gguf-py routines, so both sides run on identical float32 weights and logits agree to fp32 reduction-order noise.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from kvzip_jax.config import UnsupportedModelError  # noqa: E402
from kvzip_jax.lm import LanguageModel  # noqa: E402
from kvzip_jax.models import CheckpointError  # noqa: E402

ATOL = 1e-4
# Q4_K / Q6_K quantize rows in super-blocks of 256 values, so every weight's input dim is 256 here.
DIMS = dict(vocab_size=128, hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, num_hidden_layers=2, max_position_embeddings=64)
QUANTS = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)
TOKENS = np.random.default_rng(7).integers(0, DIMS["vocab_size"], size=(2, 12))
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf order for Q/K rows (written independently of the loader's inverse).
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, file, qtype: Q, *, arch: str = "llama", metadata: dict | None = None, extra=None) -> str:
    """A llama.cpp-style GGUF of an HF Llama: 2-D weights in qtype, norms in F32, as llama.cpp's converter does."""
    cfg = model.config
    w = gguf.GGUFWriter(str(file), arch)
    meta = dict(block_count=cfg.num_hidden_layers, context_length=cfg.max_position_embeddings,
                embedding_length=cfg.hidden_size, feed_forward_length=cfg.intermediate_size,
                head_count=cfg.num_attention_heads, head_count_kv=cfg.num_key_value_heads,
                rope_dimension_count=cfg.head_dim, key_length=cfg.head_dim, value_length=cfg.head_dim,
                layer_norm_rms_eps=cfg.rms_norm_eps, rope_freq_base=cfg.rope_parameters["rope_theta"],
                vocab_size=cfg.vocab_size, bos_token_id=1, eos_token_id=2)
    meta.update(metadata or {})
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        _add(w, _gguf_name(name), a, qtype)
    for name, a, raw in extra or ():
        w.add_tensor(name, a, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(file)


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{i}.{_LAYER[module]}.{suffix}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def _add(writer, name: str, a: np.ndarray, qtype: Q) -> None:
    if a.ndim == 1 or qtype == Q.F32:
        writer.add_tensor(name, a.astype(np.float32))
    elif qtype in _K_SUPER_SCALES:
        writer.add_tensor(name, _random_k_blocks(a.shape, qtype, seed=len(name) + a.size), raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)


# gguf-py 0.19 dequantizes K-quants but cannot quantize them (`quantize` raises NotImplementedError), so those
# files get random but valid blocks: the weights are whatever the blocks decode to, which is all a parity check
# against transformers' loader needs. Byte layout (ggml-common.h): Q4_K = f16 d, f16 dmin, 12 bytes of 6-bit
# scales/mins, 128 bytes of nibbles; Q6_K = 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, f16 d.
# The super-block scales keep |w| below ~0.4 so that logits stay O(1).
_K_SUPER_SCALES = {Q.Q4_K: ((0, 2e-4), (2, 2e-3)), Q.Q6_K: ((208, 1e-4),)}


def _random_k_blocks(shape: tuple[int, int], qtype: Q, seed: int) -> np.ndarray:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = np.random.default_rng(seed).integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    for offset, value in _K_SUPER_SCALES[qtype]:
        blocks[:, offset:offset + 2] = np.full((len(blocks), 1), value, np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // block * type_size)


def _hf_from_gguf(file: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(file), gguf_file=os.path.basename(file), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tiny_model(hf_model_factory):
    return hf_model_factory("llama", **DIMS)[0]


@pytest.fixture(scope="module")
def hf_logits(hf_logits_fn):
    return hf_logits_fn


@pytest.mark.parametrize(
    ("qtype", "tied"), [(q, False) for q in QUANTS] + [(Q.F32, True), (Q.Q4_K, True)],
    ids=[q.name for q in QUANTS] + ["F32-tied", "Q4_K-tied"],
)
def test_tiny_gguf_logits_match_transformers(qtype, tied, tmp_path, tiny_model, hf_model_factory, hf_logits,
                                             ours_logits_fn):
    model = hf_model_factory("llama", tie_word_embeddings=True, **DIMS)[0] if tied else tiny_model
    file = write_gguf(model, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    lm = LanguageModel.from_pretrained(file)
    assert lm.tokenizer is None  # no tokenizer metadata in these files
    assert lm.config.tie_word_embeddings == tied
    assert lm.config.num_kv_heads == 2 and lm.config.head_dim == 64
    ours = ours_logits_fn(lm.params, lm.config, TOKENS)
    ref = hf_logits(_hf_from_gguf(file), TOKENS)
    diff = float(np.abs(ours - ref).max())
    print(f"{qtype.name} {'tied' if tied else 'untied'}: max |logit diff| = {diff:.3g}, max |logit| = "
          f"{np.abs(ref).max():.3g}")
    assert diff <= ATOL
    if qtype == Q.F32:  # no quantization: also the original torch model
        assert np.abs(ours - hf_logits(model, TOKENS)).max() <= ATOL


def test_directory_with_one_gguf_loads_and_several_are_refused(tmp_path, tiny_model):
    write_gguf(tiny_model, tmp_path / "a.gguf", Q.Q8_0)
    lm = LanguageModel.from_pretrained(tmp_path, tokenizer=False)
    assert lm.config.num_layers == 2
    shutil.copy(tmp_path / "a.gguf", tmp_path / "b.gguf")
    with pytest.raises(CheckpointError, match=r"2 GGUF files \(a\.gguf, b\.gguf\)"):
        LanguageModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------- bad input
def test_unsupported_architecture(tmp_path, tiny_model):
    file = write_gguf(tiny_model, tmp_path / "bert.gguf", Q.F16, arch="bert")
    with pytest.raises(UnsupportedModelError, match=r"GGUF architecture 'bert' .* supported: llama"):
        LanguageModel.from_pretrained(file)


def test_unsupported_quant_type(tmp_path, tiny_model):
    raw = np.zeros((4, 32), np.int8)  # an integer tensor: no weight type we dequantize
    file = write_gguf(tiny_model, tmp_path / "i8.gguf", Q.F16, extra=[("blk.0.attn_norm.bias", raw, Q.I8)])
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_norm\.bias .* quant type I8\b.* supported: F32, F16"):
        LanguageModel.from_pretrained(file)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.001])
def test_truncated_file(tmp_path, tiny_model, keep):
    file = write_gguf(tiny_model, tmp_path / "cut.gguf", Q.Q8_0)
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(CheckpointError, match=r"cannot read GGUF file .*cut\.gguf .*truncated or corrupt"):
        LanguageModel.from_pretrained(file)


def test_shape_disagreeing_with_metadata(tmp_path, tiny_model):
    file = write_gguf(tiny_model, tmp_path / "bad.gguf", Q.F32, metadata=dict(feed_forward_length=512))
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_\w+\.weight .* shape \(\d+, \d+\) .* implies \(\d+, \d+\)"):
        LanguageModel.from_pretrained(file)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no GGUF file at .*nothing\.gguf"):
        LanguageModel.from_pretrained(tmp_path / "nothing.gguf")


# --------------------------------------------------------------------------------------------------- convert
def test_convert_cli_writes_an_hf_checkpoint(tmp_path, tiny_model, hf_logits, ours_logits_fn):
    from kvzip_jax.cli import main

    file = write_gguf(tiny_model, tmp_path / "tiny.gguf", Q.Q4_K)
    out = tmp_path / "hf"
    assert main(["convert", "--model", file, "--out", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    gguf_lm = LanguageModel.from_pretrained(file)
    ours = ours_logits_fn(gguf_lm.params, gguf_lm.config, TOKENS)
    assert np.abs(hf_logits(converted, TOKENS) - ours).max() <= ATOL
    back = LanguageModel.from_pretrained(out)
    np.testing.assert_array_equal(ours_logits_fn(back.params, back.config, TOKENS), ours)
    assert main(["convert", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------------------------------------- real SmolLM2
SMOL_ATOL = 1e-4  # the bar; measured 8.5e-5 since long contractions run in blocks on CPU (layers.py)


@pytest.fixture(scope="module")
def smollm2(smollm2_lm):
    file, lm = smollm2_lm
    return file, lm, _hf_from_gguf(file)


def test_smollm2_logits_match_transformers(smollm2, hf_logits, ours_logits_fn):
    _, lm, hf = smollm2
    assert lm.config.num_layers == 30 and lm.config.tie_word_embeddings
    ids = np.array([lm.encode("The capital of France is Paris, and the capital of Italy is")])
    diff = float(np.abs(ours_logits_fn(lm.params, lm.config, ids) - hf_logits(hf, ids)).max())
    print(f"SmolLM2 Q4_1: max |logit diff| = {diff:.3g}")
    assert diff <= SMOL_ATOL


def test_smollm2_tokenizer_and_chat_template(smollm2):
    file, lm, _ = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(file), gguf_file=os.path.basename(file))
    text = "GGUF files keep llama.cpp's tokenizer: héllo wörld, 1234!"
    assert lm.encode(text) == ref(text)["input_ids"]
    assert lm.tokenizer.chat_template and "<|im_start|>" in lm.tokenizer.chat_template
    chat = lm.encode("Hi", chat=True)
    assert lm.tokenizer.decode(chat).startswith("<|im_start|>")


def test_smollm2_tokenizer_is_converted_once_then_loaded_from_the_cache(smollm2, monkeypatch):
    """The GGUF tokenizer conversion (10-20 s) ran when the session fixture loaded SmolLM2; loading it again
    reads the saved copy under `cache_dir()` instead, and encodes and renders the chat template identically."""
    from kvzip_jax.lm import cache_dir, load_tokenizer

    file, lm, _ = smollm2
    assert os.listdir(os.path.join(cache_dir(), "tokenizers"))
    real = transformers.AutoTokenizer.from_pretrained
    conversions = []

    def counting(*args, **kwargs):
        if "gguf_file" in kwargs:
            conversions.append(kwargs["gguf_file"])
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counting)
    again = load_tokenizer(file, file)
    assert conversions == []
    text = "Cached tokenizers: héllo wörld, 1234! <|im_start|>"
    assert again.encode(text) == lm.tokenizer.encode(text)
    assert again.chat_template == lm.tokenizer.chat_template and again.eos_token_id == lm.tokenizer.eos_token_id
    # A changed file (here: a new modification time) has another key, so it would be converted again.
    from kvzip_jax.lm import _gguf_tokenizer_key

    key = _gguf_tokenizer_key(file)
    os.utime(file, ns=(os.stat(file).st_atime_ns, os.stat(file).st_mtime_ns + 1))
    try:
        assert _gguf_tokenizer_key(file) != key
    finally:
        os.utime(file, ns=(os.stat(file).st_atime_ns, os.stat(file).st_mtime_ns - 1))
    assert _gguf_tokenizer_key(file) == key


def test_smollm2_greedy_generation_matches(smollm2):
    _, lm, hf = smollm2
    ids = lm.encode("What is the capital of France?", chat=True)
    ours = lm.generate([ids], max_new_tokens=6, stop_token_ids=[])[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=lm.config.pad_token_id)
    assert ours == ref[0, len(ids):].tolist()
