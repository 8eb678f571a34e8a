"""The `distill` pass: recover a compressed student's fidelity from its teacher.

Teacher: the pipeline's input model (`Context.reference`) or `teacher=PATH`, run by an
ONNX Runtime inference session on the training data (outputs cached in memory up to
`teacher_cache_mb`). Student: the graph the pass is given, with BatchNormalization
folded first (ORT training does not update running statistics), ops without gradients
legalized (`legalize.py`), integer weights behind DequantizeLinear turned into float
parameters trained through their fixed grids (`qat.py`). The loss (`losses.py`) is
built as ONNX nodes on the student, a `GradientEngine` (ONNX Runtime training today)
compiles it, `trainer.py` runs the loop, and the best parameters by held-out fidelity
are written back into the graph — only if they beat the input; otherwise the input is
kept and the report says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxslim_edge import Context, Pass, PassReport
from onnxslim_edge.errors import ConfigError, DataError, UnsupportedError
from onnxslim_edge.passes.distill.engine import OptimizerSpec, engine_for, train_extra_missing
from onnxslim_edge.passes.distill.legalize import blocked, legalize
from onnxslim_edge.passes.distill.losses import (
    LABELS_INPUT,
    LOSS_KINDS,
    FeaturePair,
    LossSpec,
    OutputLoss,
    build_loss_model,
    teacher_input,
)
from onnxslim_edge.passes.distill.qat import offset_input, prepare_qat
from onnxslim_edge.passes.distill.samples import (
    Teacher,
    augment_images,
    fixed_batch,
    load_samples,
    run_batched,
)
from onnxslim_edge.passes.distill.trainer import (
    Trainer,
    TrainResult,
    TrainSettings,
    check_checkpoint,
)

__all__ = ["Distill", "DistillConfig"]

log = logging.getLogger(__name__)

#: (op, input positions) through which a float initializer is a trainable weight.
_WEIGHT_USES: Mapping[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}),
    "ConvTranspose": frozenset({1, 2}),
    "Gemm": frozenset({0, 1, 2}),
    "MatMul": frozenset({0, 1}),
    "Add": frozenset({0, 1}),
    "Sub": frozenset({0, 1}),
    "Mul": frozenset({0, 1}),
    "Div": frozenset({0}),
    "BatchNormalization": frozenset({1, 2}),
    "LayerNormalization": frozenset({1, 2}),
    "Reshape": frozenset({0}),
    "QuantizeLinear": frozenset({0}),
}
#: Layers whose weight (input 1; MatMul also 0) keeps its exact zeros (pruning masks).
_MASKED_LAYERS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "MatMul": (0, 1)}


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Options of the `distill` pass (docs/distillation.md documents each default).

    - `teacher`: the teacher model's path (None: the pipeline's input model).
    - `data`: the training data's path (None: the Context's data, `--calib`).
    - `labels`: an integer label array in the `data` .npz (adds cross-entropy).
    - `epochs`: passes over the training split (> 0).
    - `steps`: total optimizer steps instead of `epochs` (> 0; None: by epochs).
    - `batch_size`: samples per step (> 0; a model that fixes its batch axis trains in
      batches of that size).
    - `lr`: the peak learning rate, after warm-up (> 0).
    - `optimizer`: AdamW or SGD.
    - `weight_decay`: AdamW's decoupled weight decay (>= 0).
    - `warmup`: the fraction of the steps with a linear warm-up, in [0, 0.5].
    - `schedule`: the learning rate after warm-up: cosine (to 0) or constant.
    - `temperature`: the KD temperature T (> 0).
    - `alpha`: the KD share of the loss when labels exist (CE gets 1 - alpha), in [0, 1].
    - `losses`: `OUTPUT=kd|mse|cosine|none[:WEIGHT]` per output; unlisted float outputs
      get kd for (N, classes) logits, mse otherwise.
    - `features`: `STUDENT_TENSOR=TEACHER_TENSOR[:WEIGHT]` pairs with a relative-MSE loss.
    - `frozen`: initializer or node names / regexes (full match) that do not train.
    - `no_gradient`: before a node without gradient: stop with an error, or freeze the
      weights feeding it.
    - `keep_zeros`: exact zeros of layer weights stay zero (pruning masks).
    - `validation`: an .npz of scoring data (the data's inputs, kept apart from the
      training data) that picks the best epoch and decides the never-worse check (None:
      a `holdout` split of the training data).
    - `holdout`: the fraction of the samples held out for scoring, in [0, 0.5] (at least
      1 sample).
    - `patience`: epochs without improvement before stopping (0: never stop early).
    - `max_samples`: samples read into memory (> 0).
    - `augment`: image augmentation: auto (on for one NCHW image input >= 32x32), on, off.
    - `teacher_cache_mb`: cache the teacher's outputs up to this size (0: run the
      teacher on every batch).
    - `checkpoint_dir`: save state every epoch and on Ctrl-C, and resume from it.
    - `engine`: the gradient engine; auto takes the first installed of
      onnxruntime-training and onnx-ad.
    - `threads`: intra-op threads of the training and scoring sessions (None: ONNX
      Runtime's default).
    - `seed`: the shuffling, split and augmentation seed (None: the Context's).
    """

    teacher: str | None = None  # path; default: the pipeline's input model
    data: str | None = None  # training data path; default: the Context's (--calib)
    validation: str | None = None  # scoring data path; default: a `holdout` split of `data`
    labels: str | None = None  # array of class labels in the `data` .npz (adds CE)
    epochs: int = 10
    steps: int | None = None  # total optimizer steps; overrides epochs
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    schedule: Literal["cosine", "constant"] = "cosine"
    temperature: float = 2.0
    alpha: float = 0.9  # KD share when labels exist
    losses: tuple[str, ...] = ()  # "output=kd|mse|cosine|none[:weight]"
    features: tuple[str, ...] = ()  # "student_tensor=teacher_tensor[:weight]"
    frozen: tuple[str, ...] = ()  # initializer or node names / regexes (full match)
    no_gradient: Literal["error", "freeze"] = "error"
    keep_zeros: bool = True
    holdout: float = 0.1
    patience: int = 3
    max_samples: int = 10000
    augment: Literal["auto", "on", "off"] = "auto"
    teacher_cache_mb: int = 1024  # 0: never cache
    checkpoint_dir: str | None = None
    engine: Literal["auto", "onnxruntime-training", "onnx-ad"] = "auto"
    threads: int | None = None
    seed: int | None = None  # default: the Context's seed

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, kind: type = int) -> None:
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                raise ConfigError(
                    f"distill.{name} must be a positive {kind.__name__}, got {value!r}"
                )

        positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        positive("max_samples", self.max_samples)
        if not isinstance(self.teacher_cache_mb, int) or self.teacher_cache_mb < 0:
            raise ConfigError(
                f"distill.teacher_cache_mb must be an integer >= 0, got {self.teacher_cache_mb!r}"
            )
        if self.steps is not None:
            positive("steps", self.steps)
        if self.threads is not None:
            positive("threads", self.threads)
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"distill.{name} must be a number > 0, got {value!r}")
        for name, lo, hi in (("alpha", 0, 1), ("warmup", 0, 0.5), ("holdout", 0.0, 0.5)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ConfigError(f"distill.{name} must be in [{lo}, {hi}], got {value!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"distill.patience must be an integer >= 0, got {self.patience!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"distill.weight_decay must be >= 0, got {self.weight_decay!r}")
        OptimizerSpec(kind=self.optimizer, weight_decay=float(self.weight_decay))
        for item in self.losses:
            _parse_loss(item)
        for item in self.features:
            _parse_feature(item)
        for pattern in self.frozen:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"distill.frozen: bad regex {pattern!r} ({exc})") from None


def _weight(text: str, where: str) -> tuple[str, float]:
    body, sep, w = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        value = float(w)
    except ValueError:
        raise ConfigError(f"{where}: weight {w!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{where}: weight must be >= 0, got {value}")
    return body, value


def _parse_loss(item: str) -> tuple[str, str, float]:
    name, sep, rest = item.rpartition("=")
    if not sep or not name:
        raise ConfigError(f"distill.losses: expected OUTPUT=KIND[:WEIGHT], got {item!r}")
    kind, weight = _weight(rest, f"distill.losses {item!r}")
    if kind not in (*LOSS_KINDS, "none"):
        raise ConfigError(
            f"distill.losses {item!r}: kind must be one of {', '.join(LOSS_KINDS)}, none"
        )
    return name, kind, weight


def _parse_feature(item: str) -> FeaturePair:
    left, sep, right = item.partition("=")
    if not sep or not left or not right:
        raise ConfigError(f"distill.features: expected STUDENT=TEACHER[:WEIGHT], got {item!r}")
    teacher, weight = _weight(right, f"distill.features {item!r}")
    return FeaturePair(left, teacher, weight)


class Distill(Pass):
    """Student -> the same graph with its float weights fine-tuned to reproduce the teacher.

    Lossy (it recovers what earlier passes lost), measured on a held-out split by output
    fidelity (top-1 agreement for logits, cosine otherwise); never returns a model that
    scores below its input there. Scope: every float weight of Conv/Gemm/MatMul/
    elementwise layers and the float parameters of integer weights behind
    DequantizeLinear, minus `frozen`; exact zeros of layer weights stay zero
    (`keep_zeros`). Needs a gradient engine: ONNX Runtime training (`train` extra) or
    onnx-ad (both extras).
    """

    name: ClassVar[str] = "distill"
    Config: ClassVar[type] = DistillConfig

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        missing = train_extra_missing(self.config.engine)
        if missing is not None:
            raise UnsupportedError(missing)
        report = self.new_report()
        cfg = self.config
        seed = ctx.seed if cfg.seed is None else cfg.seed
        teacher = self._teacher(ctx)
        _fold_batchnorm(graph, ctx, report)
        student = _export(graph)
        inputs, labels = load_samples(cfg, ctx, student)
        n = next(iter(inputs.values())).shape[0]
        n_val = 0
        if cfg.validation is not None:
            inputs, labels, n_val = _with_validation(cfg, ctx, student, inputs, labels)
        elif n < 2:
            raise DataError(f"distill needs at least 2 samples (1 to train, 1 held out); got {n}")
        run = _Problem(cfg, teacher, student, inputs, labels, seed, report, n_val=n_val)
        with tempfile.TemporaryDirectory(prefix="onnxslim-distill-") as tmp:
            result = run.train(Path(tmp), progress=ctx.progress)
        run.finish(graph, result)
        return report

    def _teacher(self, ctx: Context) -> onnx.ModelProto:
        if self.config.teacher is not None:
            from onnxslim_edge.model import load_model

            return load_model(self.config.teacher)
        if ctx.reference is None:
            raise ConfigError(
                "distill needs a teacher: run it in a Pipeline (the input model is the "
                "teacher) or give distill:teacher=PATH"
            )
        return ctx.reference


def _with_validation(
    cfg: DistillConfig,
    ctx: Context,
    student: onnx.ModelProto,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:
    """The training samples with `cfg.validation`'s appended (their count last): scoring
    and the never-worse check then run on data the user chose, not on a split of `data`."""
    val, val_labels = load_samples(dataclasses.replace(cfg, data=cfg.validation), ctx, student)
    for k, v in inputs.items():
        if val[k].shape[1:] != v.shape[1:]:
            raise DataError(
                f"distill.validation: input '{k}' has samples of shape {val[k].shape[1:]}, "
                f"the training data {v.shape[1:]}"
            )
    n_val = next(iter(val.values())).shape[0]
    merged = {k: np.concatenate([v, val[k].astype(v.dtype, copy=False)]) for k, v in inputs.items()}
    if labels is not None and val_labels is not None:
        labels = np.concatenate([labels, val_labels])
    return merged, labels, n_val


def _fold_batchnorm(graph: gs.Graph, ctx: Context, report: PassReport) -> None:
    from onnxslim_edge.passes.batchnorm import FoldBatchNorm

    if not any(n.op == "BatchNormalization" for n in graph.nodes):
        return
    folded = FoldBatchNorm(fold_mul_add=False).run(graph, ctx)
    graph.cleanup().toposort()
    report.count("folded_batchnorm", folded.counters.get("folded_batchnorm", 0))
    left = [n.name for n in graph.nodes if n.op == "BatchNormalization"]
    if left:
        report.warn(
            f"{len(left)} BatchNormalization node(s) could not be folded ({left[0]}, ...): "
            "their running statistics stay as they are while the rest trains"
        )


def _export(graph: gs.Graph) -> onnx.ModelProto:
    from onnxslim_edge.graph import export_graph

    model = onnx.ModelProto()
    model.CopyFrom(export_graph(graph))  # its initializers may be the graph's own protos
    return model


class _Problem:
    """Everything one distill run builds: terms, trainable set, masks, feeds, scoring."""

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: onnx.ModelProto,
        student: onnx.ModelProto,
        inputs: dict[str, np.ndarray],
        labels: np.ndarray | None,
        seed: int,
        report: PassReport,
        *,
        n_val: int = 0,
    ) -> None:
        self.cfg, self.student, self.inputs, self.seed, self.report = (
            cfg,
            student,
            inputs,
            seed,
            report,
        )
        self.n = next(iter(inputs.values())).shape[0]
        self.n_val = n_val  # the last n_val samples are the validation data
        self.teacher_model = teacher
        self._evaluator: Any = None
        self.terms = self._terms(teacher)
        teacher_names = [t.output for t in self.terms] + [f.teacher for f in self._features()]
        self.teacher = Teacher(
            teacher, list(dict.fromkeys(teacher_names)), inputs, cfg.teacher_cache_mb, cfg.threads
        )
        self._check_outputs()
        self.labels = None
        if labels is not None:
            kd = [t for t in self.terms if t.kind == "kd"]
            if not kd:
                raise ConfigError("distill.labels needs an output with the kd loss (class logits)")
            self.labels = labels
        self.augment = self._augment()
        self.fixed = fixed_batch(student)
        self.batch_size = self.fixed or cfg.batch_size
        if self.fixed and self.fixed != cfg.batch_size:
            report.warn(f"the model fixes its batch to {self.fixed}: training in batches of it")
        self.engine = engine_for(cfg.engine)
        self.train_student, self.fq = prepare_qat(student)
        legal = legalize(self.train_student)
        self.train_student = legal.model
        for op, count in legal.rewrites.items():
            report.count(f"legalized_{op}", count)
        self.trainable = self._trainable()
        self.masks = self._masks() if cfg.keep_zeros else {}
        report.count("trainable_tensors", len(self.trainable))
        report.count("masked_weights", int(sum(int(m.sum()) for m in self.masks.values())))
        report.count("fake_quant_weights", len(self.fq))
        report.count("augmented", int(self.augment))

    # -- what to match

    def _features(self) -> list[FeaturePair]:
        return [_parse_feature(f) for f in self.cfg.features]

    def _terms(self, teacher: onnx.ModelProto) -> list[OutputLoss]:
        explicit = {}
        for item in self.cfg.losses:
            name, kind, weight = _parse_loss(item)
            explicit[name] = (kind, weight)
        student_outputs = [o for o in self.student.graph.output]
        teacher_outputs = {o.name for o in teacher.graph.output}
        unknown = sorted(set(explicit) - {o.name for o in student_outputs})
        if unknown:
            raise ConfigError(f"distill.losses: '{unknown[0]}' is not an output of the student")
        terms = []
        for out in student_outputs:
            if out.name not in teacher_outputs:
                raise UnsupportedError(
                    f"teacher/student output mismatch: the student's output '{out.name}' is "
                    f"not an output of the teacher ({', '.join(sorted(teacher_outputs))})"
                )
            elem = out.type.tensor_type.elem_type
            if elem not in (onnx.TensorProto.FLOAT,):
                continue
            kind, weight = explicit.get(out.name, (_auto_kind(out), 1.0))
            if kind != "none":
                terms.append(OutputLoss(out.name, kind, weight))  # type: ignore[arg-type]
        if not terms and not self.cfg.features:
            raise UnsupportedError("distill: the student has no float output to match")
        return terms

    def _check_outputs(self) -> None:
        """Run both models on two samples: the matched outputs and feature pairs agree."""
        from onnxslim_edge.graph import exposing_session

        features = self._features()
        produced = {o for n in self.student.graph.node for o in n.output}
        for pair in features:
            if pair.student not in produced:
                raise ConfigError(f"distill.features: '{pair.student}' is no tensor of the student")
        exposed = [p.student for p in features]
        session = exposing_session(self.student, exposed, threads=self.cfg.threads)
        names = [t.output for t in self.terms] + [p.student for p in features]
        feed = {i.name: self.inputs[i.name][:2] for i in session.get_inputs()}
        got = dict(zip(names, run_batched(session, names, feed, 2, fixed_batch(self.student))))
        want = self.teacher.run({k: v[:2] for k, v in self.inputs.items()})
        pairs = [(t.output, t.output) for t in self.terms] + [
            (p.student, p.teacher) for p in features
        ]
        for s_name, t_name in pairs:
            if got[s_name].shape != want[t_name].shape:
                raise UnsupportedError(
                    f"teacher/student output mismatch: '{t_name}' is {want[t_name].shape[1:]} per "
                    f"sample in the teacher but '{s_name}' is {got[s_name].shape[1:]} in the student"
                )

    def _augment(self) -> bool:
        mode = self.cfg.augment
        images = [
            k
            for k, v in self.inputs.items()
            if v.ndim == 4 and v.dtype.kind == "f" and min(v.shape[2:]) >= 2
        ]
        if mode == "on":
            if len(images) != 1 or len(self.inputs) != 1:
                raise ConfigError("distill.augment=on needs one NCHW float image input")
            return True
        if mode == "off":
            return False
        only = len(self.inputs) == 1 and len(images) == 1
        return only and min(self.inputs[images[0]].shape[2:]) >= 32

    # -- what trains

    def _trainable(self) -> list[str]:
        graph = self.train_student.graph
        uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for pos, name in enumerate(node.input):
                uses.setdefault(name, []).append((node, pos))
        frozen = [re.compile(p) for p in self.cfg.frozen]
        qat_params = {f.param for f in self.fq}
        layer_reads: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:  # a fake-quant weight's layer reads the Add's output
            if node.name.endswith("/fake_quant"):
                layer_reads[node.input[0]] = uses.get(node.output[0], [])
        engine_frozen: dict[str, list[str]] = {}
        out = []
        for init in graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT or "/legal_c" in init.name:
                continue
            readers = uses.get(init.name, [])
            if not readers:
                continue
            if init.name not in qat_params and not all(
                pos in _WEIGHT_USES.get(node.op_type, ()) for node, pos in readers
            ):
                continue
            size = int(np.prod(init.dims)) if init.dims else 1
            if size == 1 and not any(node.op_type in _MASKED_LAYERS for node, _ in readers):
                continue
            why = next(
                (r for node, pos in readers if (r := self.engine.untrainable(node, pos))), None
            )
            if why is None and init.name in qat_params:  # through its fake-quant Add
                why = next(
                    (
                        r
                        for node, pos in layer_reads.get(init.name, [])
                        if (r := self.engine.untrainable(node, pos))
                    ),
                    None,
                )
            if why is not None:
                engine_frozen.setdefault(why, []).append(init.name)
                continue
            names = {init.name} | {node.name for node, _ in readers}
            if init.name.endswith(".distill_float"):
                names.add(init.name[: -len(".distill_float")])
            if any(p.fullmatch(n) for p in frozen for n in names):
                self.report.count("frozen_tensors")
                continue
            out.append(init.name)
        for why, names in engine_frozen.items():
            self.report.warn(f"{why}: {len(names)} weight(s) stay as they are ({names[0]}, ...)")
            self.report.count("engine_frozen_tensors", len(names))
        stuck = blocked(self.train_student, out, self.engine.no_gradient)
        if stuck:
            where = sorted(stuck)
            if self.cfg.no_gradient == "error":
                raise UnsupportedError(
                    f"distill: no gradient through {where[0]}"
                    + (f" (and {len(where) - 1} more)" if len(where) > 1 else "")
                    + "; freeze the weights before it (distill:no_gradient=freeze, or "
                    "distill:frozen=NAMES)"
                )
            drop = set().union(*stuck.values())
            for w in where:
                self.report.warn(
                    f"no gradient through {w}: froze {len(stuck[w])} weight(s) before it"
                )
            out = [n for n in out if n not in drop]
        if not out:
            raise UnsupportedError("distill: nothing to train (every weight is frozen or constant)")
        return out

    def _masks(self) -> dict[str, np.ndarray]:
        graph = self.train_student.graph
        inits = {t.name: t for t in graph.initializer}
        layer_weights = set()
        for node in graph.node:
            for pos in _MASKED_LAYERS.get(node.op_type, ()):
                if pos < len(node.input):
                    layer_weights.add(node.input[pos])
        fq_out = {}
        for node in graph.node:  # QAT weights reach the layer through their fake-quant Add
            if node.name.endswith("/fake_quant"):
                fq_out[node.output[0]] = node.input[0]
        for name in list(layer_weights):
            layer_weights.add(fq_out.get(name, name))
        masks = {}
        for name in self.trainable:
            if name in layer_weights:
                values = numpy_helper.to_array(inits[name])
                zeros = values == 0
                if zeros.any():
                    masks[name] = zeros
        return masks

    # -- feeds and scoring

    def make_feeds(
        self, idx: np.ndarray, rng: np.random.Generator | None, params: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        batch = {k: v[idx] for k, v in self.inputs.items()}
        augmented = None
        if rng is not None and self.augment:
            key = next(iter(batch))
            batch[key] = augment_images(batch[key], rng)
            augmented = batch
        teacher = self.teacher.run(augmented) if augmented else self.teacher.at(idx, self.inputs)
        feeds = dict(batch)
        for name, value in teacher.items():
            feeds[teacher_input(name)] = value
        if self.labels is not None:
            classes = teacher[next(t.output for t in self.terms if t.kind == "kd")].shape[-1]
            feeds[LABELS_INPUT] = np.eye(classes, dtype=np.float32)[self.labels[idx]]
        for fq in self.fq:
            feeds[offset_input(fq.param)] = fq.offset(params[fq.param])
        return feeds

    def apply(self, model: onnx.ModelProto, params: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        """A copy of the student with `params` written in (QAT weights re-quantized)."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        values = self.export_values(params)
        for i, init in enumerate(out.graph.initializer):
            if init.name in values:
                out.graph.initializer[i].CopyFrom(
                    numpy_helper.from_array(values[init.name], init.name)
                )
        return out

    def export_values(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = {k: v for k, v in params.items() if not k.endswith(".distill_float")}
        for fq in self.fq:
            if fq.param in params:
                values[fq.initializer] = fq.quantize(params[fq.param])
        return values

    def score(self, params: Mapping[str, np.ndarray], held: np.ndarray) -> float:
        """Held-out fidelity of the student with `params`, by `verify.Evaluator` against
        the teacher: top-1 agreement for logits outputs, cosine otherwise, averaged."""
        from onnxslim_edge.verify import Evaluator

        names = [t.output for t in self.terms] or [self.student.graph.output[0].name]
        if self._evaluator is None:
            k = self.fixed or 64
            idx = np.resize(held, -(-len(held) // k) * k) if self.fixed else held
            feeds = [
                {i.name: self.inputs[i.name][idx[s : s + k]] for i in self._feedable()}
                for s in range(0, len(idx), k)
            ]
            self._evaluator = Evaluator(
                self.teacher_model, feeds, batch_size=k, output_names=names, seed=self.seed
            )
        result = self._evaluator.score(self.apply(self.student, params))
        scores = []
        for name in names:
            m = result.outputs[name]
            value = m.top1_agreement if m.top1_agreement is not None else m.cosine
            scores.append(value if value is not None and m.nonfinite_mismatches == 0 else 0.0)
        return float(np.mean(scores)) if not result.messages else 0.0

    def _feedable(self) -> list[onnx.ValueInfoProto]:
        inits = {t.name for t in self.student.graph.initializer}
        return [i for i in self.student.graph.input if i.name not in inits]

    # -- the run

    def norms(self, train_idx: np.ndarray) -> dict[str, float]:
        idx = train_idx[:512]
        values = self.teacher.at(idx, self.inputs)
        return {k: float(np.mean(np.square(v, dtype=np.float64))) for k, v in values.items()}

    def train(self, workdir: Path, *, progress: bool) -> TrainResult:
        cfg = self.cfg
        rng = np.random.default_rng(self.seed)
        if self.n_val:
            n_train = self.n - self.n_val
            held, train_idx = np.arange(n_train, self.n), rng.permutation(n_train)
        else:
            order = rng.permutation(self.n)
            n_held = max(1, round(cfg.holdout * self.n)) if cfg.holdout > 0 else 0
            if n_held >= self.n:
                raise DataError(f"distill: {self.n} samples leave none to train on")
            held, train_idx = (order[:n_held], order[n_held:]) if n_held else (order, order)
            if not n_held:
                self.report.warn("holdout=0: fidelity is scored on the training samples")
        spec = LossSpec(
            outputs=tuple(self.terms),
            features=tuple(self._features()),
            temperature=float(cfg.temperature),
            alpha=float(cfg.alpha),
            labels=self.labels is not None,
            norms=self.norms(train_idx),
        )
        shapes = {}
        sample = self.teacher.at(held[:1], self.inputs)
        for name, value in sample.items():
            shapes[name] = ["N", *value.shape[1:]]
        loss_model = build_loss_model(self.train_student, spec, shapes)
        checkpoint = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        check_checkpoint(checkpoint, self.fingerprint())  # before minutes of compiling
        engine = self.engine
        t0 = time.perf_counter()
        program = engine.compile(
            loss_model,
            trainable=self.trainable,
            optimizer=OptimizerSpec(kind=cfg.optimizer, weight_decay=float(cfg.weight_decay)),
            workdir=workdir,
            threads=cfg.threads,
        )
        self.report.detail(kind="engine", engine=engine.name, compile_s=time.perf_counter() - t0)
        settings = TrainSettings(
            epochs=cfg.epochs,
            steps=cfg.steps,
            batch_size=self.batch_size,
            pad_batches=self.fixed is not None,
            lr=float(cfg.lr),
            warmup=float(cfg.warmup),
            schedule=cfg.schedule,
            patience=cfg.patience,
            seed=self.seed,
            checkpoint_dir=checkpoint,
            progress=progress,
        )
        trainer = Trainer(
            program,
            settings,
            train_idx=train_idx,
            held_idx=held,
            make_feeds=self.make_feeds,
            score=lambda p: self.score(p, held),
            masks=self.masks,
            feed_params=[f.param for f in self.fq],
            fingerprint=self.fingerprint(),
        )
        try:
            return trainer.run()
        finally:
            program.close()

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.student.SerializeToString(deterministic=True))
        h.update(
            json.dumps(
                dataclasses.asdict(self.cfg)
                | {"checkpoint_dir": None, "epochs": None, "steps": None},
                sort_keys=True,
                default=str,
            ).encode()
        )
        for k in sorted(self.inputs):
            h.update(k.encode() + np.ascontiguousarray(self.inputs[k][:64]).tobytes())
        return h.hexdigest()

    def finish(self, graph: gs.Graph, result: TrainResult) -> None:
        report = self.report
        for record in result.history:
            report.detail(kind="epoch", **dataclasses.asdict(record))
        improved = result.best_epoch > 0 and result.best_metric + 1e-12 >= result.before_metric
        report.detail(
            kind="summary",
            fidelity_before=result.before_metric,
            fidelity_after=result.best_metric if improved else result.before_metric,
            heldout_loss_before=result.before_loss,
            heldout_loss_after=result.best_loss if improved else result.before_loss,
            best_epoch=result.best_epoch,
            epochs=len(result.history),
            steps=result.steps,
            loss_curve=result.loss_curve,
            interrupted=result.interrupted,
            diverged=result.diverged,
            stopped_early=result.stopped_early,
            resumed_from_step=result.resumed_from,
            scored_on="validation" if self.n_val else "holdout",
            scored_samples=self.n_val or None,
            wall_s_per_epoch=[r.wall_s for r in result.history],
            samples_per_s=[r.samples_per_s for r in result.history],
        )
        report.count("epochs", len(result.history))
        report.count("steps", result.steps)
        if result.diverged:
            report.warn(f"the loss diverged at step {result.steps} (lower distill:lr)")
        if result.interrupted:
            report.warn(f"interrupted after {result.steps} steps; kept the best model so far")
        if not improved:
            report.warn(
                f"training did not improve held-out fidelity ({result.before_metric:.4f}); "
                "kept the input model"
            )
            return
        values = self.export_values(result.best_params)
        tensors = graph.tensors()
        for name, value in values.items():
            tensor = tensors.get(name)
            if isinstance(tensor, gs.Constant):
                tensor.values = np.asarray(value, dtype=tensor.values.dtype)
            else:  # pragma: no cover - every trained name comes from the student's constants
                raise RuntimeError(
                    f"distill: trained weight '{name}' is not a constant of the graph"
                )


def _auto_kind(out: onnx.ValueInfoProto) -> str:
    dims = out.type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 1:
        return "kd"
    return "mse"
