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


def _train_args(out: Path) -> list[str]:
    """The main job's `pah-edge train ...` arguments (without `pah-edge`), with --out replaced by ``out``."""
    [train] = [s for s in _steps(_block_after(MAIN_JOB)) if s.startswith("pah-edge train")]
    args = shlex.split(train)[1:]
    i = args.index("--out")
    return [*args[: i + 1], str(out), *args[i + 2 :]]


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
    """Parse the README's train command with the real CLI, stopping before training."""
    import pah_edge.trainer

    seen = {}

    def fake_run_training(cfg, out, **kwargs):
        seen.update(cfg=cfg, out=out)
        return {"average_accuracy": 0.0, "forgetting": 0.0, "bwt": 0.0}

    monkeypatch.setattr(pah_edge.trainer, "run_training", fake_run_training)
    result = CliRunner().invoke(app, _train_args(tmp_path / "quick"))
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert seen["out"] == tmp_path / "quick"
    assert cfg.data.benchmark == "split-fashion-mnist"  # the prose: "5 Split-Fashion-MNIST tasks"
    assert cfg.model.backbone == "mobilenet_v3_small"
    args = shlex.split(next(s for s in _steps(_block_after(MAIN_JOB)) if s.startswith("pah-edge train")))
    assert args[args.index("--out") + 1] == "runs/quick"  # the prose: "writes metrics and plots to `runs/quick/`"


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path):
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"needs Fashion-MNIST in {FASHION_MNIST} (apt-get install -y dataset-fashion-mnist)")
    out = tmp_path / "quick"
    result = subprocess.run([sys.executable, "-m", "pah_edge.cli", *_train_args(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"acc_matrix", "average_accuracy", "forgetting", "bwt"} <= set(metrics)
    acc = metrics["acc_matrix"]
    assert [len(row) for row in acc] == [1, 2, 3, 4, 5]  # the prose: 5 tasks
    assert all(0 <= a <= 1 for row in acc for a in row)
    assert 0.5 < metrics["average_accuracy"] <= 1  # 2 classes per task: chance is 0.5
    for name in ("accuracy_matrix.png", "prototypes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
