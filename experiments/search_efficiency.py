"""Search efficiency and overhead on MNIST-1D: hypervolume vs wall-clock for
(a) the default search (NSGA-II with Pareto early stopping), (b) the same without early
stopping, (c) random sampling; 3 seeds each, the same trial budget. Also the time each trial
spends outside training compute (sampling, storage, export, measurement).

    python experiments/search_efficiency.py        # ~15 min on 2 cores (two searches at a time)

Writes experiments/results/search_efficiency.{json,csv,png}; prints a one-line summary.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import optuna
import pandas as pd
from _common import RESULTS, pyplot, write_json

from nas.report import build_report

CONFIGS = {"default": ("nsga2", True), "no_early_stop": ("nsga2", False), "random": ("random", False)}


def run_one(storage: str, config: str, seed: int, trials: int, epochs: int) -> None:
    sampler, early = CONFIGS[config]
    cmd = [sys.executable, "-m", "nas.cli", "search", "--dataset", "mnist1d", "--study", f"{config}-s{seed}",
           "--storage", storage, "--trials", str(trials), "--epochs", str(epochs), "--sampler", sampler,
           "--seed", str(seed), "--train-threads", "1", "--quiet", "--artifacts", storage.split("///")[1] + ".art"]
    if not early:
        cmd.append("--no-early-stop")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def first_time_reaching(curve: pd.DataFrame, target: float) -> float | None:
    hit = curve[curve["hypervolume"] >= target - 1e-12]
    return float(hit["elapsed_s"].iloc[0]) if len(hit) else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--analyze", metavar="STORAGE", help="only re-analyze the studies of an earlier run")
    args = ap.parse_args()
    storage = args.analyze or f"sqlite:///{tempfile.mkdtemp(prefix='nas-eff-')}/eff.db"
    jobs = [(c, s) for s in range(args.seeds) for c in CONFIGS]
    if not args.analyze:
        with ThreadPoolExecutor(2) as pool:  # two searches at a time, one core each
            list(pool.map(lambda j: run_one(storage, j[0], j[1], args.trials, args.epochs), jobs))

    studies = [optuna.load_study(study_name=f"{c}-s{s}", storage=storage) for c, s in jobs]
    rep = build_report(studies)
    curves = {st.name: st.hv_curve for st in rep.studies}
    rows = []
    for (c, s) in jobs:
        curve = curves[f"{c}-s{s}"]
        same_time = float(curves[f"default-s{s}"]["elapsed_s"].max())  # the default search's duration
        at = curve[curve["elapsed_s"] <= same_time]
        rows.append({"config": c, "seed": s, "final_hv": float(curve["hypervolume"].iloc[-1]),
                     "hv_at_default_wall": float(at["hypervolume"].iloc[-1]) if len(at) else 0.0,
                     "wall_s": float(curve["elapsed_s"].max())})
    df = pd.DataFrame(rows)
    agg = df.groupby("config").agg(hv_mean=("final_hv", "mean"), hv_std=("final_hv", "std"),
                                   hv_at_default_wall=("hv_at_default_wall", "mean"), wall_mean=("wall_s", "mean"))
    reach = []
    for s in range(args.seeds):
        target = curves[f"default-s{s}"]["hypervolume"].iloc[-1]
        reach.append({"seed": s, "default_wall_s": float(curves[f"default-s{s}"]["elapsed_s"].max()),
                      "random_reaches_at_s": first_time_reaching(curves[f"random-s{s}"], target)})

    # overhead: trial time outside training compute (train + fine-tuning)
    over = []
    for st in studies:
        for t in st.trials:
            u = t.user_attrs
            if t.state.name != "COMPLETE" or "train_s" not in u:
                continue
            dur = t.duration.total_seconds()
            compute = u["train_s"] + u["compress_s"]
            over.append({"duration_s": dur, "compute_s": compute, "preflight_s": u["preflight_s"], "eval_s": u["eval_s"],
                         "sampling_storage_s": max(0.0, dur - u["total_s"]), "overhead_fraction": (dur - compute) / dur})
    over_df = pd.DataFrame(over)

    ratio = agg.loc["default", "hv_mean"] / agg.loc["random", "hv_mean"]
    reached = [r["random_reaches_at_s"] for r in reach]
    summary = (f"final hypervolume default {agg.loc['default', 'hv_mean']:.4f} vs no-early-stop "
               f"{agg.loc['no_early_stop', 'hv_mean']:.4f} vs random {agg.loc['random', 'hv_mean']:.4f} "
               f"(default/random {ratio:.3f}); at the default's wall-clock ({agg.loc['default', 'wall_mean']:.0f}s): "
               f"{agg.loc['no_early_stop', 'hv_at_default_wall']:.4f} / {agg.loc['random', 'hv_at_default_wall']:.4f}; "
               f"random reached the default's final HV in "
               f"{sum(r is not None for r in reached)}/{len(reached)} seeds; "
               f"overhead {over_df['overhead_fraction'].median():.1%} of trial time (median)")
    write_json("search_efficiency", {
        "command": "python experiments/search_efficiency.py", "trials": args.trials, "epochs": args.epochs,
        "seeds": args.seeds, "dataset": "mnist1d", "space": "mnist1d", "reference_point": rep.reference,
        "per_run": rows, "by_config": agg.reset_index().to_dict("records"), "hv_ratio_default_over_random": ratio,
        "random_time_to_default_hv": reach,
        "overhead": {"median_fraction": float(over_df["overhead_fraction"].median()),
                     "median_preflight_s": float(over_df["preflight_s"].median()),
                     "median_eval_s": float(over_df["eval_s"].median()),
                     "median_sampling_storage_s": float(over_df["sampling_storage_s"].median()),
                     "median_compute_s": float(over_df["compute_s"].median()),
                     "median_trial_s": float(over_df["duration_s"].median())},
        "summary": summary})
    df.to_csv(RESULTS / "search_efficiency.csv", index=False)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = {"default": "tab:red", "no_early_stop": "tab:blue", "random": "tab:grey"}
    for (c, s) in jobs:
        curve = curves[f"{c}-s{s}"]
        ax.plot(curve["elapsed_s"], curve["hypervolume"], color=colors[c], alpha=0.8, label=c if s == 0 else None)
    ax.set_xlabel("wall-clock since the search started (s)")
    ax.set_ylabel("hypervolume (normalized)")
    ax.set_title(f"MNIST-1D, {args.trials} trials x {args.seeds} seeds per config", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "search_efficiency.png")
    print(summary)


if __name__ == "__main__":
    main()
