"""Fuzz: damaged inputs of every kind, built from the embedded sample, through the real CLI (in-process, plus a few
real processes). For each: no traceback, a non-zero exit or the bad record (label) named, no file outside the
output changed (the input tree hashed before and after), no password in the output, and Ray never started."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from search.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
PASSWORD = "Fz-s3cret-7781"
RECORDS = 6  # ecg_id 1..6 of the sample, at 100 Hz
BAD = 2  # the record a case damages
ASC = ("101", "102", "103", "124")


# --- the shared, undamaged inputs (one copy per module) ---------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ptbxl/ (6 records), features.csv (their 12SL labels), asc/ (4 files), truth.csv, ds/ (a prepared dataset),
    store.db (an MLflow store, created once: the cases only read it)."""
    from mlflow.tracking import MlflowClient

    from data_prep.ptbxl import prepare_ptbxl

    base = tmp_path_factory.mktemp("fuzz-base")
    db = pd.read_csv(SAMPLE / "ptbxl" / "ptbxl_database.csv")
    db = db[db["ecg_id"] <= RECORDS]
    root = base / "ptbxl"
    root.mkdir()
    db.to_csv(root / "ptbxl_database.csv", index=False)
    shutil.copy(SAMPLE / "ptbxl" / "scp_statements.csv", root)
    for f in db["filename_lr"]:
        for ext in (".hea", ".dat"):
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(SAMPLE / "ptbxl" / f"{f}{ext}", root / f"{f}{ext}")
    n = len(db)
    pd.DataFrame({"ecg_id": db["ecg_id"], "RR_Mean_Global": np.linspace(700, 1100, n), "PR_Int_Global": 160.0,
                  "QRS_Dur_Global": 95.0, "QT_Int_Global": 400.0}).to_csv(base / "features.csv", index=False)
    shutil.copytree(SAMPLE / "deepfake-asc", base / "asc")
    pd.DataFrame({"patid": [int(a) for a in ASC], "avgrrinterval": [1000, 800, 750, 900], "pr": [160, 150, 140, 155],
                  "qrs": [90, 94, 92, 96], "qt": [400, 390, 380, 395]}).to_csv(base / "truth.csv", index=False)
    prepare_ptbxl(root, base / "ds", features=base / "features.csv", split="random", workers=1)
    MlflowClient(f"sqlite:///{base / 'store.db'}").search_experiments()
    return base


def copy(base: Path, d: Path, name: str) -> Path:
    """The case's own copy of one shared input."""
    src, dst = base / name, d / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def record(root: Path, ecg_id: int = BAD) -> Path:
    db = pd.read_csv(root / "ptbxl_database.csv", dtype=str)
    return root / db.loc[db["ecg_id"] == str(ecg_id), "filename_lr"].iloc[0]


def edit_csv(path: Path, column: str, value: str, row: int = BAD - 1) -> None:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[row, column] = value
    table.to_csv(path, index=False)


def edit_hea(root: Path, change: Callable[[list[str]], list[str]]) -> None:
    hea = record(root).with_suffix(".hea")
    hea.write_text("\n".join(change(hea.read_text().splitlines())) + "\n")


def edit_lead_lines(root: Path, field: int, value: str) -> None:
    """Field `field` (0-based, whitespace split) of every signal line of the bad record's header."""
    def change(lines: list[str]) -> list[str]:
        out = [lines[0]]
        for line in lines[1:]:
            parts = line.split()
            if len(parts) > field:
                parts[field] = value
            out.append(" ".join(parts))
        return out
    edit_hea(root, change)


def set_dat(root: Path, make: Callable[[np.ndarray], np.ndarray]) -> None:
    dat = record(root).with_suffix(".dat")
    samples = np.fromfile(dat, dtype="<i2")
    make(samples).astype("<i2").tofile(dat)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def changed(d: dict, **values: object) -> dict:
    return {**d, **values}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def save_npy(path: Path, make: Callable[[np.ndarray], np.ndarray]) -> None:
    array = np.load(path)
    np.save(path, make(array))


def with_row(array: np.ndarray, value: float) -> np.ndarray:
    array = array.copy()
    array[3, 1, 10] = value
    return array


# --- the cases ----------------------------------------------------------------------------------------------------
# Each builder damages the case directory's copies and returns the CLI arguments. The outcome is "error" (non-zero
# exit, one `error:` line), "skip" (exit 0, the record named) or "drop" (exit 0, the record and its label named).
# Arguments may write `out` (the case's output); every other file must stay as it was.

def ptbxl_args(d: Path, *extra: str, features: bool = True) -> list[str]:
    return ["data", "ptbxl", "--root", str(d / "ptbxl"), "--out", str(d / "out"), "--workers", "1",
            *(["--features", str(d / "features.csv")] if features else []), *extra]


def ptbxl_case(damage: Callable[[Path], object], *extra: str, features: bool = True):
    def build(base: Path, d: Path) -> list[str]:
        copy(base, d, "ptbxl")
        if features:
            copy(base, d, "features.csv")
        damage(d)
        return ptbxl_args(d, *extra, features=features)
    return build


def hea(change: Callable[[list[str]], list[str]]):
    return ptbxl_case(lambda d: edit_hea(d / "ptbxl", change))


def hea_bytes(data: bytes):
    return ptbxl_case(lambda d: record(d / "ptbxl").with_suffix(".hea").write_bytes(data))


def lead_field(field: int, value: str):
    return ptbxl_case(lambda d: edit_lead_lines(d / "ptbxl", field, value))


