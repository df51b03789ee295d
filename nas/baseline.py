"""Your own model on the front: ``--baseline model.onnx`` (or a ``.pt2`` from torch.export).

The model is measured the way every trial is: accuracy on the study's own validation and test
splits (the inputs the trials see, normalized by the training split's statistics), latency in
ONNX Runtime under the host-wide measurement lock with the study's thread count and windows,
scaled to the study's reference runtime floor, and size as the bytes of the file handed over.
A ``.pt2`` is checked to hold nothing pickled, loaded with unpickling disabled, and exported to
ONNX so that it is timed in the same runtime as the trials.

The record is stored with the study (user attribute ``nas:baselines``, keyed by the file's
name), so ``nas front`` and ``nas report`` show it later without re-measuring. A front member
*beats* a baseline when it is at least as accurate on validation and no worse on every cost
the baseline has, better on one; tables show by how much (``10.4x smaller, 1.09x faster``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from nas.errors import BundleError, NasError

__all__ = ["BASELINES_KEY", "check_baseline", "measure_baseline", "store_baseline", "stored_baselines", "beats", "annotate"]

BASELINES_KEY = "nas:baselines"
COSTS = ("latency_ms", "size_bytes")
SUFFIXES = (".onnx", ".pt2")


def _onnx_from_pt2(path: Path, example: Any, workdir: Path) -> Path:
    import torch

    from nas.onnxio import quiet_output, quiet_exporter
    from nas.trust import MAX_PT2_BYTES
    from nas.verify import load_pt2

    # torch.export.save stores the example inputs pickled; they are not needed here, so a copy of
    # the archive with that entry emptied is what gets checked and loaded (nothing is unpickled).
    import zipfile

    import zlib

    clean = workdir / "baseline.pt2"
    budget = MAX_PT2_BYTES  # decompressed bytes copied at most (declared sizes can lie)
    try:
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(clean, "w") as dst:
            for info in src.infolist():
                if info.filename.endswith("/data/sample_inputs/model.pt"):
                    dst.writestr(info, b"")
                    continue
                with src.open(info) as fin, dst.open(info, "w") as fout:
                    while chunk := fin.read(1 << 20):
                        budget -= len(chunk)
                        if budget < 0:
                            raise BundleError(f"{path}: {path.name} unpacks to more than {MAX_PT2_BYTES >> 20} MiB")
                        fout.write(chunk)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error, NotImplementedError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{path}: {path.name} is not a torch.export archive ({exc})") from exc
    try:
        program = load_pt2(clean)
    except BundleError as exc:  # name the user's file, not the checked copy
        raise BundleError(str(exc).replace(str(clean), str(path)).replace("baseline.pt2", path.name)) from exc
    out = workdir / "baseline.onnx"
    quiet_exporter()  # (it logs a line per missing torchvision operator)
    try:  # the program as it is (its graph is already captured): the torch.export-based exporter
        with quiet_output():
            torch.onnx.export(program, (example,), str(out), dynamo=True, optimize=True)
        return out
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise BundleError(f"{path}: cannot export the program to ONNX ({type(exc).__name__})") from exc


def _open(path: Path, data: Any, threads: int, workdir: Path) -> tuple[Any, Path]:
    """The baseline as an ONNX Runtime session (and its ONNX file), checked against the data:
    input [N, C, H, W] of the data's shape, output [N, classes]."""
    import torch

    from nas.onnxio import ort_predict, ort_session
    from nas.trust import check_onnx

    if path.suffix.lower() not in SUFFIXES:
        raise NasError(f"baseline {str(path)!r}: unknown format {path.suffix or '(none)'!r} (allowed: .onnx, .pt2)")
    if not path.is_file():
        raise NasError(f"baseline file {str(path)!r} does not exist")
    shape = (1, data.in_channels, *data.input_size)
    if path.suffix.lower() == ".pt2":
        onnx_path = _onnx_from_pt2(path, torch.zeros(shape), workdir)
    else:
        check_onnx(path)
        onnx_path = path
    try:
        sess = ort_session(onnx_path, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from exc
    inp = sess.get_inputs()[0]
    want = [d if isinstance(d, int) else None for d in inp.shape]
    if len(want) != 4 or any(w is not None and w != s for w, s in zip(want[1:], shape[1:])):
        raise NasError(f"baseline {path.name} takes input {inp.shape}, but the study's data is "
                       f"[N, {', '.join(map(str, shape[1:]))}] (channels, height, width)")
    try:
        out = ort_predict(sess, data.x_val[:2].numpy())
    except Exception as exc:  # noqa: BLE001
        raise NasError(f"baseline {path.name} fails on the study's inputs ({str(exc).splitlines()[0][:200]})") from exc
    if out.ndim != 2 or out.shape[1] != data.num_classes:
        raise NasError(f"baseline {path.name} outputs shape {list(out.shape[1:])} per input; the study's data "
                       f"has {data.num_classes} classes (need [N, {data.num_classes}] scores)")
    return sess, onnx_path


def check_baseline(path: str | Path, data: Any, threads: int = 1) -> None:
    """Refuse, before a search starts, a baseline that could not be measured on ``data``."""
    with tempfile.TemporaryDirectory(prefix="nas-baseline-") as tmp:
        _open(Path(path), data, threads, Path(tmp))


def measure_baseline(path: str | Path, study: optuna.Study) -> dict[str, Any]:
    """Accuracy (validation, test), latency and size of a user's model on ``study``'s task."""
    import torch

    from nas.backends.optuna import with_study_floor
    from nas.measure import latency_host
    from nas.onnxio import ort_predict
    from nas.pipeline import Task, get_dataset, timed
    from nas.study import study_meta

    path = Path(path)
    meta = study_meta(study)
    if "task" not in meta:
        raise NasError(f"study {study.study_name!r} was not made by nas search: no task to measure a baseline on")
    task = with_study_floor(Task.from_dict(meta["task"]), study)
    data = get_dataset(task.dataset, task.seed)
    with tempfile.TemporaryDirectory(prefix="nas-baseline-") as tmp:
        sess, onnx_path = _open(path, data, task.latency_threads, Path(tmp))
        val = ort_predict(sess, data.x_val.numpy())
        test = ort_predict(sess, data.x_test.numpy())
        lat = timed(onnx_path, torch.zeros(1, data.in_channels, *data.input_size), task)
    host = latency_host()
    return {
        "name": path.name, "file": str(path.resolve()), "format": path.suffix.lower().lstrip("."),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "accuracy": float((val.argmax(1) == data.y_val.numpy()).mean()),
        "test_accuracy": float((test.argmax(1) == data.y_test.numpy()).mean()),
        "size_bytes": int(path.stat().st_size), **lat, **host,
        "timing_host": f"{host['latency_cpu']} x{host['latency_cores']}, onnxruntime {host['latency_onnxruntime']}",
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def store_baseline(study: optuna.Study, record: dict[str, Any]) -> None:
    """Keep ``record`` with the study (replacing an earlier one of the same name)."""
    stored = dict(study.user_attrs.get(BASELINES_KEY) or {})
    stored[record["name"]] = record
    study.set_user_attr(BASELINES_KEY, stored)


def stored_baselines(study: optuna.Study) -> list[dict[str, Any]]:
    stored = study.user_attrs.get(BASELINES_KEY) or {}
    return [stored[k] for k in sorted(stored)] if isinstance(stored, dict) else []


def beats(row: pd.Series | dict[str, Any], base: dict[str, Any], objectives: list[str]) -> dict[str, float] | None:
    """How much a trial beats a baseline (cost ratios baseline / trial), or None if it does not:
    at least as accurate on validation, no worse on any cost both have, better on one."""
    if "accuracy" not in objectives or row.get("accuracy") is None or row["accuracy"] < base["accuracy"]:
        return None
    costs = [c for c in COSTS if c in objectives and c in base and pd.notna(row.get(c))]
    if not costs or any(row[c] > base[c] for c in costs):
        return None
    if row["accuracy"] == base["accuracy"] and all(row[c] == base[c] for c in costs):
        return None
    return {c: float(base[c]) / float(row[c]) if row[c] > 0 else float("inf") for c in costs}


def describe(ratios: dict[str, float]) -> str:
    words = {"size_bytes": "smaller", "latency_ms": "faster"}
    return ", ".join(f"{r:.2f}x {words[c]}" if r < 100 else f"{r:,.0f}x {words[c]}" for c, r in ratios.items())


def annotate(front: pd.DataFrame, baselines: list[dict[str, Any]], objectives: list[str]) -> pd.DataFrame:
    """The front with one column per baseline: how much each member beats it ('' if it does not).
    Compared only with members timed on the baseline's kind of host."""
    out = front.copy()
    for base in baselines:
        col = f"vs {base['name']}"
        cells = []
        for _, row in out.iterrows():
            same_host = "timing_host" not in row or not row["timing_host"] or row["timing_host"] == base["timing_host"]
            r = beats(row, base, objectives) if same_host else None
            cells.append(describe(r) if r else "")
        out[col] = cells
    return out


def baseline_lines(baselines: list[dict[str, Any]], front: pd.DataFrame) -> list[str]:
    """One sentence per baseline: its figures and how many front members beat it."""
    from nas.table import human

    lines = []
    for b in baselines:
        col = f"vs {b['name']}"
        n = int((front[col] != "").sum()) if col in front else 0
        lines.append(f"baseline {b['name']}: {human('accuracy', b['accuracy'])} val / {human('test_accuracy', b['test_accuracy'])} "
                     f"test, {human('latency_ms', b['latency_ms'])}, {human('size_bytes', b['size_bytes'])} "
                     f"(timed on {b['timing_host']}); {n} front member{'s' if n != 1 else ''} beat{'s' if n == 1 else ''} it")
    return lines
