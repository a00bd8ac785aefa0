"""`pah-edge train` on bad input: one `error:` line that names the fix, exit code 1, no traceback, nothing lost.

Every case runs the real entry point in a subprocess (``python -m pah_edge.cli``, i.e. ``main()``,
which also maps Click's usage-error code 2 to 1) from the repository root, so the checkout's code is
what runs. The console is a non-TTY of 80 columns: an error must stay on one line even there, because
logs and CI output are read line by line. The error cases fail before any training and take about
3 s each (mostly importing torch).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, file_tree, run_cli_process, write_image_folder

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "tiny_cnn", "--image-size", "28", "--no-progress", "--prototype-size", "8", "--epochs", "1"]
TIMEOUT = 300  # s; generous for a loaded 2-core machine, the cases take seconds




@pytest.fixture(scope="module")
def two_classes(tmp_path_factory, mnist_digits):
    """ROOT/<class>/*.png: one task of 2 classes x 12 real digits."""
    root = tmp_path_factory.mktemp("two_classes")
    return write_image_folder(root, mnist_digits, {"task": [0, 1]}, per_class=12) / "task"



# --- 1-3: image folders that cannot make a task ------------------------------------------------------


def test_empty_folder(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    out = tmp_path / "run"
    message = assert_one_line_error(run_cli_process("train", root, *TINY, "--out", out), "ROOT/<class>", "ROOT/<task>/<class>")
    assert str(root) in message
    assert not out.exists(), "a failed run must not leave a run directory behind"


def test_task_with_one_class(tmp_path, mnist_digits):
    root = write_image_folder(tmp_path / "data", mnist_digits, {"only": [3]}, per_class=10) / "only"
    out = tmp_path / "run"
    message = assert_one_line_error(run_cli_process("train", root, *TINY, "--out", out), "at least 2 class folders")
    assert "digit3" in message
    assert not out.exists()


def test_one_class_task_among_several_is_named(tmp_path, mnist_digits):
    root = write_image_folder(tmp_path / "data", mnist_digits, {"a": [0, 1], "b": [2]}, per_class=10)
    out = tmp_path / "run"
    assert_one_line_error(run_cli_process("train", root, *TINY, "--out", out), "'b'", "at least 2 class folders")
    assert not out.exists()


@pytest.mark.parametrize("layout", ["one task", "several tasks"])
def test_class_folder_without_images(tmp_path, mnist_digits, layout):
    data = write_image_folder(tmp_path / "data", mnist_digits, {"t": [0, 1]}, per_class=10)
    empty = data / "t" / "digit9"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    root = data / "t" if layout == "one task" else data
    out = tmp_path / "run"
    message = assert_one_line_error(run_cli_process("train", root, *TINY, "--out", out), "digit9", ".png", "remove the folder")
    assert "no images" in message
    assert not out.exists()


# --- 4: unreadable images are skipped, with a counted warning --------------------------------------------


def test_corrupt_images_are_skipped_with_a_counted_warning(tmp_path, mnist_digits):
    root = write_image_folder(tmp_path / "data", mnist_digits, {"t": [0, 1]}, per_class=12) / "t"
    (root / "digit0" / "garbage.png").write_bytes(b"this is not a png" * 20)
    good = (root / "digit1" / "0.png").read_bytes()
    (root / "digit1" / "truncated.png").write_bytes(good[: len(good) // 2])
    before = file_tree(root)
    out = tmp_path / "run"

    result = run_cli_process("train", root, *TINY, "--out", out)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output
    warning = " ".join(result.stderr.split())  # Rich's log handler wraps long records at 80 columns
    assert "skipped 2 unreadable image(s) in task 't'" in warning, result.stderr
    assert "digit0/garbage.png" in warning and "digit1/truncated.png" in warning
    assert (out / "metrics.json").is_file()
    assert file_tree(root) == before, "the user's images must be left exactly as they were"


def test_too_few_readable_images_left_is_an_error(tmp_path, mnist_digits):
    root = write_image_folder(tmp_path / "data", mnist_digits, {"t": [0, 1]}, per_class=12) / "t"
    for extra in (root / "digit0").glob("*.png"):
        if extra.name not in ("0.png", "1.png"):
            extra.unlink()
    (root / "digit0" / "garbage.png").write_bytes(b"garbage")  # 3 files, only 2 decode
    out = tmp_path / "run"
    result = run_cli_process("train", root, *TINY, "--out", out)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr  # the skip warning may come first
    assert "digit0" in errors[0] and "at least 3" in errors[0] and "unreadable" in errors[0]
    assert not out.exists()


# --- 5-7, 9: options that name something that is not there ----------------------------------------------


def test_unknown_backbone_lists_the_valid_names(tmp_path, two_classes):
    out = tmp_path / "run"
    assert_one_line_error(run_cli_process("train", two_classes, "--backbone", "nope", "--out", out),
                           "'nope'", "mobilenet_v3_small", "resnet18", "tiny_cnn")
    assert not out.exists()


def test_missing_benchmark_data_dir(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nonexistent"
    message = assert_one_line_error(
        run_cli_process("train", "--benchmark", "split-fashion-mnist", "--data-dir", missing, *TINY, "--out", out),
        "--data-dir", "apt-get install -y dataset-fashion-mnist",
    )
    assert str(missing) in message
    assert not out.exists()


def test_missing_image_folder(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-folder"
    message = assert_one_line_error(run_cli_process("train", missing, *TINY, "--out", out), "does not exist", "ROOT/<class>")
    assert str(missing) in message
    assert not out.exists()


def test_unknown_benchmark_lists_the_valid_names(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(run_cli_process("train", "--benchmark", "nope", *TINY, "--out", out),
                           "'nope'", "split-fashion-mnist", "mnist-5k", "split-cifar100", "tiny-imagenet")
    assert not out.exists()


def test_neither_folder_nor_benchmark(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(run_cli_process("train", *TINY, "--out", out), "--benchmark")
    assert not out.exists()


def test_unknown_option_is_a_usage_error_with_code_1(tmp_path):
    out = tmp_path / "run"
    result = run_cli_process("train", "--nope", "--out", out)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output  # Click's own code would be 2
    assert "Traceback" not in output
    assert "--nope" in result.stderr and "--help" in result.stderr
    assert not out.exists()


def test_unknown_option_is_one_error_line(tmp_path):
    assert_one_line_error(run_cli_process("train", "--nope", "--out", tmp_path / "run"), "--nope", "--help")


def test_missing_weights_file(tmp_path, two_classes):
    out = tmp_path / "run"
    assert_one_line_error(run_cli_process("train", two_classes, *TINY, "--weights", "/missing.pt", "--out", out),
                           "'/missing.pt'", "not found", "--weights PATH")
    assert not out.exists()


def test_weights_file_that_is_not_a_state_dict(tmp_path, two_classes):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not a torch file")
    out = tmp_path / "run"
    assert_one_line_error(run_cli_process("train", two_classes, *TINY, "--weights", weights, "--out", out),
                           str(weights), "torch.save(model.state_dict())")
    assert not out.exists()


def test_pretrained_torchvision_backbone_without_cached_weights(tmp_path, two_classes, monkeypatch):
    """An empty torch cache: one line with the file to fetch and where to put it, never a download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # a download attempt would fail at once, not hang
    out = tmp_path / "run"
    assert_one_line_error(run_cli_process("train", two_classes, "--backbone", "mobilenet_v3_small", "--pretrained", "--image-size", "32",
                                "--no-progress", "--epochs", "1", "--out", out),
                           "mobilenet_v3_small", "https://download.pytorch.org/models/mobilenet_v3_small-",
                           str(tmp_path / "torch" / "hub" / "checkpoints"), "--weights PATH")
    assert not out.exists() and not (tmp_path / "torch").exists()


# --- 8: help --------------------------------------------------------------------------------------------


def test_help():
    result = run_cli_process("--help")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_train_help():
    result = run_cli_process("train", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--benchmark", "--backbone", "--out", "--resume", "--weights"):
        assert option in result.stdout, option


def test_console_script_is_pah_edge_cli_main():
    """The README's `pah-edge` is the `main()` these tests run through `python -m pah_edge.cli`."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"pah-edge": "pah_edge.cli:main"}


@pytest.mark.parametrize("given, expected", [(None, "1"), ("2", str(min(2, os.cpu_count() or 1)))])
def test_the_cli_runs_numpy_on_one_blas_thread_unless_told_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    pytest.importorskip("threadpoolctl", reason="reads the BLAS thread count numpy's OpenBLAS uses")
    code = ("import pah_edge.cli, threadpoolctl; "
            "print(*[i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.split() == [expected], result.stderr[-500:]  # set before numpy loaded its BLAS
