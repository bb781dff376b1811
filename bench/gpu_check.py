"""The GPU paths, run once on one GPU (bench/gpu_check.sh; under 8 minutes on an H100/H200), printed as one table:
  1. per architecture, training samples/s (forward + backward, batch of random ECGs) at 100 and 500 Hz in fp32 and
     under bf16 autocast, with the achieved TFLOP/s from a FLOP count of one step (torch.utils.flop_counter:
     matmuls and convolutions, forward and backward; recurrent cells are not counted, so lstm/rnn read low) against
     the device's peak (PEAKS: NVIDIA's datasheet figures, dense, without sparsity);
  2. the trainable's own device paths on the prepared sample (device-resident splits, autocast, device-side
     augmentation): one trial, its samples/s and which paths it took;
  3. a 16-trial search (inception1d, FIFO) with 4 trials sharing the GPU (gpus_per_trial 0.25) against 1 at a time:
     trials per hour, and GPU memory per trial (the largest trial process, polled with nvidia-smi);
  4. DeepFake ECGs generated per second (data_prep.deepfake.generate) on the device.
`--cpu` runs every step on the CPU at tiny sizes (a Ray that declares one logical GPU for the shared-GPU search),
so the script is known to run end to end before it meets a GPU.
Usage: python bench/gpu_check.py [--cpu] [--trials 16] [--epochs 3]   (--cpu: 2.5 s signals, 4 trials of 1 epoch)
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ecgmodels import create_model, list_models

REPO = Path(__file__).resolve().parents[1]
RATES = {100: 1000, 500: 5000}  # Hz -> samples in 10 s
# device name (substring) -> (fp32 non-tensor, bf16 dense tensor) TFLOP/s, from NVIDIA's datasheets (SXM parts)
PEAKS = {"H200": (67.0, 989.0), "H100": (67.0, 989.0), "A100": (19.5, 312.0), "L40S": (91.6, 362.0),
         "L4": (30.3, 121.0), "A10G": (31.2, 70.0)}
SPACE = {"arch": "inception1d", "batch_size": 64, "patience": 10, "schedule": "constant", "norm": "zscore"}


def peak(device: str) -> tuple[float, float] | None:
    name = torch.cuda.get_device_name(0) if device == "cuda" else ""
    return next((p for key, p in PEAKS.items() if key in name), None)


def step_fn(name: str, length: int, batch: int, device: str, amp: bool):
    model = create_model(name, length=length).to(device).train()
    x = torch.randn(batch, 8, length, device=device)
    y = torch.randint(0, 5, (batch,), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    return step


def throughput(device: str, batch: int, seconds: float, shorten: int = 1) -> list[dict]:
    """Samples/s and TFLOP/s per architecture, rate and precision (signals `shorten` times shorter than 10 s)."""
    rows, top = [], peak(device)
    for name in list_models():
        for rate, length in RATES.items():
            length //= shorten
            for amp in (False, True):
                step = step_fn(name, length, batch, device, amp)
                step()  # warm-up (cuDNN autotuning, lazy init)
                with FlopCounterMode(display=False) as counter:
                    step()
                flops = counter.get_total_flops()
                n, start = 0, time.perf_counter()
                while n < 2 or time.perf_counter() - start < seconds:
                    step()
                    n += 1
                if device == "cuda":
                    torch.cuda.synchronize()
                per_s = n / (time.perf_counter() - start)
                tflops = flops * per_s / 1e12
                ref = top[1 if amp else 0] if top else None
                rows.append({"arch": name, "rate": rate, "dtype": "bf16" if amp else "fp32",
                             "samples_s": per_s * batch, "tflops": tflops,
                             "of_peak": f"{100 * tflops / ref:.1f}%" if ref else "n/a"})
                print(f"  {name} {rate} Hz {rows[-1]['dtype']}: {rows[-1]['samples_s']:.3g} samples/s, "
                      f"{tflops:.3g} TFLOP/s ({rows[-1]['of_peak']} of peak)", flush=True)
    return rows


def prepared_sample(tmp: Path, cpu: bool) -> Path:
    """The embedded PTB-XL sample at 100 Hz, prepared into `tmp` (its first 120 records with --cpu)."""
    import pandas as pd

    from data_prep.ptbxl import prepare_ptbxl

    root = tmp / "ptbxl"
    shutil.copytree(REPO / "sample_data" / "ptbxl", root, ignore=shutil.ignore_patterns("records500"))
    if cpu:
        db = pd.read_csv(root / "ptbxl_database.csv")
        db.head(120).to_csv(root / "ptbxl_database.csv", index=False)
    return prepare_ptbxl(root, tmp / "prepared", split="random", workers=2)


def trial_paths(data: Path, device: str, cpu: bool) -> dict:
    """One trial of the trainable on the device: which paths it took and its training samples/s."""
    from search.trainable import DEFAULTS, Trial, run_trial
    from search.trial_data import load_splits

    config = {**DEFAULTS, "data": str(data), **SPACE, "max_epochs": 1 if cpu else 3,
              "aug.noise.p": 0.5, "aug.noise.strength": 0.05, "aug.shift.p": 0.5, "aug.shift.strength": 0.1}
    if cpu:  # what the GPU chooses by itself, forced on the CPU
        config.update(resident=True, amp="bf16", **{"arch.depth": 3, "arch.filters": 8})
    trial = Trial(config, None)
    _, train, _, _ = load_splits(config, trial.device)
    x, _ = next(train.batches(8))
    augmented = trial.augment(x)
    start = time.perf_counter()
    found = run_trial(config, report=lambda *_: None)
    seconds = time.perf_counter() - start
    return {"device": str(trial.device), "resident": train.x is not None, "amp": str(trial.amp),
            "augment_on": str(augmented.device), "val_auc": found["val_auc"],
            "train_samples_s": len(train) * int(found["epoch"]) / seconds}


class MemoryPoll(threading.Thread):
    """The largest GPU memory any one process held while running (nvidia-smi every 0.5 s), in MiB."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.most, self.done = 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            self.most = max([self.most, *(int(v) for v in out.split() if v.isdigit())])


