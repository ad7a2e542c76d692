"""Images through the serving engine, on a tiny random LLaVA-style model (CLIP tower, MLP projector, Llama text
model): greedy answers equal `MultimodalLM.generate` for the same prompts and images under a blocking policy
(images encoded by the prefill instance) and a non-blocking one (an encode instance); the embedding cache (hits,
eviction, pins checked by the engine's invariants after every step); a failed encode step; the input errors;
and the OpenAI API with image parts (data URIs), through the official client, answering as `MultimodalLM` does."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from kvzip_jax.config import ModelConfig
from kvzip_jax.kvzip_demo import DEMO_MODEL_DIR
from kvzip_jax.lm import pretrained_tokenizer
from kvzip_jax.models import projector, vision
from kvzip_jax.models.decoder import init_params
from kvzip_jax.multimodal_lm import MultimodalLM, image_modality
from kvzip_jax.preprocess import ImageProcessor
from serving.api import create_app
from serving.calibrate import fit_profile
from serving.costmodel import CostModel, default_cost_model
from serving.engine import Engine, EngineConfig, MediaInput, SamplingParams
from serving.model import Group, Stage
from serving.replay import engine_images, replay
from serving.server import ServerThread
from serving.workloads import WorkloadSpec, generate

openai = pytest.importorskip("openai")

IMAGE_ID = 1024  # "<image>", added to the demo tokenizer's 1024 tokens
MAX_TOKENS = 10
SHAPE = dict(page_size=8, pages_per_instance=1024, prefill_chunk=32, max_model_len=128, check_invariants=True,
             warmup=False)


@pytest.fixture(scope="module")
def mm():
    tokenizer = pretrained_tokenizer(DEMO_MODEL_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    text = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=1032, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_id=None))
    tower = vision.VisionConfig(model_type=vision.CLIP, hidden_size=32, intermediate_size=64, num_layers=2,
                                num_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    proj = projector.ProjectorConfig(in_features=32, out_features=64)
    processor = ImageProcessor(processor_type="CLIPImageProcessor", shortest_edge=32, do_center_crop=True,
                               crop_height=32, crop_width=32)
    image = image_modality(tower, vision.init_params(tower, seed=2), proj, projector.init_params(proj, seed=3),
                           token_id=IMAGE_ID, processor=processor)
    return MultimodalLM(text, init_params(text, seed=1), {"image": image}, tokenizer)


@pytest.fixture(scope="module")
def cases(mm):
    """(prompt with one placeholder per image, images): two images, one (shared with the first), none, and an
    image whose 16 tokens straddle the 32-token prefill chunks."""
    rng = np.random.default_rng(0)
    pixels = [rng.standard_normal((3, 32, 32)).astype(np.float32) for _ in range(3)]

    def text(n):
        return rng.integers(6, 128, n).tolist()

    return [
        ([*text(3), IMAGE_ID, *text(4), IMAGE_ID, *text(2)], [pixels[0], pixels[1]]),
        ([IMAGE_ID, *text(7)], [pixels[0]]),
        (text(11), []),
        ([*text(25), IMAGE_ID, *text(3)], [pixels[2]]),
    ]


@pytest.fixture(scope="module")
def reference(mm, cases):
    # one batch (ragged image counts, right padding): one compilation
    return mm.generate([p for p, _ in cases], images=[imgs for _, imgs in cases], max_new_tokens=MAX_TOKENS,
                       stop_token_ids=[])


def inputs(mm, cases):
    return [p for p, _ in cases], [[MediaInput.from_item(mm.modalities["image"], x) for x in imgs]
                                   for _, imgs in cases]


def build(mm, **config) -> Engine:
    return Engine(mm.config, mm.params, mm.tokenizer, engine_config=EngineConfig(**config, **SHAPE),
                  modalities=mm.modalities, model_name="tiny-llava")


@pytest.fixture(scope="module")
def coupled(mm):
    """One coupled instance (blocking: it encodes a request's images, then prefills it), shared by the tests."""
    with build(mm, policy="coupled", num_instances=1) as engine:
        yield engine


FIVE = {"static_epd": dict(policy="static_epd", policy_options=(("split", (1, 1, 1, 1, 1)),), num_instances=5),
        "elasticmm": dict(policy="elasticmm", num_instances=5)}  # non-blocking: the MM group's encode instance


@pytest.mark.parametrize("name", ["coupled", *FIVE])
def test_greedy_answers_with_images_match_multimodal_generate(mm, coupled, cases, reference, name):
    prompts, images = inputs(mm, cases)
    with build(mm, **FIVE[name]) if name in FIVE else contextlib.nullcontext(coupled) as engine:
        if name in FIVE:
            assert engine.layout_counts()[(Group.MM, Stage.ENCODE)] == 1
        before = engine.stats.media_encoded
        assert engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS), media=images) == reference
        assert engine.stats.media_encoded - before == 3  # 3 distinct images: the shared one is encoded once
        encoded = [t for t in engine.timings if t[0] == "encode"]
        assert encoded and all(f[0] % 16 == 0 for _, f, _ in encoded)
        if name in FIVE:
            enc = [i for i in engine.insts if i.group == Group.MM and i.stage == Stage.ENCODE]
            assert enc and all(i.pool.used == 0 for i in enc)  # encode instances hold no KV
            assert name != "static_epd" or enc[0].steps >= 1
        # the same images again: every embedding comes from the cache, nothing is encoded
        hits = engine.embedding_cache.hits
        assert engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS), media=images) == reference
        assert engine.stats.media_encoded - before == 3 and engine.embedding_cache.hits - hits == 4
        with engine.lock:
            assert engine.requests == {} and all(n == 0 for n in engine.embedding_cache.pool.ref.values())
            engine.check_invariants()
        assert engine.stats.policy_errors == 0


