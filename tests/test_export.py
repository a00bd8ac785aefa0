"""Export: checkpoint -> bundle of three ONNX graphs, parity with PyTorch, and the export/verify CLI.

Tiny runs on real digits, trained once per module in-process (a few seconds each).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import file_tree, write_image_folder
from torch.nn import functional as F
from typer.testing import CliRunner

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle, BundleError, sha256_file
from pah_edge.workstation.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pah_edge.cli import app
from pah_edge.workstation.config import DataConfig, ModelConfig, RunConfig, TrainConfig, resolve
from pah_edge.machine import library_versions
from pah_edge.export import bundle_writer
from pah_edge.export.bundle_writer import export_bundle
from pah_edge.export.onnx_export import GRAPH_TOLERANCES, ExportError, Tolerance
from pah_edge.workstation.model import build_model
from pah_edge.preprocess import Preprocess, load_image, to_input
from pah_edge.workstation.trainer import run_training

TINY = {"backbone": "tiny_cnn", "image_size": 28, "prototype_size": 8}


def _train(folder: Path, out: Path, *, generator="classwise", method="pah", epochs=2) -> Path:
    cfg = RunConfig(data=DataConfig(folder=str(folder)), model=ModelConfig(**TINY, generator=generator),
                    train=TrainConfig(method=method, epochs=epochs))
    run_training(cfg, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_digits):
    """Tiny runs on real digits: classwise and classwise-linear (3- and 7-class tasks), task-mlp (two 3-class
    tasks), lwf."""
    root = tmp_path_factory.mktemp("export")
    mixed = write_image_folder(root / "mixed", mnist_digits, {"a": [0, 1, 2], "b": [3, 4, 5, 6, 7, 8, 9]}, per_class=20)
    equal = write_image_folder(root / "equal", mnist_digits, {"a": [0, 1, 2], "b": [3, 4, 5]}, per_class=20)
    return {
        "images": mixed,
        "classwise": _train(mixed, root / "runs" / "classwise"),
        "classwise-linear": _train(mixed, root / "runs" / "classwise-linear", generator="classwise-linear"),
        "task-mlp": _train(equal, root / "runs" / "task-mlp", generator="task-mlp"),
        "lwf": _train(equal, root / "runs" / "lwf", method="lwf", epochs=1),
    }


@pytest.fixture(scope="module")
def bundles(runs, tmp_path_factory):
    """{generator: (bundle dir, report)} exported with the digit folder as parity images."""
    root = tmp_path_factory.mktemp("bundles")
    return {kind: (root / kind, export_bundle(runs[kind], root / kind, images=runs["images"]))
            for kind in ("classwise", "classwise-linear", "task-mlp")}


def _errors_within(report):
    for name, graph in report.graphs.items():
        assert not GRAPH_TOLERANCES[name].violations(graph["errors"]), (name, graph["errors"])



def test_bundle_holds_graphs_manifest_and_workstation_tasks(runs, bundles):
    path, report = bundles["classwise"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "pah-edge-bundle" and manifest["format_version"] == 1
    assert manifest["backbone"] == "tiny_cnn" and manifest["feature_dim"] == 32 and manifest["opset"] == 17
    assert manifest["preprocess"] == Preprocess(image_size=28).to_dict()
    assert manifest["prototype_shape"] == [1, 8, 8] and manifest["input_channels"] == 3
    assert manifest["generator"] == {"kind": "classwise", "num_classes": None}
    assert manifest["graphs"]["backbone"] == {"file": "backbone.onnx", "inputs": {"images": [None, 3, 28, 28]},
                                              "outputs": {"features": [None, 32]}}
    assert manifest["graphs"]["learner_step"]["outputs"] == {"loss": [], "grad": [None, 1, 8, 8]}
    assert manifest["training"] == json.loads((runs["classwise"] / "metrics.json").read_text())
    assert manifest["source_checkpoint"]["sha256"] == sha256_file(runs["classwise"] / "checkpoint.pt")
    for name in ("backbone", "generator", "learner_step"):
        file = path / f"{name}.onnx"
        onnx.checker.check_model(onnx.load(str(file)), full_check=True)
        assert manifest["files"][file.name] == sha256_file(file)
        assert report.graphs[name]["size_mb"] > 0
        assert report.graphs[name]["simplified"] in ("applied", "no change")
    _errors_within(report)
    assert (path / "report.json").is_file() and report.tasks_exported == report.tasks_in_run == 2

    state = load_checkpoint(runs["classwise"] / "checkpoint.pt")
    model = model_from_checkpoint(state)
    bundle = Bundle.open(path)
    assert [(t.name, len(t.class_names), t.source) for t in bundle.tasks()] == [("a", 3, "workstation"), ("b", 7, "workstation")]
    for i, task in enumerate(bundle.tasks()):
        assert task.images_seen == state["tasks"][i]["train_size"]
        assert task.accuracy == state["acc_matrix"][-1][i]
        np.testing.assert_array_equal(bundle.load_prototypes(task.name), model.task_params[i].detach().numpy())


def _digit_features(bundle: Bundle, folder: Path) -> np.ndarray:
    files = sorted(folder.rglob("*.png"))[::10][:24]
    images = to_input(np.stack([load_image(f, bundle.preprocess) for f in files]), bundle.preprocess)
    return ort.InferenceSession(str(bundle.graph_path("backbone"))).run(["features"], {"images": images})[0]


@pytest.mark.parametrize("kind", ["classwise", "classwise-linear", "task-mlp"])
def test_learner_step_matches_autograd_for_any_class_count(runs, bundles, kind):
    """loss and d loss / d prototypes from the ONNX graph vs torch autograd, C = 3 and 12 on one graph."""
    bundle = Bundle.open(bundles[kind][0])
    generator = model_from_checkpoint(load_checkpoint(runs[kind] / "checkpoint.pt")).generator.eval()
    features = _digit_features(bundle, runs["images"])
    step = ort.InferenceSession(str(bundle.graph_path("learner_step")))
    heads = ort.InferenceSession(str(bundle.graph_path("generator")))
    rng = np.random.default_rng(1)
    for classes in [3] if kind == "task-mlp" else [3, 12]:
        protos = rng.standard_normal((classes, 1, 8, 8), dtype=np.float32)
        labels = rng.integers(0, classes, len(features))
        loss, grad = step.run(["loss", "grad"], {"prototypes": protos, "features": features, "labels": labels})

        p = torch.from_numpy(protos).requires_grad_(True)
        head = generator(p)
        expected = F.cross_entropy(torch.from_numpy(features) @ head.T, torch.from_numpy(labels))
        (expected_grad,) = torch.autograd.grad(expected, p)
        assert grad.shape == (classes, 1, 8, 8) and loss.shape == ()
        assert abs(loss - expected.item()) / abs(expected.item()) < 1e-4
        assert np.abs(grad - expected_grad.numpy()).max() / np.abs(expected_grad.numpy()).max() < 1e-4
        head_onnx = heads.run(["head"], {"prototypes": protos})[0]
        assert np.abs(head_onnx - head.detach().numpy()).max() < 1e-5


def test_task_mlp_bundle_records_and_enforces_its_class_count(bundles, tmp_path):
    path = shutil.copytree(bundles["task-mlp"][0], tmp_path / "bundle")
    bundle = Bundle.open(path)
    assert bundle.manifest["generator"] == {"kind": "task-mlp", "num_classes": 3}
    assert bundle.manifest["graphs"]["generator"]["inputs"]["prototypes"] == [3, 1, 8, 8]
    with pytest.raises(BundleError, match="exactly 3 classes"):
        bundle.add_task(name="four", class_names="wxyz", prototypes=np.zeros((4, 1, 8, 8), np.float32),
                        images_seen=4, accuracy=None, source="device")


def test_a_non_linear_generator_learns_on_the_device_from_class_mean_thumbnails(runs, bundles, tmp_path):
    """classwise (linear + MLP) has no least-squares start: the learner takes the paper's data init."""
    from pah_edge.device.learner import learn_task

    path = shutil.copytree(bundles["classwise"][0], tmp_path / "bundle")
    folder = tmp_path / "new"
    for digit in ("digit3", "digit4", "digit5"):
        shutil.copytree(runs["images"] / "b" / digit, folder / digit)
    report = learn_task(Bundle.open(path), folder, name="new", progress=False, max_steps=50)
    assert report.final_loss < report.initial_loss and report.train_accuracy > 0.5
    assert Bundle.open(path).load_prototypes("new").shape == (3, 1, 8, 8)


