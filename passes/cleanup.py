"""Lossless clean-up: drop Identity/Dropout, dead nodes, fold constants, merge duplicates.

    Identity(x) -> y                      =>  x (consumers of y read x)
    Dropout(x) -> y   (inference, no mask) =>  x
    f(constants...) -> t, t <= budget      =>  initializer t (ONNX Runtime evaluates f)
    Shape(x, start, end), x of static shape =>  initializer shape(x)[start:end]
    If(constant condition)                  =>  the nodes of the branch taken
    initializers with equal dtype, shape and bytes  =>  one initializer
    equal nodes, known shape chains, Transpose/Reshape/Cast/Gemm  =>  see `cse`,
        `shape_fold`, `layout` (`simplify`, repeated with folding until nothing changes)

Folding respects a size budget per folded tensor, so ConstantOfShape/Tile/Expand
chains that would bloat the model stay computed at run time. onnx-graphsurgeon's
folding is used with its shape folding and If flattening off: the former ignores
Shape's start/end and rewrites int->float->int Cast pairs as integer arithmetic
(x * 0.5 becomes x * 0), the latter loses branch outputs the branch also reads.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError, first_line
from onnxslim_edge.graph import (
    const_value,
    infer_shapes,
    is_graph_input,
    is_graph_output,
    output_ids,
    replace_uses,
)
from onnxslim_edge.passes.cse import NONDETERMINISTIC_OPS
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = ["Cleanup", "CleanupConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CleanupConfig:
    """Options of the `cleanup` pass.

    - `fold_constants`: evaluate subgraphs that depend only on constants.
    - `fold_size_limit`: the largest tensor, in bytes, that folding may create.
    - `remove_identity`: bypass Identity nodes and inference-mode Dropout nodes.
    - `merge_constants`: make constants with the same dtype, shape and bytes one.
    - `fuse_pad`: `Pad(zeros, spatial axes) -> Conv` becomes one Conv with larger pads.
    - `simplify`: merge equal nodes, fold shape chains (symbolic dims kept), merge
      Transpose/Reshape pairs, drop no-op Transpose/Reshape/Cast, fuse MatMul + Add into
      Gemm, omit zero LSTM/GRU/RNN initial states (passes/cse.py, shape_fold.py, layout.py).
    """

    fold_constants: bool = True
    fold_size_limit: int = 16 * 2**20
    remove_identity: bool = True
    merge_constants: bool = True
    fuse_pad: bool = True
    simplify: bool = True

    def __post_init__(self) -> None:
        for key in ("fold_constants", "remove_identity", "merge_constants", "fuse_pad", "simplify"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"cleanup.{key}: expected true/false, got {getattr(self, key)!r}")
        limit = self.fold_size_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"cleanup.fold_size_limit: expected a byte count >= 0, got {limit!r}")


class Cleanup(Pass):
    """Identity/Dropout removal, dead-node removal, budgeted constant folding,
    duplicate-constant merging, common-subexpression elimination and shape-chain folding.
    Exact: removed nodes are copies, merged constants are bytewise equal, and folded
    values are what ONNX Runtime computes for those nodes (the `simplify` rewrites are
    exact as their modules state).

    Graph input and output names never change: an Identity that copies a graph input
    or output to a graph output is kept. Dropout is removed only when it cannot be in
    training mode and its mask output is unused. Nodes producing graph outputs, random
    ops and tensors over `fold_size_limit` bytes are not folded.

    Counters: `identities_removed`, `dropouts_removed`, `dead_nodes_removed`, `folded`
    (nodes replaced by constants), `ifs_flattened` (If nodes with a constant condition
    replaced by their branch), `constants_merged`, `pads_fused`; with `simplify`:
    `nodes_merged` (CSE), `shapes_folded`, `reshape_shapes_rewritten`,
    `transposes_merged`, `reshapes_merged`, `noop_nodes_removed`, `gemms_fused`,
    `zero_states_dropped`.
    """

    name: ClassVar[str] = "cleanup"
    Config: ClassVar[type] = CleanupConfig
    lossless: ClassVar[bool] = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        report = self.new_report()
        cfg: CleanupConfig = self.config
        # Shapes of the graph as handed over (cached per model state): removing copies
        # and dead nodes below keeps every remaining tensor's name and shape.
        shapes = _inferred_shapes(graph) if cfg.fold_constants else {}
        if cfg.remove_identity:
            _remove_copies(graph, report)
        report.count("dead_nodes_removed", _cleanup(graph))
        if cfg.fold_constants:
            _fold(graph, cfg.fold_size_limit, shapes, report)
        if cfg.fuse_pad:
            _fuse_pads(graph, report)
        if cfg.merge_constants:
            _merge_constants(graph, report)
            graph.cleanup()
        if cfg.simplify:
            _simplify(graph, cfg, report)
        for key in (
            "pads_fused",
            "identities_removed",
            "dropouts_removed",
            "folded",
            "ifs_flattened",
            "constants_merged",
        ):
            report.count(key, 0)
        return report


# --------------------------------------------------------------------------- simplify

_SIMPLIFY_ROUNDS = 6


def _simplify(graph: gs.Graph, cfg: CleanupConfig, report: PassReport) -> None:
    """CSE, shape-chain folding and layout merging, each followed by constant folding
    and merging, until a round changes nothing (at most `_SIMPLIFY_ROUNDS`)."""
    from onnxslim_edge.passes.cse import eliminate_common_subexpressions
    from onnxslim_edge.passes.layout import merge_layout_ops
    from onnxslim_edge.passes.shape_fold import fold_shape_chains

    for key in ("nodes_merged", "shapes_folded", "reshape_shapes_rewritten"):
        report.count(key, 0)
    for _ in range(_SIMPLIFY_ROUNDS):
        changed = eliminate_common_subexpressions(graph)
        report.count("nodes_merged", changed)
        graph.cleanup(remove_unused_graph_inputs=False)
        shapes = infer_shapes(graph)
        folded, reshaped = fold_shape_chains(graph, shapes)
        report.count("shapes_folded", folded)
        report.count("reshape_shapes_rewritten", reshaped)
        changed += folded + reshaped
        for key, n in merge_layout_ops(graph, shapes, _bypass).items():
            report.count(key, n)
            changed += n
        if not changed:
            break
        graph.cleanup(remove_unused_graph_inputs=False)
        if cfg.fold_constants:
            _fold(graph, cfg.fold_size_limit, _inferred_shapes(graph), report)
        if cfg.merge_constants:
            _merge_constants(graph, report)
            graph.cleanup(remove_unused_graph_inputs=False)


# --------------------------------------------------------------------------- pad fusion


def _fuse_pads(graph: gs.Graph, report: PassReport) -> None:
    """`Pad(x, zeros on spatial axes) -> Conv` => `Conv(x)` with the pads added. Exact:
    Conv's own padding is zeros too. TF-style "SAME" exports (asymmetric at stride 2)
    produce this pair before every strided conv."""
    outputs = output_ids(graph)
    for pad in [n for n in graph.nodes if n.op == "Pad"]:
        out = pad.outputs[0]
        consumers = list(out.outputs)
        if id(out) in outputs or len(consumers) != 1 or consumers[0].op != "Conv":
            continue
        conv = consumers[0]
        if conv.inputs[0] is not out:
            continue
        reason, spatial = _pad_amounts(pad)
        if reason is None and conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            reason = "the Conv uses auto_pad"
        if reason:
            report.skip(pad, reason)
            continue
        rank = len(spatial) // 2
        current = list(conv.attrs.get("pads", [0] * (2 * rank)))
        if len(current) != 2 * rank:
            report.skip(pad, "Pad and Conv disagree on the number of spatial axes")
            continue
        conv.attrs["pads"] = [int(a) + int(b) for a, b in zip(current, spatial)]
        conv.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
        report.count("pads_fused")


def _pad_amounts(pad: gs.Node) -> tuple[str | None, list[int]]:
    """(why not, []) or (None, Conv-style spatial pads [b1.., e1..]) of a Pad node."""
    mode = pad.attrs.get("mode", "constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return "not constant padding", []
    if len(pad.inputs) > 3 and not pad.inputs[3].is_empty():
        return "pads selected axes (axes input)", []
    if "pads" in pad.attrs:  # opset < 11
        pads, value = np.asarray(pad.attrs["pads"]), pad.attrs.get("value", 0.0)
    else:
        pads = const_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
        value = 0.0
        if len(pad.inputs) > 2 and not pad.inputs[2].is_empty():
            value = const_value(pad.inputs[2])
    if pads is None or value is None:
        return "pads or value computed at run time", []
    if np.any(np.asarray(value) != 0):
        return "pads with a nonzero value", []
    pads = [int(v) for v in np.asarray(pads).ravel()]
    rank = len(pads) // 2
    if rank < 3:
        return "no spatial axes", []
    begin, end = pads[:rank], pads[rank:]
    if any(begin[:2]) or any(end[:2]):
        return "pads the batch or channel axis", []
    if min(pads) < 0:
        return "crops (negative pads)", []
    return None, begin[2:] + end[2:]


# --------------------------------------------------------------------------- copies


def _remove_copies(graph: gs.Graph, report: PassReport) -> None:
    outputs = output_ids(graph)
    for node in list(graph.nodes):
        if node.op == "Identity":
            reason = _bypass(graph, node, outputs)
            if reason:
                report.skip(node, reason)
            else:
                report.count("identities_removed")
        elif node.op == "Dropout":
            reason = _dropout_blocker(graph, node) or _bypass(graph, node, outputs)
            if reason:
                report.skip(node, reason)
            else:
                report.count("dropouts_removed")


def _dropout_blocker(graph: gs.Graph, node: Any) -> str | None:
    """Why this Dropout is not the identity at inference, or None."""
    if graph.opset < 7 and not node.attrs.get("is_test", 0):
        return "Dropout has is_test=0 (training mode before opset 7)"
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        mode = const_value(node.inputs[2])
        if mode is None:
            return "Dropout training_mode is not a constant"
        if mode.size != 1 or bool(mode.reshape(-1)[0]):
            return "Dropout training_mode is true"
    for mask in node.outputs[1:]:
        if not mask.is_empty() and (mask.outputs or is_graph_output(graph, mask)):
            return "Dropout mask output is used"
    return None


def _bypass(graph: gs.Graph, node: Any, outputs: set[int]) -> str | None:
    """Remove a node whose first output equals its first input; return why not, or None.

    `outputs`: ids of graph and subgraph outputs (see `output_ids`).
    """
    if not node.inputs or node.inputs[0].is_empty() or not node.outputs:
        return "node has no input or output"
    src, dst = node.inputs[0], node.outputs[0]
    if id(dst) not in outputs:
        replace_uses(dst, src)
        _detach(graph, node)
        return None
    if not is_graph_output(graph, dst):
        return "its output is returned by a subgraph"
    # dst names a graph output: keep its name by making src's producer write it.
    if is_graph_input(graph, src) or id(src) in outputs:
        return "copies a graph input/output to a graph output (keeps the interface names)"
    if len(src.inputs) != 1:
        return "copies a constant to a graph output"
    producer = src.inputs[0]
    replace_uses(src, dst, skip=node)
    _detach(graph, node)
    index = next(i for i, t in enumerate(producer.outputs) if t is src)
    producer.outputs[index] = dst
    return None


def _detach(graph: gs.Graph, node: Any) -> None:
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)


def _cleanup(graph: gs.Graph) -> int:
    """gs cleanup (graph inputs kept); the number of nodes it removed, subgraphs excluded."""
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False)
    return before - len(graph.nodes)


# --------------------------------------------------------------------------- folding


def _inferred_shapes(graph: gs.Graph) -> dict[str, tuple[Any, Any]]:
    """(shape, dtype) by tensor name; shapes measured by ONNX Runtime on placeholder
    inputs are not trusted for folding (a data-dependent shape is only what they gave)."""
    return {
        name: (None if info.measured else info.shape, info.numpy_dtype)
        for name, info in infer_shapes(graph).items()
    }


def _fold(graph: gs.Graph, limit: int, shapes: dict[str, Any], report: PassReport) -> None:
    """Fold the graph, then each subgraph (If/Loop/Scan bodies), within the budget.

    Scopes are folded outer first; a scope into which If branches were flattened is
    folded again, and its subgraphs are looked up after that.
    """
    graph.toposort()
    candidates = [n for n in _all_nodes(graph) if n.op != "Constant"]
    kept = {t.name for t in (*graph.inputs, *graph.outputs)}  # interface names
    for sub in graph.subgraphs(recursive=True):
        kept.update(t.name for t in sub.outputs)  # a subgraph may return an outer tensor
    state = _Flattening(kept=kept, owners=_name_owners(graph))
    scopes = [graph]
    while scopes:
        scope = scopes.pop(0)
        while True:  # a flattened branch may hold constants and If nodes to fold again
            _fold_one(scope, limit, shapes, kept, report, graph.ir_version)
            if not _flatten_constant_ifs(scope, state, report):
                break
        scopes.extend(sub for node in scope.nodes for sub in node.subgraphs())
    graph.cleanup(remove_unused_graph_inputs=False)
    alive = {id(n) for n in _all_nodes(graph)}
    folded = [n for n in candidates if id(n) not in alive and id(n) not in state.dropped]
    report.count("folded", len(folded))
    for node in folded:
        report.detail(folded=node.name or node.op, op=node.op)


def _fold_one(
    graph: gs.Graph,
    limit: int,
    shapes: dict[str, Any],
    kept: set[str],
    report: PassReport,
    ir: int | None,
) -> None:
    """Fold one scope (subgraphs excluded). `kept`: names of the model's interface and of
    subgraph outputs, whose producers stay."""
    outputs = kept | {t.name for t in graph.outputs}

    deferred: list[Any] = []  # growing ops whose size may be known once inputs fold

    def exclude(node: Any) -> bool:
        if node.op in NONDETERMINISTIC_OPS:
            return True
        for out in node.outputs:
            if out.name in outputs:
                return True  # a graph output stays computed: runtimes expect a producer
            shape, dtype = shapes.get(out.name, (None, None))
            static = shape is not None and all(isinstance(d, int) for d in shape)
            if static and dtype is not None:
                if _volume(shape) * dtype.itemsize > limit:
                    return True
            elif node.op in GROWING_OPS:  # size unknown to shape inference: bound it first
                bound = _growth_bytes(node, shapes)
                if bound is None:
                    deferred.append(node)
                    return True
                if bound > limit:
                    return True
        return False

    _fold_static_shapes(graph, shapes, outputs)
    _fold_data_movement(graph, limit, outputs)
    ir_version = graph.ir_version
    # gs exports the folding graph with this IR version: ONNX Runtime 1.19 refuses IR > 10,
    # and below IR 4 every initializer would have to be a graph input.
    graph.ir_version = min(max(ir or 10, 4), 10)
    options = {
        # gs's own shape folding ignores Shape's start/end attributes and elides
        # int->float->int Cast pairs (changing results): `_fold_static_shapes` replaces it.
        "fold_shapes": False,
        "size_threshold": limit,
        "should_exclude_node": exclude,
        "recurse_subgraphs": False,
        "recurse_functions": False,
        # gs's flattening of If nodes with a constant condition loses tensors that a
        # branch both returns and reads: `_flatten_constant_ifs` replaces it.
        "flatten_subgraphs": False,
    }
    from onnx_graphsurgeon.logger import G_LOGGER

    from onnxslim_edge.runtime import ort_log_severity

    # gs folds through ONNX Runtime sessions of its own; their optimizer warnings are noise
    try:
        for _ in range(4):  # again while a deferred growing op may now have constant inputs
            deferred.clear()
            constants = _constant_count(graph)
            with ort_log_severity(3), G_LOGGER.suppress(G_LOGGER.CRITICAL):
                try:
                    graph.fold_constants(error_ok=False, **options)
                except Exception as exc:
                    report.warn(
                        f"constant folding of '{graph.name}' failed as a whole "
                        f"({first_line(exc)}); folding part by part"
                    )
                    try:  # gs 0.6 "basic" partitioning recurses forever on a failing part
                        graph.fold_constants(error_ok=True, partitioning="recursive", **options)
                    except Exception as exc2:
                        report.warn(
                            f"constant folding of '{graph.name}' skipped: {first_line(exc2)}"
                        )
            if not deferred or _constant_count(graph) == constants:
                break
    finally:
        graph.ir_version = ir_version


#: Ops that only move data, folded here in numpy (exact) before onnx-graphsurgeon's
#: folding, which would export their inputs to an ONNX Runtime session (several copies
#: of each weight at once: a transposed weight costs 4x its size there).
_DATA_MOVEMENT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_FOLDABLE_KINDS = frozenset("fiub")


def _fold_data_movement(graph: gs.Graph, limit: int, outputs: set[str]) -> None:
    """Replace each data-movement node whose inputs are initializers by its result, one
    tensor at a time; its input's data is read without being kept in the graph."""
    opset = _default_opset(graph)
    for node in list(graph.nodes):
        if node.op not in _DATA_MOVEMENT_OPS or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if out.name in outputs or not isinstance(out, gs.Variable):
            continue
        inputs = [t for t in node.inputs if not t.is_empty()]
        if not inputs or not all(isinstance(t, gs.Constant) for t in inputs):
            continue
        if any(_stored_dtype(t) is None for t in inputs):
            continue
        if _volume(inputs[0].shape) * _stored_dtype(inputs[0]).itemsize > limit:
            continue
        try:
            value = _move_data(node, [_peek(t) for t in node.inputs], opset)
        except (ValueError, TypeError, IndexError):
            continue  # an invalid node: left to the runtime, which reports it
        if value is None:
            continue
        # (np.ascontiguousarray would make a 0-d result 1-d)
        out.to_constant(value if value.flags.c_contiguous else value.copy(order="C"))
        node.outputs.clear()
        node.inputs.clear()


