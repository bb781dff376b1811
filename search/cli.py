"""`ecgsearch`: argument parsing and printing only; the work is done by functions that tests call directly."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample_data"


def _data_ptbxl(args: argparse.Namespace) -> int:
    from data_prep.dataset import describe
    from data_prep.ptbxl import prepare_ptbxl

    out = prepare_ptbxl(args.root, args.out, rate=args.rate, features=args.features,
                        min_likelihood=args.min_likelihood, split=args.split, seed=args.seed,
                        strict=args.strict, workers=args.workers)
    print(describe(out))
    return 0


def _data_deepfake(args: argparse.Namespace) -> int:
    from data_prep.dataset import describe
    from data_prep.deepfake import prepare_deepfake

    if (args.count is None) == (args.asc_dir is None):
        raise InputError("ecgsearch data deepfake: give exactly one of --count N (generate) or --asc-dir DIR (read)")
    out = prepare_deepfake(args.out, count=args.count, seed=args.seed, asc_dir=args.asc_dir,
                           ground_truth=args.ground_truth, strict=args.strict, workers=args.workers)
    print(describe(out))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from data_prep.dataset import describe
    from data_prep.ptbxl import prepare_ptbxl

    out = prepare_ptbxl(SAMPLE_DATA / "ptbxl", Path(args.workdir) / "ptbxl-100", rate=100)
    print(describe(out))
    return 0


def _server(args: argparse.Namespace) -> int:
    import signal

    from search.server import mask_uri, start_server

    server = start_server(args.backend_store_uri, args.artifacts_destination, host=args.host, port=args.port,
                          workers=args.workers)
    print(f"MLflow tracking server on {server.url} (backend {mask_uri(args.backend_store_uri)}, "
          f"artifacts {args.artifacts_destination}); runs table: {server.runs_link('<id>')}; log {server.log_path}",
          flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` of this process stops the server too
    try:
        return server.process.wait()
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecgsearch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare a dataset").add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="dataset directory to write (reused if unchanged)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    common.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: all cores)")

    ptbxl = data.add_parser("ptbxl", parents=[common], help="PTB-XL wfdb records -> prepared dataset")
    ptbxl.add_argument("--root", required=True, type=Path, help="PTB-XL directory (ptbxl_database.csv, records100/)")
    ptbxl.add_argument("--rate", type=int, choices=(100, 500), default=100)
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
    fake.set_defaults(func=_data_deepfake)

    server = sub.add_parser("server", help="start the MLflow tracking server a cluster logs to (blocks)")
    server.add_argument("--backend-store-uri", required=True,
                        help="runs database, e.g. postgresql://user[:password]@host:5432/db (password never printed)")
    server.add_argument("--artifacts-destination", required=True,
                        help="where proxied artifact uploads land (directory or object-store URI)")
    server.add_argument("--host", default="127.0.0.1", help="bind address (reach it through port forwarding)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, default=1, help="server worker processes (1 keeps it near 0.4 GiB)")
    server.set_defaults(func=_server)

    demo = sub.add_parser("demo", help="run the demo on the embedded sample data")
    demo.add_argument("--workdir", type=Path, default=Path("prepared"))
    demo.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"ecgsearch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ecgsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
