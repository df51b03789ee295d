"""How well does accuracy at an early-stopping rung predict a trial's final accuracy?

    python experiments/rung_correlation.py [--trials 16]

For each bundled task (digits with the default space, MNIST-1D with mnist1d_compress) runs a
random search in which every trial trains its full budget while its validation accuracy is
recorded at 1/4 and 1/2 of the epochs (the rung rule is given more peers than there are trials,
so it records but never stops). Reports Spearman's rank correlation between each rung's accuracy
and the final validation accuracy of the deployed model, and how many of the final top third a
1/eta=1/3 cut at the rung would have kept. Writes experiments/results/rung_correlation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import optuna
from scipy.stats import spearmanr

from nas.backends.optuna import run_optuna
from nas.pipeline import Task
from nas.space import load_space

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = (("digits", "default"), ("mnist1d", "mnist1d_compress"))


def one(dataset: str, space_name: str, trials: int, seed: int) -> dict:
    space = load_space(space_name)
    with tempfile.TemporaryDirectory(prefix="nas-rungs-") as tmp:
        task = Task(dataset=dataset, seed=seed, artifacts_dir=f"{tmp}/art",
                    early_stop={"fractions": [0.25, 0.5], "eta": 3.0, "min_peers": 10**9})  # record, never stop
        t0 = time.time()
        study = run_optuna(space, task, study_name="r", storage=f"sqlite:///{tmp}/r.db", sampler="random",
                           n_trials=trials)
        wall = time.time() - t0
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    final = [t.user_attrs["val_accuracy"] for t in done]
    out = {"dataset": dataset, "space": space_name, "completed": len(done), "wall_s": round(wall, 1), "rungs": {}}
    top = sorted(range(len(done)), key=lambda i: -final[i])[: max(1, len(done) // 3)]
    for key in sorted({k for t in done for k in t.user_attrs if k.startswith("rung_")}, key=lambda k: int(k[5:])):
        rung = [t.user_attrs.get(key) for t in done]
        pairs = [(r, f) for r, f in zip(rung, final) if r is not None]
        rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic if len(pairs) > 2 else float("nan")
        kept = sorted(range(len(done)), key=lambda i: -(rung[i] or 0))[: max(1, len(done) // 3)]
        out["rungs"][key] = {"epoch": int(key[5:]), "spearman": round(float(rho), 3),
                             "top_third_kept": f"{len(set(kept) & set(top))}/{len(top)}"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", action="append", metavar="DATASET:SPACE",
                    help="instead of the bundled tasks, e.g. runs/digits16.npz:default (repeatable)")
    ap.add_argument("--name", default="rung_correlation", help="results file name")
    a = ap.parse_args()
    tasks = [tuple(t.rsplit(":", 1)) for t in a.task] if a.task else TASKS
    results = [one(str(Path(d).resolve()) if d.endswith(".npz") else d, s, a.trials, a.seed) for d, s in tasks]
    RESULTS.mkdir(exist_ok=True)
    extra = "".join(f" --task {t}" for t in a.task or []) + (f" --name {a.name}" if a.task else "")
    (RESULTS / f"{a.name}.json").write_text(json.dumps(
        {"command": f"python experiments/rung_correlation.py --trials {a.trials}{extra}", "tasks": results}, indent=2) + "\n")
    for r in results:
        rungs = ", ".join(f"epoch {v['epoch']}: rho {v['spearman']}, top third kept {v['top_third_kept']}"
                          for v in r["rungs"].values())
        print(f"{r['dataset']} / {r['space']} ({r['completed']} trials, {r['wall_s']:.0f} s): {rungs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
