"""Built-in passes, installed as `onnxslim_edge.passes`.

Each module holds one pass class, registered as an entry point of the group
`onnxslim_edge.passes` in pyproject.toml (as a third-party package registers its own);
`onnxslim_edge.registry` imports a module only when its pass is used.
"""

__all__: list[str] = []
