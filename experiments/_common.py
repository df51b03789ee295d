"""Shared helpers of the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()} cores{mem}, {cpu}, Python {platform.python_version()}"


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def pyplot():  # noqa: ANN201
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def front_within(study, within_s: float | None = None):  # noqa: ANN201
    """The study's Pareto front, of the trials finished within ``within_s`` seconds of the first
    trial's start (all trials if ``None``): what a search stopped at that time would report."""
    import pandas as pd

    from nas.pareto import pareto_mask
    from nas.study import front_frame, study_meta, trials_frame

    if within_s is None:
        return front_frame(study)
    meta = study_meta(study)
    df = trials_frame(study)
    t0 = pd.to_datetime(df["datetime_start"]).min()
    df = df[(pd.to_datetime(df["datetime_complete"]) - t0).dt.total_seconds() <= within_s]
    front = df[pareto_mask(df[meta["objectives"]].to_numpy(dtype=float), meta["directions"])]
    return front.sort_values(meta["objectives"][0], ascending=False).reset_index(drop=True)


def compare_with_front(study, baselines: list[dict], input_shape: tuple[int, ...], passes: int = 2,
                       front=None) -> dict[str, Any]:  # noqa: ANN001
    """Time the baselines' ONNX files, every front member's deployed ``model.onnx`` and the
    runtime's floor (an Identity graph) one after the other within the same ``passes``, then
    compare each baseline with the front members at least as accurate on *validation* (the test
    split is shown beside, never chosen on): size ratio against the smallest, latency ratio
    against the fastest, and every such member's own ratios.

    ``baselines``: dicts with ``name``, ``onnx`` (path), ``size_bytes``, ``val_accuracy``,
    ``test_accuracy``."""
    import numpy as np

    from nas.measure import identity_graph, onnx_latency
    from nas.study import front_frame

    front = front_frame(study) if front is None else front
    models: dict[Any, Path] = {b["name"]: Path(b["onnx"]) for b in baselines}
    models.update({int(t): Path(study.trials[int(t)].user_attrs["artifact_dir"]) / "model.onnx" for t in front["trial"]})
    models["runtime_floor"] = identity_graph(input_shape)
    timed = [{k: onnx_latency(p, input_shape) for k, p in models.items()} for _ in range(passes)]
    ms = {k: float(np.mean([t[k].median_ms for t in timed])) for k in models}
    out: dict[str, Any] = {"same_pass_ms": {str(k): v for k, v in ms.items()}, "runtime_floor_ms": ms["runtime_floor"],
                           "passes": [{str(k): v.median_ms for k, v in t.items()} for t in timed], "ratios": {}}
    for b in baselines:
        ok = front[front["accuracy"] >= b["val_accuracy"]]
        members = [{"trial": int(r.trial), "val_accuracy": float(r.accuracy), "test_accuracy": float(r.test_accuracy),
                    "size_bytes": int(r.size_bytes), "latency_ms": ms[int(r.trial)],
                    "size_ratio": b["size_bytes"] / float(r.size_bytes), "latency_ratio": ms[b["name"]] / ms[int(r.trial)],
                    "summary": f"{r.arch} / {r.compression}"} for r in ok.itertuples()]
        if not members:
            out["ratios"][b["name"]] = None
            continue
        smallest = min(members, key=lambda m: m["size_bytes"])
        fastest = min(members, key=lambda m: m["latency_ms"])
        out["ratios"][b["name"]] = {
            "baseline_ms": ms[b["name"]], "size_ratio": smallest["size_ratio"], "size_trial": smallest["trial"],
            "latency_ratio": fastest["latency_ratio"], "latency_trial": fastest["trial"],
            "smaller_and_faster": [m["trial"] for m in members if m["size_ratio"] > 1 and m["latency_ratio"] > 1],
            "members": members}
    return out
