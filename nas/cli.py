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

from nas.cliparser import build_parser
from nas.errors import NasError
from nas.experiment import apply_config, given_dests  # noqa: F401 - re-exported for callers
from nas.objectives import parse_constraints, parse_objectives
from nas.progress import trial_line
from nas.table import FORMATS, render
from nas.trust import redact_url

__all__ = ["main"]


# ----------------------------------------------------------------------------- commands


def _progress_callback(progress: Any, objectives: Sequence[str]):  # noqa: ANN202
    def callback(study: Any, trial: Any) -> None:
        progress.trial_finished(study.get_trials(deepcopy=False), trial, trial_line(trial, objectives))

    return callback


def cmd_search(args: argparse.Namespace) -> int:
    from nas.backends.optuna import SAMPLERS, finished_count, run_optuna
    from nas.pipeline import get_dataset
    from nas.task import Task, auto_screen, default_train_threads
    from nas.space import default_space_name, load_space
    from nas.study import front_frame, open_storage, study_folder

    if args.backend == "ray" and args.ray_address:
        from nas.backends.ray import check_ray_address

        check_ray_address(args.ray_address)  # within seconds, before anything is stored
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
    import time

    from nas.finalists import TIMEOUT_SHARE, auto_finalists, finalist_epochs

    k = auto_finalists(len(data.y_train)) if args.finalists is None else args.finalists
    epochs = args.finalist_epochs or finalist_epochs(space.recipe["epochs"].options(), args.epochs)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def reserve_s(_st: Any) -> float:  # --timeout keeps a share for the finalists
        return TIMEOUT_SHARE * args.timeout if k and args.timeout else 0.0

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
            callbacks=[_progress_callback(progress, objectives)], on_progress=progress.trial_progress, reserve_s=reserve_s,
            extra_meta={"backend": "optuna", "config": {k: redact_url(v) if k == "storage" else v
                                                        for k, v in vars(args).items() if k != "func"}},
        )
    if k:
        _run_finalists(study, space, task, k, epochs, deadline, progress, objectives, args, err)
    progress.finished(study.get_trials(deepcopy=False))
    done = finished_count(study)
    _print_front(study, front_frame(study), objectives, "table", f"Pareto front of {study_name} ({done} trials)", args.baseline)
    if args.log_format != "json":
        import shlex

        err.print(f"see it again: nas front {shlex.quote(study_name)} --storage {shlex.quote(redact_url(args.storage))}")
    return 0


def _run_finalists(study: Any, space: Any, task: Any, k: int, epochs: int, deadline: float | None, progress: Any,
                   objectives: Sequence[str], args: argparse.Namespace, err: Any) -> None:
    """Retrain the chosen front members for ``epochs`` (:mod:`nas.finalists`), one at a time with
    all of the host's cores, through the same objective as every trial."""
    import dataclasses

    from nas.backends.optuna import make_objective, with_study_floor
    from nas.finalists import run_finalists
    from nas.task import default_train_threads

    task = with_study_floor(dataclasses.replace(task, train_threads=args.train_threads or default_train_threads(1)), study)

    def say(event: dict[str, Any], text: str) -> None:
        if args.quiet:
            return
        if args.log_format == "json":
            print(json.dumps(event), file=sys.stderr, flush=True)
        else:
            err.print(text)

    def chosen(t: Any, cost: float) -> None:
        say({"event": "finalist", "trial": t.number, "epochs": epochs, "estimate_s": round(cost, 1)},
            f"finalist: retraining trial {t.number} for {epochs} epochs (~{cost:.0f} s)")

    def skipped(t: Any, cost: float, left: float) -> None:
        say({"event": "finalist_skipped", "trial": t.number, "estimate_s": round(cost, 1), "left_s": round(left, 1)},
            f"finalist: trial {t.number} skipped: ~{cost:.0f} s to retrain, {max(0.0, left):.0f} s of --timeout left")

    run_finalists(study, make_objective(space, task, on_progress=progress.trial_progress), k, epochs,
                  callbacks=[_progress_callback(progress, objectives)], deadline=deadline, on_chosen=chosen,
                  on_skipped=skipped)


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


def _out_folder(path: Path) -> Path:
    """``--out``: a folder that is new or empty, under folders (not files); one line otherwise."""
    if path.exists() and not path.is_dir():
        raise NasError(f"--out {path} is a file; give a folder path (new, or empty)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NasError(f"--out {path}: {parent} is a file, not a folder")
            break
    return path


def _writing(path: Path, write: Any) -> Any:
    try:
        return write()
    except OSError as exc:  # a read-only or virtual filesystem (/proc), no permission, disk full
        where = Path(exc.filename or path).absolute()
        if where != path.absolute() and path.absolute().parent not in (where, *where.parents):
            raise  # not about writing --out
        raise NasError(f"--out {path}: cannot write there ({exc.strerror or type(exc).__name__})") from None


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
    out = _out_folder(Path(args.out or Path("runs") / "reports" / "+".join(map(path_component, args.studies))))
    for path in _writing(out, lambda: write_report(rep, out)):
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
    out = _out_folder(Path(args.out or Path("runs") / "bundles" / f"{path_component(args.study)}-trial{number}"))
    _writing(out, lambda: export_bundle(study, number, out, storage_url=args.storage, retrain_epochs=args.retrain))
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            apply_config(args, parser, argv if argv is not None else sys.argv[1:])
        return COMMANDS[args.command](args)
    except NasError as exc:
        print(f"nas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nas: interrupted; finished trials are stored, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
