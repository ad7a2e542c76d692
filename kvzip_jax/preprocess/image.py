"""CLIP / SigLIP image preprocessing in numpy + Pillow, equal to transformers' processors for the same config.

We match transformers' PIL backend (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`: what `backend="pil"` or
the deprecated `use_fast=False` selects, and what transformers 5 falls back to without torchvision), not the
torchvision "fast" one: the PIL path is the original CLIP / SigLIP pipeline, and it is reproducible with Pillow alone
(bit-exact here), while the fast one resizes torch tensors with its own kernels and needs torch at run time.

The pipeline, per image: convert to RGB (alpha composited onto white) -> resize with Pillow on uint8 -> center crop
(zero-padding an image smaller than the crop) -> rescale in float64, cast to float32 -> normalize in float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CONFIG_NAME = "preprocessor_config.json"
SUPPORTED_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")
# Older or backend-specific names that HF configs carry for the same processors.
_ALIASES = {
    "CLIPFeatureExtractor": "CLIPImageProcessor",
    "CLIPImageProcessorFast": "CLIPImageProcessor",
    "CLIPImageProcessorPil": "CLIPImageProcessor",
    "SiglipImageProcessorFast": "SiglipImageProcessor",
    "SiglipImageProcessorPil": "SiglipImageProcessor",
}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
# Pillow's filter ids, which HF configs store as `resample`.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# transformers' class defaults, used for keys a config leaves out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    ),
    "SiglipImageProcessor": dict(
        size={"height": 224, "width": 224},
        crop_size=None,
        do_center_crop=False,
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
    ),
}


def _config_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no {CONFIG_NAME} at {path!r}: pass a directory containing it or the file itself")
    return file


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in `path` (a directory holding `preprocessor_config.json`, or that file)."""
    file = _config_path(path)
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read preprocessor config {file!r}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"preprocessor config {file!r} holds a {type(cfg).__name__}, expected a JSON object")
    return cfg


