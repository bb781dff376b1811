"""Parameters and training throughput (forward + backward samples/s) of every ecgmodels architecture per rate.

Each row's ratio is against inception1d (the study's model) at the same rate on the same device, measured in this run.
Usage: python bench/models.py [--batch 32] [--seconds 1] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from ecgmodels import create_model, list_models

RATES = {100: 1000, 500: 5000}  # Hz -> samples in 10 s


class Bench:
    """A default classifier on one random batch; ``measure`` times forward+backward steps for a while."""

    def __init__(self, name: str, length: int, batch: int, device: str):
        self.model = create_model(name, length=length).to(device).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.x = torch.randn(batch, 8, length, device=device)
        self.y = torch.randint(0, 5, (batch,), device=device)
        self.device = device
        self.best = 0.0
        self.step()  # warm-up

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(self.model(self.x), self.y).backward()

    def measure(self, seconds: float) -> None:
        """Time steps for about ``seconds``; keep the best samples/s over calls (robust to other load on the CPU)."""
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < seconds:
            self.step()
            n += 1
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.best = max(self.best, n * len(self.x) / (time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements per row; the best counts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"batch {args.batch}, {args.threads} CPU threads, best of {args.rounds} rounds, torch {torch.__version__}")
    print("| device | arch | rate | params | samples/s | x inception1d | s per epoch of 350 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for device in devices:
        for rate, length in RATES.items():
            rows = {name: Bench(name, length, args.batch, device) for name in list_models()}
            for _ in range(args.rounds):
                for bench in rows.values():
                    bench.measure(args.seconds)
            base = rows["inception1d"].best
            for name, bench in rows.items():
                print(f"| {device} | {name} | {rate} Hz | {bench.params:,} | {bench.best:.1f} | "
                      f"{bench.best / base:.2f} | {350 / bench.best:.1f} |", flush=True)


if __name__ == "__main__":
    main()
