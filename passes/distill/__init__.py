"""Recovery by knowledge distillation on the ONNX graph (the `distill` pass).

- `engine.py`: the `GradientEngine` interface (no ONNX Runtime specifics);
- `ort_engine.py`: ONNX Runtime training 1.19.2 (the `train` extra);
- `ad_engine.py`: onnx-ad gradient graphs of standard ops on plain onnxruntime;
- `legalize.py`: exact rewrites of ops without gradients;
- `losses.py`: KD / MSE / cosine / feature losses as ONNX nodes;
- `qat.py`: integer weights as float parameters behind fixed Q/DQ grids;
- `samples.py`: training samples, the teacher's values, augmentation;
- `trainer.py`: the loop; `distill.py`: the pass.

Nothing here imports onnxruntime.training (or torch) until a pass runs.
"""
