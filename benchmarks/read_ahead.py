"""How much does reading the next batch on a thread (``BatchStream``) save over reading it between backbone calls?

One pass = every image of ``--images`` (a folder, walked recursively; default: foolbox's 20 ImageNet
photos enlarged to 640 x 480 camera frames, JPEG quality 90, 10 copies each) decoded, resized, run through the
bundle's backbone (ONNX Runtime CPU) and answered with the task-free rule, as `pah-edge predict` does.
The same pass reads its batches either with ``BatchStream`` (the next batch decoded on a thread while the
backbone runs this one) or with ``SerialStream`` below (each batch decoded when the loop asks for it,
as before the read-ahead). The two take turns pass by pass; ms per image are medians over the rounds.

    python benchmarks/read_ahead.py /tmp/demo/bundle --batches 1 32 --out benchmarks/results/read_ahead.json
"""

from __future__ import annotations

import pah_edge.blas_threads  # noqa: F401  (first, as in the pah-edge command: one BLAS thread)

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.device.images import BatchStream
from pah_edge.device.predict import Predictor, image_files
from pah_edge.machine import library_versions, machine_info


class SerialStream(BatchStream):
    """``BatchStream``'s batches, each read in the caller's thread when asked for."""

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.items), self.batch_size):
            batch = self._batch(start)
            if batch is not None:
                yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--images", type=Path, help="Folder of images (default: camera frames from foolbox's photos).")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/read_ahead.json"))
    args = parser.parse_args()

    bundle = Bundle.open(args.bundle)
    with tempfile.TemporaryDirectory(prefix="read-ahead-") as work:
        files = image_files([args.images]) if args.images else _camera_frames(Path(work))
        rows = _passes(bundle, files, args.batches, args.rounds)
    atomic_write_json(args.out, {"command": "python " + " ".join(sys.argv), "date": date.today().isoformat(),
                                 "machine": machine_info(), "versions": library_versions(),
                                 "load_average": os.getloadavg(), "images": len(files),
                                 "image_size": bundle.preprocess.image_size, "rows": rows})
    print(f"-> {args.out}", file=sys.stderr)


def _camera_frames(work: Path) -> list[Path]:
    import foolbox

    photos = sorted((Path(foolbox.__file__).parent / "data").glob("imagenet_*"))
    files = []
    for copy in range(10):
        for photo in photos:
            files.append(work / f"{copy}-{photo.stem}.jpg")
            with Image.open(photo) as image:
                image.convert("RGB").resize((640, 480), Image.Resampling.BICUBIC).save(files[-1], quality=90)
    return files


def _passes(bundle: Bundle, files: list[Path], batches: list[int], rounds: int) -> list[dict]:
    """Per batch size: ms per image of each stream's passes, taking turns."""
    rows = []
    with Predictor(bundle, runtime="onnxruntime-cpu") as predictor:
        def one_pass(stream_type: type[BatchStream], batch: int) -> float:
            answer = predictor.answerer(batch_size=batch)
            start = time.perf_counter()
            for inputs, _ in stream_type(files, bundle.preprocess, batch):
                answer(inputs)
            return (time.perf_counter() - start) * 1e3 / len(files)

        for batch in batches:
            ms: dict[str, list[float]] = {"serial": [], "ahead": []}
            for _ in range(rounds):
                ms["serial"].append(one_pass(SerialStream, batch))
                ms["ahead"].append(one_pass(BatchStream, batch))
            serial, ahead = (float(np.median(ms[k])) for k in ("serial", "ahead"))
            rows.append({"batch": batch, "ms_per_image": {"serial": serial, "ahead": ahead},
                         "saved": 1 - ahead / serial, "rounds_ms": ms})
            print(f"batch {batch}: {serial:.2f} -> {ahead:.2f} ms per image ({100 * (1 - ahead / serial):.0f} % less)",
                  file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
