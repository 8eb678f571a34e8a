"""The digits demo model: a small ResNet-style CNN on scikit-learn's 8x8 digits.

`python -m benchmarks.digits.train --out onnxslim_edge/assets` trains it and writes the
ONNX model and test split that ship inside the package (see onnxslim_edge/demo.py).
"""
