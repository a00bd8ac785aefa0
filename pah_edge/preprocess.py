"""How raw images become network input, shared by training and the device.

Imports only numpy and Pillow (never torch): the device side runs this exact code, so a model
sees the same pixels on the device as in training.
"""

from __future__ import annotations

import numbers
import os
import struct
import warnings
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from PIL import Image

from pah_edge.errors import ConfigError, DataError, FrameError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")  # compare with the lower-cased suffix
# How the centre square becomes image_size x image_size (``resize_image``). A bundle names its rule
# and keeps it: a model sees the pixels it was trained on. The legacy rule filters the square
# bilinearly in one pass. The area rule, the default since 2026-12 and about twice as fast on a
# camera frame (docs/benchmarks.md), shrinks as OpenCV's INTER_AREA does: it averages whole k x k
# blocks (Pillow's reduce), then box-filters the less than 2x left; it enlarges bilinearly.
LEGACY_RESIZE = "resize_shorter_center_crop"
AREA_RESIZE = "area_shorter_center_crop"
RESIZE_RULES = (LEGACY_RESIZE, AREA_RESIZE)
# Larger images are refused before decoding: 50 megapixels already take 150 MB as RGB, and
# crafted files (decompression bombs) declare far more than that in a few bytes.
MAX_IMAGE_PIXELS = 50_000_000

# What Pillow raises for a truncated, corrupt or unsupported file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """How raw images become network input; written next to every exported model and read by the device."""

    image_size: int  # output is image_size x image_size, pixels
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per RGB channel, on the 0..1 scale
    std: tuple[float, float, float] = IMAGENET_STD  # per RGB channel, on the 0..1 scale
    resize: str = AREA_RESIZE

    def __post_init__(self) -> None:
        size = self.image_size
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"image_size must be a positive whole number of pixels, got {self.image_size!r}")
        # Lists (from JSON) become tuples so equal settings compare and hash equal.
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", _three_floats("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _three_floats("std", self.std, positive=True))
        if self.resize not in RESIZE_RULES:
            raise ConfigError(f"unknown resize rule {self.resize!r}: use one of {', '.join(RESIZE_RULES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; `from_dict` reads it back."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "resize": self.resize}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of `to_dict`; unknown or missing keys raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"preprocess settings must be a JSON object, got {type(d).__name__}: re-export the model")
        unknown = sorted(set(d) - {"image_size", "mean", "std", "resize"})
        if unknown:
            raise ConfigError(f"unknown preprocess settings {unknown}: upgrade pah-edge or re-export the model")
        if "image_size" not in d:
            raise ConfigError("preprocess settings lack image_size: re-export the model")
        return cls(**d)


def _three_floats(name: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(values)) or (positive and min(values) <= 0):
        kind = "positive numbers" if positive else "numbers"
        raise ConfigError(f"{name} must be 3 {kind} (R, G, B on the 0..1 scale), got {value!r}")
    return values  # type: ignore[return-value]


