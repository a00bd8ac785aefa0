"""Conversion steps from a trained PyTorch PAH to ONNX graphs and TensorRT engines."""
