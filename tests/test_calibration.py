"""INT8 calibration (`pah_edge.calibration`, `pah-edge calibrate`) on the tiny bundle of real digits.

Real ONNX Runtime quantization, no mocks. The tiny bundle's tasks are weak (tiny_cnn, 1 epoch), so
their logits sit close together and a feature change of 3e-4 in cosine flips a few predictions:
accuracy gates are tested on deliberately broken calibrations, and the INT8 graph's fidelity on
features (cosine, relative error) with tolerances measured here.
"""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_one_line_error, file_tree, run_cli_process, write_image_folder
from PIL import Image
from tiny_bundle import make_tiny_bundle

from pah_edge.bundle import Bundle, BundleError
from pah_edge.bundle_layout import CALIBRATION_NAME, CALIBRATION_REJECTED_NAME, INT8_BACKBONE_NAME, LOCK_NAME
from pah_edge.calibration.quantize import TARGETS, QuantizeOptions, default_target, int8_onnx_from_fp32
from pah_edge.calibration.reader import ImageFolderReader, calibration_files
from pah_edge.device.images import BatchStream
from pah_edge.errors import ConfigError

# Measured on the tiny bundle (entropy, per-channel, 7-bit weights, 37 images): mean cosine 0.9996,
# relative error 0.03. The bounds leave room for other CPUs' kernels.
MIN_COSINE = 0.99
MAX_REL_ERROR = 0.1
FIRST_CONV = "/trunk/trunk.0/trunk.0.0/Conv"  # of the tiny bundle's backbone
FAST = ["--samples", "40", "--latency-runs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits):
    """(bundle, calibration images, eval folder, new-task folder): images the bundle never trained on."""
    root = tmp_path_factory.mktemp("calibration")
    bundle = make_tiny_bundle(root, mnist_digits)
    held_out = {d: images[200:] for d, images in mnist_digits.items()}
    calib = write_image_folder(root / "calib", held_out, {"all": list(range(10))}, per_class=8) / "all"
    evaluation = write_image_folder(root / "eval", {d: images[100:] for d, images in held_out.items()},
                                    {"a": [0, 1, 2], "b": [3, 4, 5], "c": [6, 7, 8, 9]}, per_class=10)
    new_task = write_image_folder(root / "new", {d: images[200:] for d, images in held_out.items()},
                                  {"pairs": [1, 7]}, per_class=10) / "pairs"
    return bundle, calib, evaluation, new_task


@pytest.fixture
def bundle_dir(made, tmp_path):
    return shutil.copytree(made[0], tmp_path / "bundle")


def _features(model_path, inputs):
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"images": inputs})[0]


# --- the Q/DQ graph -----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_qdq_graph_runs_in_onnxruntime_close_to_fp32(made, tmp_path, target):
    bundle_dir, calib, _, _ = made
    bundle = Bundle.open(bundle_dir)
    files = calibration_files(calib, 40)
    reader = ImageFolderReader(files, bundle.preprocess, samples=37, batch_size=8)  # a short last batch too
    out = tmp_path / "int8.onnx"
    made_info = int8_onnx_from_fp32(bundle.graph_path("backbone"), out, reader, QuantizeOptions(target=target),
                                    tmp_path)

    model = onnx.load(str(out))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0, ops
    # Activations: signed with zero point 0 for TensorRT, unsigned (zero point where the range puts it) for ONNX Runtime.
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    if target == "tensorrt":
        assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    else:
        assert all(z.dtype == np.uint8 for z in zero_points)
    assert made_info["samples"] == 37 and made_info["excluded"] == [FIRST_CONV]  # the stem stays FP32 by default
    inputs = next(iter(BatchStream(files[40:], bundle.preprocess, 32)))[0]  # not calibrated on
    fp32, int8 = _features(bundle.graph_path("backbone"), inputs), _features(out, inputs)
    cosine = np.sum(fp32 * int8, axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert cosine.mean() > MIN_COSINE, cosine
    assert np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32) < MAX_REL_ERROR


def test_excluded_nodes_stay_fp32(made, tmp_path):
    bundle = Bundle.open(made[0])
    reader = ImageFolderReader(calibration_files(made[1], 16), bundle.preprocess, samples=16)
    out = tmp_path / "int8.onnx"
    info = int8_onnx_from_fp32(bundle.graph_path("backbone"), out, reader,
                               QuantizeOptions(method="minmax", fp32_last=True,
                                               exclude=("/trunk/trunk.1/trunk.1.0/Conv",)), tmp_path)
    convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
    assert info["excluded"] == [c.name for c in convs] == [FIRST_CONV, "/trunk/trunk.1/trunk.1.0/Conv",
                                                             "/trunk/trunk.2/trunk.2.0/Conv"]
    initializers = {i.name for i in onnx.load(str(out)).graph.initializer}
    # A quantized Conv reads its weight through a DequantizeLinear; an excluded one reads the float weight.
    assert all(conv.input[1] in initializers for conv in convs)