def first_line(field: int, value: str):
    def change(lines: list[str]) -> list[str]:
        parts = lines[0].split()
        parts[field] = value
        return [" ".join(parts), *lines[1:]]
    return hea(change)


def dat(make: Callable[[np.ndarray], np.ndarray]):
    return ptbxl_case(lambda d: set_dat(d / "ptbxl", make))


def dat_bytes(make: Callable[[bytes], bytes]):
    def damage(d: Path) -> None:
        f = record(d / "ptbxl").with_suffix(".dat")
        f.write_bytes(make(f.read_bytes()))
    return ptbxl_case(damage)


def db_cell(column: str, value: str, *extra: str):
    return ptbxl_case(lambda d: edit_csv(d / "ptbxl" / "ptbxl_database.csv", column, value), *extra)


def db_file(text: bytes | str, name: str = "ptbxl_database.csv"):
    def damage(d: Path) -> None:
        f = d / "ptbxl" / name
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ptbxl_case(damage)


def header_only(name: str):
    def damage(d: Path) -> None:
        f = d / "ptbxl" / name
        f.write_text(f.read_text().splitlines()[0] + "\n")
    return ptbxl_case(damage)


def drop_column(name: str, column: str):
    def damage(d: Path) -> None:
        f = d / "ptbxl" / name
        pd.read_csv(f, dtype=str, keep_default_na=False).drop(columns=[column]).to_csv(f, index=False)
    return ptbxl_case(damage)


def duplicate_db_row(d: Path) -> None:
    f = d / "ptbxl" / "ptbxl_database.csv"
    db = pd.read_csv(f, dtype=str, keep_default_na=False)
    pd.concat([db, db.iloc[[BAD - 1]]]).to_csv(f, index=False)


def every_record(damage: Callable[[Path], None]):
    def all_bad(d: Path) -> None:
        db = pd.read_csv(d / "ptbxl" / "ptbxl_database.csv")
        for f in db["filename_lr"]:
            damage(d / "ptbxl" / f)
    return ptbxl_case(all_bad)


def features_cell(column: str, value: str, *extra: str):
    return ptbxl_case(lambda d: edit_csv(d / "features.csv", column, value), *extra)


def features_file(text: bytes | str):
    return ptbxl_case(lambda d: (d / "features.csv").write_bytes(text if isinstance(text, bytes) else text.encode()))


def duplicate_features_row(d: Path) -> None:
    f = d / "features.csv"
    t = pd.read_csv(f, dtype=str)
    pd.concat([t, t.iloc[[BAD - 1]].assign(QT_Int_Global="300")]).to_csv(f, index=False)


def asc_case(damage: Callable[[Path], object], *extra: str, truth: bool = True):
    def build(base: Path, d: Path) -> list[str]:
        copy(base, d, "asc")
        if truth:
            copy(base, d, "truth.csv")
        damage(d)
        return ["data", "deepfake", "--asc-dir", str(d / "asc"), "--out", str(d / "out"), "--workers", "1",
                *(["--ground-truth", str(d / "truth.csv")] if truth else []), *extra]
    return build


def asc_text(change: Callable[[list[str]], list[str]], name: str = "102"):
    def damage(d: Path) -> None:
        f = d / "asc" / f"{name}.asc"
        f.write_text("\n".join(change(f.read_text().splitlines())) + "\n")
    return asc_case(damage)


def asc_cell(value: str):
    def change(lines: list[str]) -> list[str]:
        parts = lines[100].split()
        parts[1] = value
        lines[100] = " ".join(parts)
        return lines
    return asc_text(change)


def asc_bytes(data: bytes):
    return asc_case(lambda d: (d / "asc" / "102.asc").write_bytes(data))


def truth_cell(column: str, value: str, *extra: str):
    return asc_case(lambda d: edit_csv(d / "truth.csv", column, value), *extra)


def truth_file(text: bytes | str):
    return asc_case(lambda d: (d / "truth.csv").write_bytes(text if isinstance(text, bytes) else text.encode()))


def prepared(damage: Callable[[Path], object], command: str = "verify"):
    """A damaged copy of the prepared dataset, given to `data verify` or to `search` (which must stop before Ray)."""
    def build(base: Path, d: Path) -> list[str]:
        ds = copy(base, d, "ds")
        damage(ds)
        if command == "verify":
            return ["data", "verify", str(ds)]
        return search_args(d, "--data", str(ds))
    return build


def search_args(d: Path, *extra: str) -> list[str]:
    return ["search", "--data", str(d / "ds"), "--task", "classification", "--num-samples", "1", "--max-epochs", "1",
            "--tracking-uri", f"sqlite:///{d / 'out.db'}", "--storage-path", str(d / "out-ray"), *extra]


def search_case(*extra: str, space: str | bytes | None = None):
    def build(base: Path, d: Path) -> list[str]:
        copy(base, d, "ds")
        options = list(extra)
        if space is not None:
            f = d / "space.yaml"
            f.write_bytes(space if isinstance(space, bytes) else space.encode())
            options += ["--config", str(f)]
        return search_args(d, *options)
    return build


def command(*argv: str):
    """A CLI command of its own: `{d}` in an argument is the case directory, `{store}` the shared MLflow store."""
    def build(base: Path, d: Path) -> list[str]:
        copy(base, d, "ds")
        return [a.replace("{d}", str(d)).replace("{store}", f"sqlite:///{base / 'store.db'}") for a in argv]
    return build


