"""Bundles: what a user takes away from a study, and proof that it is what the search measured.

A bundle folder holds ``model.onnx`` (the deployable, int8 QDQ where quantized),
``model.pt2`` (a ``torch.export`` program of the same model), ``weights.nasp`` (the packed
file whose length is ``size_bytes``), ``manifest.json`` (candidate, metrics, measurement
context, data split, sha256 of every file) and ``MODEL_CARD.md``. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from nas.compress.passes import (
    active_methods,
    load_packed,
)
from nas.config import Candidate
from nas.errors import NasError
from nas.measure import (
    LATENCY_HOST_KEYS,
    cpu_model,
)
from nas.pipeline import PACKED_NAME, Task, artifact_name, evaluate, get_dataset
from nas.preprocess import with_normalization
from nas.pareto import knee_order
from nas.study import front_frame, study_meta, trials_frame
from nas.trust import (
    redact_url,
)

__all__ = ["pick_trial", "export_bundle", "FILES", "MANIFEST", "CARD", "BUNDLE_FORMAT", "LATENCY_BAND"]

FILES = ("model.onnx", "model.pt2", PACKED_NAME)
# /2: the models take raw inputs and normalise them themselves; the manifest says how to feed them
BUNDLE_FORMAT = "nas-bundle/2"
# int8 QDQ quantizes activations too; the share of test predictions that must still agree
# with the packed float model (the weights themselves are the packed ones exactly).
INT8_AGREEMENT = 0.9
MANIFEST = "manifest.json"
CARD = "MODEL_CARD.md"
# Latency differs between processes by more than one run's IQR; the band verify accepts.
LATENCY_BAND = ("within max(3 x recorded IQR, 0.25 x recorded median) either way; a slower run is re-timed "
                "up to 5 times, 1-8 s apart; not compared on a host with another CPU model, core count or onnxruntime version "
                "than the one that timed it")

_PICK = re.compile(r"^\s*(max|min)\s+(\w+)(?:\s+(?:with|where)\s+(.+))?\s*$")
_COND = re.compile(r"^\s*(\w+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the manifest records one per file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Columns a pick rule may select or filter on: validation accuracy and the measured costs.
# Test accuracy is reported, never chosen on (it would leak the test split into selection).
PICKABLE = ("accuracy", "val_accuracy", "packed_val_accuracy", "reward", "latency_ms", "latency_iqr_ms",
            "size_bytes", "flops", "params")


def _pick_column(name: str, df: Any, rule: str) -> str:
    if name.startswith("test") or "test_" in name:
        raise NasError(f"pick rule {rule!r}: {name} is never used for selection (the test split is only reported; "
                       f"allowed: {', '.join(c for c in PICKABLE if c in df.columns)})")
    if name not in PICKABLE or name not in df.columns:
        raise NasError(f"pick rule {rule!r}: unknown column {name!r} (allowed: {', '.join(c for c in PICKABLE if c in df.columns)})")
    return name


def pick_trial(study: optuna.Study, rule: str) -> int:
    """A front member by rule: ``knee``, or ``max|min NAME [with COND [and COND ...]]`` where
    COND is ``NAME <= VALUE`` (also ``<``, ``>=``, ``>``) and NAME is validation accuracy or a
    cost (:data:`PICKABLE`). Test accuracy is never a selection criterion."""
    meta = study_meta(study)
    front = front_frame(study)
    if front.empty:
        raise NasError(f"study {study.study_name!r} has no completed trials to pick from")
    if rule.strip() == "knee":
        return int(front["trial"].iloc[int(knee_order(front[meta["objectives"]].to_numpy(dtype=float),
                                                       meta["directions"])[0])])
    m = _PICK.match(rule)
    if not m:
        raise NasError(f"pick rule {rule!r} not understood (allowed: 'knee', or 'max|min NAME [with NAME <= VALUE [and ...]]')")
    how, target, conds = m.groups()
    df = trials_frame(study)
    df = df[df["state"] == "COMPLETE"]
    target = _pick_column(target, df, rule)
    for cond in (conds.split(" and ") if conds else []):
        c = _COND.match(cond)
        if not c:
            raise NasError(f"pick rule: condition {cond!r} not understood (like 'latency_ms <= 0.02')")
        name, op = _pick_column(c.group(1), df, rule), c.group(2)
        try:
            value = float(c.group(3))
        except ValueError:
            raise NasError(f"pick rule: condition {cond!r}: {c.group(3)!r} is not a number") from None
        if not np.isfinite(value):
            raise NasError(f"pick rule: condition {cond!r}: the value must be a finite number")
        col = df[name].astype(float)
        df = df[{"<=": col <= value, "<": col < value, ">=": col >= value, ">": col > value}[op]]
    if df.empty:
        raise NasError(f"pick rule {rule!r}: no completed trial satisfies it")
    row = df.sort_values(target, ascending=how == "min", kind="stable").iloc[0]
    return int(row["trial"])


def _context(threads: int) -> dict[str, Any]:
    import onnx
    import onnxruntime

    return {"runtime": "onnxruntime", "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "torch": torch.__version__.split("+")[0], "python": platform.python_version(),
            "execution_provider": "CPUExecutionProvider", "threads": threads, "batch_size": 1,
            "cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()}


def _card(manifest: dict[str, Any]) -> str:
    from nas.table import human

    m, c = manifest["metrics"], Candidate.from_dict(manifest["candidate"])
    inp = manifest["input"]
    src = manifest["source"]
    ctx = manifest["measurement"]
    pos = src.get("front_position", {})
    lines = [
        f"# {manifest['name']}",
        "",
        f"A {c.arch.spatial} CNN classifier for `{manifest['data']['name']}` "
        f"(input {manifest['data']['input_shape']}, {manifest['data']['num_classes']} classes), "
        f"found by compression-aware architecture search with `nas`.",
        "",
        "## How it was found",
        f"- study `{src['study']}` (storage `{redact_url(src['storage'])}`), trial {src['trial']} of {src['n_trials']}, "
        f"objectives {', '.join(src['objectives'])}",
        f"- on the Pareto front: {'yes' if pos.get('on_front') else 'no'}"
        + (f", one of {pos['front_size']} Pareto-optimal trials; rank {pos['accuracy_rank']} by accuracy" if pos.get("on_front") else ""),
        f"- architecture: `{c.arch.summary()}`",
        f"- compression: `{c.compression.summary()}`",
        "",
        "## Figures (measured on the files in this folder)",
        "| metric | value |",
        "|---|---|",
        f"| validation accuracy | {human('accuracy', m['val_accuracy'])} |",
        f"| test accuracy | {human('accuracy', m['test_accuracy'])} |",
        *([f"| packed PyTorch model (weights only, float activations) | val {human('accuracy', m['packed_val_accuracy'])}, "
           f"test {human('accuracy', m['packed_test_accuracy'])} |"] if "packed_test_accuracy" in m else []),
        f"| latency (ONNX Runtime, batch 1, {m.get('latency_threads', ctx['threads'])} thread"
        f"{'s' if m.get('latency_threads', ctx['threads']) != 1 else ''}) | " + (
            f"{human('latency_ms', m['latency_ms'])} mean over {m['latency_inputs']:,} validation inputs (the work "
            f"depends on the input), p95 {human('latency_ms', m['latency_p95_ms'])} |" if "latency_p95_ms" in m else
            f"{human('latency_ms', m['latency_ms'])} median, IQR {human('latency_ms', m['latency_iqr_ms'])} |"),
        f"| size of `{PACKED_NAME}` | {human('size_bytes', m['size_bytes'])} |",
        f"| parameters | {m['params']:,} |",
        f"| FLOPs (fvcore, multiply-adds) | {m['flops']:,} |",
        f"| deployed precision | {m['deploy_precision']} |",
        f"| latency timed on | {m.get('latency_cpu', ctx['cpu'])}, {m.get('latency_cores', ctx['cores'])} cores, "
        f"onnxruntime {m.get('latency_onnxruntime', ctx['onnxruntime'])} |",
    ]
    if manifest.get("search_metrics"):
        s = manifest["search_metrics"]
        lines.append(f"| at search time | val {human('accuracy', s['val_accuracy'])}, test {human('accuracy', s['test_accuracy'])}, "
                     f"{human('size_bytes', s['size_bytes'])} (retrained for {manifest['retrain_epochs']} epochs since) |")
    lines += [
        "",
        "## Use it",
        "```python",
        "import nas",
        f"model, manifest = nas.load_bundle(\"{manifest['name']}\")",
        "logits = model(x)  # x: float32 array (N, " + ", ".join(str(d) for d in manifest["data"]["input_shape"])
        + f"), raw: {inp['scale']}",
        "classes = manifest[\"input\"][\"classes\"]  # logits[:, k] scores classes[k]",
        "```",
        "Or run `model.onnx` in ONNX Runtime directly (input "
        f"`{inp['layout']}` {inp['dtype']}, batch 1 as timed), or load `model.pt2` with `torch.export.load`; "
        "both take the same raw inputs and give the same logits.",
        "",
        "## Input",
        f"- layout {inp['layout']}, dtype {inp['dtype']}, shape (N, "
        + ", ".join(str(d) for d in manifest["data"]["input_shape"]) + "); `model.onnx` takes N = 1 (one input "
        "at a time, as it was timed), `model.pt2` and `load_bundle` any N",
        f"- values: {inp['scale']}; the training split spans {inp['range'][0]:g} to {inp['range'][1]:g}",
        f"- normalisation is inside the model (its first operation): (x - {inp['normalization']['mean']:.7g}) / "
        f"{inp['normalization']['std']:.7g}, the training split's mean and std; do not normalise again",
        "- classes (logit order): " + ", ".join(f"{k} `{c}`" for k, c in enumerate(inp["classes"])),
        "",
        "## Limits",
        f"- Trained on {manifest['data']['n_train']} samples of `{manifest['data']['name']}` (split seed "
        f"{manifest['data']['seed']}); accuracy elsewhere is unknown.",
        "- Latency was measured at batch 1 on the CPU above; other hardware will differ.",
    ]
    lines += [note for meth in active_methods(c.compression) for note in meth.card_notes(c.compression)]
    own = m.get("method_metrics") or {}
    lines += [line for meth in active_methods(c.compression) if meth.name in own
              for line in meth.card_lines(c.compression, own[meth.name])]
    return "\n".join(lines) + "\n"


def _front_position(study: optuna.Study, number: int) -> dict[str, Any]:
    front = front_frame(study)
    on = number in set(front["trial"]) if not front.empty else False
    out: dict[str, Any] = {"on_front": bool(on), "front_size": int(len(front))}
    if on and "accuracy" in front.columns:
        order = front.sort_values("accuracy", ascending=False)["trial"].tolist()
        out["accuracy_rank"] = order.index(number) + 1
    return out


def export_bundle(study: optuna.Study, number: int, out: Path, *, storage_url: str = "",
                  retrain_epochs: int | None = None) -> Path:
    """Write the bundle of trial ``number`` into ``out`` (a new or empty folder)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise NasError(f"study {study.study_name!r} has no trial {number} (trials 0..{len(trials) - 1})")
    trial = trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise NasError(f"trial {number} is {trial.state.name}, not COMPLETE: {trial.user_attrs.get('fail_reason', '')}")
    if out.exists() and any(out.iterdir()):
        raise NasError(f"bundle folder {out} exists and is not empty (choose another --out)")
    meta = study_meta(study)
    task = Task.from_dict(meta["task"])
    cand = Candidate.from_dict(trial.user_attrs["candidate"])
    metrics = {k: trial.user_attrs[k] for k in ("accuracy", "val_accuracy", "test_accuracy", "latency_ms",
                                                 "latency_iqr_ms", "size_bytes", "params", "flops", "deploy_precision")}
    metrics.update({k: trial.user_attrs[k] for k in ("packed_val_accuracy", "packed_test_accuracy", "latency_threads",
                                                     "latency_floor_ms", "latency_p95_ms", "latency_inputs",
                                                     "method_metrics")
                    if k in trial.user_attrs})
    metrics.update({k: trial.user_attrs[k] for k in LATENCY_HOST_KEYS if k in trial.user_attrs})
    search_metrics = None
    out.parent.mkdir(parents=True, exist_ok=True)
    # built beside its destination, then renamed into place in one step
    tmp = Path(tempfile.mkdtemp(prefix=".nas-bundle-", dir=out.parent))
    try:
        if retrain_epochs:
            cand = dataclasses.replace(cand, recipe=dataclasses.replace(cand.recipe, epochs=retrain_epochs))
            res = evaluate(cand, dataclasses.replace(task, artifacts_dir=str(tmp), early_stop=None, epochs=None),
                           trial_id="retrain")
            src = tmp / "retrain"
            search_metrics, metrics = metrics, {k: res.metrics[k] for k in (*metrics, *LATENCY_HOST_KEYS) if k in res.metrics}
        else:
            folder = trial.user_attrs.get("artifact_dir") or (
                str(Path(task.artifacts_dir) / artifact_name(number)) if task.artifacts_dir else None)
            if not folder or not Path(folder, PACKED_NAME).is_file():
                raise NasError(f"trial {number} has no stored artifacts (looked in {folder!r}); "
                               "export it with --retrain EPOCHS to rebuild it")
            src = Path(folder)
        shutil.copy2(src / "model.onnx", tmp / "model.onnx")
        shutil.copy2(src / PACKED_NAME, tmp / PACKED_NAME)
        data = get_dataset(task.dataset, task.seed)
        # the PyTorch program takes raw inputs like model.onnx: normalisation is its first step
        try:
            packed = load_packed(cand, (tmp / PACKED_NAME).read_bytes())
        except Exception as exc:  # noqa: BLE001 - a file that is not this candidate's fails in many ways
            raise NasError(f"trial {number}: the stored {PACKED_NAME} in {src} is not this trial's candidate "
                           f"({type(exc).__name__}); another study may have written there: export it with "
                           "--retrain EPOCHS to rebuild it") from exc
        model = with_normalization(packed, *data.normalization)
        example = torch.zeros(2, cand.arch.in_channels, *cand.arch.input_size)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        program.example_inputs = None  # otherwise saved with torch.save (a pickle); the bundle has none
        torch.export.save(program, str(tmp / "model.pt2"))
        if (tmp / PACKED_NAME).stat().st_size != metrics["size_bytes"]:
            raise NasError(f"trial {number}: packed file is {(tmp / PACKED_NAME).stat().st_size} bytes, "
                           f"the study recorded {metrics['size_bytes']}")
        manifest = {
            "format": BUNDLE_FORMAT,
            "name": out.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "candidate": cand.to_dict(),
            "metrics": metrics,
            "search_metrics": search_metrics,
            "retrain_epochs": retrain_epochs,
            "measurement": _context(task.latency_threads),
            "data": {**data.describe(), "dataset": task.dataset,
                     "splits": "train/val/test fixed by seed; accuracy objective on val, test never seen by the search"},
            "input": data.input_spec(),
            "source": {"study": study.study_name, "storage": redact_url(storage_url), "trial": number, "n_trials": len(trials),
                       "objectives": meta["objectives"], "front_position": _front_position(study, number)},
            "tolerances": {"accuracy": "exact (same data, same artifact)", "size_bytes": "exact",
                           "latency_ms": LATENCY_BAND},
            "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in FILES},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / CARD).write_text(_card(manifest))
        if (tmp / "retrain").exists():
            shutil.rmtree(tmp / "retrain")
        if (tmp / "teachers").exists():
            shutil.rmtree(tmp / "teachers")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)  # the bundle appears whole or not at all
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
