"""A tiny exported bundle for device-side tests (a few seconds to make).

tiny_cnn trained for 1 epoch on real digits: workstation tasks "a" (digits 0-2) and "b" (3-5),
then a device task "c" (6-9) registered directly, its prototypes fitted by plain gradient descent
on the bundle's own learner-step graph (no learner needed), with its task-free statistics. Class
names are folder names "digitN".
"""

from pathlib import Path

import numpy as np
from conftest import write_image_folder

LAYOUT = {"a": [0, 1, 2], "b": [3, 4, 5]}
DEVICE_TASK = ("c", [6, 7, 8, 9])


def export_tiny_run(root: Path, digits: dict, layout: dict, *, per_class: int, epochs: int = 1) -> Path:
    """Train tiny_cnn on ``layout`` ({task: [digit, ...]}) of real digits and export it; returns the bundle."""
    from pah_edge.workstation.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from pah_edge.export.bundle_writer import export_bundle
    from pah_edge.workstation.trainer import run_training

    folder = write_image_folder(root / "digits", digits, layout, per_class=per_class)
    cfg = RunConfig(data=DataConfig(folder=str(folder)),
                    model=ModelConfig(backbone="tiny_cnn", image_size=28, prototype_size=8),
                    train=TrainConfig(epochs=epochs))
    run_training(cfg, root / "run", show_progress=False)
    export_bundle(root / "run", root / "bundle", simplify=False)
    return root / "bundle"


def make_tiny_bundle(root: Path, digits: dict) -> Path:
    """Train, export and extend a bundle under ``root``; returns the bundle directory."""
    from pah_edge.bundle import Bundle
    from pah_edge.task_free import task_stats

    export_tiny_run(root, digits, LAYOUT, per_class=20)
    bundle = Bundle.open(root / "bundle")
    name, classes = DEVICE_TASK
    prototypes, accuracy, features, labels = _fit_prototypes(bundle, [digits[d][:30] for d in classes])
    bundle.add_task(name=name, class_names=[f"digit{d}" for d in classes], prototypes=prototypes,
                    images_seen=30 * len(classes), accuracy=accuracy, source="device",
                    stats=task_stats(features, labels, len(classes)))
    return bundle.path


def _fit_prototypes(bundle, per_class: list[np.ndarray], steps: int = 100, lr: float = 100.0):
    """(prototypes float32 [C, 1, s, s], train accuracy, features, labels): gradient descent from small
    random values."""
    import onnxruntime as ort

    from pah_edge.preprocess import to_input

    images = np.concatenate([np.repeat(d[:, :, :, None], 3, axis=3) for d in per_class])
    labels = np.repeat(np.arange(len(per_class)), [len(d) for d in per_class]).astype(np.int64)
    features = ort.InferenceSession(str(bundle.graph_path("backbone"))).run(
        ["features"], {"images": to_input(images, bundle.preprocess)})[0]
    step = ort.InferenceSession(str(bundle.graph_path("learner_step")))
    rng = np.random.default_rng(0)
    prototypes = 0.1 * rng.standard_normal((len(per_class), *bundle.prototype_shape), dtype=np.float32)
    for _ in range(steps):
        _, grad = step.run(["loss", "grad"], {"prototypes": prototypes, "features": features, "labels": labels})
        prototypes = prototypes - np.float32(lr) * grad
    head = ort.InferenceSession(str(bundle.graph_path("generator"))).run(["head"], {"prototypes": prototypes})[0]
    return prototypes, float(((features @ head.T).argmax(1) == labels).mean()), features, labels


def query_folder(root: Path, digits: dict) -> Path:
    """Images to predict: nested folders, plus hidden and non-image entries that must be ignored.

    query/top.png, query/six/0.png, query/six/1.png, query/deep/er/seven.PNG; ignored:
    query/.hidden/x.png, query/.dot.png, query/notes.txt.
    """
    from PIL import Image

    query = root / "query"
    files = {"top.png": digits[0][100], "six/0.png": digits[6][100], "six/1.png": digits[6][101],
             "deep/er/seven.PNG": digits[7][100], ".hidden/x.png": digits[1][100], ".dot.png": digits[2][100]}
    for name, image in files.items():
        (query / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(query / name, format="PNG")
    (query / "notes.txt").write_text("not an image")
    return query


QUERY_FILES = ["top.png", "deep/er/seven.PNG", "six/0.png", "six/1.png"]  # the walk's order: sorted per folder
