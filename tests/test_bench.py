"""`pah-edge bench` (`pah_edge.device.bench`): rows, skips, ratios, outputs and bad arguments, on the tiny bundle.

One measured report per module (ONNX Runtime and PyTorch eager, few iterations); the runs without
torch are in test_device_no_torch.py. TensorRT cannot run here: its rows are checked on a GPU only.
"""

import json
import shutil

import numpy as np
import pytest
from conftest import assert_one_line_error, file_tree, run_cli
from tiny_bundle import make_tiny_bundle, query_folder

from pah_edge.device.bench import BenchConfig, add_ratios, run_bench
from pah_edge.device.bench_timing import NOISY_CV, Timing, alternating, measure
from pah_edge.device.runtimes import tensorrt_problem
from pah_edge.errors import ConfigError
from pah_edge.export.torch_runner import torch_runners

REQUIRED = ("component", "runtime", "precision", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput_ips", "rss_mb",
            "cv", "iterations", "speedup_vs_torch")
COMPONENTS = ("backbone", "head-generation", "learner-step", "predict-e2e", "predict-frame", "predict-stream",
              "predict-task-free", "learn-task")
QUICK = {"iterations": 5, "warmup": 1, "threads": 1}



@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits):
    root = tmp_path_factory.mktemp("bench")
    return make_tiny_bundle(root, mnist_digits), query_folder(root, mnist_digits), root


@pytest.fixture(scope="module")
def measured(made):
    """(report, JSON path, plot path, bundle files before, bundle files after) of one ORT + torch run."""
    bundle, _, root = made
    before = file_tree(bundle)
    config = BenchConfig(runtimes=("onnxruntime", "torch"), batches=(1, 4), **QUICK)
    report = run_bench(bundle, config, json_path=root / "out" / "b.json", plot_path=root / "out" / "b.png",
                       reference=torch_runners)  # as the CLI passes it
    return report, root / "out" / "b.json", root / "out" / "b.png", before, file_tree(bundle)


def _row(report, component, runtime, batch, precision="fp32"):
    (row,) = [r for r in report.results if (r["component"], r["runtime"], r["batch"], r["precision"])
              == (component, runtime, batch, precision)]
    return row


# --- the report -------------------------------------------------------------------------------------


def test_rows_have_the_schema_and_sane_values(measured):
    report, json_path, *_ = measured
    assert json.loads(json_path.read_text()) == report.to_dict()
    assert set(report.to_dict()) == {"machine", "settings", "results", "skipped"}
    assert {"cpu", "cores", "gpu", "versions"} <= set(report.machine)
    assert "onnxruntime" in report.machine["versions"]
    for row in report.results:
        assert all(key in row for key in REQUIRED), row
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row
        assert row["throughput_ips"] == pytest.approx(row["batch"] * 1000 / row["p50_ms"])
        assert row["rss_mb"] > 0 and row["cv"] >= 0
        assert "device_mem_mb" not in row  # no GPU rows here
    assert report.settings["inputs"] == "synthetic"


def test_every_component_runs_on_onnxruntime_and_the_graphs_on_torch(measured):
    report = measured[0]
    ran = {(r["component"], r["runtime"]) for r in report.results}
    assert {(c, "onnxruntime") for c in COMPONENTS} <= ran
    assert {(c, "torch") for c in ("backbone", "head-generation", "learner-step")} <= ran
    assert {r["batch"] for r in report.results if r["component"] in ("backbone", "learner-step")} == {1, 4}
    assert _row(report, "predict-e2e", "onnxruntime", 1)["iterations"] == QUICK["iterations"]
    learn = _row(report, "learn-task", "onnxruntime", 80, precision="auto")  # 10 classes x 8 images
    assert learn["runner"] == "onnxruntime-cpu"


