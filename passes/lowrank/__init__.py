"""Low-rank splitting (`lowrank`): SVD/Tucker-2 factor layers for Gemm, MatMul and Conv.

`factors` holds the decomposition math, `select` the rank selection, `layers` what can
be split and what it costs, `rewrite` the graph edits, and `split` the pass and its
options. See docs/lowrank.md.
"""

from onnxslim_edge.passes.lowrank.split import LowRank, LowRankConfig

__all__ = ["LowRank", "LowRankConfig"]
