"""Storage faults while a command changes a bundle: one line, exit 1, the bundle as it was, no temporary files.

A file-size limit (RLIMIT_FSIZE, which any user may lower for a child process) stands in for a full
disk: both make write() fail part-way (EFBIG, ENOSPC) through the same code paths.
"""

import errno
import resource
import shutil
import subprocess
import sys

import pytest
import typer
from conftest import file_tree, write_image_folder
from tiny_bundle import make_tiny_bundle

from pah_edge.atomic import atomic_write_bytes
from pah_edge.cli_support import user_errors
from pah_edge.errors import StorageError

LIMIT_BYTES = 64  # below every file a task change writes (registry JSON, npz files)


@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits):
    root = tmp_path_factory.mktemp("storage")
    new_task = write_image_folder(root / "new", mnist_digits, {"pairs": [1, 7]}, per_class=12) / "pairs"
    return make_tiny_bundle(root, mnist_digits), new_task


@pytest.fixture
def bundle_dir(made, tmp_path):
    return shutil.copytree(made[0], tmp_path / "bundle")



def _limited_cli(*args, limit=LIMIT_BYTES):
    """``pah-edge ARGS`` in a child process that may write files of at most ``limit`` bytes."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "pah_edge.cli", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit_file_size, timeout=300)


@pytest.mark.parametrize("command", [
    ("learn-task", "{new}", "--bundle", "{bundle}", "--runtime", "onnxruntime-cpu", "--no-progress"),
    ("tasks", "remove", "a", "--bundle", "{bundle}"),
    ("tasks", "rename", "a", "first", "--bundle", "{bundle}"),
])
def test_a_write_that_fails_leaves_the_bundle_as_it_was(bundle_dir, made, command):
    before = file_tree(bundle_dir)
    args = [part.format(new=made[1], bundle=bundle_dir) for part in command]
    result = _limited_cli(*args)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "could not write" in line and "ulimit -f" in line and "run the command again" in line
    after = file_tree(bundle_dir)
    assert {k: v for k, v in after.items() if k != ".lock"} == before  # learn-task creates the empty lock file
    assert after.get(".lock", b"") == b""
    assert not [p for p in bundle_dir.rglob("*") if p.name.endswith(".tmp")]


def test_the_same_commands_succeed_once_the_storage_allows(bundle_dir, made):
    result = _limited_cli("learn-task", made[1], "--bundle", bundle_dir, "--runtime", "onnxruntime-cpu",
                          "--no-progress", limit=resource.RLIM_INFINITY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pairs" in (bundle_dir / "tasks" / "registry.json").read_text()


def test_atomic_write_names_the_fix_for_each_fault(tmp_path, monkeypatch):
    target = tmp_path / "file.json"
    target.write_bytes(b"old")
    for code, fix in [(errno.ENOSPC, "free space"), (errno.EROFS, f"make {tmp_path} writable"),
                      (errno.EIO, "storage device")]:
        def failing_fsync(fd, code=code):
            raise OSError(code, "injected")

        monkeypatch.setattr("os.fsync", failing_fsync)
        with pytest.raises(StorageError, match=fix):
            atomic_write_bytes(target, b"new")
        assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]


@pytest.mark.parametrize(("code", "expected"), [
    (errno.EACCES, "could not read or write /data/bundle/manifest.json (injected): check you may read it and write "
                   "to /data/bundle, then run the command again"),
    (errno.EIO, "could not read or write /data/bundle/manifest.json (injected): check the storage device"),
    (errno.ENOSPC, "could not write /data/bundle/manifest.json (injected): free space on its file system"),
])
def test_a_fault_outside_the_bundles_writes_is_called_a_write_only_when_it_must_be_one(capsys, code, expected):
    # Root reads any file whatever its mode, so the denied read is injected as the OSError it raises.
    @user_errors
    def command():
        raise OSError(code, "injected", "/data/bundle/manifest.json")

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {expected}"), line
