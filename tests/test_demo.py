"""`pah-edge demo`: every stage on a tiny backbone (the real one runs in test_readme's slow test)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pah_edge.demo as demo
from pah_edge.bundle import Bundle
from pah_edge.cli import app
from pah_edge.workstation.data.benchmarks import FASHION_MNIST_DIR


@pytest.fixture
def tiny_demo(monkeypatch):
    """The demo with tiny_cnn at 28 px: the same stages in seconds."""
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"needs Fashion-MNIST in {FASHION_MNIST_DIR} (apt-get install -y dataset-fashion-mnist)")
    monkeypatch.setattr(demo, "BACKBONE", "tiny_cnn")
    monkeypatch.setattr(demo, "IMAGE_SIZE", 28)
    monkeypatch.setattr(demo, "PRETRAINED", False)


def test_every_stage_runs_and_the_summary_adds_up(tiny_demo, tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--limit-per-class", "10", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"]["tasks"] == 5 and summary["export"]["parity_ok"] and summary["old_tasks_unchanged"]
    assert summary["new_task"]["classes"] == 10 and 0 <= summary["new_task"]["val_accuracy"] <= 1
    held = 10 * demo.HELD_OUT_PER_CLASS
    assert {k: v["images"] for k, v in summary["held_out"].items()} == {
        "digits_with_task": held, "fashion_with_task": held, "digits_task_free": held, "fashion_task_free": held,
        "digits_nearest_class_mean": held}
    assert len(summary["examples"]) == 6 and len({e["path"].split("/")[-2] for e in summary["examples"]}) == 6
    assert set(summary["unknown_rate"]) == {"digits", "fashion"}
    assert all(0 <= rate <= 1 for rate in summary["unknown_rate"].values())
    assert list(summary["seconds"]) == ["images", "train", "export", "learn", "predict", "total"]
    for text in ("export: parity with PyTorch OK", "new task 'digits' learned", "held-out clothes, their task given",
                 "examples (task-free):", "called unknown: digits", "seconds per stage: images"):
        assert text in result.stdout, text
    tasks = Bundle.open(out / "bundle").tasks()
    assert [t.name for t in tasks][-1] == "digits" and len(tasks) == 6
    assert len(list((out / "new_images").glob("*/*.png"))) == 10 * demo.NEW_PER_CLASS
    assert sum(summary["new_task"]["images"].values()) == 10 * demo.NEW_PER_CLASS
    assert summary["new_task"]["bytes_stored"] > 0 and summary["new_task"]["stats_bytes_stored"] > 0
    assert len(list((out / "held_out").glob("*/*/*.png"))) == 2 * held


def test_a_non_empty_out_needs_force_which_removes_only_the_demos_outputs(tmp_path):
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    (out / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 1 and "pass --force" in result.stderr
    assert (out / "run").is_dir()
    demo._prepare_out(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    file = tmp_path / "file"
    file.write_text("")
    result = CliRunner().invoke(app, ["demo", "--out", str(file)])
    assert result.exit_code == 1 and "is a file" in result.stderr
    assert not Path(file).read_text()
