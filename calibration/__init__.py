"""INT8 post-training calibration of the exported backbone (Q/DQ ONNX)."""
