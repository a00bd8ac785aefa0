"""Runners: ONNX Runtime and the PyTorch reference on a tiny model; TensorRT where a GPU has it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pah_edge.bundle_layout import engine_record
from pah_edge.device.runtimes import (
    EngineMismatchError,
    RuntimeInputError,
    RuntimeUnavailable,
    available_runtimes,
    check_feeds,
    create_runner,
    engine_compatibility_problem,
    pick_runtime,
)
from pah_edge.device.runtimes.onnxruntime import OnnxRuntimeRunner
from pah_edge.device.runtimes.tensorrt import TensorRTRunner, tensorrt_problem
from pah_edge.errors import PahEdgeError
from pah_edge.export.torch_runner import TorchRunner

OUTPUTS = ["features", "logits"]
SPEC = "float32[?, 3, 6, 6]"
TENSORRT_USABLE = tensorrt_problem() is None


class Tiny(torch.nn.Module):
    """conv -> relu -> flatten (features) -> linear (logits) on 3 x 6 x 6 images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, images):
        features = torch.relu(self.conv(images)).flatten(1)
        return features, self.head(features)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    torch.onnx.export(
        tiny,
        (torch.zeros(2, 3, 6, 6),),
        str(path),
        opset_version=17,
        dynamo=False,
        input_names=["images"],
        output_names=OUTPUTS,
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def _images(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)


def _torch_outputs(module, images):
    with torch.no_grad():
        return [t.numpy() for t in module(torch.from_numpy(images))]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnxruntime_matches_torch_at_any_batch(tiny, tiny_onnx):
    with OnnxRuntimeRunner(tiny_onnx, providers=["CPUExecutionProvider"], threads=1) as runner:
        assert runner.name == "onnxruntime-cpu"
        assert runner.input_specs() == {"images": ((None, 3, 6, 6), np.dtype(np.float32))}
        assert runner.output_names() == OUTPUTS
        for batch in (1, 3, 7):
            images = _images(batch, seed=batch)
            out = runner.infer({"images": images})
            assert list(out) == OUTPUTS
            for got, want in zip(out.values(), _torch_outputs(tiny, images)):
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            assert runner.last_infer_ms is not None and runner.last_infer_ms > 0


def test_torch_runner_matches_onnxruntime(tiny, tiny_onnx):
    images = _images(4)
    with create_runner("onnxruntime-cpu", tiny_onnx) as ort_runner:
        want = ort_runner.infer({"images": images})
    tiny.train()  # the runner must switch to eval and restore the mode afterwards
    runner = TorchRunner(tiny, input_names=["images"], output_names=OUTPUTS)
    with runner:
        assert not tiny.training
        got = runner.infer({"images": images})
    assert tiny.training
    tiny.eval()
    assert runner.name == "torch" and runner.last_infer_ms > 0
    for name in OUTPUTS:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"pixels": _images(2)}, rf"expects inputs images: {SPEC}; got pixels: float32\[2, 3, 6, 6\]"),
        ({}, rf"expects inputs images: {SPEC}; got nothing"),
        ({"images": _images(2), "extra": _images(1)}, "got images: .*, extra: "),
        ({"images": _images(2).astype(np.float64)}, rf"input images expects {SPEC}; got float64\[2, 3, 6, 6\]"),
        ({"images": _images(2)[:, :, :5]}, rf"input images expects {SPEC}; got float32\[2, 3, 5, 6\]"),
        ({"images": _images(2)[0]}, rf"input images expects {SPEC}; got float32\[3, 6, 6\]"),
        ({"images": _images(2).tolist()}, r"must be a numpy array float32\[\?, 3, 6, 6\]; got images: list"),
    ],
    ids=["wrong-name", "missing", "extra", "wrong-dtype", "wrong-static-dim", "wrong-rank", "not-an-array"],
)
def test_bad_feeds_name_the_expected_inputs(tiny_onnx, feeds, message):
    spec = SPEC.replace("[", r"\[").replace("?", r"\?")
    with OnnxRuntimeRunner(tiny_onnx, threads=1) as runner:
        with pytest.raises(RuntimeInputError, match=message.replace(SPEC, spec)) as info:
            runner.infer(feeds)
    assert "\n" not in str(info.value)
    assert runner.last_infer_ms is None


