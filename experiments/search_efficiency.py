"""Search efficiency on MNIST-1D with every compression gene (`mnist1d_compress`):
hypervolume vs wall-clock for the default sampler (the surrogate-screening sampler) against
Optuna's TPE (multivariate) and GPSampler, NSGA-II and random sampling (``--samplers``, the
first being the one compared with); 3 seeds each, the same trial budget, the space's own recipe
and early-stopping setting, every run's hypervolume on one fixed reference point. Also the time
each trial spends outside training compute, and the sampler's time per proposal.

Per seed: the wall-clock each other sampler needs to reach the default's final hypervolume
(a run that never reaches it counts as its whole wall-clock, marked '>'), and hypervolumes at
equal wall-clock. Runs go two at a time, one core each.

    python experiments/search_efficiency.py --trials 100     # ~15 min per run, two at a time

Writes experiments/results/<out>.{json,csv,png} and <out>_trials.csv (``--out``, default
search_efficiency); prints a one-line summary.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import optuna
import pandas as pd
from _common import RESULTS, pyplot, write_json

from nas.report import build_report

from nas.backends.optuna import SAMPLERS

DEFAULT = "surrogate"  # nas search's default sampler (cliparser); study names say which sampler ran
COLORS = {"surrogate": "tab:red", "surrogate-gp": "tab:purple", "nsga2": "tab:blue", "random": "tab:grey",
          "tpe": "tab:green", "gp": "tab:orange"}


def run_one(storage: str, config: str, seed: int, trials: int, epochs: int | None, timeout: float | None = None) -> None:
    cmd = [sys.executable, "-m", "nas.cli", "search", "--dataset", "mnist1d", "--space", "mnist1d_compress",
           "--study", f"{config}-s{seed}", "--storage", storage, "--trials", str(trials), "--sampler", config,
           "--seed", str(seed), "--train-threads", "1", "--quiet", "--artifacts", storage.split("///")[1] + ".art"]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if timeout:
        cmd += ["--timeout", str(int(timeout))]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


PAUSE_S = 120.0  # consecutive trials of one run follow each other within seconds


def busy_elapsed(trials: pd.DataFrame) -> pd.Series:
    """Seconds from the run's first trial start to each trial's completion, with pauses removed:
    a run extended later (``--extend-random``) is a resumed study, and the time between the two
    sessions, when nothing of it ran, is not search time. Indexed by trial number."""
    df = trials.dropna(subset=["datetime_start"]).sort_values("datetime_start")
    start, end = pd.to_datetime(df["datetime_start"]), pd.to_datetime(df["datetime_complete"])
    paused, latest, out = 0.0, None, {}
    t0 = start.min()
    for trial, st, en in zip(df["trial"], start, end):
        if latest is not None and (st - latest).total_seconds() > PAUSE_S:
            paused += (st - latest).total_seconds()
        if pd.notna(en):
            latest = en if latest is None else max(latest, en)
            out[int(trial)] = (en - t0).total_seconds() - paused
    return pd.Series(out, dtype=float)


def linear_curve(st, names: list[str], dirs: list[str], ref: dict[str, float]) -> pd.DataFrame:
    """The same run's hypervolume with costs on a linear scale (each divided by the reference),
    as this benchmark measured it before the report moved to log-scale costs."""
    from nas.report import _hv_curve

    return _hv_curve(st.trials, names, dirs, ref)


def first_time_reaching(curve: pd.DataFrame, target: float) -> float | None:
    hit = curve[curve["hypervolume"] >= target - 1e-12]
    return float(hit["elapsed_s"].iloc[0]) if len(hit) else None


def compare(curves: dict[str, pd.DataFrame], jobs: list[tuple[str, int]], seeds: int, trials: int,
            default: str = DEFAULT):
    """Per run: final hypervolume, at the default's wall-clock and after ``trials`` trials; per seed:
    the wall-clock every other sampler needs to reach the default's final hypervolume."""
    rows = []
    for (c, s) in jobs:
        curve = curves[f"{c}-s{s}"]
        same_time = float(curves[f"{default}-s{s}"]["elapsed_s"].max())  # the default search's duration
        at = curve[curve["elapsed_s"] <= same_time]
        rows.append({"config": c, "seed": s, "final_hv": float(curve["hypervolume"].iloc[-1]),
                     "hv_at_default_wall": float(at["hypervolume"].iloc[-1]) if len(at) else 0.0,
                     "hv_at_budget": float(curve["hypervolume"].iloc[min(trials, len(curve)) - 1]),
                     "wall_s": float(curve["elapsed_s"].max()), "trials": int(len(curve))})
    df = pd.DataFrame(rows)
    agg = df.groupby("config").agg(hv_mean=("final_hv", "mean"), hv_std=("final_hv", "std"),
                                   hv_at_default_wall=("hv_at_default_wall", "mean"),
                                   hv_at_budget=("hv_at_budget", "mean"), wall_mean=("wall_s", "mean"))
    reach = []
    for s in range(seeds):
        target = curves[f"{default}-s{s}"]["hypervolume"].iloc[-1]
        default_wall = float(curves[f"{default}-s{s}"]["elapsed_s"].max())
        row = {"seed": s, "default_final_hv": float(target), "default_wall_s": default_wall}
        for other in sorted({c for c, _ in jobs} - {default}):
            if f"{other}-s{s}" not in curves:
                continue
            hit = first_time_reaching(curves[f"{other}-s{s}"], target)
            wall = hit if hit is not None else float(curves[f"{other}-s{s}"]["elapsed_s"].max())
            row[f"{other}_reaches_at_s"] = hit
            row[f"{other}_time_ratio"] = wall / default_wall
            row[f"{other}_time_ratio_text"] = f"{'' if hit is not None else '>'}{wall / default_wall:.2f}x"
        reach.append(row)
    return df, agg, reach


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=None, help="override the space's epochs (default: its own)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samplers", nargs="+", default=[DEFAULT, "tpe", "gp", "nsga2", "random"], choices=SAMPLERS,
                    help="the first is the one the others are compared with (default: nas search's default first)")
    ap.add_argument("--out", default="search_efficiency", help="results name under experiments/results")
    ap.add_argument("--storage", help="where the studies go (default: a new temporary SQLite file); a study already "
                                      "there resumes to --trials, so a run can be extended by more samplers later")
    ap.add_argument("--analyze", metavar="STORAGE", help="only re-analyze the studies of an earlier run")
    ap.add_argument("--extend-random", metavar="FACTOR", type=float, default=None,
                    help="with --analyze: first resume each random run until its wall-clock is FACTOR x the default's "
                         "(a random run that has not reached the default's hypervolume by then counts as '>FACTORx')")
    args = ap.parse_args()
    storage = args.analyze or args.storage or f"sqlite:///{tempfile.mkdtemp(prefix='nas-eff-')}/eff.db"
    print(f"storage: {storage}", flush=True)
    default = args.samplers[0]
    # sampler by sampler in the order given, two searches at a time (an interrupted run keeps
    # every seed of the samplers it reached)
    jobs = [(c, s) for c in args.samplers for s in range(args.seeds)]
    t0 = time.time()
    if not args.analyze:
        from nas.study import open_storage

        open_storage(storage, create=True)  # made once here, not raced by the first two searches
        with ThreadPoolExecutor(2) as pool:  # two searches at a time, one core each
            list(pool.map(lambda j: run_one(storage, j[0], j[1], args.trials, args.epochs), jobs))
    total_s = time.time() - t0

    names = {st.study_name for st in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    jobs = [(c, s) for c, s in jobs if f"{c}-s{s}" in names]  # (an interrupted run: what finished)
    if args.analyze and args.extend_random and "random" in args.samplers:
        from nas.study import trials_frame

        t_ext = time.time()
        for s in range(args.seeds):  # one at a time, beside whatever else runs (as the runs went two at a time)
            walls = {c: float(busy_elapsed(trials_frame(optuna.load_study(study_name=f"{c}-s{s}", storage=storage))).max())
                      for c in (default, "random")}
            more = args.extend_random * walls[default] - walls["random"]
            pair = build_report([optuna.load_study(study_name=f"{c}-s{s}", storage=storage) for c in (default, "random")])
            if pair.studies[1].hv_curve["hypervolume"].max() >= pair.studies[0].hv_curve["hypervolume"].iloc[-1]:
                print(f"random-s{s}: already reached the default's final hypervolume; not extended", flush=True)
                continue
            if more > 0:
                print(f"random-s{s}: {walls['random']:.0f} s so far, resuming for {more:.0f} s more", flush=True)
                run_one(storage, "random", s, 100_000, args.epochs, timeout=more + 30)
        total_s += time.time() - t_ext
    studies = [optuna.load_study(study_name=f"{c}-s{s}", storage=storage) for c, s in jobs]
    rep = build_report(studies)
    curves, lin_curves = {}, {}
    for st in rep.studies:  # elapsed time without pauses (a resumed run), on both cost scales
        busy = busy_elapsed(st.trials)
        for out, curve in ((curves, st.hv_curve), (lin_curves, linear_curve(st, rep.objectives, rep.directions, rep.reference))):
            curve = curve.copy()
            curve["elapsed_s"] = curve["trial"].map(busy).to_numpy()
            out[st.name] = curve.sort_values("elapsed_s", kind="stable").reset_index(drop=True)
    scales = {"log": compare(curves, jobs, args.seeds, args.trials, default),
              "linear": compare(lin_curves, jobs, args.seeds, args.trials, default)}
    df, agg, reach = scales["log"]

    # overhead: trial time outside training compute (train + fine-tuning)
    over = []
    for st in studies:
        for t in st.trials:
            u = t.user_attrs
            if t.state.name != "COMPLETE" or "train_s" not in u:
                continue
            dur = t.duration.total_seconds()
            compute = u["train_s"] + u["compress_s"]
            over.append({"config": st.study_name.rsplit("-s", 1)[0], "duration_s": dur, "compute_s": compute, "preflight_s": u["preflight_s"], "eval_s": u["eval_s"],
                         "sampling_storage_s": max(0.0, dur - u["total_s"]), "overhead_fraction": (dur - compute) / dur})
    over_df = pd.DataFrame(over)

    def sentence(scale: str) -> str:
        _, agg, reach = scales[scale]

        def hv(c: str, col: str = "hv_mean") -> str:
            return f"{agg.loc[c, col]:.4f}" if c in agg.index else "not run"

        others = [c for c in args.samplers if c != default]
        return (f"{scale}-scale costs: hypervolume after {args.trials} trials (mean of {args.seeds} seeds) "
                + ", ".join(f"{c}{' (default)' if c == default else ''} {hv(c, 'hv_at_budget')}" for c in args.samplers)
                + "; at the default's wall-clock: " + ", ".join(f"{c} {hv(c, 'hv_at_default_wall')}" for c in others)
                + "; wall-clock to the default's final HV per seed: "
                + "; ".join(f"{c} " + ", ".join(r.get(f"{c}_time_ratio_text", "-") for r in reach) for c in others))

    summary = (sentence("log") + ". " + sentence("linear")
               + f". Overhead {over_df['overhead_fraction'].median():.1%} of trial time (median); total {total_s / 60:.0f} min")
    write_json(args.out, {
        "command": f"python experiments/search_efficiency.py --trials {args.trials} --samplers {' '.join(args.samplers)}"
                   + (f" (then --analyze STORAGE --extend-random {args.extend_random})" if args.extend_random else ""),
        "trials": args.trials,
        "epochs": args.epochs or "space default", "seeds": args.seeds, "dataset": "mnist1d", "space": "mnist1d_compress",
        "samplers": args.samplers, "default": default, "total_wall_s": total_s, "reference_point": rep.reference, "log_scale_zero": rep.lower,
        "pause_removed_over_s": PAUSE_S, "extend_random": args.extend_random,
        **{f"{scale}_scale": {"per_run": d.to_dict("records"), "by_config": a.reset_index().to_dict("records"),
                              "time_to_default_hv": r}
           for scale, (d, a, r) in scales.items()},
        "overhead": {"median_fraction": float(over_df["overhead_fraction"].median()),
                     "median_preflight_s": float(over_df["preflight_s"].median()),
                     "median_eval_s": float(over_df["eval_s"].median()),
                     "median_sampling_storage_s": float(over_df["sampling_storage_s"].median()),
                     "median_compute_s": float(over_df["compute_s"].median()),
                     "median_trial_s": float(over_df["duration_s"].median()),
                     # a trial's time outside its own work: the sampler's proposal plus storage
                     "median_sampling_storage_s_by_sampler": over_df.groupby("config")["sampling_storage_s"].median().to_dict()},
        "summary": summary})
    df.to_csv(RESULTS / f"{args.out}.csv", index=False)
    # every trial's objectives and times (the studies themselves stay in the temporary storage):
    # enough to recompute any run's curve on another reference point
    keep = ["trial", "state", "datetime_start", "datetime_complete", *rep.objectives]
    pd.concat([st.trials[[k for k in keep if k in st.trials]].assign(study=st.name) for st in rep.studies]).to_csv(
        RESULTS / f"{args.out}_trials.csv", index=False)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, (scale, cs) in zip(axes, (("log", curves), ("linear", lin_curves))):
        for (c, s) in jobs:
            curve = cs[f"{c}-s{s}"]
            ax.plot(curve["elapsed_s"], curve["hypervolume"], color=COLORS.get(c, "black"), alpha=0.8, label=c if s == 0 else None)
        ax.set_xlabel("wall-clock since the search started (s, pauses removed)")
        ax.set_ylabel(f"hypervolume (costs on a {scale} scale)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"MNIST-1D mnist1d_compress, {args.trials} trials x {args.seeds} seeds per sampler"
                 + (f" (random extended to {args.extend_random}x the default's wall-clock)" if args.extend_random else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.out}.png")
    print(summary)


if __name__ == "__main__":
    main()