def _size_pair(value: Any, name: str) -> tuple[int, int] | None:
    """(height, width) of a crop size given as a dict or an int (transformers' `get_size_dict`)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Mapping) and "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"]))
    raise ValueError(f"{name}={value!r} is not supported: expected an int or {{'height': H, 'width': W}}")


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, Sequence) and len(value) == 3:
        return tuple(float(v) for v in value)
    raise ValueError(f"{name}={value!r} is not supported: expected a number or 3 numbers (one per RGB channel)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageProcessor:
    """Host-side image preprocessing for CLIP- and SigLIP-style vision towers.

    Resize target: `shortest_edge` (keep aspect, CLIP) or exact `height` x `width` (SigLIP); the first wins when a
    config has both, as in transformers. `crop_height` / `crop_width` apply when `do_center_crop`.
    """

    processor_type: str
    do_resize: bool = True
    shortest_edge: int | None = None
    height: int | None = None
    width: int | None = None
    resample: int = 3
    do_center_crop: bool = False
    crop_height: int | None = None
    crop_width: int | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    do_convert_rgb: bool = True

    def __post_init__(self):
        if self.processor_type not in SUPPORTED_PROCESSORS:
            raise ValueError(
                f"image processor type {self.processor_type!r} is not supported; supported: {SUPPORTED_PROCESSORS}"
            )
        if self.resample not in RESAMPLE_NAMES:
            raise ValueError(f"resample={self.resample!r} is not supported; supported Pillow filters: {RESAMPLE_NAMES}")
        if self.do_resize:
            if self.shortest_edge is None and (self.height is None or self.width is None):
                raise ValueError("do_resize needs `shortest_edge` or both `height` and `width`")
            for name in ("shortest_edge", "height", "width"):
                v = getattr(self, name)
                if v is not None and v < 1:
                    raise ValueError(f"{name}={v} must be >= 1")
        if self.do_center_crop:
            if self.crop_height is None or self.crop_width is None or min(self.crop_height, self.crop_width) < 1:
                raise ValueError(
                    f"do_center_crop needs crop_height and crop_width >= 1, got {self.crop_height}x{self.crop_width}"
                )
        if self.do_normalize and any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std={self.image_std} has a zero entry")

    # ---- construction ----

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ImageProcessor:
        """From an HF `preprocessor_config.json` dict; keys it leaves out take transformers' class defaults."""
        raw_type = config.get("image_processor_type") or config.get("feature_extractor_type")
        ptype = _ALIASES.get(raw_type, raw_type)
        if ptype not in SUPPORTED_PROCESSORS:
            raise ValueError(
                f"image processor type {raw_type!r} is not supported; supported: {SUPPORTED_PROCESSORS} "
                f"(and their aliases {sorted(_ALIASES)})"
            )
        if config.get("use_square_size"):
            raise ValueError("use_square_size=True (KOSMOS-2's CLIP variant) is not supported")
        d = {**_DEFAULTS[ptype], **{k: v for k, v in config.items() if v is not None}}
        size = d.get("size")
        shortest_edge = height = width = None
        if isinstance(size, int) and not isinstance(size, bool):
            shortest_edge = size  # an int means the shortest edge for both (their default_to_square=False)
        elif isinstance(size, Mapping) and ("shortest_edge" in size or ("height" in size and "width" in size)):
            if size.get("longest_edge") is not None:
                raise ValueError(f"size={size!r}: `longest_edge` is not supported")
            shortest_edge = size.get("shortest_edge")
            height, width = size.get("height"), size.get("width")
        else:
            raise ValueError(f"size={size!r} is not supported: expected an int, {{'shortest_edge': N}} or H/W")
        crop = _size_pair(d.get("crop_size"), "crop_size")
        resample = d.get("resample", 3)
        if isinstance(resample, bool) or not isinstance(resample, int):
            raise ValueError(f"resample={resample!r} is not supported; supported Pillow filters: {RESAMPLE_NAMES}")
        return cls(
            processor_type=ptype,
            do_resize=bool(d.get("do_resize", True)),
            shortest_edge=None if shortest_edge is None else int(shortest_edge),
            height=None if height is None else int(height),
            width=None if width is None else int(width),
            resample=resample,
            do_center_crop=bool(d.get("do_center_crop")),
            crop_height=None if crop is None else crop[0],
            crop_width=None if crop is None else crop[1],
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=_triple(d["image_mean"], "image_mean"),
            image_std=_triple(d["image_std"], "image_std"),
            do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ImageProcessor:
        """From a directory holding `preprocessor_config.json` (or the path of that file)."""
        return cls.from_dict(read_config(path))

    def params(self) -> dict[str, Any]:
        """Every parameter that changes the output, JSON-ready: the key material for `content_hash`."""
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return {"kind": "image", **d}

    # ---- input ----

    def decode(self, image: Any) -> np.ndarray:
        """A PIL image, an HWC (or HW) uint8 array or a file path -> an HWC uint8 array with 3 channels."""
        if isinstance(image, str | os.PathLike):
            image = _open(image)
        if isinstance(image, Image.Image):
            return self._decode_pil(image)
        if isinstance(image, np.ndarray):
            return self._decode_array(image)
        raise ValueError(
            f"unsupported image input of type {type(image).__name__}: expected a PIL image, an HWC uint8 numpy "
            "array or a file path"
        )

    def _decode_pil(self, image: Image.Image) -> np.ndarray:
        if self.do_convert_rgb:
            # transformers' convert_to_rgb: composite any transparency onto white with Pillow.
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
            return np.array(image.convert("RGB"))
        arr = np.array(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(
                f"PIL image of mode {image.mode!r} is not 3-channel 8-bit RGB; with do_convert_rgb=False only RGB is "
                "supported (set do_convert_rgb=True to convert it)"
            )
        return arr

    def _decode_array(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype != np.uint8:
            raise ValueError(f"image array has dtype {arr.dtype}; only uint8 (0..255) HWC arrays are supported")
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"image array has shape {arr.shape}; expected HWC (H, W, C) or a grayscale (H, W)")
        channels = arr.shape[-1]
        if not self.do_convert_rgb:
            if channels != 3:
                raise ValueError(
                    f"image array has {channels} channels (shape {arr.shape}); with do_convert_rgb=False only 3 "
                    "(RGB) is supported"
                )
            return arr
        if channels == 1:
            return np.repeat(arr, 3, axis=-1)
        if channels == 3:
            return arr
        if channels == 4:
            # transformers' numpy branch of convert_to_rgb: float64 blend onto white, then round.
            alpha = arr[..., 3:4] / 255
            return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        raise ValueError(
            f"image array has {channels} channels (shape {arr.shape}); supported: 1 (gray), 3 (RGB), 4 (RGBA)"
        )

    # ---- transforms ----

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step, with transformers' `get_resize_output_image_size` arithmetic."""
        if not self.do_resize:
            return (height, width)
        if self.shortest_edge is None:
            return (self.height, self.width)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def _resize(self, arr: np.ndarray) -> np.ndarray:
        out_h, out_w = self.output_size(*arr.shape[:2])
        resized = Image.fromarray(arr).resize((out_w, out_h), resample=Image.Resampling(self.resample))
        return np.asarray(resized)

    def _center_crop(self, arr: np.ndarray) -> np.ndarray:
        # transformers' center_crop: offsets floor toward the top-left; a too-small image is zero-padded first.
        h, w = arr.shape[:2]
        ch, cw = self.crop_height, self.crop_width
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0:
            return arr[top : top + ch, left : left + cw]
        new_h, new_w = max(ch, h), max(cw, w)
        pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        padded = np.zeros((new_h, new_w, *arr.shape[2:]), dtype=arr.dtype)
        padded[pad_top : pad_top + h, pad_left : pad_left + w] = arr
        top, left = top + pad_top, left + pad_left
        return padded[max(0, top) : min(new_h, top + ch), max(0, left) : min(new_w, left + cw)]

    def preprocess_one(self, image: Any) -> np.ndarray:
        """One image -> float32 CHW pixel values."""
        arr = self.decode(image)
        if min(arr.shape[:2]) < 1:
            raise ValueError(f"image has an empty side: shape {arr.shape}")
        if self.do_resize:
            arr = self._resize(arr)
        if self.do_center_crop:
            arr = self._center_crop(arr)
        x = np.ascontiguousarray(np.moveaxis(arr, -1, 0))
        if self.do_rescale:
            # Same arithmetic as transformers' rescale: float64 product, then float32.
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return x

    def __call__(self, images: Any) -> np.ndarray:
        """One image or a sequence of images (or an NHWC uint8 array) -> float32 pixel values [N, 3, H, W]."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, list | tuple):
            images = [images]
        if not images:
            raise ValueError("no images given")
        out = [self.preprocess_one(im) for im in images]
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise ValueError(
                f"processed images have different shapes {sorted(shapes)} (no center crop to a common size); "
                "process them one at a time"
            )
        return np.stack(out)


def _open(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file; EXIF orientation applied, as transformers' `load_image` does."""
    try:
        with Image.open(os.fspath(path)) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file {os.fspath(path)!r}: {e}") from e
