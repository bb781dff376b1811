"""DeepFake preparation throughput (ECGs/s) against the deepfake-ecg package's own `generate()`, in the same run.

The package's `generate()` runs the GAN one ECG at a time and writes one .asc text file each (no labels). Ours runs
it in batches under inference_mode; shown alone (generation only) and as the full preparation (generation, extractor
labels in worker processes, the memmapped dataset written).
Usage: python bench/prep_deepfake.py [--count 256] [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import deepfakeecg

from data_prep.deepfake import generate, prepare_deepfake


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--baseline-count", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        deepfakeecg.generate(args.baseline_count, tmp)
        package = args.baseline_count / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in generate(args.count, seed=0):
            pass
        batched = args.count / (time.perf_counter() - start)
        start = time.perf_counter()
        prepare_deepfake(Path(tmp) / "ds", count=args.count, seed=0, workers=args.workers)
        prepared = args.count / (time.perf_counter() - start)
    print(f"{'deepfake-ecg generate() to .asc files':<45} {package:>8.1f} ECGs/s  ({args.baseline_count} ECGs)")
    print(f"{'batched generation only':<45} {batched:>8.1f} ECGs/s  ratio {batched / package:.1f}")
    print(f"{f'prepare_deepfake (+ labels, x{args.workers} workers)':<45} {prepared:>8.1f} ECGs/s  "
          f"ratio {prepared / package:.1f}  ({args.count} ECGs)")


if __name__ == "__main__":
    main()
