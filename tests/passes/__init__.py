"""Tests of the built-in passes (`passes/`, installed as `onnxslim_edge.passes`)."""
