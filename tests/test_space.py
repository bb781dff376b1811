"""The search space: YAML -> define-by-run trials with conditional dimensions; fixing, narrowing; and validation:
the one-line errors a bad space, dataset, tracking store or pretrained model gets before Ray starts."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from data_prep.deepfake import prepare_deepfake
from data_prep.errors import InputError
from ecgmodels import create_model, default_hparams, save_checkpoint
from search_fixtures import small_ptbxl  # noqa: F401 (fixture)
from search.cli import main
from search.space import SearchSpace, load_space_config
from search.spec import SearchSpec
from search.tuner import run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)
CONSTANTS = {"data": "/data", "task": "classification", "target": None, "max_epochs": 3, "seed": 0}


def sample(space: SearchSpace, n: int = 25) -> list[tuple[dict, dict]]:
    """n trial configs with the params Optuna saw for each."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((space(trial), dict(trial.params)))
        study.tell(trial, 0.5)
    return out


def baseline(**overrides) -> SearchSpace:
    return SearchSpace(load_space_config(None, overrides), "baseline", CONSTANTS)


def test_default_space_conditions_hparams_on_arch_and_params_on_schedule() -> None:
    configs = sample(baseline(), 40)
    assert {c["arch"] for c, _ in configs} == {"inception1d", "resnet1d", "cnn1d", "lstm", "vit1d"}
    for config, _ in configs:
        hparams = {k.split(".", 1)[1] for k in config if k.startswith("arch.")}
        assert hparams and hparams <= set(default_hparams(config["arch"]))
        params = {k.split(".", 1)[1] for k in config if k.startswith("schedule.")}
        assert params == {"constant": set(), "cosine": {"warmup_epochs"}, "exponential": {"gamma"},
                          "onecycle": {"pct_start"}, "plateau": {"factor", "patience"}}[config["schedule"]]
        assert "freeze_depth" not in config and "pretrained_lr_mult" not in config
        assert config["data"] == "/data" and config["approach"] == "baseline"
        assert {f"aug.{a}.{p}" for a in ("noise", "lead_dropout") for p in ("p", "strength")} <= set(config)
        assert "arch.lead_stats" not in config  # a top-level setting, searched for every architecture
    assert [c["trial_number"] for c, _ in configs] == list(range(40))
    assert {c["lead_stats"] for c, _ in configs} == {False, True}


def test_fixed_and_narrowed_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.001, "arch": ["resnet1d"], "schedule": "cosine",
                                    "weight_decay": {"low": 1e-3, "high": 1e-2, "log": True},
                                    "archs": {"resnet1d": {"depth": 3}}, "aug": {"noise": {"p": 0.0}}}))
    space = SearchSpace(load_space_config(path), "baseline", CONSTANTS)
    for config, params in sample(space):
        assert config["lr"] == 0.001 and "lr" not in params  # fixed: a constant, not searched
        assert config["arch"] == "resnet1d" and config["arch.depth"] == 3 and config["schedule"] == "cosine"
        assert 1e-3 <= config["weight_decay"] <= 1e-2
        assert config["aug.noise.p"] == 0.0
        assert 0.05 <= config["aug.wander.strength"] <= 0.5  # the rest keeps the default ranges


def test_transfer_space_keeps_the_pretrained_arch_and_searches_freezing() -> None:
    pretrained = {"qrs": create_model("inception1d", "regression", 1, 8, 1000, "global", depth=6)}
    space = SearchSpace(load_space_config(), "single", CONSTANTS, pretrained)
    for config, _ in sample(space):
        assert config["arch"] == "inception1d" and config["norm"] == "global"
        assert not any(k.startswith("arch.") for k in config)
        assert 0 <= config["freeze_depth"] <= 2  # inception1d depth 6 has two stages; the default range is cut
        assert 0.01 <= config["pretrained_lr_mult"] <= 1.0


@pytest.mark.parametrize("overrides, words", [
    ({"arch": ["inception1d", "transformer9000"]}, ["arch", "transformer9000"]),
    ({"schedule": "warmup"}, ["schedule", "warmup"]),
    ({"learning_rate": 0.1}, ["learning_rate"]),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, ["lr", "inverted"]),
    ({"batch_size": []}, ["batch_size", "empty"]),
    ({"batch_size": 32.5}, ["batch_size", "int"]),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, ["lr", "log"]),
    ({"aug": {"noise": {"p": 1.5}}}, ["aug.noise.p"]),
    ({"aug": {"blur": {"p": 0.1}}}, ["aug.blur"]),
    ({"archs": {"resnet1d": {"heads": 4}}}, ["archs.resnet1d.heads"]),
    ({"schedules": {"cosine": {"gamma": 0.9}}}, ["schedules.cosine.gamma"]),
])
def test_bad_space_is_one_line_naming_the_setting(overrides: dict, words: list[str]) -> None:
    with pytest.raises(InputError) as err:
        baseline(**overrides)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_space_fails_before_ray_starts(small_ptbxl: Path, tmp_path: Path) -> None:
    import ray

    with pytest.raises(InputError, match="inverted"):
        run_search(SearchSpec(small_ptbxl, "classification", num_samples=1, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                   space_overrides={"lr": {"low": 1.0, "high": 0.1}}, storage_path=tmp_path))
    assert not ray.is_initialized()


def test_cli_reports_a_bad_space_file_in_one_line_with_exit_2(small_ptbxl: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: [inception1d, nope]\n")
    code = main(["search", "--data", str(small_ptbxl), "--task", "classification", "--num-samples", "2",
                 "--config", str(bad), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == ("ecgsearch: error: search space: arch: unknown 'nope'; "
                                    "choose from cnn1d, inception1d, lstm, resnet1d, rnn, vit1d")


@pytest.mark.parametrize("case", ["not prepared", "no labels for the task", "unknown target",
                                  "tracking store does not answer", "pretrained missing",
                                  "pretrained at another rate", "pretrained on another target"])
def test_bad_inputs_fail_before_ray_starts(case: str, small_ptbxl: Path, asc_dir: Path, tmp_path: Path) -> None:
    import ray

    kw = {"data": small_ptbxl, "task": "classification", "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
          "storage_path": tmp_path}
    if case == "not prepared":
        kw["data"] = tmp_path
        words = "not a prepared dataset"
    elif case == "no labels for the task":  # DeepFake ECGs have intervals but no diagnostic classes
        kw["data"] = prepare_deepfake(tmp_path / "deepfake", asc_dir=asc_dir, rate=100)
        words = "has no labels for classification"
    elif case == "unknown target":
        kw.update(task="regression", target="st")
        words = "--target"
    elif case == "tracking store does not answer":
        kw["tracking_uri"] = "http://127.0.0.1:9"  # nothing listens on the discard port
        words = "does not answer"
    elif case == "pretrained missing":
        kw.update(approach="single", pretrained={"qrs": str(tmp_path / "nowhere.pt")})
        words = "no checkpoint"
    else:
        length, target = (5000, "qrs") if case == "pretrained at another rate" else (1000, "hr")
        save_checkpoint(create_model("cnn1d", "regression", 1, 8, length), tmp_path / "model.pt",
                        extra={"target": target})
        kw.update(approach="single", pretrained={"qrs": str(tmp_path)})
        words = "x 5000 samples" if length == 5000 else "trained on 'hr'"
    with pytest.raises(InputError, match=words) as err:
        run_search(SearchSpec(num_samples=1, **kw))
    assert "\n" not in str(err.value)
    assert not ray.is_initialized()
