"""How `nas front` and `nas report` scale with study size.

Writes studies of 1,000 and 10,000 completed trials (3 objectives: accuracy up, latency and
size down, drawn so that a realistic few dozen are Pareto-optimal) into a fresh SQLite file
with Optuna's own ``add_trials``, then times `nas front` and `nas report` on each in a new
process, the way a user runs them.

    python experiments/large_study.py            # ~3 min on 2 cores (most of it writing the studies)

Writes experiments/results/large_study.json.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from _common import write_json

from nas.study import META_KEY


def make_study(storage: str, name: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize", "minimize"])
    study.set_metric_names(["accuracy", "latency_ms", "size_bytes"])
    study.set_user_attr(META_KEY, {"version": 1, "objectives": ["accuracy", "latency_ms", "size_bytes"],
                                   "directions": ["maximize", "minimize", "minimize"], "task": {}, "space": {}})
    dists = {"w": optuna.distributions.IntDistribution(8, 64)}
    t0 = time.time()
    base = datetime.datetime(2026, 1, 1)
    trials = []
    for i in range(n):
        size = float(np.exp(rng.uniform(np.log(1e3), np.log(1e5))))
        lat = 0.004 + 0.02 * rng.random() + size * 1e-7
        acc = float(np.clip(0.6 + 0.08 * np.log10(size) - 0.1 * rng.random() ** 0.3, 0, 1))
        trials.append(optuna.trial.FrozenTrial(
            number=i, trial_id=i, state=optuna.trial.TrialState.COMPLETE, value=None, values=[acc, lat, size],
            datetime_start=base + datetime.timedelta(seconds=10 * i),
            datetime_complete=base + datetime.timedelta(seconds=10 * i + 9),
            params={"w": int(rng.integers(8, 65))}, distributions=dists,
            user_attrs={"accuracy": acc, "test_accuracy": acc - 0.01, "latency_ms": lat, "size_bytes": size,
                        "summary": f"stem16 | conv k3 w{i % 64}", "params": int(size / 4)},
            system_attrs={}, intermediate_values={}))
    study.add_trials(trials)
    print(f"{name}: {n} trials written in {time.time() - t0:.0f} s", flush=True)


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "nas.cli", *cmd], cwd=cwd, check=True, capture_output=True)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nas-large-"))
    storage = f"sqlite:///{tmp}/large.db"
    rows = []
    for n in map(int, args.sizes.split(",")):
        name = f"large-{n}"
        make_study(storage, name, n)
        front_n = len(optuna.load_study(study_name=name, storage=storage).best_trials)
        rows.append({"trials": n, "front_size": front_n,
                     "front_s": timed(["front", name, "--storage", storage], tmp),
                     "report_s": timed(["report", name, "--storage", storage, "--out", str(tmp / f"r{n}")], tmp)})
        print(rows[-1], flush=True)
    write_json("large_study", {"command": "python experiments/large_study.py", "rows": rows,
                               "note": "wall-clock of a new `nas` process each, Python start-up and imports included"})


if __name__ == "__main__":
    main()
