"""Images and sounds of chat requests: `data:` URIs decoded (Pillow), `input_audio` parts decoded (WAV, the standard
library's `wave`), preprocessed by the model's processors and keyed by content hash, off the event loop (the API
calls these in Starlette's thread pool, so preprocessing never blocks other requests, and never shares a device
step with prefill).

The server never fetches the network: an http(s) image URL is refused with a message that says so.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import warnings
import wave

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.api_schema import InputAudio, RequestError
from serving.engine import MediaInput

MAX_IMAGE_PIXELS = 40_000_000  # a decoded image beyond this is refused (a decompression bomb otherwise)
MAX_AUDIO_SECONDS = 600  # a decoded sound beyond this is refused before its samples are read


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """What a chat request becomes for the engine (`Engine.submit`'s arguments): token ids, the images and sounds,
    and for a prompt given expanded, its modality ids and (MokA) question-key mask."""

    ids: list[int]
    media: tuple = ()
    modality_ids: np.ndarray | None = None
    key_mask: np.ndarray | None = None


def placeholder_text(tokenizer, token_id: int) -> str:
    """The text of the image placeholder token (e.g. "<image>"), checked to encode back to that one token."""
    text = tokenizer.convert_ids_to_tokens(token_id)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if isinstance(text, str) else None
    if ids != [token_id]:
        raise ValueError(f"the tokenizer does not encode the image placeholder (token id {token_id}, text {text!r}) "
                         "as that one token; add it as a special token")
    return text


def decode_data_uri(url: str, where: str) -> Image.Image:
    """A data:image/...;base64,... URI -> the decoded picture (RequestError for anything else)."""
    if not url.startswith("data:"):
        raise RequestError(f"{where}: image URLs must be data: URIs (base64); this server does not fetch the "
                           "network", param="messages")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(f"{where}: the data URI is not base64 (data:image/png;base64,...)", param="messages")
    raw = _b64(payload, "image", where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RequestError(f"{where}: the image has {image.width}x{image.height} pixels; the limit is "
                                   f"{MAX_IMAGE_PIXELS}", status=413, param="messages")
            image.load()
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise RequestError(f"{where}: the image cannot be read ({type(e).__name__}: {e})", param="messages") from e
    return image


def _b64(payload: str, what: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where}: the {what} is not valid base64 ({e})", param="messages") from e


def decode_wav(part: InputAudio | None, where: str) -> tuple[np.ndarray, int]:
    """An `input_audio` part (base64 WAV, PCM 8/16/32-bit) -> (float32 mono samples in [-1, 1], sample rate).
    Channels are averaged."""
    if part is None or part.format != "wav":
        raise RequestError(f"{where}: input_audio must be WAV (format 'wav'); got "
                           f"{None if part is None else part.format!r}", param="messages")
    raw = _b64(part.data, "sound", where)
    try:
        with wave.open(io.BytesIO(raw)) as f:
            rate, channels, width, n = f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()
            if n > MAX_AUDIO_SECONDS * rate:
                raise RequestError(f"{where}: the sound lasts {n / rate:.1f} s; the limit is {MAX_AUDIO_SECONDS} s",
                                   status=413, param="messages")
            frames = f.readframes(n)
    except RequestError:
        raise
    except (wave.Error, EOFError, ValueError) as e:
        raise RequestError(f"{where}: the sound cannot be read as WAV ({e})", param="messages") from e
    kinds = {1: (np.uint8, 128.0, 128.0), 2: (np.int16, 0.0, 32768.0), 4: (np.int32, 0.0, 2.0 ** 31)}
    if width not in kinds:
        raise RequestError(f"{where}: {8 * width}-bit WAV samples are not supported (8, 16 or 32-bit PCM)",
                           param="messages")
    dtype, offset, scale = kinds[width]
    samples = np.frombuffer(frames[:len(frames) - len(frames) % (width * channels)], dtype).astype(np.float32)
    return ((samples - offset) / scale).reshape(-1, channels).mean(axis=1), rate


def media_input(modality, item, where: str) -> MediaInput:
    """A decoded picture or sound through the model's processor (errors name the request part)."""
    try:
        return MediaInput.from_item(modality, item)
    except ValueError as e:
        raise RequestError(f"{where}: {e}", param="messages") from e


def image_inputs(modality, urls: list[tuple[str, str]]) -> list[MediaInput]:
    """(url, where in the request) of each image -> the engine's inputs, in order."""
    return [media_input(modality, decode_data_uri(url, where), where) for url, where in urls]