def _mobilenet_run(out: Path) -> Path:
    """A mobilenet_v3_large checkpoint at 32 px with BatchNorm statistics from real-sized activations."""
    cfg = resolve(RunConfig(data=DataConfig(benchmark="mnist-5k"),
                            model=ModelConfig(backbone="mobilenet_v3_large", image_size=32), train=TrainConfig()))
    torch.manual_seed(0)
    model = build_model(cfg.model, first_task_classes=3, load_weights=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:  # untouched statistics leave features near 1e-9, where abs error says nothing
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model.train().backbone(torch.randn(8, 3, 32, 32))
    model.eval().add_task(torch.randn(model.generator.param_shape(3)))
    preprocess = Preprocess(image_size=32)
    save_checkpoint(out / "checkpoint.pt", {
        "config": cfg.to_dict(), "preprocess": preprocess.to_dict(),
        "tasks": [{"name": "t0", "class_names": ["x", "y", "z"], "train_size": 30}], "completed": 1,
        "feature_dim": 960, "acc_matrix": [[0.5]], "val_acc": [0.5], "versions": library_versions(),
        "model": model.state_dict()})
    atomic_write_json(out / "config.json", {"config": cfg.to_dict(), "preprocess": preprocess.to_dict()})
    return out


def test_mobilenet_v3_large_passes_parity_and_keeps_hardswish(tmp_path):
    report = export_bundle(_mobilenet_run(tmp_path / "run"), tmp_path / "bundle")
    _errors_within(report)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "bundle" / "backbone.onnx")).graph.node}
    assert {"HardSwish", "HardSigmoid"} <= ops
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["feature_dim"] == 960


