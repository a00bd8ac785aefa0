"""pah-edge: on-device continual learning with Prototype-Augmented Hypernetworks.

Importing this package is cheap and imports no deep-learning framework: torch is imported by the
training-side modules that need it, so the device side runs on an install without torch.
``from pah_edge import Device`` loads the device API (numpy, ONNX Runtime, Pillow) on first use.
"""

__version__ = "0.1.0"
__all__ = ["Device", "LearnReport", "Prediction"]


def __getattr__(name: str):
    # Lazy: `import pah_edge` (the CLI, the training side) does not pay for ONNX Runtime.
    if name in __all__:
        from pah_edge.device import api

        return getattr(api, name)
    raise AttributeError(f"module 'pah_edge' has no attribute {name!r}")
