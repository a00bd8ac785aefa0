"""Preprocess settings, resizing of every image mode, safe decoding and input normalisation."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from pah_edge import preprocess
from pah_edge.errors import ConfigError, DataError
from pah_edge.workstation.data import load_image_folder
from pah_edge.preprocess import (
    AREA_RESIZE, IMAGENET_MEAN, IMAGENET_STD, LEGACY_RESIZE, Preprocess, frame_image, load_image, resize_image,
    to_input,
)

PRE = Preprocess(image_size=8)


def test_round_trip_through_dict():
    pre = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    d = pre.to_dict()
    assert d == {
        "image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.5, 1.0],
        "resize": AREA_RESIZE,
    }
    assert Preprocess.from_dict(d) == pre
    legacy = Preprocess(image_size=32, resize=LEGACY_RESIZE)  # bundles exported before the area rule
    assert Preprocess.from_dict(legacy.to_dict()) == legacy
    assert Preprocess.from_dict({"image_size": 224}) == Preprocess(image_size=224)
    assert Preprocess(image_size=8).mean == IMAGENET_MEAN and Preprocess(image_size=8).std == IMAGENET_STD


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 0},
        {"image_size": True},
        {"image_size": 8.0},
        {"image_size": 8, "std": (0.2, 0.0, 0.2)},
        {"image_size": 8, "mean": (0.5, 0.5)},
        {"image_size": 8, "resize": "stretch"},
    ],
)
def test_invalid_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        Preprocess(**kwargs)


@pytest.mark.parametrize("d", [{"image_size": 8, "colour": "rgb"}, {"mean": [0, 0, 0]}, [8]])
def test_from_dict_rejects_unknown_or_missing_keys(d):
    with pytest.raises(ConfigError):
        Preprocess.from_dict(d)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "I", "I;16", "F"])
def test_every_mode_becomes_uint8_rgb(mode):
    out = resize_image(Image.new(mode, (20, 12)), PRE)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8


def test_uniform_colour_survives_resizing_exactly():
    out = resize_image(Image.new("RGB", (37, 23), (10, 200, 77)), PRE)
    assert (out == (10, 200, 77)).all()


def test_gray_gives_three_equal_channels():
    gray = np.arange(30 * 30, dtype=np.uint8).reshape(30, 30)
    out = resize_image(Image.fromarray(gray), PRE)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("size", [(60, 20), (20, 60)])
def test_shorter_side_is_resized_and_centre_cropped(size):
    # Three stripes along the long side: only the middle (green) one survives the crop.
    img = Image.new("RGB", size, (255, 0, 0))
    w, h = size
    middle = (w // 3, 0, 2 * w // 3, h) if w > h else (0, h // 3, w, 2 * h // 3)
    img.paste((0, 255, 0), middle)
    out = resize_image(img, PRE)
    assert (out[1:-1, 1:-1] == (0, 255, 0)).all()


def test_the_area_rule_averages_whole_blocks():
    # 20 x 17 -> 8 x 8: the centre square (17) cut to whole 2 x 2 blocks (16: rows 0-15, columns
    # 2-17), each output pixel its block's rounded mean.
    image = np.random.default_rng(0).integers(0, 256, (17, 20, 3), np.uint8)
    blocks = np.floor(image[:16, 2:18].reshape(8, 2, 8, 2, 3).mean(axis=(1, 3)) + 0.5)
    assert (resize_image(Image.fromarray(image), PRE) == blocks).all()
    # 9 blocks left for 8 pixels: the box filter spreads them, and a flat colour stays exact.
    assert (resize_image(Image.new("RGB", (19, 18), (10, 200, 77)), PRE) == (10, 200, 77)).all()


def test_the_legacy_rule_keeps_its_pixels():
    # A bundle exported before the area rule still gets exactly the one bilinear pass it was trained on.
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (21, 30, 3), np.uint8))
    expected = image.resize((8, 8), Image.Resampling.BILINEAR, box=(4.5, 0, 25.5, 21))
    assert (resize_image(image, Preprocess(image_size=8, resize=LEGACY_RESIZE)) == np.asarray(expected)).all()


SIZES = [(480, 640), (481, 643), (720, 1280), (28, 28), (100, 300), (300, 100), (145, 999), (5, 7)]


@pytest.mark.parametrize("rule", [AREA_RESIZE, LEGACY_RESIZE])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_frames_files_and_the_training_side_give_the_same_pixels(tmp_path, rule, height, width):
    # The device's frames (cropped before Pillow sees them), its PNG files, and the training side's
    # in-memory datasets (resize_image of the array) are one function of the pixels.
    pre = Preprocess(image_size=144, resize=rule)
    rgb = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), np.uint8)
    for frame in (rgb, rgb[:, :, 0]):
        Image.fromarray(frame).save(tmp_path / "frame.png")
        expected = resize_image(Image.fromarray(frame), pre)
        assert expected.shape == (144, 144, 3)
        assert (frame_image(frame, pre) == expected).all()
        assert (load_image(tmp_path / "frame.png", pre) == expected).all()
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    assert (frame_image(bgr, pre, bgr=True) == resize_image(Image.fromarray(rgb), pre)).all()


def test_the_training_loader_gives_the_device_pixels(tmp_path):
    # The workstation's image-folder loader (what a model is trained on) and the device's frames.
    pre = Preprocess(image_size=144)
    rng = np.random.default_rng(0)
    frames = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i, (height, width) in enumerate(SIZES[:5]):
            frames[name, i] = rng.integers(0, 256, (height, width, 3), np.uint8)
            Image.fromarray(frames[name, i]).save(tmp_path / name / f"{i}.png")
    (task,) = load_image_folder(tmp_path, preprocess=pre)
    trained = np.concatenate([task.train.images, task.val.images, task.test.images])
    on_device = np.stack([frame_image(f, pre) for f in frames.values()])
    assert sorted(t.tobytes() for t in trained) == sorted(d.tobytes() for d in on_device)


def test_transparency_is_composited_on_black():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :5, 3] = 255  # left half opaque, right half fully transparent
    out = resize_image(Image.fromarray(rgba, "RGBA"), Preprocess(image_size=10))
    assert (out[:, :4] == (200, 100, 50)).all()
    assert (out[:, 6:] == 0).all()


def test_palette_transparency_is_composited_on_black():
    img = Image.new("P", (10, 10), 1)
    img.putpalette([255, 255, 255, 0, 0, 255] + [0] * 762)
    img.info["transparency"] = 1
    assert (resize_image(img, PRE) == 0).all()


def test_sixteen_bit_images_are_scaled_not_clipped():
    img = Image.fromarray(np.full((10, 10), 32896, np.uint16))  # 128 * 257
    assert img.mode.startswith("I;16")
    assert (resize_image(img, PRE) == 128).all()


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "PNG"), ("RGB", "JPEG"), ("RGB", "BMP"), ("RGBA", "PNG"), ("P", "PNG")]
)
def test_load_image_reads_files(tmp_path, mode, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new(mode, (30, 20), 120 if mode in ("L", "P") else (120, 60, 30, 255)[: len(mode)]).save(path, fmt)
    out = load_image(path, PRE)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8


def test_big_jpeg_decodes_at_reduced_scale_with_the_same_colours(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (30, 140, 220)).save(path, quality=95)
    out = load_image(path, PRE).astype(int)
    assert np.abs(out - (30, 140, 220)).max() <= 3


def test_load_image_accepts_file_objects():
    buf = io.BytesIO()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(buf, "PNG")
    buf.seek(0)
    assert (load_image(buf, PRE) == (1, 2, 3)).all()


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_files_are_data_errors_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match="broken.png"):
        load_image(path, PRE)


def test_truncated_file_is_a_data_error(tmp_path):
    path = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(path, PRE)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nothing.png"):
        load_image(tmp_path / "nothing.png", PRE)


def test_decompression_bomb_is_refused_without_pillow_warnings(tmp_path):
    # 100 megapixels: above our limit and above Pillow's own warning threshold.
    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=r"bomb\.png.*10000x10000.*megapixels"):
            load_image(path, PRE)


def test_pixel_limit_is_a_module_constant(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("L", (200, 100)).save(path)
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 200 * 100 - 1)
    with pytest.raises(DataError, match="wide.png"):
        load_image(path, PRE)
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 200 * 100)
    assert load_image(path, PRE).shape == (8, 8, 3)


def test_to_input_normalises_per_channel():
    pre = Preprocess(image_size=2)
    images = np.zeros((2, 2, 2, 3), np.uint8)
    images[0] = 255
    images[1, :, :, 0] = 51  # red only: 0.2 after /255
    x = to_input(images, pre)
    assert x.shape == (2, 3, 2, 2) and x.dtype == np.float32 and x.flags.c_contiguous
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 0, 0], (1 - mean) / std, rtol=0, atol=1e-5)
    np.testing.assert_allclose(x[1, :, 1, 1], (np.array([0.2, 0, 0]) - mean) / std, rtol=0, atol=1e-5)
    np.testing.assert_allclose(x[1, 0], np.full((2, 2), (0.2 - 0.485) / 0.229), rtol=0, atol=1e-5)


def test_to_input_matches_the_formula_on_random_images():
    pre = Preprocess(image_size=5, mean=(0.1, 0.5, 0.9), std=(0.3, 0.2, 0.1))
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), np.uint8)
    expected = (images / 255.0 - np.array(pre.mean)) / np.array(pre.std)
    np.testing.assert_allclose(to_input(images, pre), expected.transpose(0, 3, 1, 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "images", [np.zeros((1, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((1, 9, 9, 3), np.uint8)]
)
def test_to_input_rejects_wrong_arrays(images):
    with pytest.raises(ValueError):
        to_input(images, PRE)
