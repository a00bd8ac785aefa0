"""Fuzzed image files (hypothesis): truncated and mangled PNG/JPEG/BMP bytes, empty files, headers that
claim absurd sizes, and odd modes. Decoding either gives the network's input or refuses with DataError,
quickly and without allocating what a header claims; learn-task, predict and calibrate skip and count
what they cannot read, and never show a traceback."""

import io
import logging
import re
import shutil
import struct
import time
import zlib

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, write_image_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_bundle import make_tiny_bundle

from pah_edge.bundle import Bundle
from pah_edge.calibration.calibrate import calibrate_bundle
from pah_edge.calibration.quantize import QuantizeOptions
from pah_edge.device.learner import learn_task
from pah_edge.device.predict import Predictor
from pah_edge.errors import DataError
from pah_edge.preprocess import MAX_IMAGE_PIXELS, Preprocess, load_image

PRE = Preprocess(image_size=28)
FORMATS = {"png": "PNG", "jpg": "JPEG", "bmp": "BMP"}
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _encode(mode: str, fmt: str, seed: int = 0) -> bytes:
    """A real 20 x 14 image of ``mode`` saved as ``fmt`` (where Pillow writes that mode)."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (14, 20, 3), dtype=np.uint8))
    options = {}
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (14, 20), dtype=np.uint16))
    elif mode == "P+transparency":
        image, options = rgb.convert("P"), {"transparency": 0}
    elif mode == "EXIF-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees
        image, options = rgb, {"exif": exif}
    else:
        image = rgb.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# Every mode each format stores: gray, RGB, alpha, palette, 16-bit, CMYK, 1-bit, EXIF orientation.
ODD = [("png", m) for m in ("L", "RGB", "RGBA", "LA", "P+transparency", "I;16", "1")] + \
      [("jpg", m) for m in ("L", "RGB", "CMYK", "EXIF-rotated")] + [("bmp", m) for m in ("L", "RGB", "RGBA", "P", "1")]


@st.composite
def mangled(draw):
    """(suffix, bytes): a real image file, then truncated, bit-flipped, spliced or emptied."""
    suffix, mode = draw(st.sampled_from(ODD))
    data = bytearray(_encode(mode, FORMATS[suffix], draw(st.integers(0, 3))))
    how = draw(st.sampled_from(["intact", "truncate", "flip", "splice", "empty"]))
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    elif how == "empty":
        data = bytearray()
    return suffix, bytes(data)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, followed by one tiny compressed row."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encode("RGB", "BMP"))
    data[18:26] = struct.pack("<ii", width, height)  # BITMAPINFOHEADER: width, height
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encode("RGB", "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


CLAIMING = {"png": _png_claiming, "bmp": _bmp_claiming, "jpg": _jpeg_claiming}
SIDE = {"png": 2**31 - 1, "bmp": 2**31 - 1, "jpg": 65535}  # the largest side each header can state


@settings(max_examples=250, **FAST)
@given(case=mangled())
def test_decoding_any_mangled_file_gives_the_input_or_a_data_error(case, tmp_path):
    suffix, data = case
    file = tmp_path / f"x.{suffix}"
    file.write_bytes(data)
    try:
        pixels = load_image(file, PRE)
    except DataError as exc:
        assert str(file) in str(exc)
    else:
        assert pixels.dtype == np.uint8 and pixels.shape == (28, 28, 3)


@settings(max_examples=60, **FAST)
@given(suffix=st.sampled_from(sorted(CLAIMING)), data=st.data())
def test_a_header_claiming_an_absurd_size_is_refused_at_once(suffix, data, tmp_path):
    side = SIDE[suffix]
    width = data.draw(st.integers(MAX_IMAGE_PIXELS // side + 1, side), label="width")
    height = data.draw(st.integers(MAX_IMAGE_PIXELS // width + 1, side), label="height")
    file = tmp_path / f"bomb.{suffix}"
    file.write_bytes(CLAIMING[suffix](width, height))
    start = time.perf_counter()
    with pytest.raises(DataError, match="too large|megapixels|cannot read"):
        load_image(file, PRE)
    assert time.perf_counter() - start < 1.0  # refused from the header: nothing of that size is decoded


def test_a_100000_by_100000_png_names_its_size_and_the_limit(tmp_path):
    file = tmp_path / "bomb.png"
    file.write_bytes(_png_claiming(100_000, 100_000))
    with pytest.raises(DataError, match="too large to decode safely|above the limit"):
        load_image(file, PRE)


@pytest.mark.parametrize("suffix, mode", ODD)
def test_every_odd_mode_decodes(tmp_path, suffix, mode):
    file = tmp_path / f"x.{suffix}"
    file.write_bytes(_encode(mode, FORMATS[suffix]))
    assert load_image(file, PRE).shape == (28, 28, 3)


# --- the commands, on the tiny bundle ------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits):
    root = tmp_path_factory.mktemp("fuzz")
    return make_tiny_bundle(root, mnist_digits), mnist_digits


def _unreadable(path) -> bool:
    try:
        load_image(path, PRE)
    except DataError:
        return True
    return False


def _plant(folder, cases):
    """Write the fuzzed ``cases`` and one empty file into ``folder``; (files written, how many cannot be read)."""
    cases = [*cases, ("jpg", b"")]
    for i, (suffix, data) in enumerate(cases):
        (folder / f"fuzz{i}.{suffix}").write_bytes(data)
    return len(cases), sum(_unreadable(folder / f"fuzz{i}.{suffix}") for i, (suffix, _) in enumerate(cases))


def _logged(caplog, call):
    """``call()``'s result and the warnings it logged about unreadable images."""
    with caplog.at_level(logging.WARNING, "pah_edge"):
        caplog.clear()
        result = call()
    return result, [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]


