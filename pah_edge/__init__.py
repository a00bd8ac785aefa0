"""pah-edge: on-device continual learning with Prototype-Augmented Hypernetworks.

Importing this package is cheap and imports no deep-learning framework: torch is imported by the
training-side modules that need it, so the device side runs on an install without torch.
"""

__version__ = "0.1.0"
