"""MLflow writes off the driver's hot path: a client whose writes (log_batch, set_tag, update_run, set_terminated,
log_text) go to one background thread, in order per run, while Tune's loop moves on.

At 32 trials reporting once a second, each MLflow call taking 50-250 ms on a loaded tracking server, a driver that
waits on every call falls behind its trials (bench/driver_sim.py). The thread drains what is queued in one go and
merges the queued metrics and tags of one run into as few `log_batch` calls as MLflow allows (1000 metrics, 100
tags), so the more it lags, the more it batches. Nothing is dropped: `flush()` waits until everything queued has
reached the store (and raises the first error the thread met, after MLflow's own HTTP retries), and runs at
interpreter exit; what a SIGKILLed driver had queued is recovered on resume from Tune's result files
(`TrialRuns.reattach`). Reads (`create_run` too, whose id the caller needs) go straight to the store.
"""
from __future__ import annotations

import atexit
import queue
import threading
from typing import Any

from mlflow.tracking import MlflowClient

WRITES = ("log_batch", "set_tag", "update_run", "set_terminated", "log_text")
MAX_METRICS, MAX_TAGS = 800, 100  # within what MLflow takes per log_batch (1000 entities in all)


class BackgroundClient:
    """An MlflowClient stand-in: the WRITES are queued for a background thread, everything else is the client's."""

    def __init__(self, client: MlflowClient):
        self.client = client
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="mlflow-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def __getattr__(self, name: str) -> Any:
        if name in WRITES:
            return lambda *args, **kwargs: self._queue.put((name, args, kwargs))
        return getattr(self.client, name)

    def __getstate__(self) -> dict:  # Tune pickles its callbacks (and so this) with the Tuner's state
        return {"client": self.client}

    def __setstate__(self, state: dict) -> None:
        self.client = state["client"]
        self._start()

    def flush(self) -> None:
        """Wait until every queued write has reached the store; raise the first one that failed."""
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"an MLflow write failed in the background: {error}") from error

    def _drain(self) -> None:
        while True:
            ops = [self._queue.get()]
            while True:
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(ops)
            except BaseException as e:  # kept for flush(); the thread goes on with later writes
                self._error = self._error or e
            finally:
                for _ in ops:
                    self._queue.task_done()

    def _write(self, ops: list[tuple[str, tuple, dict]]) -> None:
        """The ops in order per run, consecutive log_batch calls of one run merged (within MLflow's limits)."""
        pending: dict[str, dict[str, list]] = {}

        def send(run_id: str) -> None:
            batch = pending.pop(run_id, None)
            while batch and (batch["metrics"] or batch["params"] or batch["tags"]):
                self.client.log_batch(run_id, metrics=batch["metrics"][:MAX_METRICS],
                                      params=batch["params"][:MAX_TAGS], tags=batch["tags"][:MAX_TAGS])
                batch = {k: v[MAX_METRICS if k == "metrics" else MAX_TAGS:] for k, v in batch.items()}

        for name, args, kwargs in ops:
            run_id = args[0] if args else kwargs.get("run_id")
            if name == "log_batch":
                batch = pending.setdefault(run_id, {"metrics": [], "params": [], "tags": []})
                for key in batch:
                    batch[key].extend(kwargs.get(key) or [])
                continue
            send(run_id)
            getattr(self.client, name)(*args, **kwargs)
        for run_id in list(pending):
            send(run_id)
