"""The Python API (`pah_edge.Device`): frames and files give the same answers, bad frames are one error
class naming the fix, learning from arrays equals learning from a folder, and the README's example runs.

One tiny bundle per module (tiny_cnn on real digits; tasks a, b, c); tests that change it use a copy.
"""

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image
from tiny_bundle import QUERY_FILES, make_tiny_bundle, query_folder

import pah_edge
from pah_edge import Device, Prediction
from pah_edge.bundle import Bundle, BundleError, sha256_file
from pah_edge.errors import DataError, FrameError, PahEdgeError

REPO = Path(__file__).resolve().parents[1]
CPU = {"runtime": "onnxruntime-cpu"}
PYTHON_API = "<!-- python-api -->"


@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits):
    root = tmp_path_factory.mktemp("api")
    return make_tiny_bundle(root, mnist_digits), query_folder(root, mnist_digits)


@pytest.fixture(scope="module")
def dev(made):
    with Device(made[0], **CPU) as device:
        yield device


@pytest.fixture
def bundle_dir(made, tmp_path):
    return shutil.copytree(made[0], tmp_path / "bundle")


def _answer(p: Prediction) -> tuple:
    return p.task, p.label, p.known


def test_the_package_exports_the_api_lazily():
    code = "import sys, pah_edge; print('onnxruntime' in sys.modules, 'pah_edge.device.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == ["False", "False"]
    assert pah_edge.Device is Device and "Device" in pah_edge.__all__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pah_edge.Nope  # noqa: B018


def test_frames_get_the_answers_of_their_files(dev, made):
    query = made[1]
    files = [query / f for f in QUERY_FILES]
    from_files = dev.predict_files([query])
    assert [p.path for p in from_files] == [str(f) for f in files]
    gray = [np.asarray(Image.open(f)) for f in files]  # the PNGs are 8-bit gray: H x W
    rgb = [np.repeat(g[:, :, None], 3, axis=2) for g in gray]
    for frames, bgr in ((gray, False), (rgb, False), ([f[:, :, ::-1] for f in rgb], True)):
        predictions = dev.predict_batch(frames, bgr=bgr)
        assert [p.path for p in predictions] == [None] * len(files)
        assert [_answer(p) for p in predictions] == [_answer(p) for p in from_files]
        np.testing.assert_allclose([p.confidence for p in predictions], [p.confidence for p in from_files], rtol=1e-6)
        np.testing.assert_allclose([p.novelty for p in predictions], [p.novelty for p in from_files], rtol=1e-5)
    one = dev.predict(rgb[2])
    assert _answer(one) == _answer(from_files[2]) and one.confidence == pytest.approx(from_files[2].confidence)


def test_paths_and_frames_mix_and_a_task_can_be_given(dev, made):
    query = made[1]
    frame = np.asarray(Image.open(query / "six/0.png"))
    mixed = dev.predict_batch([query / "six/0.png", frame, str(query / "top.png")], task="c")
    assert [p.path for p in mixed] == [str(query / "six/0.png"), None, str(query / "top.png")]
    assert {p.task for p in mixed} == {"c"} and mixed[0].label == mixed[1].label
    assert mixed[0].confidence == pytest.approx(mixed[1].confidence)
    expected = dev.predict_files([query / "six/0.png"], task="c")[0]
    assert _answer(mixed[0]) == _answer(expected) and mixed[0].confidence == pytest.approx(expected.confidence)
    assert dev.predict_batch([]) == []
    with pytest.raises(BundleError, match="no task 'zz'"):
        dev.predict_batch([], task="zz")


def test_a_stream_answers_each_frame_as_predict_does(dev, made):
    query = made[1]
    frames = [np.asarray(Image.open(query / f)) for f in QUERY_FILES]
    items = [*frames, query / QUERY_FILES[0], *frames[::-1]]  # frames and a path, repeats
    streamed = list(dev.predict_stream(iter(items)))
    one_by_one = [dev.predict(i) for i in items]
    assert [_answer(p) for p in streamed] == [_answer(p) for p in one_by_one]
    assert [p.path for p in streamed] == [p.path for p in one_by_one]
    np.testing.assert_allclose([p.novelty for p in streamed], [p.novelty for p in one_by_one], rtol=1e-5)
    assert [p.task for p in dev.predict_stream(frames, task="c")] == ["c"] * len(frames)


def test_a_bad_frame_in_a_stream_fails_at_its_turn_and_stopping_early_ends_the_thread(dev):
    good = np.zeros((28, 28), np.uint8)
    answered = []
    with pytest.raises(FrameError, match="empty"):
        for prediction in dev.predict_stream([good, good, np.zeros((0, 28, 3), np.uint8), good]):
            answered.append(prediction)
    assert len(answered) == 2

    def endless():
        while True:
            yield good

    stream = dev.predict_stream(endless())
    next(stream)
    stream.close()  # joins the thread that prepares frames ahead
    assert not [t for t in threading.enumerate() if t.name == "pah-edge-prepare"]