def test_check_feeds_unconstrained_shape():
    check_feeds({"x": (None, np.dtype(np.float32))}, {"x": np.zeros((2, 9), np.float32)})
    with pytest.raises(RuntimeInputError, match=r"expects float32\[...\]; got int64\[2\]"):
        check_feeds({"x": (None, np.dtype(np.float32))}, {"x": np.zeros(2, np.int64)})


def test_inactive_runner_is_a_bug(tiny_onnx):
    runner = OnnxRuntimeRunner(tiny_onnx)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer({"images": _images(1)})
    with runner:
        runner.infer({"images": _images(1)})
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer({"images": _images(1)})


def test_create_runner_errors(tmp_path):
    with pytest.raises(PahEdgeError, match="unknown runtime 'tflite': choose one of onnxruntime, .*tensorrt"):
        create_runner("tflite", tmp_path / "m.onnx")
    with pytest.raises(PahEdgeError, match="no ONNX model at .*absent.onnx"):
        create_runner("onnxruntime", tmp_path / "absent.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(PahEdgeError, match="onnxruntime cannot load .*bad.onnx") as info:
        create_runner("onnxruntime", tmp_path / "bad.onnx").activate()
    assert "\n" not in str(info.value)


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is not None
    and "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
    reason="this onnxruntime has the CUDA provider",
)
def test_missing_provider_names_the_fix(tiny_onnx):
    with pytest.raises(RuntimeUnavailable, match="lacks CUDAExecutionProvider .*onnxruntime-gpu"):
        OnnxRuntimeRunner(tiny_onnx, providers=["CUDAExecutionProvider"]).activate()
    with pytest.raises(RuntimeUnavailable, match="CUDAExecutionProvider"):
        pick_runtime("onnxruntime-cuda")


@pytest.mark.skipif(TENSORRT_USABLE, reason="TensorRT is usable here")
def test_runtimes_here_fall_back_to_onnxruntime():
    status = available_runtimes()
    assert status["onnxruntime"] is None
    assert "tensorrt" in status["tensorrt"].lower() or "gpu" in status["tensorrt"].lower()
    kind, skipped = pick_runtime("auto")
    assert kind in ("onnxruntime-cpu", "onnxruntime-cuda")
    assert skipped[0] == f"tensorrt: {status['tensorrt']}"
    with pytest.raises(RuntimeUnavailable, match="pah-edge\\[tensorrt\\]|GPU"):
        pick_runtime("tensorrt")
    assert pick_runtime("onnxruntime-cpu") == ("onnxruntime-cpu", [])
    with pytest.raises(PahEdgeError, match="unknown runtime 'fastest': choose auto or one of"):
        pick_runtime("fastest")


ORIN = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "fp16"}


def test_engine_compatibility():
    here = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
    assert engine_compatibility_problem(ORIN, **here) is None
    other_gpu = engine_compatibility_problem(ORIN, **{**here, "gpu_name": "NVIDIA H100", "compute_capability": "9.0"})
    assert other_gpu == "built on Orin (compute 8.7), this machine has NVIDIA H100 (compute 9.0)"
    other_trt = engine_compatibility_problem(ORIN, **{**here, "tensorrt_version": "10.7.0"})
    assert other_trt == "built with TensorRT 10.3.0, this machine has 10.7.0"
    both = engine_compatibility_problem(ORIN, tensorrt_version="11.0.0", gpu_name="Thor", compute_capability="11.0")
    assert "TensorRT 10.3.0" in both and "Thor" in both
    assert engine_compatibility_problem({}, **here) is not None  # a record without fields proves nothing


