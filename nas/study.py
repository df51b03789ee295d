"""Study storage (the one source of truth) and the trials table every report reads.

Storages are Optuna's own: an RDB URL (``sqlite:///runs/nas.db`` by default, or any
SQLAlchemy URL such as PostgreSQL) or a journal file (a path ending in ``.log``) for many
processes on one machine. Whichever backend ran the search, ``front``/``report``/``export``
read the study through this module.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from nas.errors import ConfigError, NasError
from nas.journal import RepairingJournalFileBackend, journal_storage  # noqa: F401 - the backend: re-exported
from nas.pareto import pareto_mask
from nas.trust import redact_text, redact_url

__all__ = [
    "DEFAULT_STORAGE",
    "META_KEY",
    "open_storage",
    "path_component",
    "load_study",
    "study_meta",
    "trials_frame",
    "front_frame",
]

DEFAULT_STORAGE = "sqlite:///runs/nas.db"
HEARTBEAT_S = 10
META_KEY = "nas"
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
_STORAGE_HELP = "a database URL like sqlite:///runs/nas.db or postgresql://..., or a journal file path ending in .log"

# A name used as one folder name as it is: these characters only, not starting with a dot.
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def path_component(name: str) -> str:
    """``name`` (a study name) as one folder name that stays inside its parent folder.

    A name of letters, digits, ``.``, ``_`` and ``-`` (not starting with ``.``, at most 100
    characters) is used as it is. Any other name (a ``/``, ``..``, a space, a name from an
    untrusted space file...) gets every other character run replaced by ``_`` and a short hash
    of the full name appended, so two different names never share a folder."""
    if _SAFE_COMPONENT.fullmatch(name):
        return name
    clean = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9._-]+", "_", name)).lstrip("._")[:80] or "study"
    return f"{clean}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def _storage_identity(url: str) -> str:
    """The storage a URL names, stable across working folders: file paths absolute, password masked."""
    from nas.trust import redact_url

    path = _sqlite_path(url)
    if path is not None:
        return "sqlite:///" + str(path.resolve())
    if "://" not in url:
        return str(Path(url).resolve())
    return redact_url(url)


OWNER_FILE = ".nas-study"


def study_folder(root: Path, name: str, storage_url: str) -> Path:
    """The folder under ``root`` for study ``name`` of the storage at ``storage_url``; it holds
    a ``.nas-study`` file naming its owner. Two studies of one name in two storages (an SQLite
    database and a journal in the same folder), or a name equal to another's sanitized folder
    name, got one folder and overwrote each other's trial weights: a folder owned by another
    study is never reused; that study gets ``NAME-<hash of storage and name>`` instead. A folder
    from before owner files is claimed by the first study to use it."""
    owner = f"{_storage_identity(storage_url)}\n{name}\n"
    base = path_component(name)
    for folder in (root / base, root / f"{base}-{hashlib.sha256(owner.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"):
        marker = folder / OWNER_FILE
        try:
            if marker.is_file():
                if marker.read_text(encoding="utf-8", errors="replace") == owner:
                    return folder
                continue
            folder.mkdir(parents=True, exist_ok=True)
            marker.write_text(owner, encoding="utf-8")
            return folder
        except OSError:
            return folder  # an unwritable folder fails later with its own message
    return folder


def _sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///") :]
        return None if rest in ("", ":memory:") else Path(rest)
    return None


def _with_driver(url: str) -> str:
    """``postgresql://`` names no driver and SQLAlchemy then wants psycopg2; with only psycopg 3
    installed (the ``postgres`` extra), use it."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and sep:
        import importlib.util

        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
            return f"postgresql+psycopg://{rest}"
    return url


