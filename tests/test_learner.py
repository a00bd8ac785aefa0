"""On-device learning (`pah_edge.device.learner`, `pah-edge learn-task`) on a tiny bundle of real digits.

One bundle per module: tiny_cnn trained on digits 0-4 in two tasks, exported; every test works on
its own copy. The device learns digits 5-9. CLI cases run the real entry point in a subprocess
(``python -m pah_edge.cli``), most with torch made unimportable, since the device has none.
"""

import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import assert_one_line_error, file_tree, write_image_folder
from tiny_bundle import export_tiny_run
from PIL import Image

from pah_edge.bundle import Bundle, BundleError
from pah_edge.device.learner import batch_size_for, learn_task, split_train_val
from pah_edge.device.prototype_fit import Adam, PrototypeObjective, fit_prototypes
from pah_edge.device.prototype_init import (LinearHeads, adaptive_avg_pool, class_mean_head, initial_prototypes,
                                           thumbnails)
from pah_edge.device.runtimes import create_runner
from pah_edge.errors import ConfigError
from pah_edge.workstation.hypernetwork import ClasswiseGenerator
from pah_edge.preprocess import load_image, to_input

REPO = Path(__file__).resolve().parents[1]
NEW_DIGITS = [5, 6, 7, 8, 9]
REPORT_KEYS = {"name", "classes", "images", "skipped", "train_accuracy", "val_accuracy", "feature_images_per_s",
               "feature_seconds", "optimise_seconds", "wall_seconds", "peak_rss_mb", "runtime", "bytes_stored",
               "steps", "converged", "initial_loss", "final_loss"}
# The device has no torch: a child that imports it fails.
NO_TORCH = "import sys; sys.modules['torch'] = None; from pah_edge.cli import main; sys.argv[0] = 'pah-edge'; main()"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mnist_digits):
    """A bundle from tiny_cnn trained 2 epochs on digits 0-2 and 3-4 (20 images per class)."""
    root = tmp_path_factory.mktemp("learner")
    return export_tiny_run(root, mnist_digits, {"a": [0, 1, 2], "b": [3, 4]}, per_class=20, epochs=2)


@pytest.fixture
def bundle_dir(exported, tmp_path):
    return shutil.copytree(exported, tmp_path / "bundle")


