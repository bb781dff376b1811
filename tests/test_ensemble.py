"""Ensemble champions: Caruana selection on real trials' validation predictions, the Ensemble checkpoint, and
promote registering one pyfunc whose probabilities are the members' calibrated ones, averaged (through real Ray,
real MLflow on sqlite and real training on the small fixture)."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from data_prep.dataset import open_dataset
from ecgmodels import Ensemble, create_model, load_checkpoint, save_checkpoint, set_temperature
from search import metrics
from search.cli import main
from search.ensemble import Predictions, Selection, average, common_rows, compare, greedy, score
from search.promote import Choice, ensemble_temperature, find_search, promote, register, scored_trials
from search.spec import SearchSpec
from search.tuner import run_search
from search_fixtures import local_ray, small_ptbxl  # noqa: F401 (fixtures)
from test_promote import TINY


@pytest.fixture(scope="module")
def search(local_ray, small_ptbxl: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """Two 2-epoch trials of one search, every one with its checkpoint logged, and the search's features + forest
    candidate (keyed by the search's run id); their files downloaded."""
    tmp = tmp_path_factory.mktemp("ensemble")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = run_search(SearchSpec(small_ptbxl, "classification", num_samples=2, max_epochs=2, tracking_uri=uri,
                                   space_overrides={**TINY, "lr": 3e-3}, storage_path=tmp / "ray", name="ens",
                                   top_k=2, asha=False))
    client = MlflowClient(uri)
    trials = {}
    for run in client.search_runs([result.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"):
        where = tmp / run.info.run_id
        assert "reliability.png" in {a.path for a in client.list_artifacts(run.info.run_id)}  # a top trial's plots
        trials[run.info.run_id] = {f: Path(client.download_artifacts(run.info.run_id, f, str(where)))
                                   for f in ("model.pt", "val_predictions.npz")}
    assert len(trials) == 2 and result.forest and 0 <= result.forest["val_auc"] <= 1
    trials[result.parent_run_id] = {f: Path(client.download_artifacts(result.parent_run_id, f"forest/{f}",
                                                                      str(tmp / "forest")))
                                    for f in ("model.pt", "val_predictions.npz")}
    return uri, trials


def val_signals(data: Path, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(open_dataset(data).signals[rows], dtype=np.float32))


def test_greedy_keeps_the_perfect_model_alone_and_pairs_complementary_ones():
    y = np.arange(40) % 2
    rows = np.arange(40)
    truth = Predictions(y, np.eye(2)[y] * 0.8 + 0.1, rows)
    noise = Predictions(y, np.full((40, 2), 0.5), rows)
    picked = greedy([noise, truth, noise], "classification")
    assert picked.members == [1] and picked.weights == [1.0]

    # two equally good models with independent errors: their mean ranks better than either
    rng = np.random.default_rng(0)
    logits = [2 * y - 1 + 1.5 * rng.standard_normal(40) for _ in range(2)]
    pair = [Predictions(y, np.c_[1 - p, p], rows) for p in (1 / (1 + np.exp(-z)) for z in logits)]
    picked = greedy(pair, "classification")
    assert sorted(picked.members) == [0, 1]
    alone = max(score(y, c.y_score, "classification") for c in pair)
    assert picked.score > alone and picked.score == pytest.approx(score(y, average(pair, picked), "classification"))


def test_greedy_regression_and_the_ensemble_modules_arithmetic():
    rng = np.random.default_rng(1)
    y, rows = rng.normal(60, 10, 50), np.arange(50)
    values = [Predictions(y, y + 5 * rng.standard_normal(50), rows) for _ in range(3)]
    picked = greedy(values, "regression")
    assert len(picked.members) >= 2 and picked.score > max(score(y, v.y_score, "regression") for v in values)

    torch.manual_seed(0)
    x = torch.randn(4, 8, 1000)
    for multi, prob in ((False, lambda z: torch.softmax(z, 1)), (True, torch.sigmoid)):
        members = [create_model("cnn1d", width=8).eval() for _ in range(2)]
        set_temperature(members[1], 3.0)
        with torch.inference_mode():
            want = 0.25 * prob(members[0](x)) + 0.75 * prob(members[1](x))
            ens = Ensemble(members, [1, 3], multi).eval()
            np.testing.assert_allclose(prob(ens(x)), want, atol=1e-6)
            set_temperature(ens, 0.5)  # the ensemble's own temperature sharpens the mean: p^2, renormalised
            sharp = want ** 2 / (want ** 2 + (1 - want) ** 2) if multi else want ** 2 / (want ** 2).sum(1, keepdim=True)
            np.testing.assert_allclose(prob(ens(x)), sharp, atol=1e-5)
    regressors = [create_model("cnn1d", "regression", width=8).eval() for _ in range(2)]
    with torch.inference_mode():
        np.testing.assert_allclose(Ensemble(regressors, [1, 1])(x), (regressors[0](x) + regressors[1](x)) / 2,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="task"):
        Ensemble([members[0], regressors[0]], [1, 1])


def test_selection_on_real_trials_is_the_ensemble_module_on_their_checkpoints(search, small_ptbxl):
    uri, trials = search
    forest = find_search(MlflowClient(uri), "ens").info.run_id  # its val predictions are out of bag, not its model's
    files = [f for run, f in trials.items() if run != forest]
    preds = [Predictions.load(f["val_predictions.npz"]) for f in files]
    picked = greedy(preds, "classification")
    assert sum(picked.weights) == pytest.approx(1) and set(picked.members) <= {0, 1}
    y = preds[0].y_true
    assert picked.score >= max(score(y, p.y_score, "classification") for p in preds)

    model = Ensemble([load_checkpoint(files[m]["model.pt"]) for m in picked.members], picked.weights).eval()
    with torch.inference_mode():
        got = torch.softmax(model(val_signals(small_ptbxl, preds[0].rows)), 1).numpy()
    np.testing.assert_allclose(got, average(preds, picked), atol=1e-5)  # the npz holds calibrated probabilities
    held = compare(preds, "classification")
    assert len(held.single) == len(held.ensemble) == 2 and np.isfinite(held.single[1])


def test_the_ensemble_temperature_minimises_the_nll_of_its_mean_on_the_val_rows(search):
    _, trials = search
    preds = common_rows([Predictions.load(f["val_predictions.npz"]) for f in trials.values()])
    y = preds[0].y_true
    mean = average(preds, Selection(list(range(len(preds))), [1 / len(preds)] * len(preds), ()))
    t = ensemble_temperature(y, mean, "classification")

    def nll_at(temp: float) -> float:
        p = mean ** (1 / temp)
        return metrics.nll(y, p / p.sum(1, keepdims=True))

    assert nll_at(t) <= nll_at(1.0) + 1e-9
    assert nll_at(t) <= min(nll_at(t * 1.25), nll_at(t / 1.25)) + 1e-9  # a minimum, not just better than 1
    assert ensemble_temperature(y, mean, "regression") == 1.0


def test_ensemble_checkpoint_round_trip(search, tmp_path):
    _, trials = search
    members = [load_checkpoint(f["model.pt"]) for f in trials.values()]
    model = Ensemble(members, [2, 1, 1]).eval()  # two nets and the forest
    save_checkpoint(model, tmp_path / "ens.pt", extra={"members": list(trials)})
    loaded = load_checkpoint(tmp_path / "ens.pt").eval()
    x = torch.randn(3, 8, 1000)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert loaded.config["weights"] == [0.5, 0.25, 0.25] and loaded.frozen == [0, 0, 0]
    assert [m.temperature.item() for m in loaded.members] == [m.temperature.item() for m in members]


def registered(uri: str, name: str, version: str, x: np.ndarray) -> tuple[dict, np.ndarray]:
    mlflow.set_tracking_uri(uri)
    return (MlflowClient(uri).get_model_version(name, version).tags,
            mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(x))


def check_registered_mean(uri: str, name: str, version: str, trials: dict, x: np.ndarray) -> dict:
    """The registered model predicts the tagged weighted mean of its members' calibrated probabilities."""
    tags, got = registered(uri, name, version, x)
    members, weights = tags["member_run_ids"].split(","), [float(w) for w in tags["member_weights"].split(",")]
    assert set(members) <= set(trials) and sum(weights) == pytest.approx(1, abs=1e-3)
    assert tags["kind"] == ("ensemble" if len(members) > 1 else "single")
    with torch.inference_mode():
        want = sum(w * torch.softmax(load_checkpoint(trials[m]["model.pt"]).eval()(torch.from_numpy(x)), 1)
                   for m, w in zip(members, weights)).numpy()
    if len(members) > 1:  # the ensemble's own temperature, fitted on its val rows
        want = want ** (1 / float(tags["temperature"]))
        want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-3)  # weights and temperature are tagged to 4 decimals
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
    return tags


def test_an_ensemble_registers_as_one_pyfunc_with_its_members_as_lineage(search, small_ptbxl, tmp_path):
    uri, trials = search
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)  # what promote() sets before it registers
    mlflow.set_registry_uri(uri)
    parent = find_search(client, "ens")
    top = [t for t in scored_trials(client, parent, "val_auc", tmp_path) if not t.prefix]  # the two trials
    pair = Choice(top[:2], [0.75, 0.25], top[0].value, "a chosen pair")
    done = register(client, parent, "ecg-pair", "val_auc", pair, False, tmp_path)
    assert done.kind == "ensemble" and done.message.startswith("registered a chosen pair")
    x = np.asarray(open_dataset(small_ptbxl).signals[:16], dtype=np.float32)
    tags = check_registered_mean(uri, "ecg-pair", done.version, trials, x)
    assert tags["member_run_ids"] == ",".join(t.run.info.run_id for t in top[:2])
    assert tags["run_id"] == parent.info.run_id and tags["member_weights"] == "0.7500,0.2500"
    assert tags["trial_number"] == ",".join(t.run.data.tags["trial_number"] for t in top[:2])


def test_the_forest_candidate_is_the_search_s_forest_calibrated_and_registers_beside_a_net(search, small_ptbxl,
                                                                                          tmp_path):
    """The forest logged on the search's run predicts exactly what scikit-learn's forest fitted on the search's
    train and val rows does; its val predictions are out of bag (no val row scored by a tree that saw it), at a
    temperature that lowers their NLL; and an ensemble of it and a net registers as one pyfunc that predicts their
    weighted mean."""
    from sklearn.ensemble import RandomForestClassifier

    from ecgmodels import signal_features
    from search import forest

    uri, trials = search
    client = MlflowClient(uri)
    parent = find_search(client, "ens")
    files = trials[parent.info.run_id]
    ds = open_dataset(small_ptbxl)
    rows = {s: ds.select(s, None, True) for s in ("train", "val")}
    y = {s: ds.labels["label"].to_numpy()[r] for s, r in rows.items()}
    feats = {s: signal_features(ds.signals[r], ds.rate) for s, r in rows.items()}
    reference = RandomForestClassifier(forest.TREES, min_samples_leaf=2, max_leaf_nodes=forest.LEAVES, random_state=0,
                                       class_weight="balanced_subsample", oob_score=True).fit(
        np.concatenate([feats["train"], feats["val"]]), np.concatenate([y["train"], y["val"]]))
    model = load_checkpoint(files["model.pt"])
    in_bag, oob = np.zeros((len(rows["val"]), 5)), np.zeros((len(rows["val"]), 5))
    in_bag[:, reference.classes_] = reference.predict_proba(feats["val"])
    oob[:, reference.classes_] = reference.oob_decision_function_[len(rows["train"]):]
    np.testing.assert_allclose(model.proba(torch.from_numpy(feats["val"])).numpy(), in_bag, atol=1e-12)

    npz = np.load(files["val_predictions.npz"])
    assert np.array_equal(npz["rows"], rows["val"]) and np.array_equal(npz["y_true"], y["val"])
    t = model.temperature.item()
    tempered = np.clip(oob, 1e-6, None) ** (1 / t)
    np.testing.assert_allclose(npz["y_score"], tempered / tempered.sum(1, keepdims=True), atol=1e-6)
    untempered = np.clip(oob, 1e-6, None) / np.clip(oob, 1e-6, None).sum(1, keepdims=True)
    assert metrics.nll(y["val"], npz["y_score"]) <= metrics.nll(y["val"], untempered) + 1e-9
    assert metrics.nll(y["val"], untempered) > metrics.nll(y["val"], in_bag) + 0.05  # the trees that saw a row flatter

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    top = scored_trials(client, parent, "val_auc", tmp_path)
    wide = [next(c for c in top if c.prefix == "forest/"), next(c for c in top if not c.prefix)]
    done = register(client, parent, "ecg-wide", "val_auc", Choice(wide, [0.5, 0.5], 0.0, "a net and the forest"),
                    False, tmp_path)
    x = np.asarray(ds.signals[:16], dtype=np.float32)
    tags = check_registered_mean(uri, "ecg-wide", done.version, trials, x)
    assert tags["trial_number"].startswith("forest,") and tags["member_run_ids"].startswith(parent.info.run_id)


def test_with_cv_the_forest_scores_every_train_and_val_row_out_of_bag(small_ptbxl, tmp_path):
    """A cross-validated search's trials predict all its train and val rows out of fold; the forest's predictions
    cover the same rows, each from the trees that did not see it (so they sit far below the in-bag fit's)."""
    from search.forest import fit_forest

    path, found = fit_forest(SearchSpec(str(small_ptbxl), "classification", cv=3), tmp_path)
    ds = open_dataset(small_ptbxl)
    both = np.union1d(ds.select("train", None, True), ds.select("val", None, True))
    npz = np.load(tmp_path / "val_predictions.npz")
    assert np.array_equal(np.sort(npz["rows"]), both)
    assert np.array_equal(npz["y_true"], ds.labels["label"].to_numpy()[npz["rows"]])
    in_bag = load_checkpoint(path).eval()(torch.from_numpy(np.asarray(ds.signals[npz["rows"]])))
    assert metrics.nll(npz["y_true"], npz["y_score"]) > metrics.nll(npz["y_true"], torch.softmax(in_bag, 1).numpy())
    assert found["val_auc"] == pytest.approx(metrics.macro_auc(npz["y_true"], npz["y_score"]))


def test_promote_ensemble_registers_the_greedy_choice(search, small_ptbxl, capsys):
    uri, trials = search
    assert main(["promote", "--search", "ens", "--name", "ecg-ens", "--ensemble", "2", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    (version,) = [v.version for v in MlflowClient(uri).search_model_versions("name = 'ecg-ens'")]
    x = np.asarray(open_dataset(small_ptbxl).signals[:16], dtype=np.float32)
    tags = check_registered_mean(uri, "ecg-ens", version, trials, x)
    several = tags["kind"] == "ensemble"
    assert ("registered the greedy ensemble of trials" in out) == several
    assert several or "greedy selection over the top 2 kept one trial" in out


def test_promote_without_the_flag_weighs_single_against_ensemble_and_says_which(search):
    uri, _ = search
    done = promote("ens", "ecg-auto", tracking_uri=uri)
    tags = MlflowClient(uri).get_model_version("ecg-auto", done.version).tags
    said = "registered the greedy ensemble" if done.kind == "ensemble" else "registered the single best"
    assert done.message.startswith(said) and tags["choice"] in done.message and tags["kind"] == done.kind
    assert "held-out half-split val macro AUC" in done.message or "kept one trial" in done.message


def test_registered_model_applies_the_fitted_temperature(search, small_ptbxl):
    uri, trials = search
    done = promote("ens", "ecg-one", tracking_uri=uri, ensemble=1)
    tags = MlflowClient(uri).get_model_version("ecg-one", done.version).tags
    files = trials[tags["member_run_ids"]]
    npz = np.load(files["val_predictions.npz"])
    x, y = val_signals(small_ptbxl, npz["rows"]), npz["y_true"]
    _, got = registered(uri, "ecg-one", done.version, x.numpy())
    model = load_checkpoint(files["model.pt"]).eval()
    t = model.temperature.item()
    set_temperature(model, 1.0)
    with torch.inference_mode():
        raw = model(x)
    assert t != 1.0  # the trial fitted one
    calibrated, plain = torch.softmax(raw / t, 1).numpy(), torch.softmax(raw, 1).numpy()
    np.testing.assert_allclose(got, calibrated, atol=1e-5)
    nll, nll_plain = metrics.nll(y, got), metrics.nll(y, plain)
    ece, ece_plain = metrics.ece(y, got), metrics.ece(y, plain)
    assert nll <= nll_plain + 1e-6, f"T={t:.3f}: NLL {nll:.4f} vs {nll_plain:.4f} at T=1 (ECE {ece:.3f} vs {ece_plain:.3f})"
    worst = np.quantile(metrics.ece_if_calibrated(got, draws=500), 0.99)  # calibrated, as far as these rows can tell
    assert ece <= worst, f"ECE {ece:.3f} on {len(y)} val rows; a calibrated model's stays under {worst:.3f}"