def test_ratios_against_torch_and_the_bare_backbone(measured):
    report = measured[0]
    ort, eager = _row(report, "backbone", "onnxruntime", 1), _row(report, "backbone", "torch", 1)
    paired = ort["speedup_vs_torch_paired"]  # the two backbones timed again, taking turns
    assert ort["speedup_vs_torch"] == paired["median"] and paired["lowest"] <= paired["median"] <= paired["highest"]
    assert paired["rounds"] == 10 and paired["block"] == 1  # QUICK's iterations, in 10 rounds
    assert "speedup_vs_torch_paired" not in eager and eager["speedup_vs_torch"] is None
    head, head_eager = _row(report, "head-generation", "onnxruntime", 10), _row(report, "head-generation", "torch", 10)
    assert head["speedup_vs_torch"] == pytest.approx(head_eager["p50_ms"] / head["p50_ms"])
    e2e = _row(report, "predict-e2e", "onnxruntime", 1)
    overhead = e2e["overhead_vs_backbone_paired"]  # predict and the bare backbone, taking turns
    assert e2e["overhead_vs_backbone"] == overhead["median"]
    assert overhead["lowest"] <= overhead["median"] <= overhead["highest"] and overhead["rounds"] == 10
    assert overhead["median"] > 0  # predict runs the backbone and decodes a frame besides
    assert e2e["speedup_vs_torch"] is None  # PyTorch does not run the device path
    free = _row(report, "predict-task-free", "onnxruntime", 1)  # taking turns with task-given predict
    assert free["overhead_vs_task_given"] == free["overhead_vs_task_given_paired"]["median"]
    assert free["overhead_vs_task_given_paired"]["rounds"] == 10 and free["overhead_vs_task_given"] > -0.5
    frame = _row(report, "predict-frame", "onnxruntime", 1)  # Device.predict of the frame in memory
    assert frame["overhead_vs_backbone"] == frame["overhead_vs_backbone_paired"]["median"]
    assert frame["overhead_vs_backbone_paired"]["rounds"] == 10 and frame["runner"] == e2e["runner"]
    stream = _row(report, "predict-stream", "onnxruntime", 1)  # ms per frame of Device.predict_stream
    assert stream["overhead_vs_backbone"] == stream["overhead_vs_backbone_paired"]["median"]
    assert stream["batch"] == 1 and stream["runner"] == e2e["runner"]


def test_skipped_runs_are_listed_with_reasons(measured):
    skipped = {(s["component"], s["runtime"], s["precision"]): s["reason"] for s in measured[0].skipped}
    assert skipped[("backbone", "onnxruntime", "int8")] == "no backbone.int8.onnx: run `pah-edge calibrate`"
    assert "TensorRT engine" in skipped[("backbone", "onnxruntime", "fp16")]
    assert "reference" in skipped[("predict-e2e", "torch", None)]
    assert "reference" in skipped[("predict-task-free", "torch", None)]
    assert "FP32 reference only" in skipped[("backbone", "torch", "int8")]


def test_the_bundle_is_left_byte_identical(measured):
    *_, before, after = measured
    assert after == before