def search_sharing(data: Path, tmp: Path, trials: int, epochs: int, cpu: bool) -> list[dict]:
    """`trials` trials 4 at a time on a quarter GPU each, then 1 at a time on the whole GPU."""
    import ray

    from search.spec import SearchSpec
    from search.tuner import run_search

    space = dict(SPACE, **({"archs": {"inception1d": {"depth": 3, "filters": 8}}} if cpu else {}))
    ray.init(address="local", num_cpus=8 if not cpu else 2, num_gpus=1 if cpu else None, include_dashboard=False,
             log_to_driver=False)
    rows = []
    try:
        for at_once in (4, 1):
            poll = MemoryPoll()
            if not cpu:
                poll.start()
            spec = SearchSpec(data, num_samples=trials, max_epochs=epochs, max_concurrent=at_once,
                              cpus_per_trial=(0.5 if cpu else 2), gpus_per_trial=1 / at_once, asha=False,
                              sampler="random", space_overrides=space, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                              storage_path=tmp / "ray", name=f"gpu-share-{at_once}", top_k=0,
                              address=ray.get_runtime_context().gcs_address)
            start = time.perf_counter()
            result = run_search(spec)
            seconds = time.perf_counter() - start
            poll.done.set()
            finished = int((result.table["status"] == "finished").sum())
            rows.append({"at_once": at_once, "gpus_per_trial": 1 / at_once, "finished": finished, "wall_s": seconds,
                         "trials_h": trials / seconds * 3600, "gpu_mib": poll.most if not cpu else None})
            print(f"  {at_once} at a time: {finished}/{trials} finished in {seconds:.0f} s", flush=True)
    finally:
        ray.shutdown()
    return rows


def deepfake_rate(device: str, count: int) -> float:
    from data_prep.deepfake import generate

    next(generate(1, 0, device))  # load the weights, warm up
    start = time.perf_counter()
    n = sum(len(b) for b in generate(count, 1, device))
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="everything on the CPU at tiny sizes")
    p.add_argument("--trials", type=int, default=None, help="trials of the shared-GPU search (16; 4 with --cpu)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (3; 1 with --cpu)")
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it with --cpu for the CPU walk-through")
    device = "cpu" if args.cpu else "cuda"
    trials, epochs = args.trials or (4 if args.cpu else 16), args.epochs or (1 if args.cpu else 3)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    began = time.perf_counter()
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    rows = throughput(device, 2 if args.cpu else 256, 0 if args.cpu else 2.0, 4 if args.cpu else 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepared_sample(Path(tmp), args.cpu)
        paths = trial_paths(data, device, args.cpu)
        shared = search_sharing(data, Path(tmp), trials, epochs, args.cpu)
    ecgs_s = deepfake_rate(device, 64 if args.cpu else 4096)

    top = peak(device)
    print(f"\n## gpu_check: {name} ({time.perf_counter() - began:.0f} s); peak fp32 / bf16 dense: "
          + (f"{top[0]:g} / {top[1]:g} TFLOP/s (NVIDIA datasheet)" if top else "unknown (PEAKS has no entry)"))
    print(f"| arch | rate{' (--cpu: 2.5 s signals, batch 2)' if args.cpu else ''} | dtype | samples/s | TFLOP/s | "
          "of peak |\n|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['rate']} Hz | {r['dtype']} | {r['samples_s']:.3g} | {r['tflops']:.3g} | "
              f"{r['of_peak']} |")
    print(f"| trainable on the sample | 100 Hz | amp {paths['amp']} | {paths['train_samples_s']:.3g} | | "
          f"device {paths['device']}, resident {paths['resident']}, augmentation on {paths['augment_on']}, "
          f"val_auc {paths['val_auc']:.3f} |")
    base = next(r for r in shared if r["at_once"] == 1)
    for r in shared:
        mem = f"{r['gpu_mib']} MiB per trial" if r["gpu_mib"] is not None else "memory n/a (no GPU)"
        print(f"| search, {r['at_once']} trial(s) per GPU (gpus_per_trial {r['gpus_per_trial']:g}) | 100 Hz | "
              f"{r['finished']}/{trials} finished | {r['trials_h']:.0f} trials/h | "
              f"x{r['trials_h'] / base['trials_h']:.2f} | {mem} |")
    print(f"| DeepFake generation | 500 Hz | inference | {ecgs_s:.0f} ECGs/s | | on {device} |")


if __name__ == "__main__":
    main()
