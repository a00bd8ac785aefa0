"""Datasets as continual-learning task sequences: the user's image folders and built-in benchmarks.

numpy and Pillow only (no torch): the trainer wraps the uint8 arrays into tensors itself.
"""

from pah_edge.workstation.data.benchmarks import BENCHMARKS, load_benchmark
from pah_edge.workstation.data.imagefolder import load_image_folder
from pah_edge.workstation.data.tasks import ImageSet, Task

__all__ = ["BENCHMARKS", "ImageSet", "Task", "load_benchmark", "load_image_folder"]
