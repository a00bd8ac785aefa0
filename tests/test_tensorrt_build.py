"""Engine builds: the errors that need no GPU (checked before anything is written) and, where
TensorRT and a GPU exist, real fp32/fp16 builds with their build records."""

import json

import numpy as np
import pytest
from conftest import file_tree

onnx = pytest.importorskip("onnx", reason="writing the test model needs onnx (pip install -e '.[train]')")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pah_edge.device.runtimes import RuntimeUnavailable  # noqa: E402
from pah_edge.bundle_layout import engine_record  # noqa: E402
from pah_edge.device.runtimes.tensorrt import tensorrt_problem  # noqa: E402
from pah_edge.export.tensorrt_build import TensorRTBuildError, build_engines  # noqa: E402

TENSORRT_USABLE = tensorrt_problem() is None


def _tiny_backbone(path):
    """images [N, 3, 4, 4] -> features [N, 5]: Flatten then MatMul, with a dynamic batch."""
    weight = np.random.default_rng(0).standard_normal((48, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["features"])],
        "tiny_backbone",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 5])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture
def bundle(tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    _tiny_backbone(root / "backbone.onnx")
    return root



def test_unknown_precision_lists_the_choices(bundle):
    before = file_tree(bundle)
    with pytest.raises(TensorRTBuildError, match="unknown precision 'bf16': choose one of fp32, fp16, int8"):
        build_engines(bundle, precision="bf16")
    assert file_tree(bundle) == before


def test_int8_needs_a_calibrated_model_first(bundle):
    # Checked before TensorRT is looked for, so the fix shows on any machine.
    expected = r"no INT8 model in .*bundle: run `pah-edge calibrate .*bundle --images DIR` first"
    with pytest.raises(TensorRTBuildError, match=expected):
        build_engines(bundle, precision="int8")
    assert not (bundle / "engines").exists()


def test_missing_backbone_and_bad_batches(tmp_path, bundle):
    with pytest.raises(TensorRTBuildError, match="no backbone.onnx in .*pah-edge export"):
        build_engines(tmp_path / "empty", precision="fp32")
    with pytest.raises(TensorRTBuildError, match="1 <= min <= opt <= max; got 8, 1, 32"):
        build_engines(bundle, batches=(8, 1, 32))
    with pytest.raises(TensorRTBuildError, match=r"batches must be \(min, opt, max\)"):
        build_engines(bundle, batches=(1, 8))
    assert not (bundle / "engines").exists()


@pytest.mark.skipif(TENSORRT_USABLE, reason="TensorRT is usable here")
def test_without_tensorrt_one_line_error_and_nothing_written(bundle):
    before = file_tree(bundle)
    with pytest.raises(RuntimeUnavailable) as info:
        build_engines(bundle, precision="fp16")
    message = str(info.value)
    assert "\n" not in message
    assert "tensorrt" in message.lower() or "gpu" in message.lower()
    assert file_tree(bundle) == before


@pytest.mark.needs_tensorrt
def test_builds_fp32_and_fp16_engines_with_build_records(bundle):
    import tensorrt as trt

    for precision in ("fp32", "fp16"):
        (engine,) = build_engines(bundle, precision=precision, batches=(1, 2, 4), workspace_mb=256)
        assert engine == bundle / "engines" / f"backbone.{precision}.engine"
        assert engine.stat().st_size > 0
        record = json.loads(engine_record(engine).read_text())
        assert record["tensorrt_version"] == trt.__version__
        assert record["precision"] == precision
        assert record["profile"] == {"input": "images", "min": [1, 3, 4, 4], "opt": [2, 3, 4, 4], "max": [4, 3, 4, 4]}
        assert record["gpu_name"] and record["compute_capability"].count(".") == 1
        assert record["workspace_mb"] == 256 and record["build_seconds"] >= 0
        assert len(record["onnx_sha256"]) == 64
    assert (bundle / "engines" / "timing.cache").stat().st_size > 0  # written once, reused by the fp16 build


def test_build_engine_cli_without_tensorrt_is_one_line_exit_1(tmp_path):
    """The device command names what is missing (here: TensorRT) and exits 1 with no traceback."""
    import subprocess
    import sys

    (tmp_path / "backbone.onnx").write_bytes(b"not used: TensorRT is checked before parsing")
    result = subprocess.run([sys.executable, "-m", "pah_edge.cli", "build-engine", str(tmp_path), "--precision", "fp16"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "TensorRT" in lines[0]
