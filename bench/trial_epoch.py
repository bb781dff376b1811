"""Seconds per epoch of one trial (default inception1d, classification, the embedded sample at 100 Hz) against a
plain PyTorch loop over the same rows held in memory (no augmentation, evaluation, metrics or checkpoint), and that
plain loop under CPU bf16 autocast. Usage: python bench/trial_epoch.py [--threads 1] [--epochs 2] [--half A]"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.dataset import open_dataset
from data_prep.ptbxl import prepare_ptbxl
from ecgmodels import create_model
from search.trainable import run_trial

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "ptbxl"


def plain_epochs(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, bf16: bool) -> tuple[float, float]:
    """Wall and CPU seconds per epoch of a bare AdamW loop (the first epoch is a warm-up and not counted)."""
    torch.manual_seed(0)
    model = create_model("inception1d", "classification", 5, x.shape[1], x.shape[2])
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-2)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(epochs + 1):
        start = np.array([time.perf_counter(), time.process_time()])
        for idx in np.array_split(rng.permutation(len(x)), int(np.ceil(len(x) / batch_size))):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(np.array([time.perf_counter(), time.process_time()]) - start)
    return tuple(np.mean(times[1:], axis=0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--half", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.gettempdir()) / "ecgsearch-bench"
    data = prepare_ptbxl(SAMPLE, work / "ptbxl-100", workers=1)
    ds = open_dataset(data)
    rows, val = ds.select("train", args.half, True), ds.select("val", args.half, True)

    stamps = []
    config = {"data": str(data), "task": "classification", "half": args.half, "max_epochs": args.epochs + 1,
              "patience": 99, "threads": args.threads, "batch_size": args.batch_size}
    start = time.perf_counter()
    run_trial(config, report=lambda found, _: stamps.append([time.perf_counter(), time.process_time()]),
              workdir=work / "trial")
    trial, trial_cpu = np.diff(stamps, axis=0).mean(0)  # the first epoch (and the build before it) is not counted
    print(f"run_trial: {trial:.1f} s/epoch, {trial_cpu:.1f} CPU s ({len(rows)} train + {len(val)} val rows, "
          f"{args.threads} thread(s), batch {args.batch_size}; {stamps[0][0] - start:.1f} s to the end of epoch 1)")

    x = torch.from_numpy(np.asarray(ds.signals[rows]))
    y = torch.as_tensor(ds.labels["label"].to_numpy()[rows])
    plain, plain_cpu = plain_epochs(x, y, args.epochs, args.batch_size, bf16=False)
    print(f"plain fp32 loop: {plain:.1f} s/epoch, {plain_cpu:.1f} CPU s  -> run_trial / plain = {trial / plain:.2f} "
          f"(CPU {trial_cpu / plain_cpu:.2f})")
    bf16, bf16_cpu = plain_epochs(x, y, args.epochs, args.batch_size, bf16=True)
    print(f"plain bf16-autocast loop: {bf16:.1f} s/epoch, {bf16_cpu:.1f} CPU s  -> fp32 / bf16 = {plain / bf16:.2f} "
          f"(CPU {plain_cpu / bf16_cpu:.2f})")


if __name__ == "__main__":
    main()