def _default_opset(graph: gs.Graph) -> int:
    return int(graph.opset) if graph.opset else 13


def _stored_dtype(tensor: Any) -> np.dtype | None:
    """The numpy dtype of a constant's stored values when it is plain data (no export
    dtype such as bfloat16 stored another way), else None."""
    values = tensor._values
    dtype = (
        values.dtype
        if isinstance(values, gs.ir.tensor.LazyValues)
        else getattr(values, "dtype", None)
    )
    if dtype is None or np.dtype(dtype).kind not in _FOLDABLE_KINDS:
        return None
    export = getattr(tensor, "export_dtype", None)
    try:
        if export is not None and np.dtype(export) != np.dtype(dtype):
            return None
    except TypeError:  # an ONNX-only type (bfloat16, float8)
        return None
    return np.dtype(dtype)


def _peek(tensor: Any) -> np.ndarray | None:
    """A constant's values; a lazily loaded one stays lazy (no copy kept in the graph)."""
    if tensor.is_empty():
        return None
    values = tensor._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        return values.load()
    return np.asarray(values)


def _move_data(node: Any, values: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    """`node`'s result on constant `values` for the ops of `_DATA_MOVEMENT_OPS`."""
    x = values[0]
    if x is None:
        return None
    attrs = node.attrs
    if node.op == "Transpose":
        perm = attrs.get("perm")
        return np.transpose(x, None if perm is None else [int(p) for p in perm])
    if node.op == "Reshape":
        if len(values) < 2 or values[1] is None:
            return None
        shape = [int(d) for d in values[1].reshape(-1)]
        if not attrs.get("allowzero", 0):
            shape = [x.shape[i] if d == 0 and i < x.ndim else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if node.op == "Flatten":
        axis = int(attrs.get("axis", 1))
        axis = axis + x.ndim if axis < 0 else axis
        if not 0 <= axis <= x.ndim:
            return None
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    axes_value = attrs.get("axes") if opset < 13 else (values[1] if len(values) > 1 else None)
    axes = None if axes_value is None else tuple(int(a) for a in np.asarray(axes_value).reshape(-1))
    if node.op == "Unsqueeze":
        return None if axes is None else np.expand_dims(x, axes)
    if axes is None:  # Squeeze of every length-1 axis
        return np.squeeze(x)
    if any(x.shape[a] != 1 for a in axes):
        return None
    return np.squeeze(x, axis=axes)


def _fold_static_shapes(graph: gs.Graph, shapes: dict[str, Any], outputs: set[str]) -> None:
    """Make the output of each Shape node whose input has a static shape a constant.

    Honors Shape's `start`/`end` (opset 15): the result is `shape[start:end]` with
    negative bounds counted from the end and both clamped to [0, rank], which is Python
    slicing. Shape nodes that produce a graph output stay computed.
    """
    for node in graph.nodes:
        if node.op != "Shape" or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if out.name in outputs or out.is_empty() or node.inputs[0].is_empty():
            continue
        shape, _ = shapes.get(node.inputs[0].name, (None, None))
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            continue
        start = node.attrs.get("start", 0)
        end = node.attrs.get("end")
        if not isinstance(start, int) or not isinstance(end, (int, type(None))):
            continue  # an attribute reference (inside a function): not known here
        out.to_constant(np.array(shape[start:end], dtype=np.int64))
        out.inputs.clear()
        node.outputs.clear()


@dataclass
class _Flattening:
    """What `_flatten_constant_ifs` needs across scopes and calls.

    `kept`: names that must not change (interface, subgraph outputs); `owners`: tensor
    name -> ids of the tensors with that name (see `_name_owners`); `dropped`: ids of
    the If nodes replaced and of the nodes of their branches not taken; `skipped`: ids
    of the If nodes already reported as kept.
    """

    kept: set[str]
    owners: dict[str, set[int]]
    dropped: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)


def _flatten_constant_ifs(graph: gs.Graph, state: _Flattening, report: PassReport) -> int:
    """Replace each If whose condition is a constant with the nodes of the branch it takes.

    The branch's own tensors whose names other scopes use too (sibling branches may
    repeat names) are renamed. For each If output, the producer of the branch
    output writes the If output instead when nothing else reads the branch output;
    otherwise (it is also read in the branch, returned twice, an outer tensor or a
    constant) the readers of the If output read the branch output. An If output with a
    name in `state.kept` can only be rebound: an If that would need it rerouted is left
    alone and reported. Returns the number of If nodes replaced.
    """
    done = 0
    index = 0
    while index < len(graph.nodes):
        node = graph.nodes[index]
        index += 1
        if node.op != "If" or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
            continue
        cond = np.asarray(node.inputs[0].values)
        if cond.size != 1:
            continue
        key = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
        branch = node.attrs.get(key)
        if not isinstance(branch, gs.Graph):
            continue
        plan = _flatten_plan(node, branch, state.kept)
        if isinstance(plan, str):
            if id(node) not in state.skipped:
                state.skipped.add(id(node))
                report.skip(node, f"If with a constant condition kept: {plan}")
            continue
        _rename_clashing(branch, state.kept, state.owners)
        pairs = list(zip(list(node.outputs), list(branch.outputs), plan))
        node.inputs.clear()
        node.outputs.clear()
        for node_out, branch_out, rebind in pairs:
            if rebind:
                producer = branch_out.inputs[0]
                slot = next(i for i, t in enumerate(producer.outputs) if t is branch_out)
                producer.outputs[slot] = node_out
            else:
                replace_uses(node_out, branch_out)
        index -= 1
        graph.nodes[index : index + 1] = branch.nodes
        index += len(branch.nodes)
        state.dropped.add(id(node))
        for other in node.subgraphs():
            if other is not branch:
                state.dropped.update(id(n) for n in _all_nodes(other))
        report.count("ifs_flattened")
        done += 1
    return done


def _flatten_plan(node: Any, branch: gs.Graph, kept: set[str]) -> list[bool] | str:
    """For each output of the If `node`, whether the producer of `branch`'s output is
    rebound to write it (True) or its readers are rerouted (False); or why `branch`
    cannot replace the If."""
    if branch.inputs:
        return "its branch has inputs"
    if len(branch.outputs) != len(node.outputs):
        return "its branch returns a different number of values"
    own = {id(t) for n in branch.nodes for t in n.outputs}
    counts = Counter(id(t) for t in branch.outputs)
    plan = []
    for node_out, out in zip(node.outputs, branch.outputs):
        if node_out.is_empty():
            return "it has an omitted output"
        rebind = id(out) in own and counts[id(out)] == 1 and not out.outputs
        if not rebind and node_out.name in kept:
            return f"its output '{node_out.name}' keeps its name but '{out.name}' is shared"
        plan.append(rebind)
    return plan


def _only_read_in(tensor: Any, branch: gs.Graph) -> bool:
    """Whether every node reading `tensor` belongs to `branch` or its subgraphs."""
    inside = {id(n) for n in branch.nodes}
    for sub in branch.subgraphs(recursive=True):
        inside.update(id(n) for n in sub.nodes)
    return all(id(n) in inside for n in tensor.outputs)


def _rename_clashing(branch: gs.Graph, kept: set[str], owners: dict[str, set[int]]) -> None:
    """Give the tensors local to `branch` that share a name with another tensor a new name.

    Constants get a renamed copy: renaming an imported initializer in place would rename
    it in the caller's ModelProto too (gs exports lazily loaded tensors in place).
    """
    local = [t for n in branch.nodes for t in n.outputs if not t.is_empty()]
    local += [
        t
        for t in branch.tensors().values()
        if isinstance(t, gs.Constant) and t.name not in kept and _only_read_in(t, branch)
    ]
    for tensor in {id(t): t for t in local}.values():
        if len(owners.get(tensor.name, ())) < 2:
            continue
        owners[tensor.name].discard(id(tensor))
        name, i = tensor.name, 0
        while name in owners:
            i += 1
            name = f"{tensor.name}_{branch.name}_{i}"
        if isinstance(tensor, gs.Constant):
            copy = gs.Constant(name, np.array(tensor.values), export_dtype=tensor.export_dtype)
            replace_uses(tensor, copy)
            tensor = copy
        else:
            tensor.name = name
        owners[name] = {id(tensor)}


def _all_nodes(graph: gs.Graph) -> list[Any]:
    """The nodes of the graph and of all its subgraphs."""
    nodes = list(graph.nodes)
    for sub in graph.subgraphs(recursive=True):
        nodes.extend(sub.nodes)
    return nodes


def _name_owners(graph: gs.Graph) -> dict[str, set[int]]:
    """Tensor name -> ids of the tensors with that name, over the graph and its subgraphs."""
    owners: dict[str, set[int]] = defaultdict(set)
    for scope in (graph, *graph.subgraphs(recursive=True)):
        for name, tensor in scope.tensors().items():
            owners[name].add(id(tensor))
    return dict(owners)


#: Ops whose output can be far larger than their inputs (a 200-byte model can ask for
#: GBs). Where shape inference cannot size their output, they fold only when a bound
#: computed from their constant inputs fits the budget: ONNX Runtime never evaluates them
#: past it.
GROWING_OPS = frozenset(
    {"ConstantOfShape", "Tile", "Expand", "Range", "Resize", "Upsample", "Pad", "OneHot",
     "EyeLike", "CenterCropPad", "Col2Im"}
)  # fmt: skip


def _growth_bytes(node: Any, shapes: dict[str, Any]) -> int | None:
    """Upper bound on the bytes a GROWING_OPS node outputs, from its constant inputs
    (8 bytes per element: any numeric dtype); None when it cannot be bounded (yet)."""

    def value(i: int) -> np.ndarray | None:
        return const_value(node.inputs[i]) if len(node.inputs) > i else None

    def shape_of(i: int) -> tuple[int, ...] | None:
        v = value(i)
        if v is not None:
            return tuple(v.shape)
        shape = shapes.get(node.inputs[i].name, (None, None))[0] if len(node.inputs) > i else None
        return (
            tuple(shape) if shape is not None and all(isinstance(d, int) for d in shape) else None
        )

    try:
        if node.op == "ConstantOfShape":
            dims = value(0)
            count = None if dims is None else math.prod(int(d) for d in dims.reshape(-1))
        elif node.op == "Tile":
            shape, repeats = shape_of(0), value(1)
            count = (
                None
                if shape is None or repeats is None
                else math.prod(shape) * math.prod(int(r) for r in repeats.reshape(-1))
            )
        elif node.op == "Expand":
            shape, target = shape_of(0), value(1)
            count = (
                None
                if shape is None or target is None
                else math.prod(
                    np.broadcast_shapes(shape, tuple(int(d) for d in target.reshape(-1)))
                )
            )
        elif node.op == "Range":
            start, stop, delta = value(0), value(1), value(2)
            count = (
                None
                if start is None or stop is None or delta is None
                else math.ceil((float(stop) - float(start)) / float(delta))
            )
        else:
            count = None
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None
    return None if count is None else max(int(count), 0) * 8


def _constant_count(graph: gs.Graph) -> int:
    return sum(isinstance(t, gs.Constant) for t in graph.tensors().values())


def _volume(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# --------------------------------------------------------------------------- merging


def _merge_constants(graph: gs.Graph, report: PassReport) -> None:
    """Make every reader of a duplicate constant read the first equal one."""
    groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    seen = output_ids(graph)  # outputs keep their names: never merged away
    for node in graph.nodes:
        for tensor in node.inputs:
            if id(tensor) in seen or tensor.is_empty():
                continue
            seen.add(id(tensor))
            key = _cheap_key(tensor)
            if key is not None:
                groups[key].append(tensor)
    for members in groups.values():
        if len(members) < 2:
            continue
        keepers: dict[bytes, list[tuple[Any, bytes]]] = defaultdict(list)
        for tensor in members:
            data = np.ascontiguousarray(_constant_of(tensor).values).tobytes()
            digest = hashlib.blake2b(data, digest_size=16).digest()
            match = next((k for k, kdata in keepers[digest] if kdata == data), None)
            if match is None:
                keepers[digest].append((tensor, data))
                continue
            replace_uses(tensor, match)
            report.count("constants_merged")
            report.detail(merged=tensor.name, into=match.name)


def _cheap_key(tensor: Any) -> tuple[str, tuple[int, ...], str] | None:
    """dtype, shape and stored dtype of a constant without loading its bytes."""
    const = _constant_of(tensor)
    if const is None:
        return None
    export = const.export_dtype
    try:
        stored = str(np.dtype(export))
    except TypeError:
        stored = str(export)
    return (str(np.dtype(const.dtype)), tuple(const.shape), stored)


def _constant_of(tensor: Any) -> gs.Constant | None:
    """The gs.Constant holding `tensor`'s value: itself, or its Constant node's `value`."""
    if isinstance(tensor, gs.Constant):
        return tensor
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        value = attrs.get("value")
        if len(attrs) == 1 and isinstance(value, gs.Constant):
            return value
    return None
