"""The workstation side: the PAH in PyTorch, its continual trainer, run configuration and datasets.

The device side (``pah_edge.device``, ``pah_edge.calibration`` and the core modules directly under
``pah_edge``) never imports from here; ``tests/test_layers.py`` enforces it.
"""
