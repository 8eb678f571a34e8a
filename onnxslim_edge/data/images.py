"""Folders of images turned into input samples by a declared preprocessing.

Owns `ImagePreprocess` (size, resize mode, scale/mean/std, layout, channel order,
dtype: a frozen, validated config), `parse_preprocess` (the CLI's `--preprocess` text),
the image extensions read, and the chunk factory over an image folder for a
single-input model, checked against the input's shape before any image is decoded.
Pillow is imported only when an image is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from onnxslim_edge.data.specs import Feed, _Chunks, _fmt_shape, _InputSpec
from onnxslim_edge.errors import ConfigError, DataError

__all__ = ["IMAGE_EXTENSIONS", "ImagePreprocess", "parse_preprocess"]

#: File extensions read as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# --------------------------------------------------------------------------- images


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    """How an image file becomes one input sample.

    - `size`: (H, W) of the result.
    - `resize`: "stretch" resizes to (H, W) ignoring the aspect ratio;
      "shorter-center-crop" scales the shorter side to `resize_shorter` (default: the
      smallest scale that covers (H, W)) and crops the centre (offsets rounded down).
      Resampling is bilinear; an image already at the target size is not resampled.
    - pixels become `(pixel * scale - mean) / std` per channel (float dtypes); an
      integer `dtype` keeps the raw pixels and needs scale 1, mean 0, std 1.
    - `layout`: "NCHW" gives samples (C, H, W), "NHWC" gives (H, W, C).
    - `channels`: "RGB", "BGR" or "L" (grey, one channel).
    """

    size: tuple[int, int]
    resize: Literal["stretch", "shorter-center-crop"] = "shorter-center-crop"
    resize_shorter: int | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR", "L"] = "RGB"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(int(s) <= 0 for s in self.size):
            raise ConfigError(f"preprocess: size must be two positive ints (H, W), not {self.size}")
        if self.resize not in ("stretch", "shorter-center-crop"):
            raise ConfigError(
                f"preprocess: resize must be stretch or shorter-center-crop, not {self.resize!r}"
            )
        if self.resize_shorter is not None:
            if self.resize != "shorter-center-crop":
                raise ConfigError("preprocess: resize_shorter needs resize=shorter-center-crop")
            if self.resize_shorter < max(self.size):
                raise ConfigError(
                    f"preprocess: resize_shorter {self.resize_shorter} is smaller than the crop "
                    f"{self.size[0]}x{self.size[1]}"
                )
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"preprocess: layout must be NCHW or NHWC, not {self.layout!r}")
        if self.channels not in ("RGB", "BGR", "L"):
            raise ConfigError(f"preprocess: channels must be RGB, BGR or L, not {self.channels!r}")
        n = self.num_channels
        for key in ("mean", "std"):
            value = getattr(self, key)
            if len(value) == 1 and n > 1:
                object.__setattr__(self, key, tuple(value) * n)
            elif len(value) == 3 and n == 1 and len(set(value)) == 1:
                object.__setattr__(self, key, (value[0],))
            elif len(value) != n:
                raise ConfigError(
                    f"preprocess: {key} has {len(value)} values for {n} channel(s) ({self.channels})"
                )
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not all(math.isfinite(v) for v in value):
                shown = "|".join(f"{v:g}" for v in value)
                raise ConfigError(f"preprocess: {key}={shown} is not finite")
        if not math.isfinite(self.scale):
            raise ConfigError(f"preprocess: scale={self.scale:g} is not finite")
        if any(s == 0 for s in self.std):
            raise ConfigError("preprocess: std must not be 0")
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise ConfigError(f"preprocess: unknown dtype {self.dtype!r}") from exc
        if dt.kind in "iub" and (
            self.scale != 1 or any(self.mean) or any(s != 1 for s in self.std)
        ):
            raise ConfigError(
                f"preprocess: integer dtype {dt} keeps raw pixels; it needs scale=1, mean=0, std=1"
            )
        if dt.kind not in "iubf":
            raise ConfigError(f"preprocess: dtype must be numeric, not {dt}")

    @property
    def num_channels(self) -> int:
        return 1 if self.channels == "L" else 3

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        h, w = self.size
        c = self.num_channels
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    @classmethod
    def from_string(cls, text: str) -> ImagePreprocess:
        return parse_preprocess(text)

    def describe(self) -> str:
        h, w = self.size
        return f"{h}x{w} {self.resize}, {self.channels} {self.layout} {self.dtype}"

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        """One preprocessed sample (no batch axis) from an image file."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert("L" if self.channels == "L" else "RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            raise DataError(f"{path}: cannot read the image ({exc})") from exc
        except Image.DecompressionBombError as exc:
            raise DataError(f"{path}: image too large ({exc})") from exc
        h, w = self.size
        if self.resize == "stretch":
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
        else:
            iw, ih = img.size
            if self.resize_shorter is not None:
                factor = self.resize_shorter / min(iw, ih)
            else:
                factor = max(w / iw, h / ih)
            nw, nh = max(w, round(iw * factor)), max(h, round(ih * factor))
            if (nw, nh) != (iw, ih):
                img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - w) // 2, (nh - h) // 2
            if (nw, nh) != (w, h):
                img = img.crop((left, top, left + w, top + h))
        pixels = np.asarray(img)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.channels == "BGR":
            pixels = pixels[:, :, ::-1]
        dt = np.dtype(self.dtype)
        if dt.kind in "iub":
            out = pixels.astype(dt)
        else:
            mean = np.asarray(self.mean, dtype=np.float64)
            std = np.asarray(self.std, dtype=np.float64)
            out = ((pixels.astype(np.float64) * self.scale - mean) / std).astype(dt)
        if self.layout == "NCHW":
            out = out.transpose(2, 0, 1)
        return np.ascontiguousarray(out)


