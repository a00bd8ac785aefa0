"""INT8 post-training calibration of the exported backbone (Q/DQ ONNX) and its accuracy report.

``reader`` streams calibration images in ONNX Runtime's ``{input_name: batch}`` form, ``quantize``
makes the Q/DQ model, ``evaluate`` measures it against FP32, and ``calibrate`` runs `pah-edge
calibrate` end to end and installs the model into the bundle. Needs onnx (``pah-edge[calibrate]``);
never torch.
"""
