"""Convert a float32 model to float16, keeping chosen ops (and optionally the I/O) float32.

Every node whose float32 tensors may be float16 by its ONNX schema runs in float16:
its float32 constants become float16 copies and its float outputs float16. Nodes in
`op_block_list` / `node_block_list`, nodes whose schema does not allow float16 for a
float32 tensor (e.g. Range, NonMaxSuppression), ops of other domains and ops whose
output type comes from an attribute (RandomNormal, EyeLike ...) stay float32; Casts
are inserted where a tensor crosses between the two regions (one Cast per tensor and
direction). Inputs the schema types as plain `tensor(float)` (Resize/Upsample
`scales`) stay float32. Cast(to=FLOAT) and ConstantOfShape with a float32 value whose
every consumer runs in float16 produce float16 instead.

With `keep_io_types` the graph's float32 inputs and outputs stay float32 (a Cast after
each input, and the producer of each output writes a float16 tensor that a Cast turns
into the output); without it they become float16.

Constants outside float16's range are clamped to +-65504 (counted: `clamped`; an
attention mask of -1e9 becomes -65504, still effectively -inf after Softmax); nonzero
values that round to zero are counted (`underflowed`). Models with If/Loop/Scan are
left unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.graph import infer_shapes, np_dtype, unique_name
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = ["DEFAULT_OP_BLOCK_LIST", "ConvertFP16", "ConvertFP16Config"]

log = logging.getLogger(__name__)

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
FP16_MAX = 65504.0

#: Ops kept in float32 by default. Exp and Pow overflow float16 for moderate inputs
#: (exp(x) > 65504 for x > 11.1; x**2 for |x| > 256: the variance of a decomposed
#: LayerNorm); sums and means over many elements overflow or lose the small terms
#: (ReduceMean also computes that variance); CumSum accumulates. Softmax, LayerNormalization
#: (which accumulates in float32 by `stash_type`), Sqrt, Div, Erf, Tanh, Sigmoid are
#: well behaved in float16 on TensorRT and ONNX Runtime, and are not blocked.
DEFAULT_OP_BLOCK_LIST: tuple[str, ...] = (
    "Exp",
    "Pow",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceProd",
    "ReduceL2",
    "ReduceLogSumExp",
    "CumSum",
    "Softplus",
)

#: Ops whose output type comes from an attribute: never converted (besides Cast and
#: ConstantOfShape, handled specially).
_ATTR_TYPED = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "EyeLike",
        "Multinomial",
        "Bernoulli",
        "Constant",
    }
)
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


@dataclass(frozen=True, kw_only=True)
class ConvertFP16Config:
    """Options of the `fp16` pass.

    - `keep_io_types`: graph inputs and outputs stay float32 (Casts at the boundary).
    - `op_block_list`: op types that stay float32 (see DEFAULT_OP_BLOCK_LIST).
    - `node_block_list`: node names that stay float32.
    """

    keep_io_types: bool = True
    op_block_list: tuple[str, ...] = DEFAULT_OP_BLOCK_LIST
    node_block_list: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.keep_io_types, bool):
            raise ConfigError(
                f"fp16.keep_io_types: expected true/false, got {self.keep_io_types!r}"
            )
        for key in ("op_block_list", "node_block_list"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"fp16.{key}: expected a list of names, got {value!r}")
            object.__setattr__(self, key, tuple(value))


class ConvertFP16(Pass):
    """float32 tensors and constants => float16, except blocked nodes (float32, with
    Casts around them), Resize/Upsample scales and, with `keep_io_types`, the graph's
    inputs and outputs. Lossy: outputs typically differ by ~1e-3 of their range.

    Idempotent: a second run finds nothing float32 left to convert.
    Counters: `nodes_fp16`, `nodes_fp32` (blocked with float tensors), `casts_added`,
    `constants_converted`, `clamped`, `underflowed`.
    """

    name: ClassVar[str] = "fp16"
    Config: ClassVar[type] = ConvertFP16Config
    lossless: ClassVar[bool] = False

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        report = self.new_report()
        for node in graph.nodes:
            if node.op in _CONTROL_FLOW:
                report.skip(node, f"{node.op} has subgraphs: model left unchanged")
                return report
        opset = _opset(graph)
        if opset < 6:  # Cast-1 names its target type with a string; every Cast here is Cast-6
            from onnxslim_edge.errors import UnsupportedError

            raise UnsupportedError(
                f"fp16: the model's opset {opset} is older than 6, whose Cast the conversion "
                "needs; convert the model to opset 6 or newer first"
            )
        graph.toposort()
        _Converter(graph, self.config, report).run()
        return report


class _Converter:
    def __init__(self, graph: gs.Graph, config: ConvertFP16Config, report: PassReport) -> None:
        self.graph = graph
        self.config = config
        self.report = report
        for key in (
            "nodes_fp16",
            "nodes_fp32",
            "casts_added",
            "constants_converted",
            "clamped",
            "underflowed",
        ):
            report.count(key, 0)
        known = infer_shapes(graph)
        # Original dtype of every tensor (None when unknown), and the current one.
        self.orig: dict[int, np.dtype | None] = {}
        for name, tensor in graph.tensors().items():
            if isinstance(tensor, gs.Constant):
                self.orig[id(tensor)] = np.dtype(tensor.values.dtype)
            else:
                dt = known[name].numpy_dtype if name in known else None
                self.orig[id(tensor)] = dt if dt is not None else np_dtype(tensor.dtype)
        self.cur = dict(self.orig)
        self.casts: dict[tuple[int, str], Any] = {}
        self.halves: dict[int, Any] = {}
        self.names = set(graph.tensors())
        self.opset = _opset(graph)
        self.fp16_nodes: set[int] = set()
        self.plans: dict[int, Any] = {}

    # ------------------------------------------------------------------ plan

    def _schema(self, node: Any) -> Any:
        if node.domain not in ("", "ai.onnx", None):
            return None
        try:
            return onnx.defs.get_schema(node.op, self.opset, "")
        except Exception:  # no such op at this opset
            return None

    def _plan(self, node: Any) -> tuple[str, dict[int, str], dict[int, str]] | str:
        """("fp16", input_rules, output_rules) or the reason the node stays float32.

        Rules per float32 tensor index: "half" (becomes float16), "float" (stays
        float32), "any" (keeps whatever type it has).
        """
        if node.op in self.config.op_block_list:
            return f"{node.op} is in op_block_list"
        if node.name and node.name in self.config.node_block_list:
            return "in node_block_list"
        if node.op in _ATTR_TYPED:
            return "output type set by an attribute"
        schema = self._schema(node)
        if schema is None:
            return f"no ONNX schema for {node.domain or 'ai.onnx'}::{node.op}"
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        ins = _formal(schema.inputs, len(node.inputs))
        outs = _formal(schema.outputs, len(node.outputs))
        binds: dict[str, list[tuple[str, int]]] = {}
        for kind, tensors, params in (("in", node.inputs, ins), ("out", node.outputs, outs)):
            for i, (t, p) in enumerate(zip(tensors, params)):
                if not t.is_empty() and self.orig.get(id(t)) == F32:
                    binds.setdefault(p, []).append((kind, i))
        in_rules: dict[int, str] = {}
        out_rules: dict[int, str] = {}
        for p, uses in binds.items():
            if p not in allowed:  # a concrete type such as tensor(float)
                rule = "float"
            elif "tensor(float16)" not in allowed[p]:
                return f"the schema allows no float16 for {node.op}'s type {p}"
            elif any(k == "out" for k, _ in uses) or len([u for u in uses if u[0] == "in"]) > 1:
                rule = "half"
            else:
                rule = "any"
            for kind, i in uses:
                (in_rules if kind == "in" else out_rules)[i] = rule
        return "fp16", in_rules, out_rules

    # ------------------------------------------------------------------ rewrite

    def run(self) -> None:
        graph = self.graph
        plans: dict[int, Any] = {}
        for node in graph.nodes:
            plans[id(node)] = self._plan(node)
        self._keep_float_producers(plans)
        self.plans = plans
        self.fp16_nodes = {id(n) for n in graph.nodes if isinstance(plans[id(n)], tuple)}
        if not self.config.keep_io_types:
            for t in graph.inputs:
                if self.orig.get(id(t)) == F32:
                    t.dtype = F16
                    self.cur[id(t)] = F16
        for node in list(graph.nodes):
            plan = plans[id(node)]
            if node.op == "Cast":
                self._cast_node(node)
                continue
            if node.op == "ConstantOfShape":
                self._constant_of_shape(node)
                continue
            float_io = any(self.orig.get(id(t)) == F32 for t in (*node.inputs, *node.outputs))
            if isinstance(plan, str):
                if float_io and node.op != "Constant":
                    self.report.count("nodes_fp32")
                    self.report.skip(node, plan)
                for i, t in enumerate(node.inputs):
                    if not t.is_empty() and self.orig.get(id(t)) == F32:
                        node.inputs[i] = self._as(t, F32)
                self._outputs(node, {})
                continue
            _, in_rules, out_rules = plan
            for i, rule in in_rules.items():
                t = node.inputs[i]
                if rule == "half":
                    node.inputs[i] = self._as(t, F16)
                elif rule == "float":
                    node.inputs[i] = self._as(t, F32)
            if in_rules or out_rules:
                self.report.count("nodes_fp16")
            self._outputs(node, {i: F16 for i, r in out_rules.items() if r == "half"})
        self._fix_outputs()

    def _keep_float_producers(self, plans: dict[int, Any]) -> None:
        """Nodes that only compute float32-only inputs (Resize scales from shape
        arithmetic) stay float32, so those values are not rounded to float16."""
        forced: set[int] = set()
        for node in reversed(self.graph.nodes):
            if not isinstance(plans[id(node)], tuple):
                continue
            outs = [t for t in node.outputs if not t.is_empty() and self.orig.get(id(t)) == F32]
            if not outs:
                continue
            ok = True
            for t in outs:
                if not t.outputs or any(t is o for o in self.graph.outputs):
                    ok = False
                for c in t.outputs:
                    if id(c) in forced:
                        continue
                    plan = plans[id(c)]
                    uses = [i for i, inp in enumerate(c.inputs) if inp is t]
                    if not (
                        isinstance(plan, tuple) and all(plan[1].get(i) == "float" for i in uses)
                    ):
                        ok = False
            if ok:
                plans[id(node)] = "computes a float32-only input (e.g. Resize scales)"
                forced.add(id(node))

    def _outputs(self, node: Any, dtypes: dict[int, np.dtype]) -> None:
        for i, t in enumerate(node.outputs):
            if i in dtypes and not t.is_empty():
                t.dtype = dtypes[i]
                self.cur[id(t)] = dtypes[i]

    def _cast_node(self, node: Any) -> None:
        out = node.outputs[0]
        to = node.attrs.get("to")
        if to != onnx.TensorProto.FLOAT:
            return
        consumers = list(out.outputs)
        if (
            consumers
            and all(self._reads_half(c, out) for c in consumers)
            and not any(t is out for t in self.graph.outputs)
        ):
            node.attrs["to"] = onnx.TensorProto.FLOAT16
            out.dtype = F16
            self.cur[id(out)] = F16
            self.report.count("casts_to_fp16")

    def _constant_of_shape(self, node: Any) -> None:
        value = node.attrs.get("value")
        out = node.outputs[0]
        if not isinstance(value, gs.Constant) or value.values.dtype != F32:
            return
        consumers = list(out.outputs)
        if consumers and all(self._reads_half(c, out) for c in consumers):
            node.attrs["value"] = gs.Constant(value.name, self._half_values(value.values))
            out.dtype = F16
            self.cur[id(out)] = F16

    def _reads_half(self, node: Any, t: Any) -> bool:
        """Whether `node` runs in float16 and takes `t` as float16 wherever it reads it."""
        plan = self.plans.get(id(node))
        if not isinstance(plan, tuple):
            return False
        uses = [i for i, inp in enumerate(node.inputs) if inp is t]
        return all(plan[1].get(i) in ("half", "any") for i in uses)

    def _as(self, t: Any, dtype: np.dtype) -> Any:
        """`t` as `dtype` (float16 or float32): itself, a converted constant or a Cast."""
        if self.cur.get(id(t)) in (None, dtype):
            return t
        if dtype == F16 and isinstance(t, gs.Constant):
            if id(t) not in self.halves:
                if len(t.outputs) <= 1 and not any(t is o for o in self.graph.outputs):
                    t.values = self._half_values(t.values)
                    self.cur[id(t)] = F16
                    self.report.count("constants_converted")
                    return t
                half = gs.Constant(
                    unique_name(self.graph, f"{t.name}_fp16", self.names),
                    self._half_values(t.values),
                )
                self.cur[id(half)] = F16
                self.halves[id(t)] = half
                self.report.count("constants_converted")
            return self.halves[id(t)]
        if (
            dtype == F16
            and len(t.inputs) == 1
            and t.inputs[0].op == "Constant"
            and isinstance(t.inputs[0].attrs.get("value"), gs.Constant)
        ):
            if id(t) not in self.halves:
                src = t.inputs[0].attrs["value"].values
                half = gs.Constant(
                    unique_name(self.graph, f"{t.name}_fp16", self.names),
                    self._half_values(np.asarray(src)),
                )
                self.cur[id(half)] = F16
                self.halves[id(t)] = half
                self.report.count("constants_converted")
            return self.halves[id(t)]
        key = (id(t), dtype.name)
        if key not in self.casts:
            out = gs.Variable(
                unique_name(self.graph, f"{t.name}_{dtype.name}", self.names), dtype, t.shape
            )
            to = onnx.TensorProto.FLOAT16 if dtype == F16 else onnx.TensorProto.FLOAT
            self.graph.nodes.append(
                gs.Node(
                    "Cast",
                    name=unique_name(self.graph, f"{t.name}_cast_{dtype.name}", self.names),
                    attrs={"to": to},
                    inputs=[t],
                    outputs=[out],
                )
            )
            self.cur[id(out)] = dtype
            self.casts[key] = out
            self.report.count("casts_added")
        return self.casts[key]

    def _half_values(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float32)
        finite = np.isfinite(v)
        big = finite & (np.abs(v) > FP16_MAX)
        if big.any():
            self.report.count("clamped", int(big.sum()))
            v = np.where(big, np.sign(v) * FP16_MAX, v)
        half = v.astype(np.float16)
        tiny = int(np.count_nonzero((half == 0) & (v != 0)))
        if tiny:
            self.report.count("underflowed", tiny)
        return np.ascontiguousarray(half)

    def _fix_outputs(self) -> None:
        """Graph outputs get their wanted type: float32 (keep_io_types) or float16."""
        graph = self.graph
        for k, t in enumerate(graph.outputs):
            if self.orig.get(id(t)) != F32:
                continue
            want = F32 if self.config.keep_io_types else F16
            have = self.cur.get(id(t))
            if have == want:
                continue
            if have is None:
                continue
            # The producer writes an inner tensor; a Cast makes the output (name kept).
            inner = gs.Variable(
                unique_name(graph, f"{t.name}_{have.name}", self.names), have, t.shape
            )
            for node in list(t.inputs):
                node.outputs[node.outputs.index(t)] = inner
            for node in list(t.outputs):
                for i, inp in enumerate(node.inputs):
                    if inp is t:
                        node.inputs[i] = inner
            to = onnx.TensorProto.FLOAT if want == F32 else onnx.TensorProto.FLOAT16
            graph.nodes.append(
                gs.Node(
                    "Cast",
                    name=unique_name(graph, f"{t.name}_cast", self.names),
                    attrs={"to": to},
                    inputs=[inner],
                    outputs=[t],
                )
            )
            t.dtype = want
            self.report.count("casts_added")
            graph.outputs[k] = t


def _formal(params: Any, count: int) -> list[str]:
    """The type string of each of `count` actual inputs/outputs (variadic last repeats)."""
    out: list[str] = []
    for i in range(count):
        p = params[min(i, len(params) - 1)] if params else None
        if p is None or (i >= len(params) and p.option != p.option.Variadic):
            out.append("")
        else:
            out.append(p.type_str)
    return out


def _opset(graph: gs.Graph) -> int:
    opset = getattr(graph, "opset", None)
    if isinstance(opset, int):
        return opset
    imports = getattr(graph, "import_domains", None) or []
    for imp in imports:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 13
