"""What the terminal shows while a search runs: one line per ended trial and a status line (trials done / running /
queued, best so far, elapsed, estimated time left), rewritten in place on a terminal and printed every
`LOG_EVERY_S` seconds otherwise (no carriage returns in a log file); and `quiet()`, which turns Ray, Tune, Optuna
and MLflow's INFO chatter off through their own settings (`-v` keeps it).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, TextIO

from ray.tune import Callback

RAY_LOGGING_LEVEL = logging.INFO  # a local Ray's (init_ray); quiet() lowers it
LOG_EVERY_S = 60.0  # a status line in a log file at most this often
REFRESH_S = 1.0  # on a terminal


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress(Callback):
    """The search's lines on `stream` (stdout). `pruned` is the scheduler's set of trials it stopped early;
    `max_epochs` says "stopped by ASHA at epoch 3 of 10" rather than a bare count; with `budget_s` (the search's
    time budget) the estimate never goes past what the budget leaves."""

    def __init__(self, metric: str, mode: str, num_samples: int, max_epochs: int, pruned: set[str],
                 stream: TextIO | None = None, budget_s: float | None = None):
        self.metric, self.mode, self.num_samples, self.max_epochs = metric, mode, num_samples, max_epochs
        self.pruned, self.budget_s = pruned, budget_s
        self.stream = stream
        self.setup()

    def setup(self, **info: Any) -> None:
        """Called by Tune as the run (or a resumed run) starts."""
        self.start = self.shown = time.monotonic()
        self.best: tuple[float, int] | None = None  # value, trial number
        self.done = 0
        self.ended: set[str] = set()  # trial ids (Tune calls back before it marks them TERMINATED)
        self.live = False  # a status line is on screen (terminal only)

    def __getstate__(self) -> dict:  # the stream is not pickled with the Tuner's state
        return {k: v for k, v in self.__dict__.items() if k != "stream"}

    @property
    def out(self) -> TextIO:
        return getattr(self, "stream", None) or sys.stdout

    def _better(self, value: float) -> bool:
        return self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])

    def status(self, trials: list) -> str:
        """done / running / queued, best so far, elapsed and estimated time left."""
        running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)
        done = max(self.done, sum(t.status in ("TERMINATED", "ERROR") for t in trials))
        queued = max(0, self.num_samples - done - running)
        elapsed = time.monotonic() - self.start
        best = f"best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else "no result yet"
        left = elapsed * (self.num_samples - done) / done if 0 < done < self.num_samples else None
        if self.budget_s is not None and done < self.num_samples:
            left = max(0.0, min(left if left is not None else math.inf, self.budget_s - elapsed))
        left = f", ~{_clock(left)} left" if left is not None else ""
        return (f"{done}/{self.num_samples} done, {running} running, {queued} queued; {best}; "
                f"{_clock(elapsed)} elapsed{left}")

    def _print(self, line: str) -> None:
        if self.live:
            self.out.write("\r\033[K")
            self.live = False
        print(line, file=self.out, flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(f"best_{self.metric}")
        if isinstance(value, (int, float)) and self._better(float(value)):
            self.best = (float(value), trial.config.get("trial_number"))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        tty = self.out.isatty()
        if now - self.shown < (REFRESH_S if tty else LOG_EVERY_S):
            return
        self.shown = now
        if tty:
            self.out.write("\r\033[K" + self.status(trials))
            self.out.flush()
            self.live = True
        else:
            print(self.status(trials), file=self.out, flush=True)

    def _ended(self, trials: list, trial: Any, what: str) -> None:
        self.done += 1
        self.ended.add(trial.trial_id)
        result = trial.last_result or {}
        best = result.get(f"best_{self.metric}")
        score = f", best {self.metric} {best:.4f}" if isinstance(best, (int, float)) else ""
        self._print(f"[{self.done}/{self.num_samples}] trial {trial.config.get('trial_number')} "
                    f"({trial.config.get('arch')}) {what}{score} | {self.status(trials)}")
        self.shown = time.monotonic()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = int((trial.last_result or {}).get("epoch", 0))
        if trial.trial_id in self.pruned:
            self._ended(trials, trial, f"stopped by ASHA at epoch {epoch} of {self.max_epochs}")
        else:  # at max_epochs, or earlier when its val metric stopped improving (patience)
            self._ended(trials, trial, f"finished at epoch {epoch} of {self.max_epochs}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial, "FAILED (its run's tag failure_reason says why)")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.live:
            self.out.write("\r\033[K")
            self.out.flush()
            self.live = False


def quiet(verbose: bool = False) -> None:
    """Ray, Tune, Optuna and MLflow at WARNING unless `verbose`: their INFO lines ("Started a local Ray instance",
    "A new study created in memory", MLflow's registry chatter), Tune's progress table and TensorBoard hint off."""
    global RAY_LOGGING_LEVEL
    if verbose:
        return
    RAY_LOGGING_LEVEL = logging.WARNING
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter, silent at verbose=0 (the new one
    # prints its configuration box and a TensorBoard hint whatever the verbosity)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (after this, often)
    if not sys.stderr.isatty():  # libraries' bars in a log file (data_prep's own bars: tqdm(disable=None))
        os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm where it is imported after this
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("ray", "ray.tune", "ray.train", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A local Ray turns its token authentication on and says so at WARNING each start; it stays on. (Choosing it by
    # RAY_AUTH_MODE=token would also demand a token from a cluster joined by --address that runs without one.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