def test_export_picks_the_newest_run_of_the_backbone(runs, tmp_path):
    runs_dir = tmp_path / "runs"
    old, new = (shutil.copytree(runs["classwise"], runs_dir / name) for name in ("old", "new"))
    os.utime(old / "checkpoint.pt", (1e9, 1e9))
    shutil.copytree(runs["lwf"], runs_dir / "z-lwf")  # same backbone, older: not picked
    os.utime(runs_dir / "z-lwf" / "checkpoint.pt", (1e8, 1e8))
    result = CliRunner().invoke(app, ["export", "--backbone", "tiny_cnn", "--runs-dir", str(runs_dir),
                                      "--out", str(tmp_path / "bundle"), "--no-simplify"])
    assert result.exit_code == 0, result.output
    assert f"using {new}, the newest tiny_cnn run" in result.output
    assert "bundle ->" in result.output and (tmp_path / "bundle" / "manifest.json").is_file()


def test_export_without_a_matching_run_names_the_train_command(runs, tmp_path):
    shutil.copytree(runs["classwise"], tmp_path / "runs" / "tiny")
    result = CliRunner().invoke(app, ["export", "--backbone", "mobilenet_v3", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1
    assert (f"no mobilenet_v3_large run in {tmp_path / 'runs'}/: train one with "
            f"`pah-edge train --backbone mobilenet_v3_large --out {tmp_path / 'runs' / 'NAME'}`") in " ".join(result.output.split())


def test_export_refuses_a_checkpoint_of_another_backbone(runs, tmp_path):
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(runs["classwise"]), "--backbone",
                                      "mobilenet_v3_large", "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 1 and "is a tiny_cnn run" in result.output
    assert not (tmp_path / "bundle").exists()


def test_linear_head_run_is_refused(runs, tmp_path):
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(runs["lwf"]), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "--generator classwise" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_is_kept_without_force_and_replaced_with_it(runs, bundles, tmp_path):
    path = shutil.copytree(bundles["classwise"][0], tmp_path / "bundle")
    before = file_tree(path)
    args = ["export", "--checkpoint", str(runs["classwise"]), "--out", str(path), "--no-simplify"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "--force" in result.output
    assert file_tree(path) == before
    result = CliRunner().invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert file_tree(path) != before and Bundle.open(path).tasks()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .tmp- or .old- leftovers


def test_parity_failure_raises_and_leaves_no_bundle(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(bundle_writer.GRAPH_TOLERANCES, "generator", Tolerance(abs=-1.0))
    with pytest.raises(ExportError, match="generator.onnx: ONNX Runtime differs from PyTorch"):
        export_bundle(runs["classwise"], tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_run_exports_its_finished_tasks(runs, tmp_path):
    state = load_checkpoint(runs["classwise"] / "checkpoint.pt")
    state["completed"], state["acc_matrix"] = 1, state["acc_matrix"][:1]
    state["model"] = {k: v for k, v in state["model"].items() if k != "task_params.1"}
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", {k: v for k, v in state.items() if k != "format_version"})
    report = export_bundle(tmp_path / "run", tmp_path / "bundle", simplify=False)
    assert (report.tasks_exported, report.tasks_in_run) == (1, 2) and "1 of its 2 tasks" in report.note
    assert [t.name for t in Bundle.open(tmp_path / "bundle").tasks()] == ["a"]


def test_verify_passes_a_good_bundle(runs, bundles):
    result = CliRunner().invoke(app, ["verify", str(bundles["classwise"][0]), "--images", str(runs["images"])])
    assert result.exit_code == 0, result.output
    assert "torch: ok" in result.output and "tensorrt: skipped" in result.output
    assert " NO " not in result.output and "learner_step" in result.output


def test_a_bundle_is_readable_by_others_as_the_umask_says(bundles):
    # tempfile makes its folders 0700 and files 0600; a service account on the device must read the bundle.
    mask = os.umask(0o022)
    os.umask(mask)
    path = bundles["classwise"][0]
    assert oct(path.stat().st_mode & 0o777) == oct(0o777 & ~mask)
    modes = {p.relative_to(path).as_posix(): oct(p.stat().st_mode & 0o777) for p in path.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {oct(0o666 & ~mask)}, modes


def test_an_opset_this_torch_cannot_export_is_a_one_line_error(runs, tmp_path):
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(runs["classwise"]), "--out", str(tmp_path / "b"),
                                      "--opset", "99", "--no-simplify"])
    assert result.exit_code == 1, result.output
    assert "--opset 99: this torch cannot export it" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


def test_too_few_statistics_images_are_refused_before_the_export(runs, tmp_path):
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(runs["classwise"]), "--out", str(tmp_path / "b"),
                                      "--stats-per-class", "2"])
    assert result.exit_code == 1 and "--stats-per-class must be at least 3, got 2" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_run_with_options_this_version_does_not_know_is_a_one_line_error(runs, tmp_path):
    state = load_checkpoint(runs["classwise"] / "checkpoint.pt")
    state["config"]["train"]["option_from_a_newer_version"] = 1
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", {k: v for k, v in state.items() if k != "format_version"})
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1, result.output
    assert "saved options do not fit this pah-edge" in " ".join(result.output.split())


def test_an_int8_engine_is_refused_before_the_export(runs, tmp_path):
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(runs["classwise"]), "--out", str(tmp_path / "b"),
                                      "--engine", "int8"])
    assert result.exit_code == 1 and "calibrate the bundle" in " ".join(result.output.split()), result.output
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_no_checkpoint_is_a_one_line_error(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "checkpoint.pt")
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--out",
                                      str(tmp_path / "b")])
    assert result.exit_code == 1 and "holds a Tensor, not a pah-edge checkpoint" in " ".join(result.output.split())


