"""Ray backend throughput with 1 and 2 workers on the same trial budget (digits, 12 trials).

    python experiments/ray_scaling.py        # ~3 min on 2 cores

Writes experiments/results/ray_scaling.{json,png}; prints a one-line summary.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import optuna
from _common import RESULTS, pyplot, write_json

from nas.backends.ray import (
    run_ray,  # sets Ray's environment defaults: import before ray
)

import ray  # noqa: E402  isort: skip
from nas.pipeline import Task
from nas.space import load_space


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    space = load_space("default")
    tmp = tempfile.mkdtemp(prefix="nas-ray-")
    storage = f"sqlite:///{tmp}/ray.db"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    runs = {}
    try:
        for workers in (1, 2):
            name = f"workers{workers}"
            task = Task(dataset="digits", epochs=args.epochs, early_stop=None, artifacts_dir=f"{tmp}/art")
            t0 = time.perf_counter()
            run_ray(space, task, study_name=name, storage_url=storage, sampler="random", n_trials=args.trials,
                    workers=workers, runs_dir=tmp, quiet=True)
            wall = time.perf_counter() - t0
            study = optuna.load_study(study_name=name, storage=storage)
            done = [t for t in study.trials if t.state.name == "COMPLETE"]
            runs[name] = {"workers": workers, "wall_s": round(wall, 1), "complete": len(done),
                          "trials_per_min": round(60 * len(done) / wall, 2),
                          "mean_trial_s": round(sum(t.duration.total_seconds() for t in done) / len(done), 2)}
    finally:
        ray.shutdown()
    speedup = runs["workers2"]["trials_per_min"] / runs["workers1"]["trials_per_min"]
    summary = (f"Ray throughput: {runs['workers1']['trials_per_min']:.2f} trials/min with 1 worker, "
               f"{runs['workers2']['trials_per_min']:.2f} with 2 ({speedup:.2f}x)")
    write_json("ray_scaling", {"command": "python experiments/ray_scaling.py", "trials": args.trials,
                               "epochs": args.epochs, "runs": runs, "speedup": round(speedup, 3), "summary": summary})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=110)
    ax.bar(["1 worker", "2 workers"], [runs["workers1"]["trials_per_min"], runs["workers2"]["trials_per_min"]],
           color=["tab:grey", "tab:blue"])
    ax.set_ylabel("throughput (trials per minute)")
    ax.set_title(f"Ray Tune backend, {args.trials} trials, digits ({speedup:.2f}x)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "ray_scaling.png")
    print(summary)


if __name__ == "__main__":
    main()