def test_prediction_is_a_frozen_dataclass_with_to_dict(dev):
    p = dev.predict(np.zeros((40, 30, 3), np.uint8))
    assert set(p.to_dict()) == {"task", "label", "confidence", "novelty", "known"}
    assert isinstance(p.confidence, float) and 0 <= p.confidence <= 1 and isinstance(p.novelty, float)
    assert p.known is (p.novelty <= Bundle.open(dev.bundle.path).shared_stats().threshold)
    with pytest.raises(AttributeError):
        p.label = "x"
    filed = Prediction("a", "digit1", 0.5, 1.0, True, path="x.png")
    assert list(filed.to_dict()) == ["path", "task", "label", "confidence", "novelty", "known"]


@pytest.mark.parametrize("frame, words", [
    (np.zeros((28, 28, 3), np.float32), ["uint8", "float32", "astype(np.uint8)"]),
    (np.zeros((28, 28, 4), np.uint8), ["H x W x 3", "(28, 28, 4)", "frame[..., :3]"]),
    (np.zeros((28, 28, 1), np.uint8), ["H x W x 3", "(28, 28, 1)", "squeeze"]),
    (np.zeros((2, 28, 28, 3), np.uint8), ["H x W x 3", "(2, 28, 28, 3)"]),
    (np.zeros((0, 28, 3), np.uint8), ["empty", "(0, 28, 3)"]),
    (None, ["None", "read succeeded"]),
    ([[0, 1], [2, 3]], ["numpy array", "list"]),
])
def test_bad_frames_raise_one_error_class_naming_the_fix(dev, frame, words):
    with pytest.raises(FrameError) as caught:
        dev.predict(frame)
    assert isinstance(caught.value, PahEdgeError)
    for word in words:
        assert word in str(caught.value)
    with pytest.raises(FrameError):  # a bad frame among good ones fails the whole batch
        dev.predict_batch([np.zeros((28, 28), np.uint8), frame])


def test_an_unreadable_path_is_a_data_error(dev, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="cannot read image"):
        dev.predict(bad)


def test_without_with_the_device_starts_on_first_use_and_closes(made):
    device = Device(made[0], **CPU)
    assert not device._started
    first = device.predict(np.zeros((28, 28), np.uint8))
    assert device._started
    device.close()
    assert not device._started
    assert device.predict(np.zeros((28, 28), np.uint8)) == first  # starts again
    device.close()


def test_a_task_learned_on_int8_is_predicted_again_after_close(bundle_dir, mnist_digits):
    bundle = Bundle.open(bundle_dir)
    # The FP32 graph stands in for `pah-edge calibrate`'s INT8 model: only its start and restart matter.
    bundle.install_int8(bundle.graph_path("backbone"),
                        {"passed": True, "sha256": sha256_file(bundle.graph_path("backbone"))})
    images = [np.repeat(d[:, :, None], 3, axis=2) for k in (1, 7) for d in mnist_digits[k][:8]]
    device = Device(bundle, **CPU)
    device.learn_task_arrays(images, [1] * 8 + [7] * 8, name="q8", precision="int8")
    first = device.predict(images[0], task="q8")
    device.close()
    assert device.predict(images[0], task="q8") == first  # the INT8 runner starts again
    device.close()


# --- learning ----------------------------------------------------------------------------------------


def _images_of(folder: Path) -> tuple[list[np.ndarray], list[str]]:
    """Every PNG of ``folder/<class>/`` as an RGB array, class by class, files sorted, and its class name."""
    files = sorted(folder.glob("*/*.png"), key=lambda f: (f.parent.name, f.name))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files], [f.parent.name for f in files]


def test_arrays_and_a_folder_learn_the_same_task(made, mnist_digits, tmp_path):
    folder = write_image_folder(tmp_path / "new", mnist_digits, {"parts": [1, 7, 9]}, per_class=12) / "parts"
    images, labels = _images_of(folder)
    # Classes interleaved: only the order within each class matters.
    order = np.argsort([i % 12 for i in range(len(labels))], kind="stable")  # the i-th of each class in turn
    images, labels = [images[i] for i in order], [labels[i] for i in order]
    bundles = [shutil.copytree(made[0], tmp_path / name) for name in ("from_folder", "from_arrays")]
    with Device(bundles[0], **CPU) as dev:
        from_folder = dev.learn_task(folder)
    with Device(bundles[1], **CPU) as dev:
        from_arrays = dev.learn_task_arrays(images, labels, name="parts")
    assert from_folder.name == from_arrays.name == "parts"
    assert from_folder.classes == from_arrays.classes == ["digit1", "digit7", "digit9"]
    assert sum(from_folder.images.values()) == 36 and from_folder.images == from_arrays.images
    assert from_folder.val_accuracy == from_arrays.val_accuracy
    first, second = (Bundle.open(b) for b in bundles)
    np.testing.assert_array_equal(first.load_prototypes("parts"), second.load_prototypes("parts"))
    assert first.task("parts").stats_sha256 == second.task("parts").stats_sha256  # task-free statistics too