def out_case(make_out: Callable[[Path], Path], source: str = "ptbxl"):
    """--out pointing at something that is not the case's own new output."""
    def build(base: Path, d: Path) -> list[str]:
        if source == "ptbxl":
            copy(base, d, "ptbxl")
            return ["data", "ptbxl", "--root", str(d / "ptbxl"), "--out", str(make_out(d)), "--workers", "1"]
        copy(base, d, "asc")
        copy(base, d, "truth.csv")
        return ["data", "deepfake", "--asc-dir", str(d / "asc"), "--ground-truth", str(d / "truth.csv"),
                "--out", str(make_out(d)), "--workers", "1"]
    return build


def user_dir(d: Path) -> Path:
    (d / "mine").mkdir()
    (d / "mine" / "thesis.txt").write_text("years of work")
    return d / "mine"


def foreign_manifest(d: Path) -> Path:
    (d / "mine").mkdir()
    (d / "mine" / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 3}))
    return d / "mine"


def a_file(d: Path) -> Path:
    (d / "notes.txt").write_text("keep me")
    return d / "notes.txt"


def broken_link(d: Path) -> Path:
    (d / "link").symlink_to(d / "nowhere")
    return d / "link"


def hea_dir(d: Path) -> None:
    f = record(d / "ptbxl").with_suffix(".hea")
    f.unlink()
    f.mkdir()


def rewrite_npy(change: Callable[[np.ndarray], np.ndarray]):
    return lambda ds: save_npy(ds / "signals.npy", change)


def manifest(change: Callable[[dict], object]):
    return lambda ds: edit_json(ds / "manifest.json", change)


