"""benchmarks/device_acceptance.py on a tiny bundle: here (no GPU, no TensorRT) the ONNX Runtime
steps pass, the TensorRT steps are skipped with the reason, the bundle is untouched, exit 0."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_bundle import make_tiny_bundle

from pah_edge.device.runtimes import tensorrt_problem
from pah_edge.errors import PahEdgeError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_acceptance.py"
ONNXRUNTIME_STEPS = ["verify onnxruntime", "learn-task onnxruntime", "predict onnxruntime", "bench --runtime all"]
TENSORRT_STEPS = ["build-engine fp16", "build-engine int8", "verify tensorrt", "learn-task tensorrt",
                  "predict tensorrt", "bench tensorrt rows"]


def _acceptance_module():
    spec = importlib.util.spec_from_file_location("device_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600)


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, mnist_digits):
    return make_tiny_bundle(tmp_path_factory.mktemp("acceptance"), mnist_digits)


@pytest.mark.skipif(tensorrt_problem() is None, reason="TensorRT is usable here: its steps would run")
def test_without_tensorrt_onnxruntime_steps_pass_and_tensorrt_steps_say_why(bundle, tmp_path):
    before = _digest(bundle)
    result = _run(bundle, "--out", tmp_path / "report.json", "--bench-iterations", "3")
    assert result.returncode == 0, result.stdout + result.stderr

    report = json.loads((tmp_path / "report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["verify onnxruntime", "build-engine fp16", "build-engine int8", "verify tensorrt",
                           "learn-task onnxruntime", "predict onnxruntime", "learn-task tensorrt", "predict tensorrt",
                           "bench --runtime all", "bench tensorrt rows"]
    for name in ONNXRUNTIME_STEPS:
        assert steps[name]["status"] == "pass", steps[name]
    for name in TENSORRT_STEPS:
        assert steps[name]["status"] == "skipped" and "TensorRT" in steps[name]["reason"], steps[name]
    assert report["passed"] is True
    assert steps["learn-task onnxruntime"]["detail"]["name"] == "acceptance-onnxruntime"
    assert steps["predict onnxruntime"]["detail"]["images"] == 80  # the synthetic 10 classes x 8
    assert any(r["runtime"] == "onnxruntime" for r in report["bench"]["results"])
    assert {"cpu", "cores", "platform", "gpu", "versions"} <= set(report["machine"])
    assert "skipped  build-engine fp16: TensorRT" in result.stdout
    assert _digest(bundle) == before  # everything ran in a copy


def test_a_failing_step_is_recorded_and_the_rest_still_run():
    module = _acceptance_module()
    acc = module.Acceptance()

    def broken():
        raise PahEdgeError("engine mismatch")

    def not_here():
        raise module.Skip("no GPU")

    assert acc.run("a", broken) is None
    acc.run("b", not_here)
    assert acc.run("c", lambda: {"ok": 1}) == {"ok": 1}
    assert [(s["step"], s["status"], s["reason"]) for s in acc.steps] == [
        ("a", "fail", "PahEdgeError: engine mismatch"), ("b", "skipped", "no GPU"), ("c", "pass", None)]
    assert acc.failed()


def test_a_missing_bundle_is_one_error_line_and_exit_1(tmp_path):
    result = _run(tmp_path / "nothing", "--out", tmp_path / "report.json")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nothing" in lines[0], result.stderr
    assert not (tmp_path / "report.json").exists()
