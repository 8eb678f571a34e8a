"""The distillation loop: batches, schedule, masks, held-out scoring, checkpoints.

`Trainer.run()` drives a `TrainingProgram` (any gradient engine) over in-memory samples:
each epoch visits the training split in an order drawn from `(seed, epoch)`, one
optimizer step per batch at a cosine (or constant) learning rate after a linear
warm-up; after every step the masked parameters (weights that were exactly zero: pruned
channels, magnitude or N:M sparsity) are set back to zero. After every epoch the
held-out split is scored by the caller's `score(params)` (output fidelity of the
exported student against the teacher, higher is better) and its loss is measured; the
best parameters are kept, training stops early after `patience` epochs without
improvement, and with a checkpoint folder the whole state (engine state with optimizer
moments, position, best parameters, history) is saved so an interrupted run resumes on
the same trajectory. Ctrl-C stops the loop, saves, and returns the best so far.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes.distill.engine import TrainingProgram

__all__ = [
    "EpochRecord",
    "TrainResult",
    "TrainSettings",
    "Trainer",
    "check_checkpoint",
    "learning_rate",
]

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    epochs: int = 10
    steps: int | None = None
    batch_size: int = 32
    pad_batches: bool = False  # fill a short batch up by repeating samples (fixed batch)
    lr: float = 1e-3
    warmup: float = 0.05
    schedule: str = "cosine"
    patience: int = 3
    seed: int = 0
    checkpoint_dir: Path | None = None
    progress: bool = False


@dataclass
class EpochRecord:
    epoch: int
    steps: int
    train_loss: float
    heldout_loss: float
    metric: float
    lr: float
    wall_s: float
    samples_per_s: float


@dataclass
class TrainResult:
    best_params: dict[str, np.ndarray]
    best_epoch: int  # 0: nothing beat the input
    best_metric: float
    best_loss: float
    before_metric: float
    before_loss: float
    history: list[EpochRecord] = field(default_factory=list)
    loss_curve: list[float] = field(default_factory=list)  # mean loss per logged window
    steps: int = 0
    interrupted: bool = False
    stopped_early: bool = False
    diverged: bool = False  # a non-finite loss stopped the run
    resumed_from: int | None = None


def learning_rate(step: int, total: int, base: float, warmup: float, schedule: str) -> float:
    """Linear warm-up over `warmup * total` steps, then cosine to 0 (or constant)."""
    warm = round(warmup * total)
    if step < warm:
        return base * (step + 1) / (warm + 1)
    if schedule == "constant":
        return base
    progress = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """One distillation run. `make_feeds(indices, rng, params)` builds a training batch.

    - `train_idx`, `held_idx`: sample indices of the two splits;
    - `make_feeds(indices, rng, params)`: the loss model's feeds for those samples
      (`rng` for augmentation, None on the held-out split; `params` the current values
      of `feed_params`, for inputs that depend on them, e.g. fake-quant offsets);
    - `score(params)`: held-out fidelity of the student with these parameters;
    - `masks`: parameter -> boolean array of entries held at exactly zero.
    """

    def __init__(
        self,
        program: TrainingProgram,
        settings: TrainSettings,
        *,
        train_idx: np.ndarray,
        held_idx: np.ndarray,
        make_feeds: Callable[
            [np.ndarray, np.random.Generator | None, Mapping[str, np.ndarray]], Feeds
        ],
        score: Callable[[Mapping[str, np.ndarray]], float],
        masks: Mapping[str, np.ndarray] | None = None,
        feed_params: Sequence[str] = (),
        fingerprint: str = "",
        on_step: Callable[[int, float], None] | None = None,
    ) -> None:
        self.program, self.settings = program, settings
        self.train_idx, self.held_idx = np.asarray(train_idx), np.asarray(held_idx)
        self.make_feeds, self.score = make_feeds, score
        self.masks = {k: np.asarray(v, bool) for k, v in (masks or {}).items() if np.any(v)}
        self.feed_params = tuple(feed_params)
        self.fingerprint = fingerprint
        self.on_step = on_step
        b = settings.batch_size
        self.steps_per_epoch = max(1, -(-len(self.train_idx) // b))
        if settings.steps is not None:
            self.total_steps = settings.steps
            self.epochs = -(-settings.steps // self.steps_per_epoch)
        else:
            self.epochs = settings.epochs
            self.total_steps = settings.epochs * self.steps_per_epoch

    # ------------------------------------------------------------------ helpers

    def _batch(self, idx: np.ndarray) -> np.ndarray:
        if self.settings.pad_batches and 0 < len(idx) < self.settings.batch_size:
            return np.resize(idx, self.settings.batch_size)
        return idx

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.settings.seed, epoch])
        return rng.permutation(self.train_idx)

    def _held_loss(self) -> float:
        total, count = 0.0, 0
        params = self.program.get_parameters(self.feed_params) if self.feed_params else {}
        b = self.settings.batch_size
        for start in range(0, len(self.held_idx), b):
            idx = self.held_idx[start : start + b]
            total += self.program.loss(self.make_feeds(self._batch(idx), None, params)) * len(idx)
            count += len(idx)
        return total / max(count, 1)

    def _apply_masks(self) -> None:
        if not self.masks:
            return
        current = self.program.get_parameters(list(self.masks))
        for name, mask in self.masks.items():
            current[name][mask] = 0
        self.program.set_parameters(current)

    def _paths(self) -> tuple[Path, Path, Path] | None:
        d = self.settings.checkpoint_dir
        if d is None:
            return None
        return d / "state.ckpt", d / "progress.json", d / "best.npz"

    def _save(self, result: TrainResult, epoch: int, step_in_epoch: int, bad: int) -> None:
        paths = self._paths()
        if paths is None:
            return
        state, progress, best = paths
        state.parent.mkdir(parents=True, exist_ok=True)
        tmp_state = state.with_suffix(".tmp")
        self.program.save_state(tmp_state)
        os.replace(tmp_state, state)
        tmp_best = best.with_name("best.tmp.npz")
        np.savez(tmp_best, **{_key(k): v for k, v in result.best_params.items()})
        os.replace(tmp_best, best)
        doc = {
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "steps": result.steps,
            "bad_epochs": bad,
            "best_epoch": result.best_epoch,
            "best_metric": result.best_metric,
            "best_loss": result.best_loss,
            "history": [asdict(h) for h in result.history],
            "loss_curve": result.loss_curve,
            "names": sorted(result.best_params),
        }
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, progress)

    def _resume(self, result: TrainResult) -> tuple[int, int, int]:
        paths = self._paths()
        if paths is None or not paths[1].is_file():
            return 1, 0, 0
        state, progress, best = paths
        doc = check_checkpoint(progress.parent, self.fingerprint)
        assert doc is not None
        self.program.load_state(state)
        with np.load(best, allow_pickle=False) as saved:
            result.best_params = {n: saved[_key(n)] for n in doc["names"]}
        result.best_epoch = doc["best_epoch"]
        result.best_metric, result.best_loss = doc["best_metric"], doc["best_loss"]
        result.history = [EpochRecord(**h) for h in doc["history"]]
        result.loss_curve = list(doc["loss_curve"])
        result.steps = doc["steps"]
        result.resumed_from = result.steps
        log.info("distill: resuming at step %d (epoch %d)", result.steps, doc["epoch"])
        return doc["epoch"], doc["step_in_epoch"], doc["bad_epochs"]

    def _better(self, metric: float, loss: float, result: TrainResult) -> bool:
        if metric > result.best_metric + 1e-9:
            return True
        return abs(metric - result.best_metric) <= 1e-9 and loss < result.best_loss

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        s = self.settings
        self._apply_masks()
        initial = self.program.get_parameters()
        before_metric = float(self.score(initial))
        before_loss = self._held_loss()
        result = TrainResult(
            best_params=initial,
            best_epoch=0,
            best_metric=before_metric,
            best_loss=before_loss,
            before_metric=before_metric,
            before_loss=before_loss,
        )
        epoch, skip, bad = self._resume(result)
        window: list[float] = []
        window_size = max(1, self.total_steps // 200)
        epoch_state = (epoch, skip)
        try:
            while epoch <= self.epochs and result.steps < self.total_steps:
                epoch_state = (epoch, skip)
                order = self._order(epoch)
                t0 = time.perf_counter()
                seen, losses = 0, []
                batches = range(skip, self.steps_per_epoch)
                bar = _bar(batches, s.progress, f"distill epoch {epoch}/{self.epochs}")
                lr = s.lr
                for i in bar:
                    if result.steps >= self.total_steps:
                        break
                    idx = self._batch(order[i * s.batch_size : (i + 1) * s.batch_size])
                    rng = np.random.default_rng([s.seed, epoch, i])
                    params = (
                        self.program.get_parameters(self.feed_params) if self.feed_params else {}
                    )
                    feeds = self.make_feeds(idx, rng, params)
                    lr = learning_rate(result.steps, self.total_steps, s.lr, s.warmup, s.schedule)
                    loss = self.program.step(feeds, lr)
                    self._apply_masks()
                    if not math.isfinite(loss):
                        result.diverged = True
                        break
                    result.steps += 1
                    epoch_state = (epoch, i + 1)
                    losses.append(loss)
                    window.append(loss)
                    seen += len(idx)
                    if len(window) >= window_size:
                        result.loss_curve.append(float(np.mean(window)))
                        window = []
                    if hasattr(bar, "set_postfix"):
                        rate = seen / max(time.perf_counter() - t0, 1e-9)
                        last = result.history[-1].metric if result.history else result.before_metric
                        bar.set_postfix(
                            loss=f"{loss:.4g}", fidelity=f"{last:.4f}", img_s=f"{rate:.0f}"
                        )
                    if self.on_step is not None:
                        self.on_step(result.steps, loss)
                wall = time.perf_counter() - t0
                params = self.program.get_parameters()
                metric, held = float(self.score(params)), self._held_loss()
                if not (math.isfinite(metric) and math.isfinite(held)):
                    metric, held = -math.inf, math.inf
                record = EpochRecord(
                    epoch=epoch,
                    steps=result.steps,
                    train_loss=float(np.mean(losses)) if losses else float("nan"),
                    heldout_loss=held,
                    metric=metric,
                    lr=lr,
                    wall_s=wall,
                    samples_per_s=seen / wall if wall > 0 else 0.0,
                )
                result.history.append(record)
                log.info(
                    "distill epoch %d: loss %.4g, held-out loss %.4g, fidelity %.4f, %.0f samples/s",
                    epoch,
                    record.train_loss,
                    held,
                    metric,
                    record.samples_per_s,
                )
                if self._better(metric, held, result):
                    result.best_params, result.best_epoch = params, epoch
                    result.best_metric, result.best_loss = metric, held
                    bad = 0
                else:
                    bad += 1
                if result.diverged:
                    log.warning("distill: the loss diverged at step %d; stopping", result.steps)
                    break
                epoch, skip = epoch + 1, 0
                epoch_state = (epoch, 0)
                self._save(result, epoch, 0, bad)
                if s.patience and bad >= s.patience and result.steps < self.total_steps:
                    result.stopped_early = True
                    break
        except KeyboardInterrupt:
            result.interrupted = True
            log.warning("distill: interrupted at step %d; keeping the best so far", result.steps)
            self._save(result, *epoch_state, bad)
        if window:
            result.loss_curve.append(float(np.mean(window)))
        return result


def check_checkpoint(folder: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The saved progress in `folder` (None if none); ConfigError if another run's."""
    if folder is None or not (Path(folder) / "progress.json").is_file():
        return None
    progress = Path(folder) / "progress.json"
    try:
        doc = json.loads(progress.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{progress}: unreadable distill checkpoint ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{folder}: holds a distill run of another model, data or config; "
            "remove it or choose another checkpoint_dir"
        )
    return doc


def _key(name: str) -> str:
    """An npz-safe key for a parameter name (names may hold '/' and ':')."""
    return "p" + hashlib.blake2b(name.encode(), digest_size=8).hexdigest()


def _bar(items: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="step", leave=False)