def test_the_plot_is_a_png(measured):
    assert measured[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- inputs and precisions ---------------------------------------------------------------------------


def test_int8_rows_use_backbone_int8_onnx_and_real_images(made, tmp_path):
    bundle, query, _ = made
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    shutil.copy(copy / "backbone.onnx", copy / "backbone.int8.onnx")  # stands in for `pah-edge calibrate`'s file
    config = BenchConfig(runtimes=("onnxruntime",), precisions=("int8",), batches=(2,), images=query,
                         iterations=2, warmup=0)
    report = run_bench(copy, config)
    assert report.settings["inputs"] == str(query)
    assert {(r["component"], r["precision"]) for r in report.results} == {
        ("backbone", "int8"), ("predict-e2e", "int8"), ("predict-frame", "int8"), ("predict-stream", "int8"),
        ("predict-task-free", "int8"),
        ("head-generation", "fp32"), ("learner-step", "fp32"), ("learn-task", "auto")}


@pytest.mark.skipif(tensorrt_problem() is None, reason="TensorRT works here")
def test_nothing_measurable_is_an_error_naming_why(made):
    with pytest.raises(Exception, match="nothing could be measured here.*TensorRT"):
        run_bench(made[0], BenchConfig(runtimes=("tensorrt",), iterations=1, warmup=0))


@pytest.mark.needs_tensorrt
def test_tensorrt_rows_time_the_engine_with_cuda_events(made, tmp_path):
    from pah_edge.export.tensorrt_build import build_engines

    copy = shutil.copytree(made[0], tmp_path / "bundle")
    build_engines(copy, precision="fp16")
    report = run_bench(copy, BenchConfig(runtimes=("tensorrt",), precisions=("fp16",), batches=(1,), iterations=5))
    row = _row(report, "backbone", "tensorrt", 1, precision="fp16")
    assert row["timing"] == "cuda-events" and row["device_mem_mb"] > 0 and row["wall_p50_ms"] >= row["p50_ms"]


# --- timing ----------------------------------------------------------------------------------------------


def test_timing_statistics():
    timing = Timing(tuple(float(x) for x in range(1, 101)))
    assert timing.percentile(50) == pytest.approx(50.5) and timing.percentile(99) == pytest.approx(99.01)
    assert timing.cv == pytest.approx(np.std(range(1, 101), ddof=1) / 50.5) and timing.noisy
    steady = Timing((10.0, 10.1, 9.9))
    assert steady.cv < NOISY_CV and not steady.noisy
    assert steady.fields(8)["throughput_ips"] == pytest.approx(8 * 1000 / 10.0)
    assert Timing((5.0,)).cv == 0.0


def test_alternating_takes_turns_in_blocks_and_keeps_each_blocks_median():
    order = []

    def entry(name, ms):
        return lambda: order.append(name) or ms.pop(0)

    rounds = alternating({"a": entry("a", [99.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                          "b": entry("b", [99.0, 10.0, 30.0, 20.0, 40.0, 60.0, 50.0])}, rounds=2, block=3, warmup=1)
    assert order == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert rounds == [{"a": 2.0, "b": 20.0}, {"a": 5.0, "b": 50.0}]
    with pytest.raises(ValueError, match="rounds >= 1"):
        alternating({"a": lambda: 1.0}, rounds=0, block=1, warmup=0)


def test_measure_warms_up_then_keeps_every_timed_iteration():
    calls = []
    timing = measure(lambda: calls.append(1) or float(len(calls)), warmup=3, iterations=4)
    assert len(calls) == 7 and timing.samples_ms == (4.0, 5.0, 6.0, 7.0)


def test_add_ratios_leaves_none_without_a_reference():
    rows = [{"component": "predict-e2e", "runtime": "onnxruntime", "precision": "fp32", "batch": 1, "p50_ms": 2.0}]
    add_ratios(rows)
    assert rows[0]["speedup_vs_torch"] is None and rows[0]["overhead_vs_backbone"] is None


# --- the command line -------------------------------------------------------------------------------------




@pytest.mark.parametrize("args, words", [
    (["--batch", "0"], ["--batch takes positive whole numbers", "1,8,32"]),
    (["--batch", "1,x"], ["--batch takes positive whole numbers", "'1,x'"]),
    (["--runtime", "tflite"], ["unknown --runtime 'tflite'", "all, onnxruntime, tensorrt, torch"]),
    (["--precision", "bogus"], ["unknown --precision 'bogus'", "fp32, fp16, int8"]),
    (["--iterations", "0"], ["--iterations must be >= 1"]),
    (["--threads", "0"], ["--threads must be >= 1"]),
])
def test_bad_arguments_are_one_line_errors(made, args, words):
    assert_one_line_error(run_cli("bench", made[0], *args), *words)


def test_a_missing_bundle_is_a_one_line_error(tmp_path):
    assert_one_line_error(run_cli("bench", tmp_path / "nope", "--runtime", "onnxruntime"), "no bundle at", "pah-edge export")


def test_bad_images_folder_is_a_one_line_error(made, tmp_path):
    assert_one_line_error(run_cli("bench", made[0], "--images", tmp_path / "none", "--iterations", "1"), "--images", "folder")


def test_the_command_prints_machine_table_and_skips(made, tmp_path):
    result = run_cli("bench", made[0], "--runtime", "onnxruntime", "--batch", "1", "--iterations", "2", "--warmup", "0",
                  "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "cores" in lines[0] and lines[1].split()[:4] == ["component", "runtime", "precision", "batch"]
    assert any(line.startswith("skipped backbone on onnxruntime (precision int8): no backbone.int8.onnx")
               for line in lines)
    assert json.loads((tmp_path / "b.json").read_text())["results"]


def test_help():
    result = run_cli("bench", "--help")
    assert result.exit_code == 0 and "--precision" in result.stdout and "--plot" in result.stdout


def test_config_validates_when_called_as_a_library():
    with pytest.raises(ConfigError, match="--batch"):
        BenchConfig(batches=())
    assert BenchConfig.from_options(runtime="torch,onnxruntime", precision="int8,fp32", batch="8,1,8").batches == (1, 8)
    assert BenchConfig.from_options(runtime="all", precision="fp32", batch="1").runtimes == (
        "onnxruntime", "tensorrt", "torch")


def test_task_free_predict_is_skipped_with_the_fix_on_a_bundle_without_statistics(made, tmp_path):
    from pah_edge.bundle import Bundle
    from pah_edge.device.bench_components import Context, Skipped, predict_task_free

    copy = tmp_path / "old"
    shutil.copytree(made[0], copy)
    (copy / "task_free.json").unlink()  # as exported before task-free prediction existed
    bundle = Bundle.open(copy)
    ctx = Context(bundle=bundle, scratch=bundle, inputs=None, classes=4, warmup=0, iterations=1, batches=(1,),
                  threads=1)
    with pytest.raises(Skipped, match=r"no task-free statistics: add them with `pah-edge task-stats "):
        next(predict_task_free(ctx, "onnxruntime", "fp32"))


def test_the_scratch_task_takes_part_in_task_free_prediction(made, tmp_path):
    from pah_edge.bundle import Bundle
    from pah_edge.device.bench_inputs import prepare_inputs, scratch_bundle
    from pah_edge.device.predict import Predictor

    bundle = Bundle.open(made[0])
    inputs = prepare_inputs(bundle.preprocess, None, tmp_path, classes=4)
    scratch = scratch_bundle(bundle, tmp_path, inputs, classes=4)
    with Predictor(scratch, runtime="onnxruntime-cpu") as predictor:
        rule = predictor.rule()
    assert "bench" in [t.name for t in rule.tasks] and len(rule.tasks) == len(scratch.tasks())
    assert "bench" not in [t.name for t in Bundle.open(made[0]).tasks()]  # the user's bundle: untouched
