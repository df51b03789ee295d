"""Early stopping on vs off: the same 30-trial MNIST-1D search, same sampler and seed.

Reports total training time of each run and the hypervolume each reached, both at the end
and at the same wall-clock time (the early-stopped run's duration). The two searches run at
the same time, one process and one core each, so that whatever else loads the machine
slows both alike.

    python experiments/early_stopping.py            # ~10-15 min on 2 cores
    python experiments/early_stopping.py --trials 8 --epochs 4   # a quick smoke run

Writes experiments/results/early_stopping.{json,png} and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
from _common import machine

from nas.backends.optuna import run_optuna
from nas.pipeline import Task
from nas.report import build_report
from nas.space import load_space

RESULTS = Path(__file__).resolve().parent / "results"


def hv_at(curve: pd.DataFrame, t: float) -> float:
    done = curve[curve["elapsed_s"] <= t]
    return float(done["hypervolume"].iloc[-1]) if len(done) else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "early_stopping"))
    ap.add_argument("--run", choices=("early_stop_on", "early_stop_off"), help=argparse.SUPPRESS)
    ap.add_argument("--storage", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.run:  # one of the two searches, in its own process
        task = Task(dataset="mnist1d", seed=args.seed, epochs=args.epochs, train_threads=1,
                    early_stop={"eta": 3.0} if args.run == "early_stop_on" else None)
        t0 = time.perf_counter()
        run_optuna(load_space("mnist1d"), task, study_name=args.run, storage=args.storage, sampler="nsga2",
                   n_trials=args.trials)
        print(time.perf_counter() - t0)
        return

    storage = f"sqlite:///{tempfile.mkdtemp(prefix='nas-es-')}/es.db"
    procs = {}
    for name in ("early_stop_on", "early_stop_off"):
        cmd = [sys.executable, __file__, "--run", name, "--storage", storage, "--trials", str(args.trials),
               "--seed", str(args.seed)] + (["--epochs", str(args.epochs)] if args.epochs else [])
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    runs = {}
    for name, p in procs.items():
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{name} failed")
        runs[name] = (optuna.load_study(study_name=name, storage=storage), float(out.strip().splitlines()[-1]))

    rep = build_report([s for s, _ in runs.values()])
    curves = {st.name: st.hv_curve for st in rep.studies}
    t_on = runs["early_stop_on"][1]
    out: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "trials": args.trials,
                 "dataset": "mnist1d", "space": "mnist1d", "sampler": "nsga2", "seed": args.seed,
                 "reference_point": rep.reference, "runs": {}}
    for name, (study, wall) in runs.items():
        trials = study.trials
        out["runs"][name] = {
            "wall_s": round(wall, 1),
            # time inside trials (training dominates; stopped trials count up to where they stopped)
            "trial_time_s": round(sum(t.duration.total_seconds() for t in trials if t.duration), 1),
            "complete": sum(t.state.name == "COMPLETE" for t in trials),
            "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "hypervolume_final": round(float(curves[name]["hypervolume"].iloc[-1]), 5),
            "hypervolume_at_on_wall": round(hv_at(curves[name], t_on), 5),
        }
    on, off = out["runs"]["early_stop_on"], out["runs"]["early_stop_off"]
    out["summary"] = (f"early stopping: {on['trial_time_s']:.0f}s vs {off['trial_time_s']:.0f}s in trials, "
                      f"{on['pruned']} of {args.trials} trials stopped; hypervolume at {t_on:.0f}s: "
                      f"{on['hypervolume_at_on_wall']:.4f} (on) vs {off['hypervolume_at_on_wall']:.4f} (off); "
                      f"final {on['hypervolume_final']:.4f} vs {off['hypervolume_final']:.4f}")

    base = Path(args.out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, c in curves.items():
        ax.plot(c["elapsed_s"], c["hypervolume"], marker=".", label=name)
    ax.axvline(t_on, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("wall-clock since the search started (s)")
    ax.set_ylabel("hypervolume (normalized)")
    ax.set_title(f"MNIST-1D, {args.trials} trials, NSGA-II seed {args.seed}: early stopping on vs off", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(base.with_suffix(".png"))
    print(out["summary"])


if __name__ == "__main__":
    main()