def test_learn_task_arrays_with_numbers_bgr_and_then_predict(bundle_dir, mnist_digits):
    images = [np.repeat(d[:, :, None], 3, axis=2) for k in (2, 8) for d in mnist_digits[k][:10]]
    labels = [2] * 10 + [10] * 10  # eights numbered 10: classes sort by name, as folders "2" and "10" do
    with Device(bundle_dir, **CPU) as dev:
        dev.predict(images[0])  # the backbone is running: learning shares it
        learned = dev.learn_task_arrays([i[:, :, ::-1] for i in images], labels, name="twos", bgr=True)
        assert learned.classes == ["10", "2"] and learned.train_accuracy >= 0.9
        assert learned.runtime == "onnxruntime-cpu"
        assert [t.name for t in dev.tasks()] == ["a", "b", "c", "twos"]
        predicted = dev.predict_batch([mnist_digits[2][50], mnist_digits[8][50]], task="twos")
        assert [p.label for p in predicted] == ["2", "10"]
        dev.rename_task("twos", "pairs")
        dev.remove_task("pairs")
        assert [t.name for t in dev.tasks()] == ["a", "b", "c"]


@pytest.mark.parametrize(("option", "words"), [
    ({"weight": float("inf")}, "weight must be a finite number"),
    ({"lr": float("inf")}, "lr must be a positive finite number"),
    ({"max_steps": 50.0}, "whole numbers >= 1, got 50.0"),
])
def test_learning_options_out_of_range_are_config_errors(bundle_dir, option, words):
    from pah_edge.errors import ConfigError

    frames = [np.full((28, 28), v, np.uint8) for v in (0, 10, 200, 210)]
    with pytest.raises(ConfigError, match=words):
        Device(bundle_dir, **CPU).learn_task_arrays(frames, ["x", "x", "y", "y"], name="bad", **option)
    assert [t.name for t in Bundle.open(bundle_dir).tasks()] == ["a", "b", "c"]


@pytest.mark.parametrize("images, labels, error, words", [
    ([np.zeros((28, 28), np.uint8)] * 3, ["x", "y"], DataError, ["3 images but 2 labels"]),
    ([np.zeros((28, 28), np.uint8)] * 2, ["x", "x"], DataError, ["1 class(es)", "at least 2"]),
    ([np.zeros((28, 28), np.uint8)] * 2, ["x", 1], DataError, ["all class names (str) or all class numbers"]),
    ([np.zeros((28, 28), np.uint8), np.zeros((28, 28, 2), np.uint8)], ["x", "y"], FrameError, ["image 1:", "H x W x 3"]),
])
def test_bad_arrays_are_errors_that_leave_the_bundle_as_it_was(bundle_dir, images, labels, error, words):
    before = (bundle_dir / "tasks.json").read_bytes() if (bundle_dir / "tasks.json").exists() else None
    with pytest.raises(error) as caught:
        Device(bundle_dir, **CPU).learn_task_arrays(images, labels, name="bad")
    for word in words:
        assert word in str(caught.value)
    assert [t.name for t in Bundle.open(bundle_dir).tasks()] == ["a", "b", "c"]
    if before is not None:
        assert (bundle_dir / "tasks.json").read_bytes() == before


# --- the README's example ----------------------------------------------------------------------------


def readme_example() -> str:
    """The Python block right after ``<!-- python-api -->`` in the README."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index(PYTHON_API) + 1
    assert lines[start] == "```python", "no ```python block right after " + PYTHON_API
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[start + 1:end])


def prepare_readme_example(root: Path, bundle: Path, digits: dict) -> Path:
    """``root/bundle`` (a copy) and ``root/new_images/{bolt,nut}/*.png``, as the example expects."""
    shutil.copytree(bundle, root / "bundle")
    for name, digit in (("bolt", 1), ("nut", 0)):
        (root / "new_images" / name).mkdir(parents=True)
        for i, image in enumerate(digits[digit][:8]):
            Image.fromarray(image).save(root / "new_images" / name / f"{i}.png")
    return root


def test_the_readme_example_runs(made, mnist_digits, tmp_path):
    root = prepare_readme_example(tmp_path, made[0], mnist_digits)
    result = subprocess.run([sys.executable, "-c", readme_example()], cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parts ['bolt', 'nut']" in result.stdout
    assert [t.name for t in Bundle.open(root / "bundle").tasks()] == ["a", "b", "c"]  # it removes what it learned