def test_first_conv_can_be_quantized_too(made, tmp_path):
    bundle = Bundle.open(made[0])
    reader = ImageFolderReader(calibration_files(made[1], 8), bundle.preprocess, samples=8)
    out = tmp_path / "int8.onnx"
    info = int8_onnx_from_fp32(bundle.graph_path("backbone"), out, reader, QuantizeOptions(fp32_first=False), tmp_path)
    assert info["excluded"] == []
    initializers = {i.name for i in onnx.load(str(out)).graph.initializer}
    assert not any(n.input[1] in initializers for n in onnx.load(str(out)).graph.node if n.op_type == "Conv")


def test_unknown_excluded_node_is_named(made, tmp_path):
    bundle = Bundle.open(made[0])
    reader = ImageFolderReader(calibration_files(made[1], 8), bundle.preprocess, samples=8)
    with pytest.raises(ConfigError, match="--exclude nope: no such node"):
        int8_onnx_from_fp32(bundle.graph_path("backbone"), tmp_path / "int8.onnx", reader,
                            QuantizeOptions(exclude=("nope",)), tmp_path)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_layer_report_charges_a_convolution_to_the_activation_reading_it(made, tmp_path, target):
    from pah_edge.calibration.evaluate import layer_errors

    bundle = Bundle.open(made[0])
    files = calibration_files(made[1], 40)
    out = tmp_path / "int8.onnx"
    # The ONNX Runtime form folds each Relu into the Q/DQ pair after its Conv: no Conv output to compare.
    # The TensorRT form quantizes the Conv output with the Relu's range, cutting off what the Relu does.
    info = int8_onnx_from_fp32(bundle.graph_path("backbone"), out, ImageFolderReader(files, bundle.preprocess, samples=40),
                               QuantizeOptions(target=target, fp32_first=False), tmp_path)
    images = next(iter(BatchStream(files[:8], bundle.preprocess, 8)))[0]
    rows = {r["node"]: r for r in layer_errors(info["prepared"], out, images, top=20)}
    for block in range(3):
        relu = rows[f"/trunk/trunk.{block}/trunk.{block}.2/Relu"]
        assert relu["via"] == [f"/trunk/trunk.{block}/trunk.{block}.0/Conv"]
    later = rows["/trunk/trunk.1/trunk.1.2/Relu"]
    assert 0 < later["added_error"] < later["rel_error"]  # charged from the block's input on, not from zero
    # A node already excluded is no candidate any more, nor an activation charged with it.
    conv = "/trunk/trunk.1/trunk.1.0/Conv"
    again = layer_errors(info["prepared"], out, images, top=20, excluded={conv})
    assert again and not [r for r in again if r["node"] == conv or conv in r["via"]]


def test_the_reader_stops_reading_ahead_and_reports_only_the_files_it_needed(made, tmp_path):
    import threading

    bundle = Bundle.open(made[0])
    files = calibration_files(made[1], 20)
    copies = []
    for i, file in enumerate(files):
        copies.append(tmp_path / f"{i:02d}.png")
        copies[-1].write_bytes(file.read_bytes() if i != 10 else b"not a png")  # beyond the 8 it needs
    reader = ImageFolderReader(copies, bundle.preprocess, samples=8, batch_size=4)
    while not reader.done:
        reader.get_next()
    assert reader.delivered == 8 and reader.skipped == []
    assert not [t for t in threading.enumerate() if t.name == "pah-edge-prepare"]


def test_calibration_files_take_classes_in_turn(tmp_path, mnist_digits):
    root = write_image_folder(tmp_path, mnist_digits, {"t": [0, 1, 2]}, per_class=4) / "t"
    files = calibration_files(root, 6)
    assert [f.parent.name for f in files[:6]] == ["digit0", "digit1", "digit2"] * 2
    assert sorted(files) == sorted(root.rglob("*.png"))


# --- the command: install, report, refuse ------------------------------------------------------------------


