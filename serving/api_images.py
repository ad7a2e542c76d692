"""Images of chat requests: `data:` URIs decoded (Pillow), preprocessed by the model's image processor and keyed by
content hash, off the event loop (the API calls these in Starlette's thread pool, so preprocessing never blocks
other requests, and never shares a device step with prefill).

The server never fetches the network: an http(s) image URL is refused with a message that says so.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from serving.api_schema import RequestError
from serving.engine import MediaInput

MAX_IMAGE_PIXELS = 40_000_000  # a decoded image beyond this is refused (a decompression bomb otherwise)


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
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where}: the image is not valid base64 ({e})", param="messages") from e
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


def image_inputs(modality, urls: list[tuple[str, str]]) -> list[MediaInput]:
    """(url, where in the request) of each image -> the engine's inputs, in order."""
    out = []
    for url, where in urls:
        picture = decode_data_uri(url, where)
        try:
            out.append(MediaInput.from_item(modality, picture))
        except ValueError as e:
            raise RequestError(f"{where}: {e}", param="messages") from e
    return out