def test_elasticmm_sizes_an_encode_queue_of_engine_requests(mm, cases, reference):
    """ElasticMM's scaling reads the queued requests' images still to encode (`todo_imgs`, the simulator's name)."""
    prompts, images = inputs(mm, cases)
    with build(mm, **FIVE["elasticmm"]) as engine:
        out, done = [], threading.Event()

        def sink(o):
            out.extend(o.token_ids)
            if o.finish_reason is not None:
                done.set()

        with engine.lock:  # the workers wait: the request stays in its encode queue while the policy looks
            engine.submit(prompts[0], SamplingParams(max_tokens=MAX_TOKENS), sink, media=images[0])
            assert len(engine.q[(Group.MM, Stage.ENCODE)]) == 1
            finish, lengths = engine.policy._finish_times(engine, Group.MM, Stage.ENCODE, engine.now)
            assert len(finish) == 1 and lengths == [len(prompts[0]) + 2 * 15]  # 2 placeholders -> 16 tokens each
        assert done.wait(60) and out == reference[0]


def test_a_cache_of_one_image_evicts_and_answers_the_same(mm, cases, reference):
    prompts, images = inputs(mm, cases)
    with build(mm, policy="static_epd", policy_options=(("split", (1, 1, 1, 1, 1)),), num_instances=5,
               embedding_cache_tokens=16) as engine:
        for k in (0, 3, 1):  # two images (only one fits: the other is used uncached), a new one, the first again
            assert engine.generate([prompts[k]], SamplingParams(max_tokens=MAX_TOKENS), media=[images[k]]) \
                == [reference[k]]
        assert engine.embedding_cache.pool.evictions >= 1 and len(engine.embedding_store) <= 1


def test_a_failed_encode_step_restarts_its_request_elsewhere(mm, cases, reference):
    prompts, images = inputs(mm, cases)
    with build(mm, policy="coupled", num_instances=2) as engine:
        engine.inject_fault(0)
        engine.inject_fault(1)
        with engine.lock:
            engine.insts[1].fault = False  # only instance 0 fails, at its first step: the encode of a request
        out = engine.generate(prompts[:2], SamplingParams(max_tokens=MAX_TOKENS), media=images[:2])
        assert out == reference[:2]
        assert engine.insts[0].state.name == "FAILED" and engine.stats.errors == 0


def test_image_input_errors(mm, coupled, cases):
    prompts, images = inputs(mm, cases)
    sampling = SamplingParams(max_tokens=2)
    engine = coupled
    with pytest.raises(ValueError, match="5 images and sounds in one request; this engine takes at most 4"):
        engine.submit([IMAGE_ID] * 5, sampling, print, media=images[0] * 2 + images[1])
    with pytest.raises(ValueError, match="placeholder"):
        engine.submit(prompts[1] + [IMAGE_ID], sampling, print, media=images[1])
    with pytest.raises(ValueError, match="no image was given"):
        engine.submit(prompts[1], sampling, print)
    wrong = MediaInput("x", np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"shape \(3, 16, 16\); this model takes \(3, 32, 32\)"):
        engine.submit([IMAGE_ID], sampling, print, media=[wrong])
    with pytest.raises(TypeError, match="not a MediaInput"):
        engine.submit([IMAGE_ID], sampling, print, media=[np.zeros((3, 32, 32))])
    assert engine.requests == {}
    with Engine(mm.config, mm.params, engine_config=EngineConfig(**SHAPE)) as text_only:
        with pytest.raises(ValueError, match="this model takes no images or sounds"):
            text_only.submit(prompts[1], sampling, print, media=images[1])


