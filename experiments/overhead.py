"""Overhead per phase of a trial at a bundled space's default recipe.

    python experiments/overhead.py [--trials 12] [--space mnist1d_compress] [--dataset mnist1d]

Runs a search (random sampling, no early stopping, so every trial trains its full budget) and
splits each completed trial's wall-clock into: sampling + storage (trial duration minus the
pipeline's own total), pre-flight (trace, timing, FLOPs, packing), training, compression (which
includes its fine-tuning), deploy + scoring (ONNX export of the trained weights, int8
calibration, accuracy in ONNX Runtime, re-timing). Overhead is everything but training and
compression. Writes experiments/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

from nas.cli import main as nas

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--space", default="mnist1d_compress")
    ap.add_argument("--dataset", default="mnist1d")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nas-overhead-") as tmp:
        db = f"sqlite:///{tmp}/o.db"
        t0 = time.time()
        code = nas(["search", "--dataset", a.dataset, "--space", a.space, "--trials", str(a.trials), "--study", "o",
                    "--storage", db, "--sampler", "random", "--no-early-stop", "--seed", str(a.seed), "--quiet",
                    "--artifacts", f"{tmp}/art"])
        if code:
            return code
        wall = time.time() - t0
        rows = []
        for t in optuna.load_study(study_name="o", storage=db).trials:
            u = t.user_attrs
            if t.state != optuna.trial.TrialState.COMPLETE:
                continue
            duration = t.duration.total_seconds()
            row = {"trial": t.number, "duration_s": duration, "preflight_s": u["preflight_s"], "train_s": u["train_s"],
                   "compress_s": u["compress_s"], "deploy_score_s": u["eval_s"],
                   "sampling_storage_s": duration - u["total_s"], "onnx_graph_reused": u.get("onnx_graph_reused")}
            row["overhead_s"] = row["preflight_s"] + row["deploy_score_s"] + row["sampling_storage_s"]
            row["overhead_fraction"] = row["overhead_s"] / duration
            rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_s") or k == "overhead_fraction"}
    result = {"command": f"python experiments/overhead.py --trials {a.trials} --space {a.space} --dataset {a.dataset}",
              "wall_s": round(wall, 1), "completed": len(rows), "median": med, "trials": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(rows)} trials, median trial {med['duration_s']:.2f} s: pre-flight {med['preflight_s']:.2f} s, "
          f"training {med['train_s']:.2f} s, compression {med['compress_s']:.2f} s, deploy+scoring "
          f"{med['deploy_score_s']:.2f} s, sampling+storage {med['sampling_storage_s']:.2f} s; "
          f"median overhead {100 * med['overhead_fraction']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
