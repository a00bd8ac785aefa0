"""The README's two fresh-machine commands: where CI finds them, and that the main job really runs.

The fenced block right after `<!-- test-command -->` is what `.ci/run` executes; the one right after
`<!-- main-job -->` installs and runs the main job. Both are single shell lines of `&&`-joined steps.
"""

import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pah_edge.cli import app
from pah_edge.errors import PahEdgeError

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAIN_JOB, TEST_COMMAND = "<!-- main-job -->", "<!-- test-command -->"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _block_after(marker: str) -> str:
    """The fenced code block on the lines right after ``marker`` (without its fences)."""
    lines = README.read_text().splitlines()
    start = lines.index(marker) + 1
    assert lines[start].startswith("```"), f"no fenced block right after {marker}"
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[start + 1 : end])


def _steps(command: str) -> list[str]:
    return [step.strip() for step in command.split("&&")]


def _main_job_args() -> list[str]:
    """The main job's `pah-edge ...` arguments (without `pah-edge`): its last step."""
    last = _steps(_block_after(MAIN_JOB))[-1]
    assert last.startswith("pah-edge "), f"the main job must end with a pah-edge command, not {last!r}"
    return shlex.split(last)[1:]


@pytest.mark.parametrize("marker", [MAIN_JOB, TEST_COMMAND])
def test_marker_appears_once_before_a_one_line_command(marker):
    assert README.read_text().count(marker) == 1
    block = _block_after(marker)
    assert block.strip() and "\n" not in block.strip(), f"the block after {marker} must be one command line"


def test_ci_extracts_exactly_the_readme_test_command():
    """Run the awk line from .ci/run itself, so a change to either side that breaks CI fails here."""
    [line] = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip().startswith("cmd=$(awk")]
    assert line.endswith(")")
    awk = line[len("cmd=$(") : -1]
    result = subprocess.run(["bash", "-c", awk], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.rstrip("\n") == _block_after(TEST_COMMAND)


def test_test_command_runs_pytest_with_the_dev_extra():
    steps = _steps(_block_after(TEST_COMMAND))
    assert steps[-1] == "python -m pytest"
    assert any("-e" in s and "dev" in s for s in steps[:-1]), "the install step must add the [dev] extra (pytest)"


@pytest.mark.parametrize("marker", [MAIN_JOB, TEST_COMMAND])
def test_installed_extras_and_pins_exist(marker):
    """Every extra the commands install is declared, and `pkg==X` pins match what this environment tests."""
    command = _block_after(marker)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extras = [e for group in re.findall(r'-e "\.\[([^\]]*)\]"', command) for e in group.split(",")]
    assert extras, command
    assert set(extras) <= set(declared), f"undeclared extras {set(extras) - set(declared)}"
    for name, version in re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", command):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        assert installed.split("+")[0] == version, f"README pins {name}=={version}; tests run with {installed}"


def test_main_job_options_are_accepted_by_the_cli(monkeypatch, tmp_path):
    """Parse the README's demo command with the real CLI, stopping before any work."""
    import pah_edge.demo

    seen = {}

    def fake_run_demo(out, **kwargs):
        seen.update(out=out, **kwargs)
        raise PahEdgeError("stopped before the work")

    monkeypatch.setattr(pah_edge.demo, "run_demo", fake_run_demo)
    result = CliRunner().invoke(app, _main_job_args())
    assert result.exit_code == 1 and "stopped before the work" in result.output, result.output
    assert _main_job_args()[0] == "demo"
    assert seen["out"] == Path("demo")  # the prose: "demo/new_images/", "demo/summary.json"
    assert seen["epochs"] == 3 and seen["limit_per_class"] == 200  # the prose: "about 2 minutes on 2 CPU cores"
    assert pah_edge.demo.BACKBONE == "efficientnet_lite0" and pah_edge.demo.PRETRAINED  # the prose: "ImageNet"
    assert pah_edge.demo.RUNTIME == "onnxruntime-cpu"


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path):
    """The real demo, in a subprocess, into tmp_path: every stage runs and the bundle gains the new task."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"needs Fashion-MNIST in {FASHION_MNIST} (apt-get install -y dataset-fashion-mnist)")
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "pah_edge.cli", *_main_job_args(), "--out", str(out), "--no-progress"],
                            cwd=REPO, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    for text in ("base PAH (efficientnet_lite0, ImageNet, frozen, 144 px; 5 Split-Fashion-MNIST tasks): average accuracy",
                 "export: parity with PyTorch OK", "new task 'digits' learned", "old tasks unchanged: yes",
                 "examples (task-free):", "called unknown:", "seconds per stage: images"):
        assert text in result.stdout, text
    summary = json.loads((out / "summary.json").read_text())
    assert [len(row) for row in json.loads((out / "run" / "metrics.json").read_text())["acc_matrix"]] == [1, 2, 3, 4, 5]
    # The README's numbers (98 % base; digits 88.5 % task given, 89.5 % task-free; clothes 86.5 %
    # task-free), with room for other CPUs' float rounding. Chance: 50 % per base task, 10 % per
    # digit, 5 % over the 20 classes task-free.
    assert summary["base"]["average_accuracy"] >= 0.95 and summary["base"]["forgetting"] <= 0.02
    held = {key: value["accuracy"] for key, value in summary["held_out"].items()}
    assert held["digits_with_task"] >= 0.8 and held["digits_task_free"] >= 0.75, held
    assert held["fashion_with_task"] >= 0.9 and held["fashion_task_free"] >= 0.75, held
    assert held["digits_with_task"] > held["digits_nearest_class_mean"], held
    assert summary["export"]["parity_ok"] and summary["old_tasks_unchanged"]
    new_task = summary["new_task"]
    assert new_task["classes"] == 10 and new_task["train_accuracy"] >= 0.8
    assert set(summary["seconds"]) == {"images", "train", "export", "learn", "predict", "total"}
    assert len(list((out / "new_images").glob("*/*.png"))) == 10 * 100

    from pah_edge.bundle import Bundle

    tasks = Bundle.open(out / "bundle").tasks()
    assert [t.name for t in tasks] == ["task0", "task1", "task2", "task3", "task4", "digits"]
    assert tasks[-1].source == "device" and tasks[-1].class_names == tuple(str(d) for d in range(10))

    again = subprocess.run([sys.executable, "-m", "pah_edge.cli", "demo", "--out", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "pass --force" in again.stderr and "Traceback" not in again.stderr
