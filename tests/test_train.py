"""The continual trainer end to end on tiny models and real digits, through the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_image_folder
from typer.testing import CliRunner

from pah_edge.cli import app

TINY = ["--backbone", "tiny_cnn", "--image-size", "28", "--no-progress", "--prototype-size", "8"]


def _cli(*args):
    return [sys.executable, "-m", "pah_edge.cli", *args]


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory, mnist_digits):
    """One 3-class task and one 7-class task of real digits."""
    root = tmp_path_factory.mktemp("digits")
    return write_image_folder(root, mnist_digits, {"a": [0, 1, 2], "b": [3, 4, 5, 6, 7, 8, 9]}, per_class=40)


def test_imagefolder_run_with_3_and_7_class_tasks(two_tasks, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(two_tasks), *TINY, "--epochs", "30", "--backbone-lr", "1e-3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    acc = metrics["acc_matrix"]
    assert [len(row) for row in acc] == [1, 2]
    assert all(0 <= a <= 1 for row in acc for a in row)
    assert acc[0][0] > 0.6 and acc[1][1] > 0.3  # well above chance (1/3, 1/7) on real digits
    assert {"average_accuracy", "forgetting", "bwt"} <= set(metrics)
    for name in ("checkpoint.pt", "config.json", "accuracy_matrix.png", "prototypes.png"):
        assert (out / name).stat().st_size > 0
    versions = json.loads((out / "config.json").read_text())["versions"]
    assert "torch" in versions


def test_existing_run_is_not_overwritten_without_resume(two_tasks, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(two_tasks), *TINY, "--epochs", "1", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = (out / "checkpoint.pt").read_bytes()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "--resume" in result.output
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_finished_run_resumed_writes_its_outputs_again(two_tasks, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(two_tasks), *TINY, "--epochs", "1", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    metrics = (out / "metrics.json").read_bytes()
    for name in ("metrics.json", "accuracy_matrix.png"):  # a crash after the last checkpoint, say
        (out / name).unlink()
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").read_bytes() == metrics and (out / "accuracy_matrix.png").stat().st_size > 0


@pytest.mark.parametrize(("options", "words"), [
    (["--lr", "-1"], "--lr must be above 0"),
    (["--backbone-lr", "nan"], "--backbone-lr at least 0"),
    (["--device", "gpu"], "unknown device 'gpu': choose auto, cpu, cuda or cuda:N"),
    (["--generator", "task-mlp"], "built for 3 classes per task, got a task with 7"),  # before any training
])
def test_impossible_training_options_are_one_line_errors(two_tasks, tmp_path, options, words):
    result = CliRunner().invoke(app, ["train", str(two_tasks), *TINY, "--epochs", "1", "--out", str(tmp_path / "r"),
                                      *options])
    assert result.exit_code == 1 and words in " ".join(result.output.split()), result.output
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def _digit_tasks(tmp_path, mnist_digits):
    layout = {f"t{i}": [2 * i, 2 * i + 1] for i in range(3)}
    return write_image_folder(tmp_path / "digits", mnist_digits, layout, per_class=150)


@pytest.mark.slow
def test_kill_9_during_task_2_then_resume_equals_uninterrupted_run(tmp_path, mnist_digits):
    data = _digit_tasks(tmp_path, mnist_digits)
    args = ["train", str(data), *TINY, "--epochs", "6", "--seed", "3"]
    reference = tmp_path / "reference"
    subprocess.run(_cli(*args, "--out", str(reference)), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "metrics.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before task 1 finished"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((killed / "metrics.json").read_text())["completed_tasks"] == 1, "kill landed after task 2"

    subprocess.run(_cli(*args, "--out", str(killed), "--resume"), check=True, capture_output=True)
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())


def test_resume_with_other_options_is_refused_before_the_data_loads(two_tasks, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", str(two_tasks), *TINY, "--epochs", "1", "--out", str(out)]).exit_code == 0

    def load_tasks(*args, **kwargs):  # minutes on a real dataset, wasted when the options are refused
        raise AssertionError("the data was loaded")

    monkeypatch.setattr("pah_edge.workstation.trainer.load_tasks", load_tasks)
    result = CliRunner().invoke(app, ["train", str(two_tasks), *TINY, "--epochs", "2", "--out", str(out), "--resume"])
    assert result.exit_code == 1 and "epochs" in result.output, result.output


def test_a_run_from_before_an_option_existed_resumes_with_its_default(two_tasks, tmp_path):
    import torch

    out = tmp_path / "run"
    args = ["train", str(two_tasks), *TINY, "--epochs", "1", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["config"]["train"]["cache_features"]  # added on 2026-12-02
    torch.save(state, out / "checkpoint.pt")
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output


def test_a_run_from_before_the_area_resize_rule_resumes_with_its_own(two_tasks, tmp_path):
    import torch

    out = tmp_path / "run"
    args = ["train", str(two_tasks), *TINY, "--epochs", "1", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["preprocess"]["resize"] == "area_shorter_center_crop"
    state["preprocess"]["resize"] = "resize_shorter_center_crop"  # the rule before 2026-12-02
    torch.save(state, out / "checkpoint.pt")
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["preprocess"]["resize"] == "resize_shorter_center_crop"
    assert json.loads((out / "config.json").read_text())["preprocess"]["resize"] == "resize_shorter_center_crop"


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_metrics(tmp_path, mnist_digits):
    data = _digit_tasks(tmp_path, mnist_digits)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "pah_edge.cli", "train", str(data), *TINY, "--epochs", "3", "--batch-size", "16",
           # A few dozen steps per task: larger steps than the defaults, so learning shows within them.
           "--lr", "0.01", "--backbone-lr", "0.001", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(row) for row in metrics["acc_matrix"]] == [1, 2, 3]
    assert metrics["acc_matrix"][0][0] > 0.8  # the first pair of digits, learned across two processes; chance 0.5


def test_a_frozen_backbone_from_given_weights_keeps_its_batchnorm_statistics(two_tasks, tmp_path):
    """backbone_lr 0 with --weights: neither training nor the first-task recalibration moves BatchNorm."""
    import torch

    from pah_edge.workstation.backbones import create_backbone
    from pah_edge.workstation.checkpoint import load_checkpoint

    backbone = create_backbone("tiny_cnn", image_size=28)
    generator = torch.Generator().manual_seed(0)
    for name, buffer in backbone.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    torch.save(backbone.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(two_tasks), *TINY, "--epochs", "1", "--weights", str(tmp_path / "w.pt"),
                                      "--backbone-lr", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    trained = load_checkpoint(out / "checkpoint.pt")["model"]
    for name, value in backbone.state_dict().items():
        assert torch.equal(trained[f"backbone.{name}"], value), name


def _frozen_run(folder, weights, out, *, cache_features: bool) -> dict:
    """tiny_cnn frozen from ``weights``, 5 epochs per task; the metrics and the checkpoint's model state."""
    from pah_edge.workstation.checkpoint import load_checkpoint
    from pah_edge.workstation.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from pah_edge.workstation.trainer import run_training

    cfg = RunConfig(data=DataConfig(folder=str(folder)),
                    model=ModelConfig(backbone="tiny_cnn", image_size=28, prototype_size=8, weights=str(weights)),
                    train=TrainConfig(epochs=5, lr=0.05, backbone_lr=0.0, seed=1, cache_features=cache_features))
    metrics = run_training(cfg, out, show_progress=False)
    return {"metrics": metrics, "model": load_checkpoint(out / "checkpoint.pt")["model"]}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    import torch

    from pah_edge.workstation.backbones import create_backbone

    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(create_backbone("tiny_cnn", image_size=28).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def uncached_run(two_tasks, tiny_weights, tmp_path_factory):
    return _frozen_run(two_tasks, tiny_weights, tmp_path_factory.mktemp("uncached") / "run", cache_features=False)


@pytest.mark.parametrize("memory_mapped", [False, True])
def test_cached_features_train_as_the_backbone_on_every_batch_does(two_tasks, tiny_weights, uncached_run, tmp_path,
                                                                     monkeypatch, memory_mapped):
    """A frozen backbone's features computed once give the same run as the backbone on every batch:
    both tasks (the second with logit and prototype distillation), up to float rounding."""
    import numpy as np
    import torch

    from pah_edge.workstation import trainer

    mapped, open_memmap = [], np.lib.format.open_memmap

    def recording_open_memmap(path, **kwargs):
        mapped.append(path)
        return open_memmap(path, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", recording_open_memmap)
    if memory_mapped:
        monkeypatch.setattr(trainer, "FEATURES_IN_MEMORY_MAX", 0)
    out = tmp_path / "run"
    cached = _frozen_run(two_tasks, tiny_weights, out, cache_features=True)

    assert len(mapped) == (6 if memory_mapped else 0)  # train, val and test of each task
    assert not any(p.exists() for p in mapped) and not list(out.glob(".features-*"))  # deleted after the run
    accuracies = [sum(run["metrics"]["acc_matrix"], run["metrics"]["val_acc"]) for run in (cached, uncached_run)]
    assert accuracies[1][0] > 0.45  # task a learned (chance 1/3), so the runs compare real training
    # A rounding tie may flip one image of a set (>= 24 images: 0.042); the runs agreed exactly when measured.
    np.testing.assert_allclose(*accuracies, atol=0.043)
    learned = [k for k in uncached_run["model"] if not k.startswith("backbone.")]
    assert any(k.startswith("task_params.1") for k in learned) and any(k.startswith("generator.") for k in learned)
    for name, value in uncached_run["model"].items():
        if name.startswith("backbone."):
            assert torch.equal(cached["model"][name], value), name
        else:
            torch.testing.assert_close(cached["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
