"""ONNX Runtime vs PyTorch eager on a bundle's backbone, interleaved so that both see the same machine.

`pah-edge bench` times one runtime's rows after the other's; on a shared VM whose load drifts, two
p50s taken a minute apart can differ by a third for reasons that have nothing to do with the
runtimes. This alternates blocks of ``--block`` calls (ONNX Runtime, PyTorch, ONNX Runtime, ...)
for ``--rounds`` rounds at each batch size, and reports per round the ratio of the two blocks'
medians (PyTorch / ONNX Runtime) and, per batch, the median, lowest and highest of those ratios.
Both runtimes use ``--threads`` intra-op threads (default 2, the platform notes' setting); inputs
are the synthetic images `pah-edge bench` uses.

    python benchmarks/runtime_ratio.py /tmp/bench-work/bundle-mnv3l-224 --batch 1 32 \\
        --out benchmarks/results/runtime_ratio_mobilenet_v3_large.json
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import numpy as np

from pah_edge.atomic import atomic_write_json
from pah_edge.bundle import Bundle
from pah_edge.machine import library_versions
from pah_edge.device.bench_inputs import synthetic_images
from pah_edge.device.bench_timing import alternating, wall_ms_call
from pah_edge.device.runtimes import create_runner
from pah_edge.export.torch_runner import torch_runners
from pah_edge.machine import machine_info
from pah_edge.preprocess import to_input

WARMUP = 10  # calls per runtime before the first round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("bundle", type=Path, help="An exported bundle whose source checkpoint is on this machine.")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=20, help="Calls per runtime per round.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/runtime_ratio.json"))
    args = parser.parse_args()

    bundle = Bundle.open(args.bundle)
    torch, why_not = torch_runners(bundle, args.threads)
    if torch is None:
        raise SystemExit(f"cannot run PyTorch eager here: {why_not}")
    runners = {"onnxruntime": create_runner("onnxruntime-cpu", bundle.graph_path("backbone"), threads=args.threads),
               "torch": torch["backbone"]}
    size = bundle.preprocess.image_size
    pool = synthetic_images(max(args.batch), size, size, classes=10)
    results = {}
    with runners["onnxruntime"], runners["torch"]:
        for batch in args.batch:
            feeds = {"images": to_input(pool[:batch], bundle.preprocess)}
            results[str(batch)] = interleaved(runners, feeds, rounds=args.rounds, block=args.block)
            r = results[str(batch)]
            print(f"batch {batch}: ONNX Runtime {r['p50_ms']['onnxruntime']:.2f} ms, PyTorch eager "
                  f"{r['p50_ms']['torch']:.2f} ms; ratio per round: median {r['ratio_median']:.2f}x "
                  f"(lowest {r['ratio_min']:.2f}x, highest {r['ratio_max']:.2f}x)", file=sys.stderr)
    report = {"command": "python " + " ".join(sys.argv), "date": date.today().isoformat(), "machine": machine_info(),
              "versions": library_versions(), "bundle": str(args.bundle), "backbone": bundle.manifest.get("backbone"),
              "image_size": size, "threads": args.threads, "rounds": args.rounds, "block": args.block,
              "results": results}
    atomic_write_json(args.out, report)
    print(f"-> {args.out}", file=sys.stderr)


def interleaved(runners: dict, feeds: dict, *, rounds: int, block: int) -> dict:
    """Each runner's block median per round (`alternating`), their ratio, and the overall medians (ms)."""
    per_round = alternating({name: wall_ms_call(r, feeds) for name, r in runners.items()}, rounds=rounds, block=block,
                            warmup=WARMUP)
    for r in per_round:
        r["ratio"] = r["torch"] / r["onnxruntime"]
    ratios = [r["ratio"] for r in per_round]
    return {"rounds": per_round, "p50_ms": {name: float(np.median([r[name] for r in per_round])) for name in runners},
            "ratio_median": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios)}


if __name__ == "__main__":
    main()
