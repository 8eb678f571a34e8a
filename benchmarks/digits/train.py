"""Train the digits demo CNN on scikit-learn's 8x8 digits and export it to ONNX.

    python -m benchmarks.digits.train --out onnxslim_edge/assets

Writes into `--out`:

- `digits_cnn.onnx`: opset 13, input `image` (batch, 1, 8, 8) float32 in [0, 1], output
  `logits` (batch, 10); BatchNormalization nodes are kept (not folded into the convs)
  so that the `fold-batchnorm` pass has work to do.
- `digits_test.npz`: the held-out test split, arrays `image` (N, 1, 8, 8) float32 and
  `label` (N,) int64, written with fixed zip timestamps so reruns give the same bytes.
- `README.md`: how the files were made and the test accuracy measured with ONNX Runtime.

Training is seeded and uses deterministic algorithms on one CPU thread; it needs torch
and scikit-learn (the `dev` and `bench` extras) and takes well under a minute.
"""

from __future__ import annotations

import argparse
import io
import logging
import platform
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["DigitsNet", "TrainConfig", "export_onnx", "load_split", "main", "train"]

log = logging.getLogger(__name__)

MODEL_NAME = "digits_cnn.onnx"
TEST_NAME = "digits_test.npz"
README_NAME = "README.md"
OPSET = 13


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of the demo model's training run."""

    seed: int = 0
    test_size: float = 0.25
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    shift: int = 1  # random translation by up to this many pixels (training only)

    def __post_init__(self) -> None:
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.shift < 0:
            raise ValueError("epochs, batch_size and lr must be positive, shift >= 0")


class _Block(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or strided 1x1 conv + BN)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class DigitsNet(nn.Module):
    """Stem conv 1->16 + BN + ReLU, residual blocks 16->16 and 16->32 (stride 2), GAP, FC."""

    ARCHITECTURE = (
        "stem Conv3x3(1->16)+BN+ReLU; "
        "ResBlock(16->16, stride 1, identity shortcut); "
        "ResBlock(16->32, stride 2, Conv1x1 stride 2 + BN shortcut); "
        "GlobalAveragePool; Linear(32->10)"
    )

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.block1 = _Block(16, 16, 1)
        self.block2 = _Block(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_split(config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) float32 in [0, 1], labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=config.test_size, random_state=config.seed, stratify=y
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )


def _shift(x: torch.Tensor, limit: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random (dy, dx) in [-limit, limit], filling with zeros."""
    if limit == 0:
        return x
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (limit, limit, limit, limit))
    offsets = torch.randint(0, 2 * limit + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def train(x_train: np.ndarray, y_train: np.ndarray, config: TrainConfig) -> tuple[DigitsNet, float]:
    """Train a DigitsNet; return it in eval mode and the wall time in seconds."""
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(config.seed)
    model = DigitsNet()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(x_train) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    start = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(xs), generator=gen)
        total = 0.0
        for i in range(0, len(xs), config.batch_size):
            idx = order[i : i + config.batch_size]
            xb = _shift(xs[idx], config.shift, gen)
            loss = loss_fn(model(xb), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.debug("epoch %d: loss %.4f", epoch + 1, total / len(xs))
    seconds = time.perf_counter() - start
    model.eval()
    return model, seconds


def export_onnx(model: DigitsNet, path: Path) -> None:
    """Export with the TorchScript exporter, keeping BatchNormalization nodes; IR lowered."""
    from onnxslim_edge.model import load_model, save_model

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but, unlike dynamo, keeps BN under PRESERVE.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            buf,
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    save_model(load_model(buf.getvalue()), path)


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the exported model in ONNX Runtime."""
    from onnxslim_edge.runtime import make_session

    session = make_session(path, threads=1)
    logits = session.run(["logits"], {"image": x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz of deflated .npy members with fixed timestamps (byte-reproducible)."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    tmp.replace(path)


def write_readme(
    path: Path,
    config: TrainConfig,
    *,
    torch_acc: float,
    onnx_acc: float,
    n_train: int,
    n_test: int,
    model_bytes: int,
) -> None:
    """Record how the assets were made."""
    import onnx
    import sklearn

    text = f"""# Demo assets: digits CNN

Made by `python -m benchmarks.digits.train --out onnxslim_edge/assets` (see
benchmarks/digits/train.py). Do not edit these files by hand; rerun the command.

- `{MODEL_NAME}` ({model_bytes:,} bytes): ONNX opset {OPSET}, input `image`
  (batch, 1, 8, 8) float32 in [0, 1] (pixel / 16), output `logits` (batch, 10).
  Exported with `torch.onnx.export(dynamo=False, do_constant_folding=False,
  training=TrainingMode.PRESERVE)` so the BatchNormalization nodes stay in the graph
  (for the `fold-batchnorm` pass); `ir_version` lowered to what opset {OPSET} needs.
- `{TEST_NAME}`: the test split, arrays `image` ({n_test}, 1, 8, 8) float32 and
  `label` ({n_test},) int64. No pickled objects.

Data: scikit-learn's `load_digits` (1,797 8x8 grayscale images, 10 classes), stratified
split with `train_test_split(test_size={config.test_size}, random_state={config.seed})`:
{n_train} training, {n_test} test images.

Architecture: {DigitsNet.ARCHITECTURE}.

Training: seed {config.seed}, AdamW (lr {config.lr}, weight decay {config.weight_decay}),
one-cycle schedule, {config.epochs} epochs, batch {config.batch_size}, random shifts of up
to {config.shift} pixel; deterministic algorithms, one CPU thread (reruns give the same
`{MODEL_NAME}` and `{TEST_NAME}`, byte for byte, with the same torch and scikit-learn).

Test accuracy (top-1): **{onnx_acc:.4f}** in ONNX Runtime ({torch_acc:.4f} in torch).

Versions: torch {torch.__version__}, scikit-learn {sklearn.__version__}, onnx {onnx.__version__},
Python {platform.python_version()}.
"""
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the assets")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    config = TrainConfig(seed=args.seed, epochs=args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_split(config)
    model, seconds = train(x_train, y_train, config)
    with torch.no_grad():
        logits = model(torch.from_numpy(x_test)).numpy()
    torch_acc = float(np.mean(np.argmax(logits, axis=1) == y_test))

    model_path = args.out / MODEL_NAME
    export_onnx(model, model_path)
    write_npz(args.out / TEST_NAME, {"image": x_test, "label": y_test})
    onnx_acc = onnx_accuracy(model_path, x_test, y_test)
    write_readme(
        args.out / README_NAME,
        config,
        torch_acc=torch_acc,
        onnx_acc=onnx_acc,
        n_train=len(x_train),
        n_test=len(x_test),
        model_bytes=model_path.stat().st_size,
    )
    log.info(
        "trained in %.1f s; test accuracy %.4f (ONNX Runtime), %.4f (torch); wrote %s",
        seconds,
        onnx_acc,
        torch_acc,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