_PREPROCESS_KEYS = (
    "size",
    "resize",
    "resize_shorter",
    "mean",
    "std",
    "scale",
    "layout",
    "channels",
    "dtype",
)


def _parse_number(text: str, key: str) -> float:
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"preprocess: {key}={text!r} is not a number") from exc


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError as exc:
        raise ConfigError(f"preprocess: size {text!r} is not HxW (e.g. 224x224)") from exc
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2:
        raise ConfigError(f"preprocess: size {text!r} is not HxW (e.g. 224x224)")
    return dims[0], dims[1]


def parse_preprocess(text: str) -> ImagePreprocess:
    """An `ImagePreprocess` from CLI text, comma-separated, the size first or as `size=`.

        "224x224,resize_shorter=256,mean=0.485|0.456|0.406,std=0.229|0.224|0.225,layout=NCHW"

    Lists use `|`; numbers may be fractions (`scale=1/255`). Unknown keys: ConfigError.
    """
    options: dict[str, Any] = {}
    for i, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            if i == 0:
                options["size"] = _parse_size(item)
                continue
            raise ConfigError(f"preprocess: {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        key = key.replace("-", "_")
        if key not in _PREPROCESS_KEYS:
            raise ConfigError(
                f"preprocess: unknown key {key!r}; valid: {', '.join(_PREPROCESS_KEYS)}"
            )
        if key == "size":
            options[key] = _parse_size(value)
        elif key in ("mean", "std"):
            options[key] = tuple(_parse_number(v, key) for v in value.split("|"))
        elif key == "scale":
            options[key] = _parse_number(value, key)
        elif key == "resize_shorter":
            try:
                options[key] = int(value)
            except ValueError as exc:
                raise ConfigError(f"preprocess: resize_shorter={value!r} is not an int") from exc
        elif key in ("layout", "channels"):
            options[key] = value.upper()
        else:
            options[key] = value
    if "size" not in options:
        raise ConfigError(f"preprocess: {text!r} gives no size (e.g. 224x224)")
    return ImagePreprocess(**options)


def _image_source(
    files: list[Path], folder: Path, preprocess: ImagePreprocess, specs: list[_InputSpec] | None
) -> tuple[_Chunks, str]:
    name = "input"
    if specs is not None:
        required = [s for s in specs if not s.optional]
        if len(required) != 1:
            listed = ", ".join(s.name for s in required)
            raise DataError(
                f"{folder}: image folders feed single-input models; the model has inputs {listed}"
            )
        spec = required[0]
        name = spec.name
        sample = preprocess.sample_shape
        want = spec.shape
        if want is not None and (
            len(want) != 4 or any(isinstance(w, int) and w != d for w, d in zip(want[1:], sample))
        ):
            raise DataError(
                f"{folder}: preprocessing gives images of shape {_fmt_shape(sample)} but input "
                f"'{name}' expects {_fmt_shape(want)}"
            )

    def chunks() -> Iterator[tuple[str, Feed]]:
        for f in files:
            yield str(f), {name: preprocess(f)[None]}

    return chunks, name