def test_a_multimodal_workload_replays_on_the_engine_and_calibrates_its_encode_stage(coupled):
    spec = WorkloadSpec(arrival="poisson", rate=20.0, duration=1.0, dataset="cpu_mm", dup_rate=0.5, seed=3)
    requests = engine_images(generate(spec, default_cost_model()), 16)  # the tiny tower's 16 tokens per image
    # CPU-test sizes: the engine here holds 128 positions per request
    requests = [dataclasses.replace(r, text_tokens=min(r.text_tokens, 40), sys_len=min(r.sys_len, 8),
                                    output_len=min(r.output_len, 8)) for r in requests]
    images = {im.hash for r in requests for im in r.images}
    assert len(images) >= 4 and sum(len(r.images) for r in requests) > len(images)  # repeats: cache hits
    encoded = coupled.stats.media_encoded
    summary = replay(coupled, requests)
    assert summary.requests == len(requests) and summary.errors == 0
    assert coupled.stats.media_encoded - encoded == len(images)  # each distinct image once
    prof = fit_profile(coupled, list(coupled.timings), name="tiny-llava")
    steps = [(f, t) for kind, f, t in coupled.timings if kind == "encode"]
    fitted = CostModel(prof)
    predicted = np.median([fitted.encode_time(*f) for f, _ in steps])
    assert 0.5 < predicted / np.median([t for _, t in steps]) < 2.0  # the fit describes its steps (seconds)


# ---- the OpenAI API with image parts --------------------------------------------------------------------------
def data_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_with_images_through_the_openai_client(mm, coupled):
    rng = np.random.default_rng(5)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    # the reference: the chat template's text with the placeholder where each image part sits
    text = mm.tokenizer.apply_chat_template([{"role": "user", "content": "Compare <image> and<image>: which?"}],
                                            add_generation_prompt=True, tokenize=False)
    expected = mm.generate([text], images=[pictures], max_new_tokens=8, stop_token_ids=sorted(
        {*mm.config.eos_token_ids, mm.tokenizer.eos_token_id}))[0]
    content = [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": data_uri(pictures[0])}},
               {"type": "text", "text": " and"}, {"type": "image_url", "image_url": {"url": data_uri(pictures[1])}},
               {"type": "text", "text": ": which?"}]
    engine = coupled
    encoded, hits = engine.stats.media_encoded, engine.embedding_cache.hits
    with ServerThread(create_app(engine, model_name="tiny-llava")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        reply = client.chat.completions.create(model="tiny-llava", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": content}])
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == len(mm.tokenizer(text)["input_ids"]) + 2 * 15  # 16 tokens each
        stream = client.chat.completions.create(model="tiny-llava", max_tokens=8, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": content}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        # the second request found both images in the cache
        assert engine.stats.media_encoded - encoded == 2 and engine.embedding_cache.hits - hits == 2
        metrics = httpx.get(f"{server.url}/metrics").text
        assert f'serving_embedding_cache_lookups_total{{result="hit"}} {float(engine.embedding_cache.hits)}' \
            in metrics

        def refused(part, status, *words):
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
                "model": "tiny-llava", "messages": [{"role": "user", "content": [part]}]})
            assert r.status_code == status, r.text
            assert all(w in r.json()["error"]["message"] for w in words), r.text

        refused({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, 400, "network")
        refused({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}, 400, "base64")
        refused({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}, 400,
                "cannot be read")
        refused({"type": "text", "text": "a <image> in text"}, 400, "image_url parts")
        many = [{"type": "image_url", "image_url": {"url": data_uri(pictures[0])}}] * 5
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
            "model": "tiny-llava", "messages": [{"role": "user", "content": many}]})
        assert r.status_code == 400 and "at most 4" in r.json()["error"]["message"]
        # and it goes on serving
        assert client.chat.completions.create(model="tiny-llava", max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": content}]).choices[0].message.content == expected


def test_prefix_blocks_with_other_images_are_not_shared(mm, coupled, cases, reference):
    prompts, images = inputs(mm, cases)
    prompt, other = prompts[3], images[1]  # the 4th prompt's text (25 tokens, the image, 3), the 2nd's image
    expected = mm.generate([prompt], images=[[cases[1][1][0]]], max_new_tokens=MAX_TOKENS, stop_token_ids=[])
    sampling = SamplingParams(max_tokens=MAX_TOKENS)
    assert coupled.generate([prompt], sampling, media=[images[3]]) == [reference[3]]  # its blocks are cached
    hits = coupled.stats.prefix_hit_tokens
    assert coupled.generate([prompt], sampling, media=[other]) == expected
    assert coupled.stats.prefix_hit_tokens - hits == 24  # the 3 blocks before the image; not the image's blocks
    hits = coupled.stats.prefix_hit_tokens
    assert coupled.generate([prompt], sampling, media=[other]) == expected
    assert coupled.stats.prefix_hit_tokens - hits == 40  # now all but the last block (44 tokens in all)
