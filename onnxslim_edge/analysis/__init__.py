"""Model analyses: tensor shapes and dtypes, and cost (params, bytes, MACs, sparsity)."""

from onnxslim_edge.analysis.cost import (
    ModelCost,
    NodeCost,
    count_macs,
    model_cost,
    weight_sparsity,
)
from onnxslim_edge.analysis.shapes import TensorInfo, dtype_name, infer_shapes, io_info

__all__ = [
    "ModelCost",
    "NodeCost",
    "TensorInfo",
    "count_macs",
    "dtype_name",
    "infer_shapes",
    "io_info",
    "model_cost",
    "weight_sparsity",
]
