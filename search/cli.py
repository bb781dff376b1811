"""ecgsearch: hyperparameter search for ECG deep learning on PTB-XL and DeepFake ECGs. Prepare a dataset once
(`ecgsearch data`), search architectures and training settings with Ray Tune + Optuna + ASHA early stopping
(`ecgsearch search`), follow and compare the trials in MLflow (`ecgsearch ui`, `dashboard`, `compare`), register
the best model (`ecgsearch promote`), or run the whole transfer-learning study (`ecgsearch study`).
Try `ecgsearch demo` first: it runs all of it on the bundled sample in a few minutes."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.errors import InputError
from search.cli_help import APPROACHES_HELP, explain
from search.errors import SearchFailed

if TYPE_CHECKING:
    from search.spec import SearchSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample_data"


def _data_ptbxl(args: argparse.Namespace) -> int:
    from data_prep.dataset import describe
    from data_prep.ptbxl import prepare_ptbxl

    out = prepare_ptbxl(args.root, args.out, rate=args.rate, features=args.features,
                        min_likelihood=args.min_likelihood, split=args.split, seed=args.seed,
                        strict=args.strict, workers=args.workers, outlier_sd=args.drop_outliers)
    print(describe(out))
    return 0


def _data_deepfake(args: argparse.Namespace) -> int:
    from data_prep.dataset import describe
    from data_prep.deepfake import prepare_deepfake

    if (args.count is None) == (args.asc_dir is None):
        raise InputError("ecgsearch data deepfake: give exactly one of --count N (generate) or --asc-dir DIR (read)")
    out = prepare_deepfake(args.out, count=args.count, seed=args.seed, asc_dir=args.asc_dir,
                           ground_truth=args.ground_truth, strict=args.strict, workers=args.workers,
                           rate=args.rate, outlier_sd=args.drop_outliers)
    print(describe(out))
    return 0


def _data_resample(args: argparse.Namespace) -> int:
    from data_prep.dataset import describe
    from data_prep.rates import resample_dataset

    print(describe(resample_dataset(args.dir, args.out, args.rate)))
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from data_prep.dataset import describe

    print(describe(args.dir, check_hash=True))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Prepare the embedded sample (and a few hundred DeepFake ECGs), search, promote, print (README: The demo)."""
    from data_prep.dataset import describe
    from data_prep.deepfake import prepare_deepfake
    from data_prep.ptbxl import prepare_ptbxl
    from search.promote import promote
    from search.spec import SearchSpec
    from search.tuner import run_search

    workdir = Path(args.workdir)
    ptbxl = prepare_ptbxl(SAMPLE_DATA / "ptbxl", workdir / "ptbxl-100", rate=100)
    print(describe(ptbxl))
    print(describe(prepare_deepfake(workdir / "deepfake-300", count=300, seed=0, rate=100)))
    result = run_search(SearchSpec(ptbxl, "classification", num_samples=args.num_samples, max_epochs=args.max_epochs,
                                   config=REPO_ROOT / "configs" / "demo.yaml", max_concurrent=2, cpus_per_trial=1,
                                   cv=None, tracking_uri=args.tracking_uri,
                                   name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}"))
    print(promote(result.parent_run_id, "ecgsearch-demo", metric="val_auc", tracking_uri=result.tracking_uri).message)
    print(result.summary())
    return 0


def _server(args: argparse.Namespace) -> int:
    import signal

    from search.server import mask_uri, start_server

    server = start_server(args.backend_store_uri, args.artifacts_destination, host=args.host, port=args.port,
                          workers=args.workers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` of this process stops the server too (set
    try:                                                      # before the line that tells a caller it is up)
        print(f"MLflow tracking server on {server.url} (backend {mask_uri(args.backend_store_uri)}, "
              f"artifacts {args.artifacts_destination}, log {server.log_path}); searches print their runs-table "
              "link", flush=True)
        return server.process.wait()
    finally:
        server.stop()


def _pairs(items: list[str], flag: str = "--pretrained") -> dict[str, str]:
    """`--pretrained qrs=URI hr=URI` -> {"qrs": URI, "hr": URI}."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InputError(f"{flag} {item!r}: write TARGET=URI, e.g. qrs=models:/ecg-qrs@champion")
        pairs[key] = value
    return pairs


def search_spec(args: argparse.Namespace) -> SearchSpec:
    """The SearchSpec of `ecgsearch search`'s arguments."""
    from search.spec import SearchSpec

    return SearchSpec(
        args.data, args.task, target=args.target, approach=args.approach, pretrained=_pairs(args.pretrained),
        half=args.half, num_samples=args.num_samples, config=args.config, max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, time_budget_s=args.time_budget,
        max_epochs=args.max_epochs, address=args.address, tracking_uri=args.tracking_uri, name=args.name,
        storage_path=args.storage_path, seed=args.seed, sampler=args.sampler, n_startup_trials=args.startup_trials,
        asha=not args.no_asha, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        max_failures=args.max_failures, top_k=args.top_k, optuna_storage=args.optuna_storage, cv=args.cv,
        warm_start=tuple(args.warm_start), fidelity=args.fidelity, forest=not args.no_forest)


def _search(args: argparse.Namespace) -> int:
    from search.tuner import run_search

    spec = search_spec(args)
    if spec.fidelity:  # --data at 100 Hz, --fidelity-data the same records at 500 Hz
        from search.fidelity import run_fidelity

        if not args.fidelity_data:
            raise InputError("--fidelity rate needs --fidelity-data DIR: the same records prepared at 500 Hz")
        high = _pairs(args.fidelity_pretrained, "--fidelity-pretrained")
        if set(high) != set(spec.pretrained):
            raise InputError(f"--fidelity rate with --pretrained {' '.join(sorted(spec.pretrained))} needs "
                             f"--fidelity-pretrained with the same targets at 500 Hz (got "
                             f"{' '.join(sorted(high)) or 'none'}): the 100 Hz backbones cannot read 500 Hz ECGs")
        print(run_fidelity(spec, args.fidelity_data, pretrained=high)[1].summary())
        return 0
    print(run_search(spec).summary())
    return 0


def _resume(args: argparse.Namespace) -> int:
    from search.tuner import resume_search

    print(resume_search(args.search, args.tracking_uri).summary())
    return 0


def _promote(args: argparse.Namespace) -> int:
    from search.promote import promote

    print(promote(args.search, args.name, metric=args.metric, force=args.force, tracking_uri=args.tracking_uri,
                  ensemble=args.ensemble).message)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from search.tracking import serve_ui

    return serve_ui(args.tracking_uri, args.port)


def _dashboard(args: argparse.Namespace) -> int:
    from search.views import serve_dashboard

    return serve_dashboard(args.search, args.tracking_uri, args.optuna_storage, args.port)


def _compare(args: argparse.Namespace) -> int:
    from search.compare import compare_searches, format_table

    table, run_id = compare_searches(args.searches, args.tracking_uri)
    print(format_table(table))
    print(f"logged as compare.md and compare.csv on MLflow run {run_id}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from search.study import plan, run_study

    if args.plan:
        print(plan(args.config, args.tracking_uri))
        return 0
    result = run_study(args.config, args.tracking_uri)
    for name in ("architectures.md", "tables.md"):
        if name in result.tables:
            print(result.tables[name].read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    p = argparse.ArgumentParser(prog="ecgsearch", description=__doc__)
    p.add_argument("--version", action="version", version=f"ecgsearch {version('ecgsearch')}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray, Tune, Optuna and MLflow's own INFO output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare (or verify) a dataset").add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="dataset directory to write (reused if unchanged)")
    common.add_argument("--seed", type=int, default=0, help="seed of the split (and of generated ECGs)")
    common.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    common.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: all cores)")
    common.add_argument("--drop-outliers", type=float, nargs="?", const=3.0, default=None, metavar="SD",
                        help="the study's outlier rule: drop a regression label farther than SD (default 3) "
                             "standard deviations from the median")

    ptbxl = data.add_parser("ptbxl", parents=[common], help="PTB-XL wfdb records -> prepared dataset")
    ptbxl.add_argument("--root", required=True, type=Path, help="PTB-XL directory (ptbxl_database.csv, records100/)")
    ptbxl.add_argument("--rate", type=int, choices=(100, 500), default=100,
                       help="sampling rate in Hz: records100/ or records500/")
    ptbxl.add_argument("--features", type=Path, default=None,
                       help="PTB-XL+ directory (features/12sl_features.csv) for HR/PR/QRS/QT labels")
    ptbxl.add_argument("--min-likelihood", type=float, default=0.0,
                       help="ignore scp_codes statements below this likelihood (0-100)")
    ptbxl.add_argument("--split", choices=("strat_fold", "random"), default="strat_fold",
                       help="train/val/test inside each half: strat_fold 1-8/9/10, or a seeded 70/10/20")
    ptbxl.set_defaults(func=_data_ptbxl)

    fake = data.add_parser("deepfake", parents=[common], help="DeepFake ECGs (generated or published .asc)")
    fake.add_argument("--count", type=int, default=None, help="generate N ECGs with the bundled Pulse2Pulse GAN")
    fake.add_argument("--asc-dir", type=Path, default=None, help="read the published .asc files instead")
    fake.add_argument("--ground-truth", type=Path, default=None, help="MUSE ground-truth CSV for --asc-dir")
    fake.add_argument("--rate", type=int, choices=(100, 500), default=500,
                      help="500 Hz as generated, or 100 Hz (resampled, to transfer to PTB-XL's records100)")
    fake.set_defaults(func=_data_deepfake)

    resample = data.add_parser("resample", help="the same records at a lower rate (e.g. 500 -> 100 Hz), to pair with "
                                                "--fidelity-data")
    resample.add_argument("dir", type=Path, help="prepared dataset directory (e.g. at 500 Hz)")
    resample.add_argument("--rate", type=int, required=True, help="the lower rate in Hz (it must divide the dataset's)")
    resample.add_argument("--out", required=True, type=Path, help="dataset directory to write (reused if unchanged)")
    resample.set_defaults(func=_data_resample)

    verify = data.add_parser("verify", help="check a prepared dataset: manifest against files, finite samples, labels, "
                                            "content hash")
    verify.add_argument("dir", type=Path, help="prepared dataset directory")
    verify.set_defaults(func=_data_verify)

    server = sub.add_parser("server", help="start the MLflow tracking server a cluster logs to (blocks)")
    server.add_argument("--backend-store-uri", required=True,
                        help="runs database, e.g. postgresql://user[:password]@host:5432/db (password never printed)")
    server.add_argument("--artifacts-destination", required=True,
                        help="where proxied artifact uploads land (directory or object-store URI)")
    server.add_argument("--host", default="127.0.0.1", help="bind address (reach it through port forwarding)")
    server.add_argument("--port", type=int, default=5000, help="port to listen on")
    server.add_argument("--workers", type=int, default=1, help="server worker processes (1 keeps it near 0.4 GiB)")
    server.set_defaults(func=_server)

    search = sub.add_parser("search", help="run a hyperparameter search (Ray Tune + Optuna + ASHA, tracked in MLflow)")
    search.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
    search.add_argument("--task", required=True, choices=("classification", "regression"),
                        help="classification: the 5 diagnostic superclasses; regression: one interval (--target)")
    search.add_argument("--target", default=None, help="regression target: hr, pr, qrs or qt")
    search.add_argument("--approach", default="baseline", choices=("baseline", "single", "fused"),
                        help=APPROACHES_HELP)
    search.add_argument("--pretrained", nargs="*", default=[], metavar="TARGET=URI",
                        help="pretrained models for single/fused: checkpoint path or models:/NAME@champion")
    search.add_argument("--half", choices=("A", "B"), default=None, help="rows of this half only (default: all)")
    search.add_argument("--num-samples", type=int, required=True, help="number of trials")
    search.add_argument("--config", type=Path, default=None, help="search space YAML merged over configs/search.yaml")
    search.add_argument("--max-concurrent", type=int, default=2, help="trials at a time")
    search.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs reserved (and torch threads) per trial")
    search.add_argument("--gpus-per-trial", type=float, default=0, help="GPU fraction per trial, e.g. 0.25")
    search.add_argument("--time-budget", type=float, default=None, help="stop starting trials after S seconds")
    search.add_argument("--max-epochs", type=int, default=10, help="epochs per trial (ASHA's max_t)")
    search.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial")
    search.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: a local Ray")
    search.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///mlflow.db here)")
    search.add_argument("--name", default=None, help="search name (MLflow parent run, Ray experiment)")
    search.add_argument("--storage-path", type=Path, default=None, help="Ray results (default ./ray_results)")
    search.add_argument("--seed", type=int, default=0, help="seed of Optuna's sampler and of every trial")
    search.add_argument("--optuna-storage", default=None,
                        help="database for the Optuna study, e.g. the MLflow postgresql://... URI (default: a "
                             "sqlite file beside the Ray state, <storage-path>/<name>-optuna.db)")
    search.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help="Optuna sampler")
    search.add_argument("--startup-trials", type=int, default=None, metavar="N",
                        help="random trials before TPE narrows (default: 4 per architecture choice, at least 10)")
    search.add_argument("--no-asha", action="store_true", help="run every trial to --max-epochs (no early stopping)")
    search.add_argument("--grace-period", type=int, default=None, metavar="EPOCHS",
                        help="ASHA judges a trial first after this many epochs (default 3, at most --max-epochs)")
    search.add_argument("--reduction-factor", type=int, default=2,
                        help="ASHA keeps 1 in this many trials at each rung (grace x factor^k epochs)")
    search.add_argument("--cv", type=int, default=None, metavar="K",
                        help="score each trial by K patient-grouped folds of the train+val rows (default: 3 when "
                             "the data holds fewer than 2000 ECGs, else 1: a val split)")
    search.add_argument("--top-k", type=int, default=10,
                        help="trials whose checkpoint and plots are logged (promote's ensemble candidates)")
    search.add_argument("--warm-start", nargs="*", default=[], metavar="SEARCH",
                        help="start from the finished trials of these earlier searches (names or run ids)")
    search.add_argument("--no-forest", action="store_true",
                        help="do not fit the features + random-forest candidate that promote weighs beside the trials")
    search.add_argument("--fidelity", choices=("rate",), default=None,
                        help="rate: judge configurations at 100 Hz first, retrain the best at 500 Hz")
    search.add_argument("--fidelity-data", default=None, metavar="DIR",
                        help="with --fidelity rate: the --data records prepared at 500 Hz")
    search.add_argument("--fidelity-pretrained", nargs="*", default=[], metavar="TARGET=URI",
                        help="with --fidelity rate and --pretrained: the same targets' backbones at 500 Hz")
    search.set_defaults(func=_search)

    resume = sub.add_parser("resume", help="finish a search whose driver was killed or interrupted (Ctrl-C)")
    resume.add_argument("search", help="the search's MLflow run id or name")
    resume.add_argument("--tracking-uri", default=None, help="MLflow store the search ran with")
    resume.set_defaults(func=_resume)

    promote = sub.add_parser("promote", help="register a search's best model; move alias champion if it is better")
    promote.add_argument("--search", required=True, help="the search's MLflow run id or name")
    promote.add_argument("--name", required=True, help="registered model name")
    promote.add_argument("--metric", default="val_auc", help="compare on this metric (val_mae: lower is better)")
    promote.add_argument("--force", action="store_true", help="move champion even if it is not better")
    promote.add_argument("--ensemble", type=int, default=None, metavar="K",
                         help="register the greedy ensemble of up to K top trials (those with a logged model: "
                              "the search's --top-k); 1: the single best; default: whichever of the single best and "
                              "the ensemble of 10 wins a split-half check on the val rows")
    promote.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///mlflow.db here)")
    promote.set_defaults(func=_promote)

    ui = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1 over the tracking store (blocks)")
    ui.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///mlflow.db here)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1")
    ui.set_defaults(func=_ui)

    demo = sub.add_parser("demo", help="run the demo on the embedded sample data")
    demo.add_argument("--workdir", type=Path, default=Path("prepared"), help="prepared datasets (reused)")
    demo.add_argument("--num-samples", type=int, default=16, help="trials")
    demo.add_argument("--max-epochs", type=int, default=10, help="epochs per trial at most")
    demo.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///mlflow.db here)")
    demo.set_defaults(func=_demo)
    study = sub.add_parser("study", help="run the whole transfer-learning study of a config (resumable)")
    study.add_argument("--config", required=True, type=Path,
                       help="study YAML, e.g. configs/study-small.yaml (2 CPU cores) or configs/study.yaml (cluster)")
    study.add_argument("--plan", action="store_true",
                       help="print the stages, searches, trial counts and what is already done; run nothing")
    study.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db here)")
    study.set_defaults(func=_study)

    dashboard = sub.add_parser("dashboard", help="optuna-dashboard on a search's Optuna study (blocks)")
    dashboard.add_argument("search", help="the search's MLflow run id or name")
    dashboard.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///mlflow.db here)")
    dashboard.add_argument("--optuna-storage", default=None,
                           help="the database the search kept its study in, when its run records it masked (a "
                                "password); by default the study a finished search logged (optuna_study.db), or "
                                "the live study a running search records (param optuna_storage)")
    dashboard.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1")
    dashboard.set_defaults(func=_dashboard)

    compare = sub.add_parser("compare", help="several searches' best trials side by side (printed, logged to MLflow)")
    compare.add_argument("searches", nargs="+", metavar="SEARCH", help="MLflow run ids or names of searches")
    compare.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///mlflow.db here)")
    compare.set_defaults(func=_compare)
    explain(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    from search.progress import quiet

    quiet(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except InputError as e:
        print(f"ecgsearch: error: {e}", file=sys.stderr)
        return 2
    except SearchFailed as e:
        print(f"ecgsearch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a search says how to resume it
        print(f"ecgsearch: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
