"""Ray backend throughput with 1 and 2 workers on the same trial budget (digits, 12 trials), on
SQLite and on PostgreSQL, and the storage's own cost per trial for SQLite, a journal file and
PostgreSQL.

This machine has 2 cores: 2 workers can at best double throughput, and less, since the driver,
the sampler and the timing lock (no two latency measurements overlap on a host) share them.
The journal file is not a Ray storage here (the Ray backend needs a database URL): it is timed
in the per-trial storage benchmark only. PostgreSQL is a throwaway server started by this script
(:mod:`nas.pgserver`) with its default durability (fsync on), as SQLite's.

Per-trial storage cost: the storage calls of one trial as the pipeline makes them (ask, the
space's parameters, every user attribute a real trial of this search stored, tell), 100 times,
median ms.

    python experiments/ray_scaling.py        # ~5 min on 2 cores

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


def storage_cost(storage: str | optuna.storages.BaseStorage, template: optuna.trial.FrozenTrial, n: int = 100) -> float:
    """Median ms of one trial's storage calls (ask, params, user attributes, tell)."""
    import statistics

    from nas.study import open_storage

    st = open_storage(storage, create=True) if isinstance(storage, str) else storage
    study = optuna.create_study(storage=st, directions=["maximize", "minimize", "minimize"],
                                study_name=f"cost-{time.time_ns()}")
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        trial = study.ask()
        for name, dist in template.distributions.items():
            trial._suggest(name, dist)
        for k, v in template.user_attrs.items():
            trial.set_user_attr(k, v)
        study.tell(trial, list(template.values))
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    space = load_space("default")
    tmp = tempfile.mkdtemp(prefix="nas-ray-")
    from nas.pgserver import throwaway_postgres

    with throwaway_postgres(fsync=True) as (host, port, user, password):
        pg = f"postgresql://{user}:{password}@{host}:{port}/nas"
        storages = {"sqlite": f"sqlite:///{tmp}/ray.db", "postgresql": pg}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
        runs = {}
        try:
            for kind, workers in (("sqlite", 1), ("sqlite", 2), ("postgresql", 2)):
                name = f"{kind}-workers{workers}"
                task = Task(dataset="digits", epochs=args.epochs, early_stop=None, artifacts_dir=f"{tmp}/art")
                t0 = time.perf_counter()
                run_ray(space, task, study_name=name, storage_url=storages[kind], sampler="random", n_trials=args.trials,
                        workers=workers, runs_dir=tmp, quiet=True)
                wall = time.perf_counter() - t0
                study = optuna.load_study(study_name=name, storage=storages[kind])
                done = [t for t in study.trials if t.state.name == "COMPLETE"]
                runs[name] = {"storage": kind, "workers": workers, "wall_s": round(wall, 1), "complete": len(done),
                              "trials_per_min": round(60 * len(done) / wall, 2),
                              "mean_trial_s": round(sum(t.duration.total_seconds() for t in done) / len(done), 2)}
        finally:
            ray.shutdown()
        template = next(t for t in optuna.load_study(study_name="sqlite-workers1", storage=storages["sqlite"]).trials
                        if t.state.name == "COMPLETE")
        cost = {"sqlite": storage_cost(f"sqlite:///{tmp}/cost.db", template),
                "journal": storage_cost(f"{tmp}/cost.log", template),
                "postgresql": storage_cost(pg, template)}
    one, two, pg2 = runs["sqlite-workers1"], runs["sqlite-workers2"], runs["postgresql-workers2"]
    speedup = two["trials_per_min"] / one["trials_per_min"]
    summary = (f"Ray throughput on SQLite: {one['trials_per_min']:.2f} trials/min with 1 worker, "
               f"{two['trials_per_min']:.2f} with 2 ({speedup:.2f}x; 2 cores cap it at 2x); on PostgreSQL with 2: "
               f"{pg2['trials_per_min']:.2f}. Storage cost per trial ({len(template.user_attrs)} user attributes): "
               + ", ".join(f"{k} {v:.1f} ms" for k, v in cost.items())
               + f" (a trial here takes {one['mean_trial_s']:.1f} s)")
    write_json("ray_scaling", {"command": "python experiments/ray_scaling.py", "trials": args.trials,
                               "epochs": args.epochs, "runs": runs, "speedup": round(speedup, 3),
                               "storage_ms_per_trial": {k: round(v, 2) for k, v in cost.items()},
                               "user_attrs_per_trial": len(template.user_attrs), "summary": summary})
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    axes[0].bar(["SQLite\n1 worker", "SQLite\n2 workers", "PostgreSQL\n2 workers"],
                [one["trials_per_min"], two["trials_per_min"], pg2["trials_per_min"]], color=["tab:grey", "tab:blue", "tab:green"])
    axes[0].set_ylabel("throughput (trials per minute)")
    axes[0].set_title(f"Ray Tune backend, {args.trials} trials, digits", fontsize=9)
    axes[1].bar(list(cost), list(cost.values()), color="tab:purple")
    axes[1].set_ylabel("storage time per trial (ms, median)")
    axes[1].set_title("storage calls of one trial", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "ray_scaling.png")
    print(summary)


if __name__ == "__main__":
    main()
