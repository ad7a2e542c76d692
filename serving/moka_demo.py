"""The shipped MokA audio-visual demo model (`moka_jax.demo`), served: its engine and its chat prompt.

A chat request for the demo is one user message with one picture (an `image_url` part, a data URI; any size, it
is resized to 32 x 32), one sound (an `input_audio` part: base64 WAV at 16 kHz, up to 1 s) and the question as
text. It becomes the prompt the demo was trained on (`AVQADemo.prompt`): the fixed system prompt, the picture's
and the sound's tokens, and the instruction + question, whose tokens are MokA's keys. The engine prefills it
through the MokA adapters and decodes on the folded text path (`serving.engine.moka`), so the answer is the one
`AVQADemo.answer` gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from moka_jax import avqa_model, experiment
from moka_jax.demo import AVQADemo, load_demo
from serving.api_media import ChatPrompt, decode_data_uri, decode_wav, media_input
from serving.api_schema import ChatMessage, RequestError
from serving.engine import Engine, EngineConfig
from serving.engine.moka import MokAServing

MODEL_NAME = "moka-avqa-demo"
SAMPLE_RATE = avqa_model.LOG_MEL.sampling_rate
MAX_NEW_TOKENS = 6  # the demo's answers are one or two words; `prompt` leaves room for this many


def demo_engine(engine_config: EngineConfig, *, demo: AVQADemo | None = None,
                devices: Sequence[jax.Device] | None = None, tokenizer=None, model_name: str = MODEL_NAME,
                fleet=None) -> Engine:
    """An engine serving the demo (default: the shipped one). Its prefill_chunk must hold a whole prompt. `fleet`:
    its instances on a Ray cluster (`serving.engine.ray_fleet.RayFleet`)."""
    from kvzip_jax.kvzip_demo import DEMO_MODEL_DIR
    from kvzip_jax.lm import pretrained_tokenizer

    demo = load_demo() if demo is None else demo
    config = demo.model.config
    moka = MokAServing(nnx.state(demo.model.decoder), demo.moka, max_keys=experiment.MAX_KEYS)
    tokenizer = pretrained_tokenizer(DEMO_MODEL_DIR) if tokenizer is None else tokenizer
    return Engine(config, moka.text_params(config), tokenizer, engine_config, devices=devices, model_name=model_name,
                  modalities=demo.modalities(), moka=moka, fleet=fleet)


def demo_chat_prompt(demo: AVQADemo, engine: Engine):
    """The API's chat-prompt builder for the demo (`serving.api.create_app(..., chat_prompt=...)`): it runs in the
    server's thread pool (it decodes and preprocesses the picture and the sound)."""

    def build(messages: list[ChatMessage]) -> ChatPrompt:
        if len(messages) != 1 or messages[0].role != "user" or not isinstance(messages[0].content, list):
            raise RequestError(f"{MODEL_NAME} takes one user message whose content parts are a picture (image_url), "
                               "a sound (input_audio) and the question (text)", param="messages")
        pictures, sounds, texts = [], [], []
        for j, part in enumerate(messages[0].content):
            where = f"messages[0].content[{j}]"
            if part.type == "image_url":
                pictures.append((decode_data_uri(part.image_url.url if part.image_url else "", where), where))
            elif part.type == "input_audio":
                sounds.append((decode_wav(part.input_audio, where), where))
            else:
                texts.append(part.text or "")
        if len(pictures) != 1 or len(sounds) != 1:
            raise RequestError(f"{MODEL_NAME} takes exactly one picture and one sound per request; got "
                               f"{len(pictures)} picture(s) and {len(sounds)} sound(s)", param="messages")
        question = " ".join(t.strip() for t in texts if t.strip())
        if not question:
            raise RequestError("the question is empty: add a text part", param="messages")
        try:
            prompt = demo.prompt(question, max_new_tokens=MAX_NEW_TOKENS)
        except ValueError as e:  # a question longer than the model's positions allow
            raise RequestError(f"messages[0]: {e}", param="messages") from e
        (picture, pw), ((wave, rate), sw) = pictures[0], sounds[0]
        if rate != SAMPLE_RATE:
            raise RequestError(f"{sw}: the sound is sampled at {rate} Hz; this model takes {SAMPLE_RATE} Hz",
                               param="messages")
        media = (media_input(engine.modalities["image"], picture, pw),
                 media_input(engine.modalities["audio"], wave, sw))
        return ChatPrompt([int(t) for t in prompt["tokens"]], media, prompt["modality_ids"], prompt["key_mask"])

    return build