def _fuzzed_classes(root, digits, cases):
    """Digits 0 and 5, 8 of each, with ``cases`` planted among the 0s; (folder, files planted, unreadable)."""
    folder = write_image_folder(root, digits, {"t": [0, 5]}, per_class=8) / "t"
    return (folder, *_plant(folder / "digit0", cases))


@settings(max_examples=6, **FAST)
@given(cases=st.lists(mangled(), min_size=1, max_size=6))
def test_learn_task_skips_and_counts_every_unreadable_file(made, tmp_path_factory, caplog, cases):
    root = tmp_path_factory.mktemp("learn")
    folder, planted, unreadable = _fuzzed_classes(root, made[1], cases)
    bundle = Bundle.open(shutil.copytree(made[0], root / "bundle"))
    report, warned = _logged(caplog, lambda: learn_task(bundle, folder, runtime="onnxruntime-cpu", progress=False,
                                                        max_steps=5))
    assert report.skipped == unreadable
    assert report.images["train"] + report.images["val"] == 16 + planted - unreadable
    assert warned[0].startswith(f"skipped {unreadable} unreadable"), warned


@settings(max_examples=8, **FAST)
@given(cases=st.lists(mangled(), min_size=1, max_size=8))
def test_predict_skips_and_counts_every_unreadable_file(made, tmp_path_factory, caplog, cases):
    bundle_src, digits = made
    folder = tmp_path_factory.mktemp("predict")
    Image.fromarray(digits[0][0]).save(folder / "good.png")
    planted, unreadable = _plant(folder, cases)
    with Predictor(Bundle.open(bundle_src), runtime="onnxruntime-cpu") as predictor:
        results, warned = _logged(caplog, lambda: predictor.predict([folder]))
    assert len(results) == 1 + planted - unreadable
    assert re.match(rf"skipped {unreadable} unreadable image\(s\) .* of {1 + planted}:", warned[0]), warned


@settings(max_examples=4, **FAST)
@given(cases=st.lists(mangled(), min_size=1, max_size=5))
def test_the_cli_predict_is_one_line_when_nothing_is_readable_and_never_a_traceback(made, tmp_path_factory, cases):
    folder = tmp_path_factory.mktemp("cli")
    planted, unreadable = _plant(folder, cases)
    result = run_cli("predict", folder, "--bundle", made[0], "--runtime", "onnxruntime-cpu")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if unreadable == planted:
        assert_one_line_error(result, "could be read")
    else:
        assert result.exit_code == 0 and len(result.stdout.splitlines()) == planted - unreadable


@settings(max_examples=3, **FAST)
@given(cases=st.lists(mangled(), min_size=2, max_size=6))
def test_calibrate_skips_and_counts_unreadable_images(made, tmp_path_factory, caplog, cases):
    root = tmp_path_factory.mktemp("calibrate")
    images, planted, unreadable = _fuzzed_classes(root, made[1], cases)
    readable = 16 + planted - unreadable  # as many samples: calibration must read every file
    bundle_dir = shutil.copytree(made[0], root / "bundle")
    record, warned = _logged(caplog, lambda: calibrate_bundle(
        bundle_dir, images, options=QuantizeOptions(target="onnxruntime"), samples=readable, latency_runs=1,
        progress=False))
    assert record.passed and record.options["samples"] == readable
    assert warned[0].startswith(f"skipped {unreadable} unreadable"), warned
