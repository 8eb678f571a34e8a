"""Built-in passes, installed as `onnxslim_edge.passes`.

Each module holds one pass class; the registry in `onnxslim_edge.pipeline` maps names
to them and imports a module only when its pass is used.
"""

__all__: list[str] = []