def resize_image(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """The centre square of ``img`` resized to pre.image_size (``pre.resize``); uint8 [S, S, 3] RGB.

    Any mode is accepted. Transparent images (RGBA, LA, P with transparency) are composited on
    black, then alpha is dropped. 16-bit images (I;16, I) are scaled from 0..65535 to 0..255.
    """
    img = _gray_or_rgb(img)
    size = pre.image_size
    width, height = img.size
    if pre.resize == LEGACY_RESIZE:
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        # Resizing just the central square (box) equals resizing the whole image and cropping
        # afterwards: Pillow still filters across the box edge. It skips the cropped-away pixels.
        out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    else:
        left, top, side, factor = centre_square(width, height, pre)
        # reduce() reads only the box's pixels: a frame cropped to it first gives the same pixels.
        out = img.reduce(factor, box=(left, top, left + side, top + side))
        if out.size != (size, size):
            shrink = out.size[0] > size
            out = out.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    out = np.asarray(out)
    if out.ndim == 2:  # gray: resized as one channel, 3x cheaper than resizing RGB
        out = np.repeat(out[:, :, None], 3, axis=2)
    return out


def centre_square(width: int, height: int, pre: Preprocess) -> tuple[int, int, int, int]:
    """(left, top, side, factor) of the area rule: the centre square, its side a
    multiple of the whole factor (side // image_size, at least 1) that it is box-averaged by."""
    side = min(width, height)
    factor = max(1, side // pre.image_size)
    side -= side % factor  # whole blocks only: at most factor - 1 edge pixels are dropped
    return (width - side) // 2, (height - side) // 2, side, factor


def _gray_or_rgb(img: Image.Image) -> Image.Image:
    """The image as mode L or RGB, the only modes `resize_image` resizes."""
    if img.mode in ("L", "RGB") and "transparency" not in img.info:
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        # Pillow's own conversion would clip 16-bit values at 255 instead of scaling them.
        wide = np.asarray(img).astype(np.float32).clip(0, 65535)
        return Image.fromarray(np.rint(wide / 257).astype(np.uint8))
    if img.mode in ("1", "F"):
        return img.convert("L")
    if img.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in img.info:
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def load_image(source: str | os.PathLike[str] | IO[bytes], pre: Preprocess) -> np.ndarray:
    """Decode an image file (path or binary file object) and resize it; uint8 [S, S, 3] RGB.

    Raises DataError naming the file when it is unreadable, corrupt or above MAX_IMAGE_PIXELS.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<image data>")
    try:
        with warnings.catch_warnings():
            # The pixel limit below replaces Pillow's bomb warning, which would reach the user.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        with img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"image {name} is {width}x{height} pixels, above the limit of"
                    f" {MAX_IMAGE_PIXELS / 1e6:g} megapixels: shrink it or remove it"
                )
            # JPEG decodes straight to 1/2..1/8 scale, never below the output size: much faster.
            img.draft(img.mode, (pre.image_size, pre.image_size))
            return resize_image(img, pre)
    except Image.DecompressionBombError as e:
        raise DataError(f"image {name} is too large to decode safely ({e}): shrink it or remove it") from e
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot read image {name} ({e}): replace or remove the file") from e


def frame_image(frame: Any, pre: Preprocess, *, bgr: bool = False) -> np.ndarray:
    """An in-memory frame, resized as `load_image` resizes a decoded file; uint8 [S, S, 3] RGB.

    ``frame``: uint8 [H, W, 3] RGB (``bgr=True``: BGR, as OpenCV delivers it) or [H, W] gray.
    Anything else raises FrameError naming the fix.
    """
    frame = check_frame(frame)
    if frame.ndim == 3 and bgr:
        frame = frame[:, :, ::-1]
    if pre.resize == AREA_RESIZE:  # only the centre square is read: copy just that into Pillow
        left, top, side, _ = centre_square(frame.shape[1], frame.shape[0], pre)
        frame = frame[top:top + side, left:left + side]
    # The same resize_image as files: a frame and its PNG give the network the same pixels.
    return resize_image(Image.fromarray(np.ascontiguousarray(frame)), pre)


def check_frame(frame: Any) -> np.ndarray:
    """``frame`` as a uint8 [H, W, 3] or [H, W] array; FrameError saying what is wrong and how to fix it."""
    if frame is None:
        raise FrameError("the frame is None (a camera or video read that returned no frame): check the read "
                         "succeeded before predicting")
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"a frame must be a numpy array, got {type(frame).__name__}: pass np.asarray(image), "
                         "or a file path")
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
        raise FrameError(f"a frame must be H x W x 3 (RGB or, with bgr=True, BGR) or H x W (gray), got shape "
                         f"{frame.shape}: drop alpha with frame[..., :3], squeeze a single channel")
    if frame.dtype != np.uint8:
        raise FrameError(f"a frame must be uint8 (0..255), got {frame.dtype}: convert 0..1 floats with "
                         "(frame * 255).round().clip(0, 255).astype(np.uint8)")
    if frame.size == 0:
        raise FrameError(f"the frame is empty (shape {frame.shape}): check the read succeeded before predicting")
    height, width = frame.shape[:2]
    if height * width > MAX_IMAGE_PIXELS:
        raise FrameError(f"the frame is {width}x{height} pixels, above the limit of {MAX_IMAGE_PIXELS / 1e6:g} "
                         "megapixels: shrink it first")
    return frame


def to_input(images_uint8_nhwc: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 [N, S, S, 3] RGB -> contiguous float32 [N, 3, S, S] with (x / 255 - mean) / std."""
    images = images_uint8_nhwc
    size = pre.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"expected uint8 images of shape [N, {size}, {size}, 3], got {images.dtype} {images.shape}")
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    # One fused multiply-add per pixel: x * (1 / (255 std)) - mean / std.
    scale, shift = np.float32(1 / 255) / std, mean / std
    out = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    out *= scale
    out -= shift
    return out
