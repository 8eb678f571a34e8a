"""Calibration and evaluation data, streamed batch by batch.

`open_data(spec, model)` turns what a user has into a re-iterable `DataSource` of feed
dicts `{input_name: array}` holding `batch_size` samples each:

- an `.npz` whose arrays are named after the model's inputs, samples on axis 0;
- a folder of `.npz`/`.npy` files (an `.npy` file is a batch of samples of the only
  input of a single-input model);
- a folder of images with an `ImagePreprocess` (size, resize, mean/std, layout);
- any iterable of feed dicts, or a callable returning one (arrays hold one or several
  samples on axis 0);
- `"random"`: synthetic data for smoke tests (logged as such; see `random_feeds`).

Memory does not grow with the number of samples: `.npy` data is read from the file (or
from the possibly compressed zip member of an `.npz`) a batch of rows at a time, after
parsing numpy's `.npy` header; nothing is ever unpickled. Data is checked against the
model (missing or extra inputs, ranks, fixed dims, dtypes) and cast to the dtype each
input wants; a lossy cast (float to int) is refused, and so are NaN and infinity in any
sample used and data without samples. Problems raise `DataError` with one line naming
the file (or feed), the array, the sample where it applies, and the cause.

This package file only re-exports the public API. The modules: `specs` (model inputs
and the checks against them), `npz` (`.npz`/`.npy` streaming and folders of them),
`images` (`ImagePreprocess`, `parse_preprocess`, image folders), `synthetic` (random
feeds), `source` (`DataSource`, `open_data`).
"""

from __future__ import annotations

from onnxslim_edge.data.images import IMAGE_EXTENSIONS, ImagePreprocess, parse_preprocess
from onnxslim_edge.data.source import DataSource, open_data
from onnxslim_edge.data.specs import _model_inputs as _model_inputs  # for verify.py
from onnxslim_edge.data.synthetic import random_feeds

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSource",
    "ImagePreprocess",
    "open_data",
    "parse_preprocess",
    "random_feeds",
]
