"""Extra PyTorch fixtures for channel pruning, exported like `fixtures.torch_models`.

- `yolo`: a YOLOv8-style C2f block: a 1x1 Conv whose output is split in two halves
  (one `Split`), a residual bottleneck on the second half, a Concat of all three,
  a 1x1 Conv; then a CSP-style block that cuts its input with tensor slicing
  (`Slice` on the channel axis); SiLU activations (Sigmoid * x); a GAP + Linear head.
- `shufflenet`: ShuffleNetV2 units: channel split, a 1x1 -> depthwise 3x3 -> 1x1
  branch, Concat, then a channel shuffle (Reshape -> Transpose -> Reshape).

    export("yolo", tmp_path / "yolo.onnx")    # input "x" (1, 3, 16, 16), output "y"
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ARCHITECTURES", "example_input", "export"]

ARCHITECTURES = ("yolo", "shufflenet")
INPUT_SHAPE = (1, 3, 16, 16)


@functools.cache
def _builders() -> dict[str, Any]:
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1, act: bool = True) -> Any:
        layers = [
            nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.SiLU())
        return nn.Sequential(*layers)

    class Bottleneck(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.cv1 = conv_bn(c, c, 3)
            self.cv2 = conv_bn(c, c, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.cv2(self.cv1(x))

    class C2f(nn.Module):
        def __init__(self, cin: int, cout: int, c: int) -> None:
            super().__init__()
            self.c = c
            self.cv1 = conv_bn(cin, 2 * c)
            self.m = Bottleneck(c)
            self.cv2 = conv_bn(3 * c, cout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = list(self.cv1(x).split((self.c, self.c), 1))
            y.append(self.m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class CSPSlice(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.c = c
            self.cv1 = conv_bn(c, 2 * c)
            self.m = conv_bn(c, c, 3)
            self.cv2 = conv_bn(2 * c, c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.cv1(x)
            a, b = y[:, : self.c], y[:, self.c :]
            return self.cv2(torch.cat([a, self.m(b)], 1))

    class Yolo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(3, 16, 3)
            self.c2f = C2f(16, 16, 8)
            self.csp = CSPSlice(16)
            self.fc = nn.Linear(16, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.csp(self.c2f(self.stem(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    class ShuffleUnit(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            half = c // 2
            self.branch = nn.Sequential(
                conv_bn(half, half),
                conv_bn(half, half, 3, groups=half, act=False),
                conv_bn(half, half),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch(x2)], 1)
            b, c, h, w = out.shape
            return out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)

    class ShuffleNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(3, 16, 3)
            self.units = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16))
            self.head = conv_bn(16, 24)
            self.fc = nn.Linear(24, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.head(self.units(self.stem(x)))
            return self.fc(x.mean(dim=(2, 3)))

    return {"yolo": Yolo, "shufflenet": ShuffleNet}


def example_input(name: str, seed: int = 0) -> np.ndarray:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}")
    return np.random.default_rng(seed).standard_normal(INPUT_SHAPE).astype(np.float32)


def export(name: str, path: str | Path) -> Path:
    """Export `name` (eval mode, randomized BatchNorm statistics) to `path`."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _builders()[name]()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(c, generator=gen) - 0.5)
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(example_input(name)),),
            buffer,
            dynamo=False,
            opset_version=13,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["x"],
            output_names=["y"],
        )
    path = Path(path)
    path.write_bytes(buffer.getvalue())
    return path
