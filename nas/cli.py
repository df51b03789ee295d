"""``nas`` command line: search, front, report, export, verify, dashboard.

Every user error prints one line (``nas: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nas.errors import NasError
from nas.experiment import _apply_config, _given_dests  # noqa: F401 - re-exported for callers
from nas.objectives import DEFAULT_OBJECTIVES, parse_constraints, parse_objectives
from nas.study import DEFAULT_STORAGE
from nas.progress import trial_line
from nas.table import FORMATS, render
from nas.trust import redact_url

__all__ = ["main"]



class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _calibration_trials(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v != 0 and v < 5:  # a rank correlation over fewer pairs says nothing (2 pairs are always +-1)
        raise argparse.ArgumentTypeError(f"{text} must be 0 (trust every rung) or at least 5")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"{text} must be in 0..4294967295")
    return v


def _eta(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 1 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"{text} must be > 1 (it keeps the best 1/eta of each rung)")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1) (0 turns the screen off)")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return v


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nas", description="Compression-aware neural architecture search.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="examples:\n  nas search                      # 20 trials on digits, prints the Pareto front\n"
                       "  nas front digits-default        # the front again\n"
                       "  nas export digits-default --pick knee && nas verify runs/bundles/digits-default-trial7\n"
                       "run 'nas COMMAND --help' for each command's options and examples")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="run (or resume) a search and print its Pareto front",
                       epilog="examples:\n  nas search\n  nas search --dataset mnist1d --space mnist1d_compress --timeout 1800 --trials 1000\n  nas search --dataset data.npz --objectives accuracy,size_bytes --max-latency-ms 0.05\n  nas search --dataset photos/ --image-size 32 --image-mode rgb\n  nas search --backend ray --workers 2 --storage postgresql://user:pass@host/db", formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--dataset", default="digits",
                   help="digits (default), mnist1d, a .npz path, or a folder of images with one subfolder per class")
    s.add_argument("--image-size", metavar="HxW", help="image folders: resize every image to this (e.g. 32 or 32x24); "
                   "needed when the images differ in size")
    s.add_argument("--image-mode", choices=("grey", "rgb"), help="image folders: colour mode (default: rgb if any "
                   "image has colour, else grey)")
    s.add_argument("--space", default=None, help="space name or YAML path (default: by input size: 'default' up to 23 px, "
                        "'default28' for 24-64 px, 'mnist1d' for 1-D data)")
    s.add_argument("--study", default=None, help="study name (default: DATASET-SPACE)")
    s.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL or journal .log path (default {DEFAULT_STORAGE})")
    s.add_argument("--trials", type=_positive_int, default=20, help="finished trials the study should hold (default 20)")
    s.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="start no trial after this many seconds (running ones finish); --trials still caps the total")
    s.add_argument("--sampler", default="surrogate",
                   help="surrogate (default: screens candidates with models of every finished trial), nsga2, tpe, random, gp")
    s.add_argument("--objectives", default=",".join(DEFAULT_OBJECTIVES),
                   help="comma list of accuracy, latency_ms, size_bytes, flops, params")
    s.add_argument("--seed", type=_seed, default=0, help="seeds the data splits, the sampler and training (default 0)")
    s.add_argument("--epochs", type=_positive_int, default=None, help="override the space's training epochs")
    s.add_argument("--jobs", type=_positive_int, default=1, help="concurrent trials in this process")
    s.add_argument("--latency-threads", type=_positive_int, default=1, help="ONNX Runtime threads when timing")
    s.add_argument("--train-threads", type=_positive_int, default=None,
                   help="torch threads per trial (default: the host's cores divided by the concurrent trials, "
                        "--jobs or Ray --workers; two searches on one host: give each its share)")
    s.add_argument("--artifacts", default="runs/artifacts", help="folder for trial weights (default runs/artifacts)")
    for cost in ("latency_ms", "size_bytes", "flops", "params"):
        s.add_argument(f"--max-{cost.replace('_', '-')}", dest=f"max_{cost}", type=_positive_float, default=None,
                       help=f"hard limit on {cost}: rejected before training")
    s.add_argument("--reward", choices=("soft", "hard"), default=None,
                   help="optimize MnasNet's scalar reward ACC*(COST/T)^w instead of a Pareto front")
    s.add_argument("--reward-on", default="latency_ms", help="cost in the reward: latency_ms (default) or size_bytes")
    s.add_argument("--reward-target", type=_positive_float, default=None, help="target T of the reward's cost")
    s.add_argument("--no-early-stop", dest="early_stop", action="store_false",
                   help="train every trial to its full budget (default: Pareto successive halving)")
    s.add_argument("--eta", type=_eta, default=None,
                   help="early stopping keeps ~1/eta of each rung (default 3; on unless the space sets "
                        "early_stop: false, as mnist1d_compress does, or --no-early-stop is given)")
    s.add_argument("--calibrate-rungs", type=_calibration_trials, default=12, metavar="N",
                   help="early stopping waits for N finished trials and uses a rung only if its accuracy rank-"
                        "correlates with the final one (80%% lower bound of Spearman >= 0.5; default 12, 0 trusts every rung)")
    s.add_argument("--screen-fraction", type=_fraction, default=None, metavar="F",
                   help="with early stopping on, first train each trial on this fraction of the training data and "
                        "stop it there like at any rung (default 1/8 for 20,000+ training samples, else 0 = off)")
    s.add_argument("--backend", choices=("optuna", "ray"), default="optuna", help="optuna (default, in-process) or ray (Ray Tune)")
    s.add_argument("--workers", type=_positive_int, default=2, help="Ray: concurrent trials (default 2)")
    s.add_argument("--ray-address", default=None, help="Ray: connect to a cluster ('auto' or host:port); default a local instance")
    s.add_argument("--resume", action="store_true", help="Ray: continue an interrupted run (Tuner.restore)")
    s.add_argument("--max-memory-mb", type=_positive_float, default=4096.0,
                   help="candidates estimated to need more memory to train fail in pre-flight (default 4096)")
    s.add_argument("--config", default=None, help="experiment YAML whose keys are these flags (flags given here win)")
    s.add_argument("--quiet", action="store_true", help="no per-trial progress")
    s.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="progress on stderr: text (a live bar on a terminal, a line per trial otherwise) or json "
                        "(one object per line: each finished trial, then the end)")
    s.add_argument("--baseline", action="append", default=[], metavar="MODEL",
                   help="your own model (.onnx, or .pt2 from torch.export) measured on the study's data and "
                   "shown beside the front; stored with the study (repeatable)")

    f = sub.add_parser("front", help="print a study's Pareto-optimal trials",
                       epilog="examples:\n  nas front digits-default\n  nas front digits-default --all --format csv\n  nas front digits-default --baseline my_model.onnx", formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("study")
    f.add_argument("--storage", default=DEFAULT_STORAGE)
    f.add_argument("--format", default="table", help="table (default), csv, json, markdown")
    f.add_argument("--all", action="store_true", help="every trial, with state and failure reason")
    f.add_argument("--baseline", action="append", default=[], metavar="MODEL",
                   help="your own model (.onnx, or .pt2 from torch.export) measured on the study's data and "
                   "shown beside the front; stored with the study (repeatable)")
    r = sub.add_parser("report", help="HTML page and PNG plots of one study, or several compared",
                       epilog="examples:\n  nas report digits-default\n  nas report run-a run-b --out runs/reports/compare\n  nas report digits-default --baseline my_model.pt2", formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("studies", nargs="+", metavar="STUDY")
    r.add_argument("--storage", default=DEFAULT_STORAGE)
    r.add_argument("--out", default=None, help="output folder (default runs/reports/STUDY)")
    r.add_argument("--baseline", action="append", default=[], metavar="MODEL",
                   help="your own model (.onnx, or .pt2 from torch.export) measured on the study's data and "
                   "shown beside the front; stored with the study (repeatable)")

    e = sub.add_parser("export", help="write a bundle (ONNX, torch.export, packed weights, manifest, model card)",
                       epilog="examples:\n  nas export digits-default --pick knee\n  nas export digits-default --trial 7 --out my-model", formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("study")
    e.add_argument("--storage", default=DEFAULT_STORAGE)
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="trial number")
    which.add_argument("--pick", help="'knee', or e.g. 'max accuracy with latency_ms <= 0.02'")
    e.add_argument("--out", default=None, help="bundle folder (default runs/bundles/STUDY-trialN)")
    e.add_argument("--retrain", type=_positive_int, default=None, metavar="EPOCHS",
                   help="retrain the candidate for EPOCHS before export; both figures are reported")

    v = sub.add_parser("verify", help="re-check a bundle against its manifest (exit 1 on any mismatch)",
                       epilog="examples:\n  nas verify runs/bundles/digits-default-trial7", formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("bundle")
    v.add_argument("--no-latency", action="store_true", help="skip re-timing latency")

    d = sub.add_parser("dashboard", help="open optuna-dashboard on the study's storage (localhost only)",
                       epilog="examples:\n  nas dashboard digits-default --port 8080", formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("study")
    d.add_argument("--storage", default=DEFAULT_STORAGE)
    d.add_argument("--port", type=_positive_int, default=8080)
    return p


# ----------------------------------------------------------------------------- commands


def _progress_callback(progress: Any, objectives: Sequence[str]):  # noqa: ANN202
    def callback(study: Any, trial: Any) -> None:
        progress.trial_finished(study.get_trials(deepcopy=False), trial, trial_line(trial, objectives))

    return callback


def cmd_search(args: argparse.Namespace) -> int:
    from nas.backends.optuna import SAMPLERS, finished_count, run_optuna
    from nas.pipeline import Task, auto_screen, default_train_threads, get_dataset
    from nas.space import default_space_name, load_space
    from nas.study import front_frame, open_storage, study_folder

    objectives = parse_objectives(args.objectives)
    reward = None
    if args.reward:
        if args.reward_on not in ("latency_ms", "size_bytes"):
            raise NasError(f"--reward-on {args.reward_on!r} is not allowed (allowed: latency_ms, size_bytes)")
        if args.reward_target is None:
            raise NasError("--reward needs --reward-target (the target latency in ms or size in bytes)")
        reward = {"on": args.reward_on, "target": args.reward_target, "form": args.reward}
        objectives = ("reward",)
    if args.sampler not in SAMPLERS:
        raise NasError(f"unknown sampler {args.sampler!r} (allowed: {', '.join(SAMPLERS)})")
    constraints = parse_constraints({c: getattr(args, f"max_{c}") for c in ("latency_ms", "size_bytes", "flops", "params")})
    from nas.images import folder_dataset_id, is_folder_dataset

    if is_folder_dataset(args.dataset):
        args.dataset = folder_dataset_id(args.dataset, args.image_size, args.image_mode)
    elif args.image_size or args.image_mode:
        raise NasError(f"--image-size and --image-mode are for image folders; {args.dataset!r} is not a folder")
    data = get_dataset(args.dataset, args.seed)
    space = load_space(args.space or default_space_name(data.spatial, data.input_size))
    if space.spatial != data.spatial:
        raise NasError(f"space {space.name!r} is for {space.spatial} inputs but dataset {data.name} is {data.spatial}")
    if args.study is not None and not args.study.strip():
        raise NasError(f"--study {args.study!r} is empty; give a name, or leave --study out for DATASET-SPACE")
    study_name = args.study or f"{data.name}-{space.name}"
    screen = auto_screen(len(data.y_train)) if args.screen_fraction is None else args.screen_fraction
    if screen and round(len(data.y_train) * screen) < 256:
        raise NasError(f"--screen-fraction {screen:g} leaves {round(len(data.y_train) * screen)} of "
                       f"{len(data.y_train):,} training samples (at least 256 needed; 0 turns the screen off)")
    storage = open_storage(args.storage, create=True)
    # Paths are stored absolute, so export/report work from any folder that can read the storage.
    from nas.idx import is_idx_folder

    local = Path(args.dataset).suffix == ".npz" or (Path(args.dataset).is_dir() and is_idx_folder(args.dataset))
    dataset = str(Path(args.dataset).resolve()) if local else args.dataset
    task = Task(
        dataset=dataset,
        seed=args.seed,
        objectives=objectives,
        constraints=constraints,
        latency_threads=args.latency_threads,
        train_threads=args.train_threads or default_train_threads(args.workers if args.backend == "ray" else args.jobs),
        epochs=args.epochs,
        # inside --artifacts, and never a folder another study's trials live in
        artifacts_dir=str(study_folder(Path(args.artifacts).resolve(), study_name, args.storage)),
        reward=reward,
        early_stop={"eta": args.eta or 3.0, "calibrate": args.calibrate_rungs} if args.early_stop and (space.early_stop or args.eta) else None,
        screen=screen,
        max_memory_mb=args.max_memory_mb,
    )
    from rich.console import Console

    from nas.backends.optuna import check_existing

    check_existing(study_name, storage, task, space)
    if args.baseline:
        from nas.baseline import check_baseline

        for b in args.baseline:  # refused now, not after the search
            check_baseline(b, data, args.latency_threads)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.log_format == "json":  # stderr holds JSON lines only
        if not args.quiet:
            print(json.dumps({"event": "start", "study": study_name, "storage": redact_url(args.storage),
                              "dataset": data.name, "input_shape": data.describe()["input_shape"], "space": space.name,
                              "sampler": args.sampler, "objectives": list(objectives), "total": args.trials}),
                  file=sys.stderr, flush=True)
    else:
        err.print(f"study {study_name!r} in {redact_url(args.storage)}: dataset {data.name} {data.describe()['input_shape']}, "
                  f"space {space.name}, sampler {args.sampler}, objectives {','.join(objectives)}")
    from nas.objectives import directions as objective_directions
    from nas.progress import SearchProgress

    progress = SearchProgress(objectives, objective_directions(objectives), args.trials, log_format=args.log_format,
                              quiet=args.quiet, timeout=args.timeout)
    if args.backend == "ray":
        from nas.backends.ray import run_ray

        study = run_ray(space, task, study_name=study_name, storage_url=args.storage, sampler=args.sampler,
                        n_trials=args.trials, workers=args.workers, ray_address=args.ray_address, resume=args.resume,
                        quiet=args.quiet, timeout=args.timeout, progress=progress)
    else:
        if args.resume or args.ray_address:
            raise NasError("--resume and --ray-address are for --backend ray (the optuna backend resumes by rerunning)")
        study = run_optuna(
            space, task, study_name=study_name, storage=storage, sampler=args.sampler,
            n_trials=args.trials, jobs=args.jobs, timeout=args.timeout,
            callbacks=[_progress_callback(progress, objectives)], on_progress=progress.trial_progress,
            extra_meta={"backend": "optuna", "config": {k: redact_url(v) if k == "storage" else v
                                                        for k, v in vars(args).items() if k != "func"}},
        )
    progress.finished(study.get_trials(deepcopy=False))
    done = finished_count(study)
    _print_front(study, front_frame(study), objectives, "table", f"Pareto front of {study_name} ({done} trials)", args.baseline)
    if args.log_format != "json":
        import shlex

        err.print(f"see it again: nas front {shlex.quote(study_name)} --storage {shlex.quote(redact_url(args.storage))}")
    return 0


def cmd_front(args: argparse.Namespace) -> int:
    from nas.study import front_frame, load_study, study_meta, trials_frame

    if args.format not in FORMATS:
        raise NasError(f"unknown format {args.format!r} (allowed: {', '.join(FORMATS)})")
    study = load_study(args.study, args.storage)
    objectives = study_meta(study)["objectives"]
    df = trials_frame(study) if args.all else front_frame(study)
    title = f"{'All trials' if args.all else 'Pareto front'} of {args.study}"
    _print_front(study, df, objectives, args.format, title, args.baseline, full=args.all)
    return 0


def _print_front(study: Any, df: Any, objectives: Sequence[str], fmt: str, title: str, new_baselines: list[str],
                 full: bool = False) -> None:
    """The table (one per kind of timing host), with a column per baseline saying how much each
    member beats it, then a line per baseline. ``new_baselines`` are measured and stored first."""
    from nas.baseline import annotate, baseline_lines, measure_baseline, store_baseline, stored_baselines

    for b in new_baselines:
        store_baseline(study, measure_baseline(b, study))
    baselines = stored_baselines(study)
    if baselines and not full:
        df = annotate(df, baselines, list(objectives))
    hosts = df["timing_host"].unique() if "timing_host" in df else []
    if full or len(hosts) <= 1 or fmt in ("json", "csv"):
        sys.stdout.write(render(df, objectives, fmt, title, full=full))
    else:
        for host in hosts:  # one front per kind of timing machine (their latencies are not comparable)
            sys.stdout.write(render(df[df["timing_host"] == host], objectives, fmt, f"{title}, timed on {host}"))
    if baselines and fmt in ("table", "markdown"):
        for line in baseline_lines(baselines, df):
            sys.stdout.write(line + "\n")


def cmd_report(args: argparse.Namespace) -> int:
    from nas.report import build_report, write_report
    from nas.study import load_study, path_component

    studies = [load_study(name, args.storage) for name in args.studies]
    if args.baseline:
        from nas.baseline import measure_baseline, store_baseline

        for st in studies:  # each study's own splits and reference floor
            for b in args.baseline:
                store_baseline(st, measure_baseline(b, st))
    try:
        rep = build_report(studies)
    except ValueError as exc:
        raise NasError(str(exc)) from exc
    out = Path(args.out or Path("runs") / "reports" / "+".join(map(path_component, args.studies)))
    for path in write_report(rep, out):
        print(path)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from nas.study import load_study

    study = load_study(args.study, args.storage)  # fail early, with the one-line error, if it is missing
    study_id = study._study_id  # optuna-dashboard addresses studies by id
    print(f"optuna-dashboard: http://127.0.0.1:{args.port}/dashboard/studies/{study_id}  (Ctrl-C to stop)", flush=True)
    run_server(study._storage, host="127.0.0.1", port=args.port)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nas.export import export_bundle, pick_trial
    from nas.study import load_study, path_component

    study = load_study(args.study, args.storage)
    number = args.trial if args.trial is not None else pick_trial(study, args.pick)
    out = Path(args.out or Path("runs") / "bundles" / f"{path_component(args.study)}-trial{number}")
    export_bundle(study, number, out, storage_url=args.storage, retrain_epochs=args.retrain)
    manifest = json.loads((out / "manifest.json").read_text())
    m = manifest["metrics"]
    print(f"trial {number} -> {out}: test accuracy {m['test_accuracy']:.4f}, latency {m['latency_ms']:.4f} ms, "
          f"{m['size_bytes']:,} bytes ({m['deploy_precision']})")
    if manifest["search_metrics"]:
        s = manifest["search_metrics"]
        print(f"  at search time: test accuracy {s['test_accuracy']:.4f}, {s['size_bytes']:,} bytes")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from nas.verify import verify_bundle

    result = verify_bundle(Path(args.bundle), remeasure_latency=not args.no_latency)
    for what, ok, detail in result.checks:
        print(f"{'skip' if ok is None else 'ok  ' if ok else 'FAIL'} {what}: {detail}")
    print("bundle verified" if result.ok else "bundle does NOT match its manifest")
    return 0 if result.ok else 1


COMMANDS = {"search": cmd_search, "front": cmd_front, "report": cmd_report, "export": cmd_export,
            "verify": cmd_verify, "dashboard": cmd_dashboard}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            _apply_config(args, parser, argv if argv is not None else sys.argv[1:])
        return COMMANDS[args.command](args)
    except NasError as exc:
        print(f"nas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nas: interrupted; finished trials are stored, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
