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
from nas.table import FORMATS, render
from nas.trust import redact_url

__all__ = ["main"]


# ----------------------------------------------------------------------------- commands


def cmd_search(args: argparse.Namespace) -> int:
    from nas.api import run_search
    from nas.backends.optuna import finished_count
    from nas.study import front_frame

    study = run_search(args)
    done = finished_count(study)
    study_name = study.study_name
    _print_front(study, front_frame(study), study_meta_objectives(study), "table",
                 f"Pareto front of {study_name} ({done} trials)", args.baseline)
    if args.log_format != "json":
        import shlex

        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"see it again: nas front {shlex.quote(study_name)} --storage {shlex.quote(redact_url(args.storage))}")
    return 0


def study_meta_objectives(study: Any) -> list[str]:
    from nas.study import study_meta

    return list(study_meta(study)["objectives"])


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
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise NasError("nas dashboard needs optuna-dashboard: pip install 'nas[dashboard]'") from None

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


def cmd_probe(args: argparse.Namespace) -> int:
    if args.probe_command == "serve":
        from nas.probe import serve

        return serve(args.host, args.port, args.token_file, args.threads)
    return cmd_probe_profile(args)


def cmd_probe_profile(args: argparse.Namespace) -> int:
    from nas.profile import profile_space
    from nas.pipeline import get_dataset
    from nas.space import default_space_name, load_space

    out = Path(args.out)
    if out.is_dir():
        raise NasError(f"-o {out} is a folder; give the profile's file name (device.json)")
    if not out.parent.is_dir():
        raise NasError(f"-o {out}: the folder {out.parent} does not exist")
    data = get_dataset(args.dataset, args.seed)
    space = load_space(args.space or default_space_name(data.spatial, data.input_size))
    timer: Any = None
    device = None
    if args.latency_on:
        from nas.probe import connect

        client = connect(args.latency_on, args.probe_token_file)
        device = {**client.device(), "latency_device": client.url}

        def on_probe(path: Path) -> float:
            return float(client.time(path)["latency"]["median_ms"])

        timer = on_probe

    def progress(done: int, total: int) -> None:
        if done % 25 == 0 or done == total:
            print(f"nas probe profile: {done}/{total} graphs timed", file=sys.stderr, flush=True)

    prof = profile_space(space, args.dataset, args.samples, seed=args.seed, timer=timer, device=device,
                         threads=args.threads, progress=progress)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(prof, indent=1))
    tmp.replace(out)
    print(f"wrote {out}: {len(prof['samples'])} graphs of space {space.name} timed on "
          f"{prof['device'].get('latency_cpu', '?')}")
    return 0


COMMANDS = {"search": cmd_search, "front": cmd_front, "report": cmd_report, "export": cmd_export,
            "verify": cmd_verify, "dashboard": cmd_dashboard, "probe": cmd_probe}


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