def test_verify_checks_the_installed_int8_model_against_its_record(bundles, tmp_path):
    path = shutil.copytree(bundles["classwise"][0], tmp_path / "bundle")
    bundle = Bundle.open(path)
    backbone = bundle.graph_path("backbone")
    bundle.install_int8(backbone, {"passed": True, "sha256": sha256_file(backbone)})  # stands in for calibrate's
    with open(path / "backbone.int8.onnx", "ab") as model:
        model.write(b"garbage")
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and "backbone.int8.onnx does not match its SHA-256" in result.output


def test_two_tasks_whose_names_clean_up_alike_keep_their_own_statistics(mnist_digits, tmp_path):
    data = write_image_folder(tmp_path / "data", mnist_digits, {"x y": [0, 1], "x+y": [2, 3]}, per_class=12)
    bundle = Bundle.open(export_bundle(_train(data, tmp_path / "run", epochs=1), tmp_path / "bundle").bundle)
    names = [t.name for t in bundle.tasks()]
    assert names == ["x_y", "x_y-1"]
    means = [bundle.load_task_stats(bundle.task(name)).means for name in names]
    assert not np.allclose(means[0], means[1])  # before, both held the second task's class means


def test_a_run_on_a_relative_folder_exports_its_statistics_from_any_directory(mnist_digits, tmp_path, monkeypatch):
    write_image_folder(tmp_path / "data", mnist_digits, {"a": [0, 1], "b": [2, 3]}, per_class=12)
    monkeypatch.chdir(tmp_path)
    _train(Path("data"), tmp_path / "run", epochs=1)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    export_bundle(tmp_path / "run", tmp_path / "bundle", simplify=False)
    assert Bundle.open(tmp_path / "bundle").shared_stats() is not None  # the run's data was found again


def test_tolerance_with_both_limits_passes_when_either_holds():
    tol = Tolerance(abs=1e-4, rel=1e-5)
    assert tol.violations({"features": {"abs": 2e-4, "rel": 1e-6}}) == []  # large features, tiny relative error
    assert tol.violations({"features": {"abs": 5e-5, "rel": 1e-3}}) == []
    assert tol.violations({"features": {"abs": 2e-4, "rel": 1e-3}}) == ["features abs 2.00e-04 > 1e-04 and rel 1.00e-03 > 1e-05"]
    assert Tolerance(rel=1e-4).violations({"grad": {"abs": 0.0, "rel": float("nan")}}) != []
