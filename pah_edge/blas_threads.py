"""One BLAS thread for numpy in the ``pah-edge`` command, set before numpy loads (the CLI imports this first).

Between two inferences the device's numpy work is small (the task-free scores: a D x D product per
frame); numpy's BLAS threads then wait on the cores ONNX Runtime's threads hold, which more than
doubled a frame's overhead over the bare backbone (docs/benchmarks.md, "Frames and files"). A user's own
``OPENBLAS_NUM_THREADS`` wins; applications using the Python API set it themselves (README).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