def open_storage(url: str, *, create: bool, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """Open an Optuna storage; with ``create=False`` a missing SQLite/journal file is an error
    (opening it would silently create an empty database). Writers (``create=True``) get a
    heartbeat unless ``heartbeat=False`` (Ray's ask/tell driver runs no optimize() loop).
    Errors show the URL with its password masked."""
    shown = redact_url(url)
    if url.endswith(JOURNAL_SUFFIXES) and "://" not in url:
        path = Path(url)
        if not create and not path.is_file():
            raise NasError(f"storage {shown!r}: journal file does not exist")
        if path.exists() and not path.is_file():
            raise ConfigError(f"storage {shown!r} is not a file (allowed: {_STORAGE_HELP})")
        path.parent.mkdir(parents=True, exist_ok=True)
        return journal_storage(path, shown)
    if "://" not in url:
        raise ConfigError(f"storage {shown!r} is not usable (allowed: {_STORAGE_HELP})")
    sqlite = _sqlite_path(url)
    if sqlite is not None:
        if not create and not sqlite.is_file():
            raise NasError(f"storage {shown!r}: database file {sqlite} does not exist (run `nas search` first)")
        sqlite.parent.mkdir(parents=True, exist_ok=True)
    engine_url = _with_driver(url)
    beat: dict[str, Any] = {}
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if create and heartbeat:  # a writer: a heartbeat lets a later run fail and retry trials of dead workers
                    beat = {"heartbeat_interval": HEARTBEAT_S, "grace_period": 3 * HEARTBEAT_S,
                            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
                # a reader of an existing database needs no schema creation or upgrade check
                quick = {} if create else {"skip_compatibility_check": True, "skip_table_creation": True}
                return optuna.storages.RDBStorage(engine_url,
                                                  engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
                                                  **beat, **quick)
        except Exception as exc:  # SQLAlchemy raises many types for a bad URL or driver
            # Two processes creating the same new database race on its schema (seen with two
            # `nas search` started together on a new SQLite file): the loser retries and finds
            # the schema the winner made.
            if create and attempt < 3 and any(w in str(exc) for w in ("alembic_version", "already exists", "UNIQUE")):
                time.sleep(0.5 * (attempt + 1))
                continue
            root = exc  # Optuna wraps driver errors ("An exception is raised during the commit"): say the cause
            while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
                root = root.__cause__ or root.__context__
            text = str(root).strip() or str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            first = redact_text(first, url)
            raise ConfigError(f"storage {shown!r} cannot be opened: {first} (allowed: {_STORAGE_HELP})") from exc
    raise AssertionError("unreachable")  # pragma: no cover


def load_study(name: str, storage_url: str) -> optuna.Study:
    storage = open_storage(storage_url, create=False)
    try:
        storage.get_study_id_from_name(name)  # (listing study summaries would read every trial)
    except KeyError:
        names = [s.study_name for s in storage.get_all_studies()]
        existing = ", ".join(sorted(names)) or "none"
        raise NasError(f"study {name!r} not found in {redact_url(storage_url)} (existing: {existing})") from None
    return optuna.load_study(study_name=name, storage=storage)


def study_meta(study: optuna.Study) -> dict[str, Any]:
    """The nas record saved with the study: objectives, task, space. Studies not made by nas
    get their objectives from the study's metric names (or obj0, obj1, ...)."""
    meta = study.user_attrs.get(META_KEY)
    if meta:
        return meta
    dirs = ["maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    names = study.metric_names or [f"obj{i}" for i in range(len(dirs))]
    return {"objectives": list(names), "directions": dirs}


def _compression_summary(cand: dict | None) -> str:
    if not cand:
        return ""
    from nas.config import CompressionConfig

    try:
        return CompressionConfig.from_dict(cand.get("compression", {})).summary()
    except NasError:
        return "?"


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, every objective by name, key metrics, the candidate
    summary and any failure reason. Objective columns are NaN for unfinished/failed trials."""
    meta = study_meta(study)
    names = meta["objectives"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        values = t.values if t.state == optuna.trial.TrialState.COMPLETE and t.values else None
        for i, n in enumerate(names):
            row[n] = values[i] if values else np.nan
        for k in ("accuracy", "test_accuracy", "packed_val_accuracy", "packed_test_accuracy", "latency_ms",
                  "latency_iqr_ms", "latency_threads", "size_bytes", "flops", "params"):
            if k not in row:
                row[k] = ua.get(k, np.nan) if values else np.nan
        row["deploy_precision"] = ua.get("deploy_precision", "") if values else ""
        cand = ua.get("candidate")
        row["arch"] = ua.get("summary", "")
        # stored at suggest time; older studies: computed (which needs the registry, and PyTorch)
        row["compression"] = ua["compression_summary"] if "compression_summary" in ua else _compression_summary(cand)
        row["candidate"] = json.dumps(cand, sort_keys=True) if cand else ""
        row["fail_reason"] = ua.get("fail_reason", "")
        row["finalist_of"] = ua.get("finalist_of", np.nan)  # the trial this one retrains (nas.finalists)
        host = [ua.get(k) for k in ("latency_cpu", "latency_cores", "latency_onnxruntime")]
        row["timing_host"] = (f"{host[0]} x{host[1]}, onnxruntime {host[2]}" if all(h is not None for h in host) else "")
        if row["timing_host"] and ua.get("latency_device"):  # timed on a probe (--latency-on): the device's address too
            row["timing_host"] += f" at {ua['latency_device']}"
        row["duration_s"] = t.duration.total_seconds() if t.duration else np.nan
        row["datetime_start"] = t.datetime_start
        row["datetime_complete"] = t.datetime_complete
        rows.append(row)
    cols = ["trial", "state", *names]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=cols)
    return df


def front_frame(study: optuna.Study) -> pd.DataFrame:
    """The Pareto-optimal completed trials, sorted by the first objective (best first). A finalist
    and the trial it retrained are both trials: validation decides which is on the front."""
    meta = study_meta(study)
    names, dirs = meta["objectives"], meta["directions"]
    df = trials_frame(study)
    if df.empty:
        return df
    if "latency_ms" in names and df.loc[df["state"] == "COMPLETE", "timing_host"].nunique() > 1:
        # latencies timed on different kinds of machine are never compared: one front per host
        fronts = [g[pareto_mask(g[names].to_numpy(dtype=float), dirs)] for _, g in df.groupby("timing_host", sort=True)]
        front = pd.concat(fronts).copy()
        return front.sort_values(["timing_host", names[0]], ascending=[True, dirs[0] == "minimize"],
                                 kind="stable").reset_index(drop=True)
    front = df[pareto_mask(df[names].to_numpy(dtype=float), dirs)].copy()
    return front.sort_values(names[0], ascending=dirs[0] == "minimize", kind="stable").reset_index(drop=True)