def test_tensorrt_runner_refuses_engine_without_build_record(tmp_path):
    engine = tmp_path / "bundle" / "engines" / "backbone.int8.engine"
    with pytest.raises(PahEdgeError, match="no TensorRT engine at .*pah-edge build-engine"):
        TensorRTRunner(engine)
    engine.parent.mkdir(parents=True)
    engine.write_bytes(b"plan")
    with pytest.raises(EngineMismatchError, match=r"no build record backbone.int8.engine.json") as info:
        TensorRTRunner(engine)
    assert f"rebuild it with `pah-edge build-engine {tmp_path / 'bundle'} --precision int8`" in str(info.value)
    TensorRTRunner(engine, check_sidecar=False)  # an explicit opt-out loads it without a record


@pytest.mark.skipif(TENSORRT_USABLE, reason="TensorRT is usable here")
def test_tensorrt_runner_without_tensorrt_names_the_install(tmp_path):
    engine = tmp_path / "backbone.fp16.engine"
    engine.write_bytes(b"plan")
    engine_record(engine).write_text(json.dumps(ORIN))
    runner = create_runner("tensorrt", engine)
    with pytest.raises(RuntimeUnavailable) as info:
        runner.activate()
    assert not runner.is_active
    assert "\n" not in str(info.value)


def test_device_runtimes_do_not_import_torch(tiny_onnx):
    code = (
        "import sys, numpy as np\n"
        "import pah_edge.device.runtimes as r\n"
        "import pah_edge.device.runtimes.onnxruntime, pah_edge.device.runtimes.tensorrt\n"
        "import pah_edge.export.tensorrt_build\n"
        "loaded = {'torch', 'tensorrt', 'pycuda'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
        f"with r.create_runner('onnxruntime', {str(tiny_onnx)!r}) as runner:\n"
        "    runner.infer({'images': np.zeros((1, 3, 6, 6), np.float32)})\n"
        "r.pick_runtime()  # may import tensorrt where it is installed, never torch\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.needs_tensorrt
# fp16 keeps ~3 significant digits, so its outputs of magnitude ~1 also get a relative tolerance.
@pytest.mark.parametrize("precision, atol, rtol", [("fp32", 1e-5, 1e-5), ("fp16", 1e-3, 1e-2)])
def test_tensorrt_matches_onnxruntime(tiny_onnx, tmp_path, precision, atol, rtol):
    from pah_edge.export.tensorrt_build import engine_from_onnx

    engine = tmp_path / "engines" / f"backbone.{precision}.engine"
    engine_from_onnx(tiny_onnx, engine, precision=precision, min_batch=1, opt_batch=4, max_batch=8, workspace_mb=256)
    with create_runner("onnxruntime-cpu", tiny_onnx) as ort_runner, create_runner("tensorrt", engine) as trt_runner:
        assert trt_runner.input_specs() == ort_runner.input_specs()
        assert sorted(trt_runner.output_names()) == sorted(OUTPUTS)
        for batch in (1, 5, 8, 2):  # grows, then shrinks, the buffers
            images = _images(batch, seed=batch)
            want, got = ort_runner.infer({"images": images}), trt_runner.infer({"images": images})
            for name in OUTPUTS:
                np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=rtol)
            assert trt_runner.last_gpu_ms > 0 and trt_runner.last_infer_ms >= trt_runner.last_gpu_ms
        with pytest.raises(RuntimeInputError, match="outside the engine's profile"):
            trt_runner.infer({"images": _images(9)})


def test_a_failing_nvidia_smi_names_no_gpu(tmp_path, monkeypatch):
    from pah_edge.machine import gpu_name

    fake = tmp_path / "nvidia-smi"  # as on a machine whose driver is not loaded: the error goes to stdout
    fake.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the driver\"\nexit 9\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert "failed" not in (gpu_name() or "")
