"""The shipped MokA audio-visual demo, served by the engine: requests with a picture and a sound are prefilled in
one step through the MokA adapters (modality ids and the question keys from the request) and decoded on the
folded text path. Greedy answers equal `moka_jax`'s own generation (`moka_jax.generate.generate`, and the demo's
`answer`) under a blocking policy and a non-blocking one (encode instances), also for a request restarted
after its instance failed mid-decode (its generated tokens are prefilled again as text); the input errors; and
the OpenAI API with a picture and a sound, through the official client."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from serving_testutil import png_data_uri, wav_base64

from kvzip_jax.generate import generate as lm_generate
from moka_jax import experiment
from moka_jax import generate as moka_generate
from moka_jax.context import make_context
from moka_jax.data import load_demo_tokenizer
from moka_jax.demo import held_out_samples, load_demo
from serving.api import create_app
from serving.engine import Engine, EngineConfig, MediaInput, SamplingParams
from serving.model import Group, Stage
from serving.moka_demo import demo_chat_prompt, demo_engine
from serving.server import ServerThread

openai = pytest.importorskip("openai")

SHAPE = dict(page_size=8, pages_per_instance=1024, prefill_chunk=128, max_model_len=128, check_invariants=True,
             warmup=False)
LONG = 24  # tokens per answer where eos is ignored (the answers proper are 1-3 tokens)
FIVE = {"elasticmm": dict(policy="elasticmm", num_instances=5)}  # non-blocking: encode instances


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def samples():
    return held_out_samples(4)


@pytest.fixture(scope="module")
def requests_(demo, samples):
    """Each sample as the engine takes it: (expanded prompt, [picture, sound], modality ids, key mask)."""
    mods = demo.modalities()
    out = []
    for s in samples:
        p = demo.prompt(s.question)
        media = [MediaInput.from_item(mods["image"], s.image), MediaInput.from_item(mods["audio"], s.audio)]
        out.append((p["tokens"].tolist(), media, p["modality_ids"], p["key_mask"]))
    return out


@pytest.fixture(scope="module")
def reference(demo, samples, requests_):
    """`moka_jax.generate.generate` on the same prompts, LONG greedy tokens with no stop token."""
    width = -(-max(len(r[0]) for r in requests_) // 8) * 8
    batch = {"tokens": np.zeros((len(samples), width), np.int32), "modality_ids": np.full((len(samples), width), 3),
             "key_mask": np.zeros((len(samples), width), bool), "loss_weights": np.zeros((len(samples), width)),
             "image": np.stack([s.image for s in samples]).astype(np.float32) / 255.0,
             "audio": np.stack([s.audio for s in samples])}
    for b, (tokens, _, ids, keys) in enumerate(requests_):
        batch["tokens"][b, :len(tokens)], batch["modality_ids"][b, :len(tokens)] = tokens, ids
        batch["key_mask"][b, :len(tokens)] = keys
    inputs = experiment.model_inputs(batch, demo.encoders)
    x = demo.model.embed(inputs["tokens"], inputs["modality_ids"], inputs["features"])
    ctx = make_context(demo.moka, batch["modality_ids"], batch["key_mask"], max_keys=experiment.MAX_KEYS)
    out = moka_generate.generate(nnx.state(demo.model.decoder), demo.model.config, demo.moka, x,
                                 [len(r[0]) for r in requests_], ctx, max_new_tokens=LONG, stop_token_ids=())
    return [row.tolist() for row in np.asarray(out.tokens)]


def build(demo, **config) -> Engine:
    return demo_engine(EngineConfig(**config, **SHAPE), demo=demo)


@pytest.fixture(scope="module")
def coupled(demo):
    with build(demo, policy="coupled", num_instances=2) as engine:
        yield engine


def run(engine, requests_, max_tokens=LONG, **sampling):
    prompts, media, ids, keys = zip(*requests_, strict=True)
    return engine.generate(prompts, SamplingParams(max_tokens=max_tokens, **sampling), media=media,
                           modality_ids=ids, key_mask=keys)


@pytest.mark.parametrize("name", ["coupled", *FIVE])
def test_greedy_answers_match_moka_generation(demo, coupled, samples, requests_, reference, name):
    with build(demo, **FIVE[name]) if name in FIVE else contextlib.nullcontext(coupled) as engine:
        if name in FIVE:
            assert engine.layout_counts()[(Group.MM, Stage.ENCODE)] == 1
        assert run(engine, requests_, ignore_eos=True) == reference
        prefills = [t for t in engine.timings if t[0] == "prefill"]
        assert prefills and engine.stats.media_encoded >= 2 * len(samples)
        # stopping at the end-of-turn token: the demo's own answers
        tokenizer = load_demo_tokenizer()
        answers = [tokenizer.decode([t for t in out if t != 4]).strip() for out in run(engine, requests_, 6)]
        assert answers == demo.answer([s.image for s in samples], [s.audio for s in samples],
                                      [s.question for s in samples])
        with engine.lock:
            assert engine.requests == {}
            assert all(i.cached_pages == 0 for i in engine.insts if i.prefix is not None)  # nothing MokA is shared
            engine.check_invariants()


def test_text_only_requests_run_on_the_folded_text_path(demo, coupled):
    config = demo.model.config
    text = load_demo_tokenizer().encode("<|begin_of_text|>the picture shows").ids
    folded = coupled.moka.text_params(config)
    expected = np.asarray(lm_generate(folded, config, [text], max_new_tokens=8, stop_token_ids=()).tokens)[0].tolist()
    assert coupled.generate([text], SamplingParams(max_tokens=8, ignore_eos=True)) == [expected]


def test_a_request_restarted_mid_decode_prefills_its_tokens_again_and_answers_the_same(demo, requests_, reference):
    with build(demo, policy="coupled", num_instances=2, decode_steps=1) as engine:
        got, done = {}, threading.Event()

        def sink(out):
            got.setdefault(out.rid, []).extend(out.token_ids)
            if out.finish_reason is not None:
                done.set()

        tokens, media, ids, keys = requests_[0]
        rid = engine.submit(tokens, SamplingParams(max_tokens=LONG, ignore_eos=True), sink, media=media,
                            modality_ids=ids, key_mask=keys)
        deadline, victim = time.monotonic() + 120, None
        while victim is None and time.monotonic() < deadline:
            with engine.lock:
                r = engine.requests.get(rid)
                if r is not None and 3 <= r.produced < LONG - 4:
                    victim = r.owner
            time.sleep(0.002)
        assert victim is not None, "the request never reached the middle of its decode"
        engine.inject_fault(victim)
        assert done.wait(120)
        assert got[rid] == reference[0]
        assert engine.insts[victim].state.name == "FAILED" and engine.stats.errors == 0


def test_moka_input_errors(demo, coupled, requests_):
    tokens, media, ids, keys = requests_[0]
    sampling = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="key_mask marks tokens of the image"):
        bad = keys.copy()
        bad[int(np.argmax(ids == 1))] = True
        coupled.submit(tokens, sampling, print, media=media, modality_ids=ids, key_mask=bad)
    with pytest.raises(ValueError, match=r"MokAServing\.max_keys"):
        many = np.asarray(ids) == 0
        coupled.submit(tokens, sampling, print, media=media, modality_ids=ids, key_mask=many)
    with pytest.raises(ValueError, match="prefilled in one step of at most prefill_chunk = 128"):
        longer = [*tokens, *[5] * 60]
        coupled.submit(longer, sampling, print, media=media, modality_ids=[*ids, *[0] * 60], key_mask=None)
    with pytest.raises(ValueError, match="the items given are, in order, \\['audio', 'image'\\]"):
        coupled.submit(tokens, sampling, print, media=media[::-1], modality_ids=ids, key_mask=keys)
    with pytest.raises(ValueError, match="share one placeholder token: give modality_ids"):
        coupled.submit(tokens, sampling, print, media=media, key_mask=keys)
    assert coupled.requests == {}


# ---- the OpenAI API: a picture and a sound -----------------------------------------------------------------------
def test_the_openai_client_asks_the_demo_about_a_picture_and_a_sound(demo, coupled, samples):
    s = samples[1]
    pcm = (np.clip(s.audio, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768.0  # what the WAV carries
    expected = demo.answer([s.image], [pcm], [s.question])[0]
    app = create_app(coupled, chat_prompt=demo_chat_prompt(demo, coupled))
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        content = [{"type": "image_url", "image_url": {"url": png_data_uri(s.image)}},
                   {"type": "input_audio", "input_audio": {"data": wav_base64(s.audio), "format": "wav"}},
                   {"type": "text", "text": s.question}]
        reply = client.chat.completions.create(model=coupled.model_name, max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": content}])
        assert reply.choices[0].message.content.strip() == expected
        assert reply.choices[0].finish_reason == "stop"

        def refused(parts, status=400):
            r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "model": coupled.model_name, "messages": [{"role": "user", "content": parts}]})
            assert r.status_code == status, r.text
            return r.json()["error"]["message"]

        assert "one picture and one sound" in refused(content[:1] + content[2:])
        slow = {"type": "input_audio", "input_audio": {"data": wav_base64(s.audio, 8_000), "format": "wav"}}
        assert "sampled at 8000 Hz; this model takes 16000 Hz" in refused([content[0], slow, content[2]])
        mp3 = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}
        assert "must be WAV" in refused([content[0], mp3, content[2]])
        junk = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
        assert "cannot be read as WAV" in refused([content[0], junk, content[2]])
        assert "the question is empty" in refused(content[:2])
        long = {"type": "input_audio", "input_audio": {"data": wav_base64(np.tile(s.audio, 2)), "format": "wav"}}
        assert "has shape (32000,)" in refused([content[0], long, content[2]])
        # a picture of another size is resized as CLIP's processor does; a shorter sound is padded with silence
        big = np.asarray(Image.fromarray(s.image).resize((64, 48)))
        short = {"type": "input_audio", "input_audio": {"data": wav_base64(s.audio[:8000]), "format": "wav"}}
        other = client.chat.completions.create(model=coupled.model_name, max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri(big)}}, short,
                                         content[2]]}])
        assert other.choices[0].finish_reason in ("stop", "length")
        # and it keeps serving
        again = client.chat.completions.create(model=coupled.model_name, max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": content}])
        assert again.choices[0].message.content == reply.choices[0].message.content
