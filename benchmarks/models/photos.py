"""Real photos available offline, and ImageNet preprocessing for them.

The photos are the colour pictures bundled inside the scikit-image and scikit-learn
wheels (extra `bench`), so no download is needed: `photos()` loads them as
H x W x 3 uint8 RGB arrays.

`preprocess(img)` turns one photo into a (1, 3, 224, 224) float32 NCHW batch the way
EfficientNet-Lite was trained (found by classifying these photos with every variant,
see docs/benchmarks-models.md): resize the shorter side to 224 / 0.875 = 256 with
bicubic interpolation, crop the central 224 x 224, then (x - 127) / 128 per channel.
Other variants are available as `Preprocessing` values for comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from onnxslim_edge.errors import ConfigError, DataError

__all__ = [
    "IMAGENET_CLASSES",
    "IMAGENET_NORM",
    "LITE_NORM",
    "PHOTO_NAMES",
    "SENSIBLE_CLASSES",
    "Preprocessing",
    "class_name",
    "photos",
    "preprocess",
]

#: The photos `photos()` returns, and where each comes from.
PHOTO_NAMES: dict[str, str] = {
    "chelsea": "skimage.data.chelsea: a tabby cat",
    "coffee": "skimage.data.coffee: a cup of coffee on a saucer",
    "astronaut": "skimage.data.astronaut: portrait of astronaut Eileen Collins",
    "rocket": "skimage.data.rocket: a SpaceX Falcon 9 on its launch pad",
    "motorcycle": "skimage.data.stereo_motorcycle (left view): a motorcycle in a studio",
    "china": "sklearn load_sample_images china.jpg: a Chinese temple roof",
    "flower": "sklearn load_sample_images flower.jpg: a pink flower",
}

#: ImageNet-1k class ids that these photos produce, with the standard class names.
#: Only these ids are listed; see docs/benchmarks-models.md for how they were checked.
IMAGENET_CLASSES: dict[int, str] = {
    108: "sea anemone, anemone",
    117: "chambered nautilus, pearly nautilus, nautilus",
    281: "tabby, tabby cat",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat, Siamese",
    285: "Egyptian cat",
    287: "lynx, catamount",
    309: "bee",
    310: "ant, emmet, pismire",
    422: "barbell",
    437: "beacon, lighthouse, beacon light, pharos",
    442: "bell cote, bell cot",
    450: "bobsled, bobsleigh, bob",
    479: "car wheel",
    483: "castle",
    497: "church, church building",
    504: "coffee mug",
    517: "crane",
    518: "crash helmet",
    535: "disk brake, disc brake",
    538: "dome",
    540: "drilling platform, offshore rig",
    541: "drum, membranophone, tympan",
    542: "drumstick",
    543: "dumbbell",
    560: "football helmet",
    573: "go-kart",
    599: "honeycomb",
    610: "jersey, T-shirt, tee shirt",
    619: "lampshade, lamp shade",
    622: "lens cap, lens cover",
    657: "missile",
    663: "monastery",
    665: "moped",
    668: "mosque",
    670: "motor scooter, scooter",
    671: "mountain bike, all-terrain bike, off-roader",
    682: "obelisk",
    698: "palace",
    722: "ping-pong ball",
    728: "plastic bag",
    733: "pole",
    738: "pot, flowerpot",
    744: "projectile, missile",
    746: "puck, hockey puck",
    747: "punching bag, punch bag, punching ball, punchball",
    752: "racket, racquet",
    809: "soup bowl",
    812: "space shuttle",
    828: "strainer",
    830: "stretcher",
    832: "stupa, tope",
    865: "toyshop",
    883: "vase",
    904: "window screen",
    925: "consomme",
    947: "mushroom",
    960: "chocolate sauce, chocolate syrup",
    967: "espresso",
    968: "cup",
    969: "eggnog",
    975: "lakeside, lakeshore",
    985: "daisy",
    996: "hen-of-the-woods, hen of the woods, Polyporus frondosus, Grifola frondosa",
}

#: Per photo, the ImageNet classes that count as a right answer (ImageNet-1k has no
#: "motorcycle", "temple" or "astronaut" class: the nearest ones are listed; the
#: astronaut portrait has no sensible class and is left out).
SENSIBLE_CLASSES: dict[str, frozenset[int]] = {
    "chelsea": frozenset({281, 282, 283, 284, 285}),  # the domestic cats
    "coffee": frozenset({967, 968, 504}),  # espresso, cup, coffee mug
    "rocket": frozenset({657, 744, 812}),  # missile, projectile, space shuttle
    "motorcycle": frozenset({665, 670}),  # moped, motor scooter
    "china": frozenset({442, 483, 497, 663, 668, 698, 832}),  # bell cote ... palace, stupa
    "flower": frozenset({985}),  # daisy
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """Resize the shorter side to `size / crop_fraction`, center-crop `size`, normalize.

    `mean` and `std` apply to 0..255 RGB values: `(x - mean) / std`.
    """

    crop_fraction: float = 0.875
    resample: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ConfigError(f"crop_fraction must be in (0, 1], not {self.crop_fraction}")
        if self.resample not in ("bicubic", "bilinear"):
            raise ConfigError(f"resample must be 'bicubic' or 'bilinear', not {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std need three values each, std positive")


#: EfficientNet-Lite's normalization (TensorFlow: MEAN_RGB 127, STDDEV_RGB 128).
LITE_NORM = Preprocessing()
#: The usual torchvision normalization, for comparison.
IMAGENET_NORM = Preprocessing(
    mean=(0.485 * 255, 0.456 * 255, 0.406 * 255), std=(0.229 * 255, 0.224 * 255, 0.225 * 255)
)


def photos() -> dict[str, np.ndarray]:
    """The photos of `PHOTO_NAMES`, each H x W x 3 uint8 RGB. Needs scikit-image and -learn."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = {
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "astronaut": skimage.data.astronaut(),
        "rocket": skimage.data.rocket(),
        "motorcycle": skimage.data.stereo_motorcycle()[0],
    }
    sample = load_sample_images()
    for filename, image in zip(sample.filenames, sample.images):
        images[filename.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".jpg")] = image
    out = {}
    for name in PHOTO_NAMES:
        img = np.ascontiguousarray(images[name])
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, (name, img.shape)
        out[name] = img
    return out


def preprocess(
    img: np.ndarray, size: int = 224, *, config: Preprocessing = LITE_NORM
) -> np.ndarray:
    """One H x W x 3 uint8 RGB image -> (1, 3, size, size) float32, as `config` says."""
    from PIL import Image

    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"expected an H x W x 3 uint8 image, got {arr.shape} {arr.dtype}")
    h, w = arr.shape[:2]
    short = round(size / config.crop_fraction)
    if h <= w:
        new_h, new_w = short, max(short, round(w * short / h))
    else:
        new_h, new_w = max(short, round(h * short / w)), short
    resample = (
        Image.Resampling.BICUBIC if config.resample == "bicubic" else Image.Resampling.BILINEAR
    )
    resized = np.asarray(Image.fromarray(arr).resize((new_w, new_h), resample), dtype=np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size]
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    out = (crop - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1)[None], dtype=np.float32)


def class_name(index: int) -> str:
    """The ImageNet class name for `index` if listed in `IMAGENET_CLASSES`, else `class N`."""
    return IMAGENET_CLASSES.get(index, f"class {index}")