def test_calibrate_installs_int8_and_reports(made, bundle_dir):
    _, calib, evaluation, new_task = made
    before = file_tree(bundle_dir)
    # The tiny tasks' near-tied logits make small drops likely: this test is about the install and the report.
    result = run_cli_process("calibrate", bundle_dir, "--images", calib, "--eval", evaluation, "--new-task", new_task,
                  "--max-drop", "100", "--json", *FAST)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["accuracy_checked"]
    assert [t["task"] for t in report["tasks"]] == ["a", "b", "c"]
    for task in report["tasks"]:
        assert task["evaluated"] and task["images"] == 10 * len(Bundle.open(bundle_dir).task(task["task"]).class_names)
        assert task["cosine_mean"] > MIN_COSINE and 0 <= task["int8_accuracy"] <= 1
    assert set(report["new_task"]) >= {"fp32", "int8", "images"}
    added = [layer["added_error"] for layer in report["layers"]]
    assert 0 < len(added) <= 5 and added == sorted(added, reverse=True)
    assert set(report["latency_ms"]["int8"]) == {"1", "32"} and report["size_mb"]["int8"] > 0
    assert set(report["speedup"]) == {"1", "32"} and all(x > 0 for x in report["speedup"].values())
    assert report["options"]["method"] == "entropy" and report["options"]["per_channel"]
    assert report["options"]["target"] == default_target()  # --target auto

    opened = Bundle.open(bundle_dir)
    assert opened.int8_backbone_path() == bundle_dir / INT8_BACKBONE_NAME
    record = json.loads((bundle_dir / CALIBRATION_NAME).read_text())
    assert record["sha256"] == report["sha256"]
    after = file_tree(bundle_dir)
    assert set(after) - set(before) == {INT8_BACKBONE_NAME, CALIBRATION_NAME, LOCK_NAME}
    assert {k: v for k, v in after.items() if k in before} == before, "the FP32 bundle must stay as it was"


def test_int8_file_is_checked_against_its_record(made, bundle_dir):
    from pah_edge.calibration.calibrate import calibrate_bundle

    calibrate_bundle(bundle_dir, made[1], samples=16, max_drop=100, latency_runs=1, progress=False)
    model = bundle_dir / INT8_BACKBONE_NAME
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="does not match its SHA-256 in calibration.json"):
        Bundle.open(bundle_dir).int8_backbone_path()
    (bundle_dir / CALIBRATION_NAME).unlink()  # what a crash between model and record leaves
    with pytest.raises(BundleError, match="has no calibration.json"):
        Bundle.open(bundle_dir).int8_backbone_path()


def test_tensorrt_builds_only_from_its_own_int8_form(made, bundle_dir):
    from pah_edge.calibration.calibrate import calibrate_bundle
    from pah_edge.export.tensorrt_build import TensorRTBuildError, backbone_onnx

    for target in TARGETS:
        calibrate_bundle(bundle_dir, made[1], options=QuantizeOptions(target=target), samples=16, max_drop=100,
                         latency_runs=1, progress=False)
        assert Bundle.open(bundle_dir).int8_target() == target
        if target == "tensorrt":
            assert backbone_onnx(bundle_dir, "int8") == bundle_dir / INT8_BACKBONE_NAME
        else:
            with pytest.raises(TensorRTBuildError, match=r"calibrated for onnxruntime .* --target tensorrt`$"):
                backbone_onnx(bundle_dir, "int8")


def test_a_calibration_over_max_drop_is_not_installed(made, bundle_dir, tmp_path):
    _, _, evaluation, new_task = made
    black = tmp_path / "black"
    black.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(black / "0.png")  # ranges from a blank image clip real digits
    before = file_tree(bundle_dir)
    result = run_cli_process("calibrate", bundle_dir, "--images", black, "--samples", "1", "--method", "minmax", "--eval",
                  evaluation, "--latency-runs", "1", "--no-progress")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "more than --max-drop 1" in result.stderr and "FP32 stays the default" in result.stderr
    assert "INT8 %" in result.stdout, "the report is printed before the error"
    after = file_tree(bundle_dir)
    assert set(after) - set(before) == {CALIBRATION_REJECTED_NAME, LOCK_NAME}
    assert not (bundle_dir / INT8_BACKBONE_NAME).exists()
    assert not json.loads(after[CALIBRATION_REJECTED_NAME])["passed"]
    assert Bundle.open(bundle_dir).int8_backbone_path() is None
    assert_one_line_error(run_cli_process("learn-task", new_task, "--bundle", bundle_dir, "--precision", "int8", "--no-progress"),
                           "--max-drop", "pah-edge calibrate")


def _corrupt_only(root):
    (root / "x").mkdir(parents=True)
    (root / "x" / "0.png").write_bytes(b"not a png" * 10)
    (root / "x" / "1.jpg").write_bytes(b"")
    return root


