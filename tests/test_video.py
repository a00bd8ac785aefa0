"""`pah-edge predict --video/--camera`: JSON lines per frame from OpenCV, equal to `Device.predict` of the
same decoded frames; sources that cannot be opened, and a missing OpenCV, are one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from tiny_bundle import make_tiny_bundle

from pah_edge import Device

REPO = Path(__file__).resolve().parents[1]
FPS = 10.0


def write_video(path: Path, cv2, *, frames: int, digits: dict | None = None) -> Path:
    """An MJPEG .avi of ``frames`` 64 x 48 colour frames at 10 fps (digits when given, else noise)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (64, 48))
    assert writer.isOpened(), "OpenCV cannot write MJPEG here"
    rng = np.random.default_rng(0)
    for i in range(frames):
        frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        if digits is not None:
            frame[10:38, 18:46] = digits[i % 10][i][:, :, None]  # a digit on noise, BGR-gray
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2", reason="needs OpenCV: pip install 'pah-edge[camera]'")


@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits, cv2):
    root = tmp_path_factory.mktemp("video")
    return make_tiny_bundle(root, mnist_digits), write_video(root / "clip.avi", cv2, frames=7, digits=mnist_digits)


def _decoded(cv2, video: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(video))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    capture.release()
    return frames


def test_every_other_frame_as_json_lines_equal_to_the_api(made, cv2):
    bundle_dir, video = made
    result = run_cli("predict", "--video", video, "--bundle", bundle_dir, "--every", "2", "--runtime",
                     "onnxruntime-cpu")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["frame"] for line in lines] == [0, 2, 4, 6]
    assert [line["time_ms"] for line in lines] == pytest.approx([0, 200, 400, 600])
    assert all(list(line) == ["frame", "time_ms", "task", "label", "confidence", "novelty", "known"] for line in lines)
    frames = _decoded(cv2, video)
    assert len(frames) == 7
    with Device(bundle_dir, runtime="onnxruntime-cpu") as dev:
        expected = [dev.predict(frames[i], bgr=True).to_dict() for i in (0, 2, 4, 6)]
        swapped = dev.predict(frames[2]).to_dict()  # read as RGB: other pixels, so the test can tell
    for line, want in zip(lines, expected):
        assert (line["task"], line["label"], line["known"]) == (want["task"], want["label"], want["known"])
        assert line["confidence"] == pytest.approx(want["confidence"], rel=1e-5)
        assert line["novelty"] == pytest.approx(want["novelty"], rel=1e-5)
    assert swapped["novelty"] != pytest.approx(lines[1]["novelty"], rel=1e-6)


def test_max_frames_and_a_task(made):
    bundle_dir, video = made
    result = run_cli("predict", "--video", video, "--bundle", bundle_dir, "--task", "c", "--max-frames", "3")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["frame"] for line in lines] == [0, 1, 2] and {line["task"] for line in lines} == {"c"}


def test_sources_that_cannot_be_opened_are_one_line_errors(made, tmp_path):
    bundle_dir, video = made
    not_video = tmp_path / "notes.avi"
    not_video.write_text("not a video")
    for args, words in [
        (["--video", tmp_path / "none.mp4"], ["no video file", "none.mp4"]),
        (["--video", not_video], ["cannot open video", "notes.avi", "OpenCV can decode"]),
        (["--video", video, "--every", "0"], ["--every must be 1 or more"]),
        (["--video", video, "--max-frames", "0"], ["--max-frames must be 1 or more"]),
        (["--video", video, "--task", "zz"], ["no task 'zz'"]),
        (["--video", video, "--camera", "0"], ["give one of", "--video and --camera"]),
        ([video.parent, "--video", video], ["IMAGES and --video"]),
        ([], ["give image files or folders, --video FILE or --camera INDEX"]),
    ]:
        assert_one_line_error(run_cli("predict", *args, "--bundle", bundle_dir), *words)


def _stderr_lines(*args, pythonpath: str | None = None) -> list[str]:
    """stderr of the real entry point in a subprocess (OpenCV writes its warnings to file descriptor 2)."""
    path = os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "pah_edge.cli", *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": path, "COLUMNS": "80"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_a_camera_that_cannot_be_opened_is_one_line_without_opencv_warnings(made):
    lines = _stderr_lines("predict", "--camera", "97", "--bundle", made[0])
    assert lines == ["error: cannot open camera 97: check that it is connected and not in use by another program, "
                     "or give another --camera INDEX"]


def test_without_opencv_the_error_names_the_extra(made, tmp_path):
    bundle_dir, video = made
    (tmp_path / "blocker" / "cv2").mkdir(parents=True)
    (tmp_path / "blocker" / "cv2" / "__init__.py").write_text("raise ImportError('cv2 is blocked in this test')\n")
    lines = _stderr_lines("predict", "--video", video, "--bundle", bundle_dir, pythonpath=str(tmp_path / "blocker"))
    assert len(lines) == 1 and lines[0].startswith("error: --video needs OpenCV: pip install 'pah-edge[camera]'")
