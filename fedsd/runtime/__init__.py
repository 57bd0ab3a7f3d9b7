"""Running a trained model: prediction and evaluation, per-exit export, ONNX graphs and ONNX Runtime."""