@pytest.mark.parametrize("case, fixes", [
    ("empty", ["no images", "put calibration images there"]),
    ("corrupt", ["none of the 2 calibration image(s) could be read", "x/0.png"]),
    ("too few", ["has 80 images, fewer than --samples 500", "--samples 80"]),
    ("unknown eval task", ["tasks the bundle lacks (zzz)"]),
    ("unknown eval class", ["class folders task 'a' does not know (yyy, zzz)"]),  # before quantizing, not after
])
def test_bad_calibration_input_is_one_line_and_leaves_the_bundle_unchanged(made, bundle_dir, tmp_path, case, fixes):
    images, extra = made[1], []
    if case == "empty":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "corrupt":
        images = _corrupt_only(tmp_path / "corrupt")
    elif case == "unknown eval task":
        (tmp_path / "eval" / "zzz").mkdir(parents=True)
        extra = ["--eval", tmp_path / "eval"]
    elif case == "unknown eval class":
        for name in ("yyy", "zzz"):
            (tmp_path / "eval" / "a" / name).mkdir(parents=True)
            shutil.copy(next(made[1].rglob("*.png")), tmp_path / "eval" / "a" / name / "0.png")
        extra = ["--eval", tmp_path / "eval"]
    samples = "500" if case == "too few" else "2"
    before = file_tree(bundle_dir)
    assert_one_line_error(run_cli_process("calibrate", bundle_dir, "--images", images, "--samples", samples, *extra,
                                "--no-progress"), *fixes)
    assert file_tree(bundle_dir) == before


@pytest.mark.parametrize(("option", "words"), [(["--target", "gpu"], ["unknown --target 'gpu'", "tensorrt, onnxruntime"]),
                                              (["--threads", "-1"], ["--threads must be >= 1"])])
def test_an_unknown_target_or_thread_count_is_one_line(made, bundle_dir, option, words):
    before = file_tree(bundle_dir)
    assert_one_line_error(run_cli_process("calibrate", bundle_dir, "--images", made[1], *option, *FAST), *words)
    assert file_tree(bundle_dir) == before


def test_int8_without_calibration_names_the_fix(made, bundle_dir):
    assert_one_line_error(run_cli_process("predict", made[3], "--bundle", bundle_dir, "--precision", "int8"),
                           "no usable INT8 model", f"pah-edge calibrate {bundle_dir}")


def test_calibrate_help():
    result = run_cli_process("calibrate", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--images", "--samples", "--target", "--method", "--per-channel", "--fp32-first", "--fp32-last",
                   "--exclude ", "--eval",
                   "--max-drop", "--new-task"):
        assert option in result.stdout, option
    for command in ("learn-task", "predict"):
        assert "--precision" in run_cli_process(command, "--help").stdout, command


# --- a task keeps the backbone it was learned on ------------------------------------------------------


def test_a_task_is_predicted_on_the_backbone_it_was_learned_on_and_a_mismatch_warns_once(made, bundle_dir, caplog):
    import logging

    from pah_edge.device.learner import learn_task
    from pah_edge.device.predict import Predictor

    _, calib, _, new_task = made
    assert run_cli_process("calibrate", bundle_dir, "--images", calib, "--max-drop", "100", *FAST).returncode == 0
    bundle = Bundle.open(bundle_dir)
    learn_task(bundle, new_task, name="pairs", precision="int8", runtime="onnxruntime-cpu", progress=False)
    record = bundle.task("pairs")
    assert record.precision == "int8"
    assert record.backbone_sha256 == json.loads((bundle_dir / CALIBRATION_NAME).read_text())["sha256"]
    assert bundle.task("a").precision is None  # exported tasks: the FP32 graph
    files = sorted(new_task.glob("*/*.png"))

    def predict(precision="auto", task="pairs"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, "pah_edge"), \
                Predictor(bundle, runtime="onnxruntime-cpu", precision=precision) as predictor:
            results = [predictor.predict(files, task=task) for _ in range(2)]
        assert results[0] == results[1]
        return results[0], [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    as_learned, warnings = predict()
    assert as_learned == predict("int8")[0] and warnings == []
    on_fp32, warnings = predict("fp32")
    assert len(warnings) == 1, warnings  # once per Predictor, however many calls
    assert "learned on the int8 backbone and is predicted on fp32 features" in warnings[0]
    assert "4 points" in warnings[0] and "leave out --precision fp32" in warnings[0]
    assert [p["novelty"] for p in on_fp32] != [p["novelty"] for p in as_learned]  # other features, really
    _, warnings = predict(task=None)  # task-free: one backbone (FP32) for the exported tasks and this one
    assert len(warnings) == 1 and "task 'pairs'" in warnings[0] and "--precision fp32" in warnings[0]

    (bundle_dir / INT8_BACKBONE_NAME).unlink()  # the INT8 model is gone: FP32, and say how to get it back
    (bundle_dir / CALIBRATION_NAME).unlink()
    answers, warnings = predict()
    assert answers == on_fp32 and len(warnings) == 1 and "pah-edge calibrate" in warnings[0]