def write(name: str, data: bytes | str):
    return lambda ds: (ds / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def truncate(name: str, keep: float):
    def damage(ds: Path) -> None:
        data = (ds / name).read_bytes()
        (ds / name).write_bytes(data[:int(len(data) * keep)])
    return damage


def labels(change: Callable[[pd.DataFrame], pd.DataFrame]):
    def damage(ds: Path) -> None:
        change(pd.read_parquet(ds / "labels.parquet")).to_parquet(ds / "labels.parquet", index=False)
    return damage


def tamper(ds: Path) -> None:
    """Change one sample in place: shape, dtype and manifest still agree; only the content hash tells."""
    array = np.load(ds / "signals.npy", mmap_mode="r+")
    array[0, 0, 0] += 0.5
    array.flush()


def gone(name: str):
    return lambda ds: (ds / name).unlink()


def as_dir(name: str):
    def damage(ds: Path) -> None:
        (ds / name).unlink()
        (ds / name).mkdir()
    return damage


GARBAGE = bytes(range(256)) * 8
LATIN1 = "ecg_id,patient_id\n1,caf\xe9\n".encode("latin-1")
URIS = {
    "http password": f"http://user:{PASSWORD}@127.0.0.1:9",
    "https password": f"https://user:{PASSWORD}@127.0.0.1:9/mlflow",
    "http password, malformed port": f"http://user:{PASSWORD}@127.0.0.1:port",
    "http password, malformed host": f"https://user:{PASSWORD}@[::1",
    "http password with @ and /": f"http://user:{PASSWORD}@x/y@127.0.0.1:9",
    "url-encoded password": f"http://user:{PASSWORD.replace('-', '%2D')}@127.0.0.1:9",
    "postgresql password": f"postgresql://user:{PASSWORD}@127.0.0.1:1/db",
    "postgresql+psycopg password": f"postgresql+psycopg://user:{PASSWORD}@127.0.0.1:1/db",
    "postgresql password parameter": f"postgresql://127.0.0.1:1/db?user=u&password={PASSWORD}",
    "mysql password": f"mysql://user:{PASSWORD}@127.0.0.1:1/db",
    "unknown scheme password": f"foo://user:{PASSWORD}@127.0.0.1:1/db",
}

CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str, tuple[str, ...]]] = {
    # PTB-XL headers (record 2 of 10)
    "hea empty": (hea(lambda lines: []), "skip", ()),
    "hea first line only": (hea(lambda lines: lines[:1]), "skip", ()),
    "hea cut after 5 leads": (hea(lambda lines: lines[:6]), "skip", ()),
    "hea binary garbage": (hea_bytes(GARBAGE), "skip", ()),
    "hea not utf-8": (hea_bytes("00002_lr 12 100 1000 caf\xe9\n".encode("latin-1")), "skip", ()),
    "hea 250 Hz": (first_line(2, "250"), "skip", ("250",)),
    "hea rate not a number": (first_line(2, "fast"), "skip", ()),
    "hea zero signals": (first_line(1, "0"), "skip", ()),
    "hea 99 signals": (first_line(1, "99"), "skip", ()),
    "hea 10 samples": (first_line(3, "10"), "skip", ()),
    "hea negative length": (first_line(3, "-5"), "skip", ()),
    "hea gain 0": (lead_field(2, "0(0)/mV"), "skip", ()),
    "hea gain 100x": (lead_field(2, "10(0)/mV"), "skip", ("amplitude",)),
    "hea gain not a number": (lead_field(2, "big(0)/mV"), "skip", ()),
    "hea unknown unit": (lead_field(2, "1000.0(0)/furlong"), "skip", ("units",)),
    "hea format 212": (lead_field(1, "212"), "skip", ()),
    "hea format 999": (lead_field(1, "999"), "skip", ()),
    "hea format text": (lead_field(1, "x"), "skip", ()),
    "hea every lead renamed": (hea(lambda lines: lines[:1] + [" ".join(ln.split()[:-1] + ["X"]) for ln in lines[1:]]),
                               "skip", ("missing leads",)),
    "hea missing": (ptbxl_case(lambda d: record(d / "ptbxl").with_suffix(".hea").unlink()), "skip", ("missing",)),
    "hea is a directory": (ptbxl_case(hea_dir), "skip", ()),
    # PTB-XL signal files
    "dat empty": (dat_bytes(lambda b: b""), "skip", ("truncated",)),
    "dat cut in half": (dat_bytes(lambda b: b[:len(b) // 2]), "skip", ("truncated",)),
    "dat one byte": (dat_bytes(lambda b: b[:1]), "skip", ()),
    "dat random samples": (dat(lambda s: np.random.default_rng(0).integers(-32767, 32767, len(s))), "skip",
                           ("amplitude",)),
    "dat all missing": (dat(lambda s: np.full_like(s, -32768)), "skip", ("NaN",)),
    "dat all zero": (dat(lambda s: np.zeros_like(s)), "skip", ("flat",)),
    "dat one huge spike": (dat(lambda s: np.where(np.arange(len(s)) == 4800, 32767, s)), "skip", ("amplitude",)),
    "dat missing": (ptbxl_case(lambda d: record(d / "ptbxl").with_suffix(".dat").unlink()), "skip", ("missing",)),
    "every dat missing": (every_record(lambda f: f.with_suffix(".dat").unlink()), "error", ("every",)),
    "every hea garbage": (every_record(lambda f: f.with_suffix(".hea").write_bytes(GARBAGE)), "error", ("every",)),
    # PTB-XL database and statements
    "database empty": (db_file(""), "error", ("ptbxl_database.csv", "empty")),
    "database header only": (header_only("ptbxl_database.csv"), "error", ("no rows",)),
    "database binary garbage": (db_file(GARBAGE), "error", ("ptbxl_database.csv",)),
    "database not utf-8": (db_file(LATIN1), "error", ("ptbxl_database.csv",)),
    "database unbalanced quote": (db_file('ecg_id,patient_id\n1,"15709\n'), "error", ("ptbxl_database.csv",)),
    "database lacks scp_codes": (drop_column("ptbxl_database.csv", "scp_codes"), "error", ("scp_codes",)),
    "ecg_id not a number": (db_cell("ecg_id", "two"), "skip", ("two",)),
    "ecg_id empty": (db_cell("ecg_id", ""), "skip", ("line 3",)),
    "duplicate ecg_id": (ptbxl_case(duplicate_db_row), "skip", ("duplicate ecg_id",)),
    "patient_id empty": (db_cell("patient_id", ""), "skip", ("patient_id",)),
    "patient_id text": (db_cell("patient_id", "alice"), "skip", ("patient_id",)),
    "scp_codes unclosed": (db_cell("scp_codes", "{'NORM': 100.0"), "skip", ("scp_codes",)),
    "scp_codes empty": (db_cell("scp_codes", ""), "skip", ("scp_codes",)),
    "scp_codes a list": (db_cell("scp_codes", "[1, 2]"), "skip", ("scp_codes",)),
    "scp_codes likelihood text": (db_cell("scp_codes", "{'NORM': 'high'}"), "skip", ("scp_codes",)),
    "scp_codes code": (db_cell("scp_codes", "__import__('os').system('touch pwned')"), "skip", ("scp_codes",)),
    "scp_codes unknown code": (db_cell("scp_codes", "{'XYZ': 100.0}"), "skip", ("XYZ",)),
    "scp_codes unknown code strict": (db_cell("scp_codes", "{'XYZ': 100.0}", "--strict"), "error", ("XYZ",)),
    "strat_fold text": (db_cell("strat_fold", "x"), "skip", ("strat_fold",)),
    "strat_fold 11": (db_cell("strat_fold", "11"), "skip", ("strat_fold",)),
    "strat_fold empty": (db_cell("strat_fold", ""), "skip", ("strat_fold",)),
    "strat_fold text, random split": (db_cell("strat_fold", "x", "--split", "random"), "ok", ()),
    "filename empty": (db_cell("filename_lr", ""), "skip", ("filename_lr",)),
    "filename outside root": (db_cell("filename_lr", "../../../../etc/hostname"), "skip", ("missing",)),
    "age text": (db_cell("age", "old"), "ok", ()),
    "statements empty": (db_file("", "scp_statements.csv"), "error", ("scp_statements.csv",)),
    "statements header only": (header_only("scp_statements.csv"), "error", ("scp_statements.csv",)),
    "statements lack diagnostic_class": (drop_column("scp_statements.csv", "diagnostic_class"), "error",
                                         ("diagnostic_class",)),
    "database missing": (ptbxl_case(lambda d: (d / "ptbxl" / "ptbxl_database.csv").unlink()), "error",
                         ("ptbxl_database.csv",)),
    "bad record strict": (ptbxl_case(lambda d: record(d / "ptbxl").with_suffix(".dat").unlink(), "--strict"),
                          "error", ("record 2",)),
    # PTB-XL+ 12SL features
    "features empty": (features_file(""), "error", ("features.csv", "empty")),
    "features header only": (features_file("ecg_id,RR_Mean_Global,PR_Int_Global,QRS_Dur_Global,QT_Int_Global\n"),
                             "error", ("no rows",)),
    "features binary garbage": (features_file(GARBAGE), "error", ("features.csv",)),
    "features lack QT": (features_file("ecg_id,RR_Mean_Global,PR_Int_Global,QRS_Dur_Global\n1,800,160,90\n"),
                         "error", ("QT_Int_Global",)),
    "features RR text": (features_cell("RR_Mean_Global", "fast"), "drop", ("RR_Mean_Global",)),
    "features RR negative": (features_cell("RR_Mean_Global", "-800"), "drop", ("hr",)),
    "features RR zero": (features_cell("RR_Mean_Global", "0"), "drop", ("hr",)),
    "features QT 99999": (features_cell("QT_Int_Global", "99999"), "drop", ("qt",)),
    "features QRS 0": (features_cell("QRS_Dur_Global", "0"), "drop", ("qrs",)),
    "features PR text": (features_cell("PR_Int_Global", "short"), "drop", ("PR_Int_Global",)),
    "features ecg_id text": (features_cell("ecg_id", "two"), "drop", ("ecg_id",)),
    "features duplicate ecg_id": (ptbxl_case(duplicate_features_row), "drop", ("ecg_id",)),
    "features QT 99999 strict": (features_cell("QT_Int_Global", "99999", "--strict"), "error", ("qt",)),
    "features missing": (ptbxl_case(lambda d: (d / "features.csv").unlink()), "error", ("features",)),
    # DeepFake .asc files (102 of 4) and MUSE ground truth
    "asc empty": (asc_bytes(b""), "skip", ("102.asc",)),
    "asc cut short": (asc_text(lambda lines: lines[:2500]), "skip", ("102.asc",)),
    "asc extra column": (asc_text(lambda lines: [f"{ln} 7" for ln in lines]), "skip", ("102.asc",)),
    "asc missing column": (asc_text(lambda lines: [ln.rsplit(None, 1)[0] for ln in lines]), "skip", ("102.asc",)),
    "asc text cell": (asc_cell("abc"), "skip", ("102.asc",)),
    "asc nan cell": (asc_cell("nan"), "skip", ("102.asc",)),
    "asc infinite cell": (asc_cell("1e400"), "skip", ("102.asc",)),
    "asc huge cell": (asc_cell("99999999"), "skip", ("amplitude",)),
    "asc all zero": (asc_text(lambda lines: ["0 0 0 0 0 0 0 0"] * len(lines)), "skip", ("flat",)),
    "asc binary garbage": (asc_bytes(GARBAGE), "skip", ("102.asc",)),
    "asc not utf-8": (asc_bytes("1 2 3 caf\xe9\n".encode("latin-1")), "skip", ("102.asc",)),
    "asc is a directory": (asc_case(lambda d: (d / "asc" / "999.asc").mkdir()), "skip", ("999.asc",)),
    "every asc empty": (asc_case(lambda d: [f.write_bytes(b"") for f in (d / "asc").glob("*.asc")]), "error",
                        ("every",)),
    "no asc files": (asc_case(lambda d: [f.unlink() for f in (d / "asc").glob("*.asc")]), "error", ("no .asc",)),
    "bad asc strict": (asc_case(lambda d: (d / "asc" / "102.asc").write_bytes(b""), "--strict"), "error",
                       ("102.asc",)),
    "truth empty": (truth_file(""), "error", ("truth.csv",)),
    "truth header only": (truth_file("patid,avgrrinterval,pr,qrs,qt\n"), "error", ("no rows",)),
    "truth binary garbage": (truth_file(GARBAGE), "error", ("truth.csv",)),
    "truth lacks qt": (truth_file("patid,avgrrinterval,pr,qrs\n101,800,160,90\n"), "error", ("qt",)),
    "truth patid text": (truth_cell("patid", "bob"), "drop", ("patid",)),
    "truth qt text": (truth_cell("qt", "long"), "drop", ("qt",)),
    "truth duplicate patid": (truth_cell("patid", "101"), "drop", ("patid",)),
    "truth RR negative": (truth_cell("avgrrinterval", "-800"), "drop", ("hr",)),
    "truth QT 99999": (truth_cell("qt", "99999"), "drop", ("qt",)),
    "truth QT 99999 strict": (truth_cell("qt", "99999", "--strict"), "error", ("qt",)),
    "truth missing": (asc_case(lambda d: (d / "truth.csv").unlink()), "error", ("truth.csv",)),
    # --out that is not the preparation's own
    "out is the root": (out_case(lambda d: d / "ptbxl"), "error", ("--out",)),
    "out inside the root": (out_case(lambda d: d / "ptbxl" / "records100"), "error", ("--out",)),
    "out new inside the root": (out_case(lambda d: d / "ptbxl" / "prepared"), "error", ("--out",)),
    "out around the root": (out_case(lambda d: d), "error", ("--out",)),
    "out a user's directory": (out_case(user_dir), "error", ("--out", "not an ecgsearch prepared dataset")),
    "out a foreign manifest": (out_case(foreign_manifest), "error", ("--out",)),
    "out an existing file": (out_case(a_file), "error", ("--out", "file")),
    "out under a file": (out_case(lambda d: a_file(d) / "ds"), "error", ("--out",)),
    "out a broken link": (out_case(broken_link), "error", ("--out",)),
    "out is the asc dir": (out_case(lambda d: d / "asc", "asc"), "error", ("--out",)),
    "out inside the asc dir": (out_case(lambda d: d / "asc" / "ds", "asc"), "error", ("--out",)),
    "out is the ground truth": (out_case(lambda d: d / "truth.csv", "asc"), "error", ("--out",)),
    # preparation settings
    "workers -1": (ptbxl_case(lambda d: None, "--workers", "-1"), "error", ("--workers",)),
    "workers 0": (ptbxl_case(lambda d: None, "--workers", "0"), "error", ("--workers",)),
    "rate 250": (ptbxl_case(lambda d: None, "--rate", "250"), "error", ("--rate",)),
    "min-likelihood -5": (ptbxl_case(lambda d: None, "--min-likelihood", "-5"), "error", ("--min-likelihood",)),
    "min-likelihood 500": (ptbxl_case(lambda d: None, "--min-likelihood", "500"), "error", ("--min-likelihood",)),
    "drop-outliers 0": (ptbxl_case(lambda d: None, "--drop-outliers", "0"), "error", ("--drop-outliers",)),
    "drop-outliers negative": (ptbxl_case(lambda d: None, "--drop-outliers", "-2"), "error", ("--drop-outliers",)),
    "split unknown": (ptbxl_case(lambda d: None, "--split", "halves"), "error", ("--split",)),
    "seed text": (ptbxl_case(lambda d: None, "--seed", "abc"), "error", ("--seed",)),
    "root missing": (command("data", "ptbxl", "--root", "{d}/nowhere", "--out", "{d}/out"), "error", ("nowhere",)),
    "root a file": (command("data", "ptbxl", "--root", "{d}/ds/manifest.json", "--out", "{d}/out"), "error",
                    ("ptbxl_database.csv",)),
    "deepfake count 0": (command("data", "deepfake", "--count", "0", "--out", "{d}/out"), "error", ("count",)),
    "deepfake count negative": (command("data", "deepfake", "--count", "-3", "--out", "{d}/out"), "error",
                                ("count",)),
    "deepfake neither count nor asc": (command("data", "deepfake", "--out", "{d}/out"), "error", ("--count",)),
    "deepfake count and ground truth": (command("data", "deepfake", "--count", "2", "--ground-truth",
                                                "{d}/ds/manifest.json", "--out", "{d}/out"), "error",
                                        ("--ground-truth",)),
    "deepfake asc dir a file": (command("data", "deepfake", "--asc-dir", "{d}/ds/manifest.json", "--out",
                                        "{d}/out"), "error", ("not a directory",)),
    "deepfake rate 250": (command("data", "deepfake", "--count", "2", "--rate", "250", "--out", "{d}/out"), "error",
                          ("--rate",)),
    # damaged prepared datasets: `data verify`
    "ds manifest missing": (prepared(gone("manifest.json")), "error", ("not a prepared dataset",)),
    "ds manifest empty": (prepared(write("manifest.json", "")), "error", ("manifest.json",)),
    "ds manifest not json": (prepared(write("manifest.json", "{")), "error", ("manifest.json",)),
    "ds manifest a list": (prepared(write("manifest.json", "[]")), "error", ("manifest.json",)),
    "ds manifest not utf-8": (prepared(write("manifest.json", GARBAGE)), "error", ("manifest.json",)),
    "ds manifest a directory": (prepared(as_dir("manifest.json")), "error", ("manifest.json",)),
    "ds manifest not ours": (prepared(manifest(lambda m: changed(m, kind="other"))), "error",
                             ("not a prepared dataset",)),
    "ds format 99": (prepared(manifest(lambda m: changed(m, format_version=99))), "error", ("format",)),
    "ds rate 500": (prepared(manifest(lambda m: changed(m, rate=500))), "error", ("rate", "prepare it again")),
    "ds rate text": (prepared(manifest(lambda m: changed(m, rate="100"))), "error", ("rate",)),
    "ds count +1": (prepared(manifest(lambda m: changed(m, count=m["count"] + 1))), "error", ("prepare it again",)),
    "ds length 999": (prepared(manifest(lambda m: changed(m, length=999))), "error", ("prepare it again",)),
    "ds 12 leads": (prepared(manifest(lambda m: changed(m, leads=m["leads"] + ["III", "aVR", "aVL", "aVF"]))),
                    "error", ("leads",)),
    "ds lacks content hash": (prepared(manifest(lambda m: without(m, "content_hash"))), "error", ("content_hash",)),
    "ds lacks rate": (prepared(manifest(lambda m: without(m, "rate"))), "error", ("rate",)),
    "ds signals missing": (prepared(gone("signals.npy")), "error", ("signals.npy", "prepare it again")),
    "ds signals empty": (prepared(write("signals.npy", b"")), "error", ("signals.npy",)),
    "ds signals cut short": (prepared(truncate("signals.npy", 0.5)), "error", ("signals.npy", "prepare it again")),
    "ds signals header only": (prepared(truncate("signals.npy", 0.001)), "error", ("signals.npy",)),
    "ds signals garbage": (prepared(write("signals.npy", GARBAGE)), "error", ("signals.npy",)),
    "ds signals a directory": (prepared(as_dir("signals.npy")), "error", ("signals.npy",)),
    "ds signals float64": (prepared(rewrite_npy(lambda a: a.astype(np.float64))), "error", ("float64",)),
    "ds signals 12 leads": (prepared(rewrite_npy(lambda a: np.concatenate([a, a[:, :4]], axis=1))), "error",
                            ("signals.npy",)),
    "ds signals 2-D": (prepared(rewrite_npy(lambda a: a.reshape(len(a), -1))), "error", ("signals.npy",)),
    "ds signals fewer rows": (prepared(rewrite_npy(lambda a: a[:-1])), "error", ("signals.npy",)),
    "ds signals a NaN": (prepared(rewrite_npy(lambda a: with_row(a, np.nan))), "error", ("NaN", "records 4")),
    "ds signals infinite": (prepared(rewrite_npy(lambda a: with_row(a, np.inf))), "error", ("infinite",)),
    "ds signals pickled objects": (prepared(rewrite_npy(lambda a: np.array([object()] * 3))), "error",
                                   ("signals.npy",)),
    "ds labels missing": (prepared(gone("labels.parquet")), "error", ("labels.parquet", "prepare it again")),
    "ds labels garbage": (prepared(write("labels.parquet", GARBAGE)), "error", ("labels.parquet",)),
    "ds labels cut short": (prepared(truncate("labels.parquet", 0.6)), "error", ("labels.parquet",)),
    "ds labels lack split": (prepared(labels(lambda t: t.drop(columns=["split"]))), "error", ("split",)),
    "ds labels lack qt": (prepared(labels(lambda t: t.drop(columns=["qt"]))), "error", ("qt",)),
    "ds labels fewer rows": (prepared(labels(lambda t: t.iloc[:-2])), "error", ("label rows",)),
    "ds content changed": (prepared(tamper), "error", ("content hash",)),
    "ds is a file": (command("data", "verify", "{d}/ds/labels.parquet"), "error", ("not a prepared dataset",)),
    "ds missing": (command("data", "verify", "{d}/nowhere"), "error", ("nowhere",)),
    # damaged prepared datasets given to a search: refused before Ray or MLflow start
    "search ds manifest missing": (prepared(gone("manifest.json"), "search"), "error", ("not a prepared dataset",)),
    "search ds rate 500": (prepared(manifest(lambda m: changed(m, rate=500)), "search"), "error", ("rate",)),
    "search ds count +1": (prepared(manifest(lambda m: changed(m, count=m["count"] + 1)), "search"), "error",
                           ("prepare it again",)),
    "search ds 12 leads": (prepared(rewrite_npy(lambda a: np.concatenate([a, a[:, :4]], axis=1)), "search"), "error",
                           ("signals.npy",)),
    "search ds signals cut short": (prepared(truncate("signals.npy", 0.5), "search"), "error", ("signals.npy",)),
    "search ds a NaN": (prepared(rewrite_npy(lambda a: with_row(a, np.nan)), "search"), "error", ("NaN",)),
    "search ds labels garbage": (prepared(write("labels.parquet", GARBAGE), "search"), "error", ("labels.parquet",)),
    "search ds labels lack split": (prepared(labels(lambda t: t.drop(columns=["split"])), "search"), "error",
                                    ("split",)),
    "search ds manifest not json": (prepared(write("manifest.json", "{"), "search"), "error", ("manifest.json",)),
    "search ds no class labels": (prepared(labels(lambda t: t.assign(label=-1)), "search"), "error",
                                  ("classification",)),
    # bad search settings and search-space files (each refused before Ray)
    "search trials negative": (search_case("--num-samples", "-1"), "error", ("--num-samples",)),
    "search epochs negative": (search_case("--max-epochs", "-3"), "error", ("--max-epochs",)),
    "search cpus negative": (search_case("--cpus-per-trial", "-1"), "error", ("--cpus-per-trial",)),
    "search gpus negative": (search_case("--gpus-per-trial", "-1"), "error", ("--gpus-per-trial",)),
    "search half C": (search_case("--half", "C"), "error", ("--half",)),
    "search task unknown": (search_case("--task", "segmentation"), "error", ("--task",)),
    "search target unknown": (search_case("--task", "regression", "--target", "st"), "error", ("--target",)),
    "search fused with one model": (search_case("--approach", "fused", "--pretrained", "hr=/nowhere.pt"), "error",
                                    ("--pretrained",)),
    "search seed text": (search_case("--seed", "x"), "error", ("--seed",)),
    "search cv 0": (search_case("--cv", "0"), "error", ("--cv 0",)),
    "space garbage": (search_case(space=GARBAGE), "error", ("search space",)),
    "space tabs": (search_case(space="lr:\n\t- 0.1\n"), "error", ("search space",)),
    "space python object": (search_case(space="lr: !!python/object/apply:os.system ['touch pwned']\n"), "error",
                            ("search space",)),
    "space lr nan": (search_case(space="lr: .nan\n"), "error", ("lr",)),
    "space lr infinite": (search_case(space="lr: [.inf]\n"), "error", ("lr",)),
    "space lr range nan": (search_case(space="lr: {low: .nan, high: 0.1}\n"), "error", ("lr",)),
    "space batch 0": (search_case(space="batch_size: 0\n"), "error", ("batch_size",)),
    "space batch fraction": (search_case(space="batch_size: 1.5\n"), "error", ("batch_size",)),
    "space arch null": (search_case(space="arch: null\n"), "error", ("arch",)),
    "space archs a number": (search_case(space="archs: 5\n"), "error", ("archs",)),
    "space a directory": (search_case("--config", "/"), "error", ("search space",)),
    "space archs choice a number": (search_case(space="archs: {cnn1d: 5}\n"), "error", ("archs.cnn1d",)),
    "space aug a list": (search_case(space="aug: [noise, scale]\n"), "error", ("aug",)),
    "space aug choice a number": (search_case(space="aug: {noise: 5}\n"), "error", ("aug",)),
    "space schedules a list": (search_case(space="schedules: [cosine]\n"), "error", ("schedules",)),
    # bad URIs, some with passwords: refused before Ray, the password never printed
    **{f"tracking uri {k}": (search_case("--tracking-uri", uri), "error", ("--tracking-uri",))
       for k, uri in URIS.items()},
    "optuna storage password": (command(*search_args(Path("{d}"), "--tracking-uri", "{store}", "--optuna-storage",
                                                      URIS["postgresql password"])), "error", ("--optuna-storage",)),
    "promote tracking password": (command("promote", "--search", "s", "--name", "m", "--tracking-uri",
                                          URIS["http password"]), "error", ("--tracking-uri",)),
    "promote bad model name": (command("promote", "--search", "s", "--name", "bad/name:x", "--tracking-uri",
                                       "{store}"), "error", ("--name",)),
    "promote unknown search": (command("promote", "--search", "nosuch", "--name", "m", "--tracking-uri", "{store}"),
                               "error", ("nosuch",)),
    "resume tracking password": (command("resume", "s", "--tracking-uri", URIS["postgresql password"]), "error",
                                 ("--tracking-uri",)),
    "resume unknown search": (command("resume", "nosuch", "--tracking-uri", "{store}"), "error", ("nosuch",)),
    "ui tracking password": (command("ui", "--tracking-uri", URIS["https password"]), "error", ("--tracking-uri",)),
    "server backend password": (command("server", "--backend-store-uri", URIS["postgresql password"],
                                        "--artifacts-destination", "{d}/out-art"), "error", ("--backend-store-uri",)),
    "study config missing": (command("study", "--config", "{d}/nowhere.yaml", "--plan"), "error", ("nowhere",)),
}


ABSENT = {"resume unknown search": "--search"}  # resume has no --search option: its error must not name one


def tree(d: Path) -> dict[str, str]:
    """Every file under `d` (the case's output, whatever starts with `out`, left out) with its content hash."""
    found = {}
    for path in sorted(d.rglob("*")):
        rel = path.relative_to(d)
        if rel.parts[0].startswith("out") or path.is_dir():
            continue
        found[str(rel)] = "link" if path.is_symlink() and not path.exists() else \
            hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr); argparse's usage errors exit through SystemExit. Any
    other exception escapes and fails the case."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES)
def test_damaged_input(case: str, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    build, outcome, words = CASES[case]
    d = tmp_path / "case"
    d.mkdir()
    argv = build(base, d)
    monkeypatch.chdir(d)  # what a command writes by default (mlflow.db, ray_results) lands in the case directory
    before = tree(d)
    code, out, err = run(argv, capsys)
    text = out + err
    assert "Traceback" not in text, text[-3000:]
    assert PASSWORD not in text and PASSWORD.replace("-", "%2D") not in text, text[-2000:]
    assert tree(d) == before, "a file outside the output changed"
    assert not ray.is_initialized(), "Ray started"
    assert all(w in text for w in words), (words, text[-2000:])
    assert case not in ABSENT or ABSENT[case] not in text, text[-2000:]
    if outcome == "error":
        lines = err.strip().splitlines()
        assert code not in (0, None) and lines and "error: " in lines[-1], text[-2000:]
        assert lines[-1].startswith("ecgsearch: error: ") or lines[-1].startswith("ecgsearch "), lines[-1]
    else:
        assert code == 0, text[-2000:]
    if outcome == "skip":
        assert f"skipping PTB-XL record {BAD}" in text or "skipping PTB-XL record line" in text or \
            "skipping DeepFake file" in text, text[-2000:]
    if outcome == "drop":
        assert "dropped 1 labels" in text or "dropped 2 labels" in text, text[-2000:]


def test_at_least_100_cases() -> None:
    assert len(CASES) >= 100, len(CASES)


def test_an_existing_prepared_dataset_is_replaced_and_an_empty_directory_used(base: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    root, ds = copy(base, tmp_path, "ptbxl"), copy(base, tmp_path, "ds")
    code, out, err = run(["data", "ptbxl", "--root", str(root), "--out", str(ds), "--workers", "1", "--seed", "3"],
                         capsys)
    assert code == 0 and "Traceback" not in out + err
    assert json.loads((ds / "manifest.json").read_text())["splits"]["seed"] == 3
    (tmp_path / "empty").mkdir()
    code, out, err = run(["data", "ptbxl", "--root", str(root), "--out", str(tmp_path / "empty"), "--workers", "1"],
                         capsys)
    assert code == 0 and (tmp_path / "empty" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "empty", "ptbxl"]  # no temp or aside dirs left
    code, out, err = run(["data", "verify", str(ds)], capsys)
    assert code == 0 and "content hash" in out and "every record and label plausible" in out, out + err


# A few real processes: what only the interpreter's own exit shows (exit status, stderr, no traceback on exit).
PROCESS_CASES = {
    "verify a damaged dataset": ("ds signals cut short", ["signals.npy"]),
    "backend password": ("server backend password", ["--backend-store-uri"]),
}


@pytest.mark.parametrize("case", PROCESS_CASES)
def test_damaged_input_in_a_real_process(case: str, base: Path, tmp_path: Path) -> None:
    name, words = PROCESS_CASES[case]
    d = tmp_path / "case"
    d.mkdir()
    argv = CASES[name][0](base, d)
    before = tree(d)
    proc = subprocess.run([sys.executable, "-m", "search.cli", *argv], cwd=d, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ecgsearch: error: ") and all(w in last for w in words), proc.stderr[-2000:]
    assert PASSWORD not in proc.stderr + proc.stdout and tree(d) == before


@pytest.mark.parametrize("command", ["ui", "server"])
def test_a_busy_port_is_one_line_not_someone_elses_server(command: str, base: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    import socket

    store = f"sqlite:///{base / 'store.db'}"
    argv = {"ui": ["ui", "--tracking-uri", store],
            "server": ["server", "--backend-store-uri", store, "--artifacts-destination", str(tmp_path / "art")]}
    with socket.socket() as other:  # another server listening on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code, out, err = run([*argv[command], "--port", str(port)], capsys)
    assert code == 2 and err.startswith("ecgsearch: error: --port") and "in use" in err, out + err
    assert len(err.strip().splitlines()) == 1 and "http://" not in out