def _write_mixed(root: Path, digits, per_class: int, offset: int = 0) -> Path:
    """root/digit<d>/ for d in 5-9: grayscale PNG, RGB JPEG, RGBA PNG and BMP in turn, plus a notes file."""
    for d in NEW_DIGITS:
        folder = root / f"digit{d}"
        folder.mkdir(parents=True)
        for i, image in enumerate(digits[d][offset:offset + per_class]):
            gray = Image.fromarray(image)
            kind = i % 4
            if kind == 0:
                gray.save(folder / f"{i}.png")
            elif kind == 1:
                gray.convert("RGB").save(folder / f"{i}.JPG", quality=95)  # upper-case suffix too
            elif kind == 2:
                gray.convert("RGBA").save(folder / f"{i}.png")
            else:
                gray.save(folder / f"{i}.bmp")
        (folder / ".DS_Store").write_bytes(b"hidden")
    (root / "digit5" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def new_task(tmp_path_factory, mnist_digits):
    """Digits 5-9 in mixed formats, 40 per class (the user's ./new_images)."""
    return _write_mixed(tmp_path_factory.mktemp("images") / "new_images", mnist_digits, per_class=40)


def _blank_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG, written row by row: 10,000 x 10,000 px in ~12 KB and no big buffer."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path



def _cli(*args, no_torch=True, **popen):
    command = [sys.executable, "-c", NO_TORCH] if no_torch else [sys.executable, "-m", "pah_edge.cli"]
    env = {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(var, None)
    argv = [*command, "learn-task", *map(str, args)]
    if popen:
        return subprocess.Popen(argv, text=True, env=env, cwd=REPO, **popen)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)



# --- learning ----------------------------------------------------------------------------------------


def test_learns_a_new_task_from_mixed_formats_without_torch(bundle_dir, new_task):
    result = _cli(new_task, "--bundle", bundle_dir, "--name", "digits", "--json", "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    assert report["classes"] == [f"digit{d}" for d in NEW_DIGITS]
    assert report["images"] == {"train": 160, "val": 40} and report["skipped"] == 0 and report["ignored_files"] == 1
    assert report["val_accuracy"] > 0.4 and report["train_accuracy"] > 0.4  # chance is 0.2
    assert report["runtime"] == "onnxruntime-cpu" and report["steps"] >= 1
    assert report["feature_images_per_s"] > 0 and report["peak_rss_mb"] > 0
    assert "ignored 1 non-image file(s)" in " ".join(result.stderr.split())

    bundle = Bundle.open(bundle_dir)
    record = bundle.task("digits")
    assert [t.name for t in bundle.tasks()] == ["a", "b", "digits"]
    assert record.class_names == tuple(report["classes"]) and record.source == "device"
    assert record.images_seen == 200 and record.accuracy == report["val_accuracy"]
    assert record.bytes == report["bytes_stored"] and bundle.load_prototypes("digits").shape == (5, 1, 8, 8)
    print(f"\nlearn-task: {json.dumps({k: report[k] for k in sorted(REPORT_KEYS)})}")


def _old_task_logits(bundle: Bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    features = ort.InferenceSession(str(bundle.graph_path("backbone"))).run(["features"], {"images": images})[0]
    generator = ort.InferenceSession(str(bundle.graph_path("generator")))
    return {t.name: features @ generator.run(["head"], {"prototypes": bundle.load_prototypes(t.name)})[0].T
            for t in bundle.tasks()}


def test_old_tasks_stay_bit_identical(bundle_dir, new_task, exported, mnist_digits):
    bundle = Bundle.open(bundle_dir)
    probe = to_input(np.stack([np.repeat(d[:, :, None], 3, axis=2) for k in range(10) for d in mnist_digits[k][-3:]]),
                     bundle.preprocess)
    before = _old_task_logits(bundle, probe)
    files_before = {t.name: (bundle_dir / t.file).read_bytes() for t in bundle.tasks()}
    entries_before = [t.to_dict() for t in bundle.tasks()]

    report = learn_task(bundle, new_task, name="digits", progress=False)

    after = _old_task_logits(Bundle.open(bundle_dir), probe)
    assert set(after) == {"a", "b", "digits"} and report.val_accuracy > 0.4
    for name, logits in before.items():
        assert np.array_equal(logits, after[name]), f"task {name!r} changed"
        assert (bundle_dir / f"tasks/{name}.npz").read_bytes() == files_before[name]
    assert [t.to_dict() for t in Bundle.open(bundle_dir).tasks()][:2] == entries_before
    assert file_tree(bundle_dir, lock=False).keys() - file_tree(exported, lock=False).keys() == {"tasks/digits.npz", "tasks/digits.stats.npz"}


def test_replace_overwrites_the_task(bundle_dir, new_task):
    bundle = Bundle.open(bundle_dir)
    learn_task(bundle, new_task, name="digits", progress=False, max_steps=3)
    with pytest.raises(BundleError, match="task 'digits' already exists in .*; pass --replace to overwrite it"):
        learn_task(bundle, new_task, name="digits", progress=False, max_steps=3)
    report = learn_task(bundle, new_task, name="digits", progress=False, replace=True)
    assert [t.name for t in bundle.tasks()] == ["a", "b", "digits"] and report.steps > 3
    stored = sorted(f"tasks/{p.name}" for p in (bundle_dir / "tasks").glob("*.npz"))
    digits = bundle.task("digits")
    assert stored == sorted(["tasks/a.npz", "tasks/a.stats.npz", "tasks/b.npz", "tasks/b.stats.npz", digits.file,
                             digits.stats_file])  # the replaced files are gone


# --- the parts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "out"), [(28, 8), (32, 16), (224, 16), (30, 7)])
def test_adaptive_pool_matches_torch(size, out):
    images = np.random.default_rng(size).standard_normal((4, 3, size, size))
    expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(images), out).numpy()
    np.testing.assert_allclose(adaptive_avg_pool(images, out), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels", [1, 3])
def test_prototype_init_matches_the_workstations(channels):
    """Mean of per-image thumbnails == PrototypeGenerator.init_params(class-mean images, random=False)."""
    rng = np.random.default_rng(channels)
    inputs = rng.standard_normal((30, 3, 28, 28)).astype(np.float32)
    labels = rng.permutation(np.arange(30) % 3)
    means = torch.stack([torch.from_numpy(inputs[labels == c]).mean(0) for c in range(3)])
    expected = ClasswiseGenerator(32, channels=channels, size=8, hidden_dim=4).init_params(
        means, random=False, generator=None).numpy()
    got = initial_prototypes(thumbnails(inputs, channels, 8), labels, 3)
    assert got.shape == (3, channels, 8, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_adam_matches_torch():
    rng = np.random.default_rng(0)
    params = rng.standard_normal((3, 1, 4, 4)).astype(np.float32)
    reference = torch.from_numpy(params.copy()).requires_grad_(True)
    optimiser = torch.optim.Adam([reference], lr=0.05)
    adam = Adam(0.05)
    for _ in range(5):
        grad = rng.standard_normal(params.shape).astype(np.float32)
        params = adam.step(params, grad)
        reference.grad = torch.from_numpy(grad)
        optimiser.step()
    np.testing.assert_allclose(params, reference.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_one_adam_step_through_the_step_graph_lowers_the_loss(exported, new_task):
    bundle = Bundle.open(exported)
    features, labels = _digit_features(bundle, new_task)
    with create_runner("onnxruntime-cpu", bundle.graph_path("learner_step")) as step:
        objective = PrototypeObjective(step)
        prototypes = np.random.default_rng(3).standard_normal((5, *bundle.prototype_shape)).astype(np.float32)
        loss, grad = objective(prototypes, features, labels)
        assert grad.shape == prototypes.shape and np.abs(grad).max() > 0
        after, _ = objective(Adam(0.01).step(prototypes, grad), features, labels)
    assert after < loss, (loss, after)


def test_class_mean_head_is_the_cosine_nearest_class_mean():
    rng = np.random.default_rng(0)
    features = np.abs(rng.standard_normal((60, 12))) * rng.uniform(0.5, 3, (60, 1))  # varied norms
    labels = np.repeat(np.arange(3), 20)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(0) for c in range(3)])
    cosine = unit @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    logits = features @ class_mean_head(features, labels, 3, temperature=10.0).T
    assert np.array_equal(logits.argmax(1), cosine.argmax(1))
    mean_norm = np.linalg.norm(features, axis=1).mean()  # a feature of mean norm gets 10 x its cosine
    np.testing.assert_allclose(logits, 10 * cosine * np.linalg.norm(features, axis=1, keepdims=True) / mean_norm)


def test_least_squares_prototypes_reproduce_heads_in_the_generators_span(exported):
    bundle = Bundle.open(exported)
    assert bundle.generator_kind == "classwise-linear"
    shape = bundle.prototype_shape
    with create_runner("onnxruntime-cpu", bundle.graph_path("generator")) as generator:
        basis = generator.infer({"prototypes": np.eye(int(np.prod(shape)), dtype=np.float32).reshape(-1, *shape)})["head"]
        wanted = np.random.default_rng(1).standard_normal((4, *shape)).astype(np.float32)
        heads = generator.infer({"prototypes": wanted})["head"]
        linear = LinearHeads(basis, shape)
        fitted = linear.prototypes_for(heads)
        np.testing.assert_allclose(linear.directions.T @ linear.directions, np.eye(linear.directions.shape[1]),
                                   atol=1e-8)
        np.testing.assert_allclose(generator.infer({"prototypes": fitted})["head"], heads, rtol=1e-4, atol=1e-4)


def _digit_features(bundle: Bundle, new_task: Path):
    files = [f for d in NEW_DIGITS for f in sorted((new_task / f"digit{d}").glob("*.png"))[:8]]
    inputs = to_input(np.stack([load_image(f, bundle.preprocess) for f in files]), bundle.preprocess)
    labels = np.asarray([NEW_DIGITS.index(int(f.parent.name[-1])) for f in files], np.int64)
    with create_runner("onnxruntime-cpu", bundle.graph_path("backbone")) as backbone:
        return backbone.infer({"images": inputs})["features"], labels


def test_a_warm_started_fit_runs_until_its_regularised_objective_stops_improving():
    # A quadratic stands in for the cross-entropy: its minimum 1.5 is where the warm start sits, and the
    # pull towards the start 0.5 moves the optimum of the total to 7/6. Judged on the cross-entropy of
    # the warm start (0) instead of its total, no step looked like progress: it stopped after
    # `patience` steps and called that converged.
    def quadratic(prototypes, features, labels):
        return float(np.sum((prototypes - 1.5) ** 2)), 2 * (prototypes - 1.5)

    start = np.full((2, 1, 2, 2), 0.5, np.float32)
    result = fit_prototypes(quadratic, start, np.zeros((4, 1), np.float32), np.zeros(4, np.int64), max_steps=2000,
                            lr=0.05, weight=1.0, patience=10, seed=0, warm=np.full_like(start, 1.5))
    assert result.steps > 10 and result.converged
    np.testing.assert_allclose(result.prototypes, 7 / 6, atol=0.02)


def test_the_pull_to_the_start_bounds_how_far_the_fit_moves(exported, new_task):
    bundle = Bundle.open(exported)
    features, labels = _digit_features(bundle, new_task)
    start = np.random.default_rng(2).standard_normal((5, *bundle.prototype_shape)).astype(np.float32)
    with create_runner("onnxruntime-cpu", bundle.graph_path("learner_step")) as step:
        objective = PrototypeObjective(step)
        fits = {w: fit_prototypes(objective, start, features, labels, max_steps=60, lr=0.5, weight=w, patience=60,
                                  seed=0) for w in (0.0, 100.0)}
    moved = {w: np.linalg.norm(f.prototypes - start) for w, f in fits.items()}
    assert moved[100.0] < 0.5 * moved[0.0], moved
    assert fits[0.0].final_loss < fits[0.0].initial_loss and fits[0.0].steps == 60


def test_split_is_per_class_deterministic_and_keeps_a_train_image():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 1)
    train, val = split_train_val(labels, ["x", "y", "z"], 0.2, seed=0)
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(labels[train], minlength=3).tolist() == [8, 1, 1]
    again = split_train_val(labels, ["x", "y", "z"], 0.2, seed=0)
    assert np.array_equal(again[1], val) and not np.array_equal(split_train_val(labels, "xyz", 0.2, seed=1)[1], val)
    assert len(split_train_val(labels, "xyz", 0.0, seed=0)[1]) == 0


def test_batch_size_follows_the_budget_after_what_the_process_holds():
    # 1,000 images at 224 px, D = 1280: 150 MB with the models loaded, 110 MB once the backbone is
    # released; 37 MB for features and slack and 22 MB per image while extracting (its input and
    # activations, and the batches read ahead), 102 MB after.
    sizing = {"images": 1000, "feature_dim": 1280, "in_use_mb": 150, "kept_mb": 110}
    assert batch_size_for(300, 224, **sizing) == 5
    assert batch_size_for(500, 224, **sizing) == 14
    assert batch_size_for(300, 28, **sizing) == 64
    assert batch_size_for(212, 224, **sizing) == 1
    # The statistics and the fit after the extraction can need more than its smallest batch.
    with pytest.raises(ConfigError, match=r"pass --budget-mb 212 or more \(extracting features: 150 MB for Python"):
        batch_size_for(211, 224, **sizing)
    # A backbone that is not released (lent by the caller) stays under the statistics and the fit.
    with pytest.raises(ConfigError, match=r"pass --budget-mb 252 or more"):
        batch_size_for(251, 224, **(sizing | {"kept_mb": None}))
    with pytest.raises(ConfigError, match=r"pass --budget-mb 259 or more"):  # the extraction's smallest batch
        batch_size_for(258, 224, **(sizing | {"in_use_mb": 200}))
    with pytest.raises(ConfigError, match="positive number"):
        batch_size_for(0, 224)
    assert batch_size_for(None, 224) == 3 and batch_size_for(None, 28) == 64  # no budget: a batch of ~75 MB


# --- the lock ------------------------------------------------------------------------------------------


def test_lock_waits_then_reports_busy_and_removes_orphans(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    (bundle_dir / "tasks" / "crashed.npz").write_bytes(b"orphan of a kill -9 before its registry entry")
    (bundle_dir / "tasks" / ".registry.json.x1y2.tmp").write_bytes(b"torn")
    with bundle.lock(0):
        assert sorted(p.name for p in (bundle_dir / "tasks").iterdir()) == [
            "a.npz", "a.stats.npz", "b.npz", "b.stats.npz", "registry.json"]
        start = time.monotonic()
        with pytest.raises(BundleError, match="is busy .* try again when it finishes"):
            with Bundle.open(bundle_dir).lock(0.3):
                pass
        assert time.monotonic() - start >= 0.3
    with Bundle.open(bundle_dir).lock(0):  # released
        pass


# --- bad input through the CLI: one line, exit 1, bundle untouched ------------------------------------


def _one_class(tmp, digits):
    return write_image_folder(tmp / "data", digits, {"t": [5]}, per_class=4) / "t", []


def _empty_class(tmp, digits):
    root = write_image_folder(tmp / "data", digits, {"t": [5, 6]}, per_class=4) / "t"
    (root / "digit7").mkdir()
    return root, []


def _text_only_class(tmp, digits):
    root = write_image_folder(tmp / "data", digits, {"t": [5, 6]}, per_class=4) / "t"
    (root / "digit7").mkdir()
    (root / "digit7" / "readme.txt").write_text("no images here")
    return root, []


def _huge_only_class(tmp, digits):
    root = write_image_folder(tmp / "data", digits, {"t": [5, 6]}, per_class=4) / "t"
    (root / "huge").mkdir()
    _blank_png(root / "huge" / "scan.png", 10_000, 10_000)
    return root, []


def _two_classes(tmp, digits):
    return write_image_folder(tmp / "data", digits, {"t": [5, 6]}, per_class=4) / "t", []


def _bump_format(tmp, digits, bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    (bundle_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))


def _task_mlp_of_3(tmp, digits, bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    task_mlp = {"kind": "task-mlp", "num_classes": 3}
    (bundle_dir / "manifest.json").write_text(json.dumps({**manifest, "generator": task_mlp}))


def _foreign_engine(tmp, digits, bundle_dir):
    engine = bundle_dir / "engines" / "backbone.fp16.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"serialized engine")
    record = {"tensorrt_version": "10.3.0", "gpu_name": "Orin (nvgpu)", "compute_capability": "8.7",
              "precision": "fp16", "profile": {"input": "images", "min": [1, 3, 28, 28], "opt": [8, 3, 28, 28],
                                               "max": [32, 3, 28, 28]}}
    (engine.parent / "backbone.fp16.engine.json").write_text(json.dumps(record))


def _with(*options):
    """A 2-class folder and these command-line options."""
    return lambda tmp, digits: (_two_classes(tmp, digits)[0], list(options))


BAD_INPUT = {  # case: (make the folder, change the bundle, words of the error line)
    "one class": (_one_class, None, ["1 class folder (digit5)", "at least 2 class folders"]),
    "empty class folder": (_empty_class, None, ["no images found in", "digit7", "remove the folder"]),
    "non-image file only": (_text_only_class, None, ["no images found in", "digit7"]),
    "only a 100 MP image": (_huge_only_class, None, ["class 'huge' has no readable image", "huge/scan.png",
                                                     "50 megapixels"]),
    "existing name": (_with("--name", "a"), None, ["task 'a' already exists", "pass --replace", "or --name OTHER"]),
    "name with /": (_with("--name", "x/y"), None, ["invalid task name 'x/y'"]),
    "name ..": (_with("--name", ".."), None, ["invalid task name '..'"]),
    "newer bundle format": (_two_classes, _bump_format, ["bundle format 2 is newer", "upgrade pah-edge"]),
    "task-mlp class count": (_two_classes, _task_mlp_of_3, ["exactly 3 classes", "has 2"]),
    "tensorrt absent": (_with("--runtime", "tensorrt"), _foreign_engine, ["TensorRT is not installed"]),
    "budget too small": (_with("--budget-mb", "0.01"), None, ["--budget-mb 0.01 is below what learning", "or more"]),
    "unknown runtime": (_with("--runtime", "torch"), None, ["unknown runtime 'torch'"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_leaves_the_bundle_as_it_was(case, bundle_dir, tmp_path, mnist_digits):
    make_folder, edit_bundle, words = BAD_INPUT[case]
    if case == "tensorrt absent" and importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here")
    folder, extra = make_folder(tmp_path, mnist_digits)
    if edit_bundle:
        edit_bundle(tmp_path, mnist_digits, bundle_dir)
    before = file_tree(bundle_dir, lock=False)
    result = _cli(folder, "--bundle", bundle_dir, "--no-progress", *extra)
    if case == "only a 100 MP image":
        # Found only by decoding, so the runtime line that opens feature extraction comes first.
        info, _, error = result.stderr.strip().partition("\n")
        assert info.startswith("INFO extracting features of 9 images on onnxruntime-cpu"), result.stderr
        result = subprocess.CompletedProcess(result.args, result.returncode, result.stdout, error)
    assert_one_line_error(result, *words)
    assert file_tree(bundle_dir, lock=False) == before


def test_unreadable_images_are_skipped_with_a_counted_warning(bundle_dir, new_task, tmp_path):
    folder = shutil.copytree(new_task, tmp_path / "photos")
    (folder / "digit5" / "garbage.png").write_bytes(b"this is not a png" * 20)
    good = (folder / "digit6" / "0.png").read_bytes()
    (folder / "digit6" / "truncated.png").write_bytes(good[: len(good) // 2])
    _blank_png(folder / "digit7" / "huge.png", 10_000, 10_000)

    result = _cli(folder, "--bundle", bundle_dir, "--no-progress")

    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warning = " ".join(result.stderr.split())
    assert "skipped 3 unreadable image(s) (digit5/garbage.png, digit6/truncated.png, digit7/huge.png) of 203" in warning
    assert "above 50 megapixels" in warning
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("learned 'photos': 5 classes, 160 train / 40 val images, train ") and "bytes of prototypes + " in last
    assert Bundle.open(bundle_dir).task("photos").images_seen == 200


# --- interruption and concurrency ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_task(tmp_path_factory):
    """5 classes x 200 hard links to one 1000 x 1000 noise PNG each: ~15 ms per image to decode."""
    root = tmp_path_factory.mktemp("slow") / "slow"
    rng = np.random.default_rng(0)
    for c in range(5):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (1000, 1000), np.uint8)).save(folder / "0.png")
        for i in range(1, 200):
            os.link(folder / "0.png", folder / f"{i}.png")
    return root


def test_kill_9_during_learning_leaves_the_bundle_as_it_was(bundle_dir, slow_task, new_task):
    before = file_tree(bundle_dir, lock=False)
    proc = _cli(slow_task, "--bundle", bundle_dir, "--no-progress", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for line in proc.stderr:  # EOF ends the loop if the child dies first
            if "extracting features" in line:
                break
        time.sleep(0.5)
        assert proc.poll() is None, "learn-task ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stderr.close()
    assert file_tree(bundle_dir, lock=False) == before
    Bundle.open(bundle_dir)  # every hash still verifies
    result = _cli(new_task, "--bundle", bundle_dir, "--no-progress", "--name", "after-kill")
    assert result.returncode == 0, result.stderr
    assert [t.name for t in Bundle.open(bundle_dir).tasks()] == ["a", "b", "after-kill"]


def test_two_runs_at_once_lose_nothing(bundle_dir, new_task):
    procs = {name: _cli(new_task, "--bundle", bundle_dir, "--no-progress", "--name", name,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("first", "second")}
    outcomes = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        if proc.returncode == 0:
            outcomes[name] = "learned"
        else:
            assert proc.returncode == 1 and "is busy" in stderr.strip().splitlines()[-1], stderr
            outcomes[name] = "busy"
    registered = {t.name for t in Bundle.open(bundle_dir).tasks()}
    assert {name for name, outcome in outcomes.items() if outcome == "learned"} <= registered
    assert outcomes == {"first": "learned", "second": "learned"}  # the lock wait serialises them


def test_help():
    result = _cli("--help", no_torch=False)
    assert result.returncode == 0 and "--budget-mb" in result.stdout and "--replace" in result.stdout
