"""The CUDA paths, reached on the CPU where they can be: the device-resident data path (`resident: true`), autocast
(`amp: bf16`, the CPU's bf16), fractional GPUs (a Ray with one logical GPU shared by trials of 0.25). What needs a
real GPU (CUDA kernels, device-side augmentation and DeepFake generation on CUDA) is bench/gpu_check.sh's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from data_prep.errors import InputError
from search.spec import SearchSpec
from search.trainable import DEFAULTS, Trial, run_trial
from search.trial_data import load_splits
from search_fixtures import small_ptbxl, store  # noqa: F401

TINY = {"arch": "cnn1d", "arch.width": 8, "arch.depth": 3, "batch_size": 32}


def config(data, **kw) -> dict:
    return {**DEFAULTS, "data": str(data), "max_epochs": 1, **TINY, **kw}


def test_resident_splits_serve_the_same_batches_as_the_memory_map(small_ptbxl) -> None:
    cpu = torch.device("cpu")
    _, mapped, _, _ = load_splits(config(small_ptbxl), cpu)
    _, resident, _, _ = load_splits(config(small_ptbxl, resident=True), cpu)
    assert mapped.x is None and resident.x is not None  # the default on a CPU stays the memory map
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    pairs = list(zip(mapped.batches(16, rng_a), resident.batches(16, rng_b)))
    assert len(pairs) == len(mapped) // 16 + (len(mapped) % 16 > 1)
    for (xa, ya), (xb, yb) in pairs:
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_bf16_autocast_changes_the_arithmetic_not_the_outputs_dtype(small_ptbxl) -> None:
    trial = Trial(config(small_ptbxl), None)
    assert trial.amp is None and Trial(config(small_ptbxl, amp="bf16"), None).amp is torch.bfloat16
    trial.model.eval()
    x, y = next(trial.val.batches(32))
    out32, _ = trial.forward(x, y)
    trial.amp = torch.bfloat16  # the same model and batch under the CPU's bf16 autocast
    out16, loss16 = trial.forward(x, y)
    assert out16.dtype == torch.float32 and torch.isfinite(loss16)
    assert not torch.equal(out32, out16)  # bf16 arithmetic rounds differently ...
    assert torch.allclose(out32, out16, atol=0.1, rtol=0.05)  # ... to about 2-3 significant digits


def test_a_trial_trains_resident_under_bf16_autocast(small_ptbxl) -> None:
    found = run_trial(config(small_ptbxl, resident=True, amp="bf16", max_epochs=2), report=lambda *_: None)
    assert np.isfinite(found["train_loss"]) and 0 <= found["val_auc"] <= 1


def test_an_unknown_amp_is_one_input_error(small_ptbxl) -> None:
    with pytest.raises(InputError, match="amp 'fp8': choose bf16, fp16, off"):
        Trial(config(small_ptbxl, amp="fp8"), None)


def test_fractional_gpus_are_checked_against_the_machine(small_ptbxl) -> None:
    with pytest.raises(InputError, match="a fraction of one GPU or a whole number"):
        SearchSpec(small_ptbxl, gpus_per_trial=1.5, address="auto").check()
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="0 GPUs, so no trial could start"):
            SearchSpec(small_ptbxl, gpus_per_trial=0.25).check()
    SearchSpec(small_ptbxl, gpus_per_trial=0.25, address="auto").check()  # a cluster's GPUs are Ray's to count


@pytest.fixture
def ray_with_one_gpu():
    """A local Ray on 2 CPUs that believes it has one GPU (Ray schedules by declared resources)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_four_trials_share_one_gpu_at_a_quarter_each(small_ptbxl, store, tmp_path, ray_with_one_gpu) -> None:
    from search.tuner import run_search

    spec = SearchSpec(small_ptbxl, num_samples=4, max_epochs=1, max_concurrent=4, cpus_per_trial=0.5,
                      gpus_per_trial=0.25, asha=False, sampler="random", tracking_uri=store,
                      storage_path=tmp_path / "ray", address=ray_with_one_gpu.get_runtime_context().gcs_address,
                      space_overrides={"arch": "cnn1d", "archs": {"cnn1d": {"width": 8, "depth": 3}},
                                       "batch_size": 32})
    result = run_search(spec)
    assert list(result.table["status"]) == ["finished"] * 4
    client = MlflowClient(store)
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert sorted(r.data.tags.get("gpu_fraction") for r in runs) == ["0.25"] * 4
    spans = [(r.info.start_time, r.info.end_time) for r in runs]  # each trial's run, from start to end
    overlapping = max(sum(s <= t <= e for s, e in spans) for t, _ in spans)
    assert overlapping >= 2  # with one whole GPU each, Ray would have run them one at a time
