"""The Python entry point, in the spirit of Optuna's ``create_study().optimize()`` and Ray Tune's
``Tuner(...).fit()``: ``nas.search(...)`` runs (or resumes) a search and returns a
:class:`SearchResult`; ``nas.open_study(...)`` reads one back.

Every keyword is a ``nas search`` option (``--max-size-bytes`` is ``max_size_bytes=``), validated
by the same checks as the flag and as an experiment config file, so the three cannot disagree;
``nas search`` itself is this function's command line.

    import nas

    result = nas.search(dataset="digits", trials=10, epochs=2, study="api-demo", storage="sqlite:///demo.db")
    print(result.front()[["trial", "accuracy", "latency_ms", "size_bytes"]])
    bundle = result.export("knee", "runs/bundles/api-demo-knee")
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.errors import NasError
from nas.objectives import parse_constraints, parse_objectives
from nas.progress import trial_line
from nas.trust import redact_url

__all__ = ["search", "open_study", "run_search", "SearchResult"]


@dataclass
class SearchResult:
    """A study: its Pareto front and trials as pandas DataFrames, export of a member, and the
    underlying :class:`optuna.Study` (``.study``) for everything Optuna offers."""

    study: Any
    storage: str

    def front(self) -> Any:
        """The Pareto-optimal completed trials (as ``nas front``), best first."""
        from nas.study import front_frame

        return front_frame(self.study)

    def trials(self) -> Any:
        """Every trial with its state, objectives, metrics and failure reason (as ``nas front --all``)."""
        from nas.study import trials_frame

        return trials_frame(self.study)

    def export(self, trial: int | str, path: str | Path, *, retrain: int | None = None) -> Path:
        """Write the bundle of ``trial`` (a number, or a pick rule such as ``"knee"`` or
        ``"max accuracy with latency_ms <= 0.02"``) into the new or empty folder ``path``."""
        from nas.export import export_bundle, pick_trial

        number = trial if isinstance(trial, int) and not isinstance(trial, bool) else pick_trial(self.study, str(trial))
        return export_bundle(self.study, int(number), Path(path), storage_url=self.storage, retrain_epochs=retrain)


def _args(options: dict[str, Any]) -> Any:
    from nas.cliparser import build_parser
    from nas.experiment import SKIP, coerce, search_actions

    parser = build_parser()
    args = parser.parse_args(["search"])  # every default, as the command line has them
    _, actions = search_actions(parser)
    for key, value in options.items():
        if key not in actions:
            raise NasError(f"nas.search(): unknown option {key!r} (allowed: {', '.join(sorted(actions))})")
        value = coerce("nas.search()", key, value, actions[key])
        if value is not SKIP:
            setattr(args, key, value)
    return args


def search(dataset: str = "digits", *, space: str | None = None, trials: int = 20, study: str | None = None,
           storage: str | None = None, backend: str = "optuna", sampler: str = "surrogate",
           objectives: str | list[str] | tuple[str, ...] | None = None, timeout: float | None = None,
           seed: int = 0, quiet: bool = True, **options: Any) -> SearchResult:
    """Run (or resume: ``trials`` is the total the study should hold) a search and return its
    :class:`SearchResult`. ``options``: any other ``nas search`` option by its Python name
    (``epochs=2``, ``max_latency_ms=0.05``, ``jobs=2``, ``workers=2``, ``finalists=0``, ...).
    A bad value raises :class:`nas.NasError` with the same one line the CLI prints."""
    given = {"dataset": dataset, "space": space, "trials": trials, "study": study, "storage": storage,
             "backend": backend, "sampler": sampler, "objectives": objectives, "timeout": timeout, "seed": seed,
             "quiet": quiet, **options}
    args = _args({k: v for k, v in given.items() if v is not None})
    return SearchResult(run_search(args), args.storage)


def _progress_callback(progress: Any, objectives: Sequence[str]):  # noqa: ANN202
    def callback(study: Any, trial: Any) -> None:
        progress.trial_finished(study.get_trials(deepcopy=False), trial, trial_line(trial, objectives))

    return callback


def run_search(args: argparse.Namespace) -> Any:
    """Run (or resume) the search ``args`` describe (``nas search``'s options, validated) and
    return the Optuna study: what ``nas search`` and :func:`nas.search` both do."""
    from nas.backends.optuna import SAMPLERS, run_optuna
    from nas.pipeline import get_dataset
    from nas.task import Task, auto_screen, default_train_threads
    from nas.space import default_space_name, load_space
    from nas.study import open_storage, study_folder

    from nas.device import resolve_device

    resolve_device(args.device)  # a device this host lacks: one line now (each trial resolves it where it runs)
    if args.gpus_per_trial and args.backend != "ray":
        raise NasError("--gpus-per-trial is for --backend ray (Tune's GPU resources); the optuna backend trains "
                       "on --device")
    if args.siblings and (args.backend != "optuna" or args.strategy != "scratch"):
        raise NasError("--siblings works with the optuna backend and --strategy scratch (a sibling reuses the "
                       "weights its parent trained in the same process)")
    if args.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise NasError("--backend ray needs Ray Tune: pip install 'nas[ray]'")
    if args.backend == "ray" and args.ray_address:
        from nas.backends.ray import check_ray_address

        check_ray_address(args.ray_address)  # within seconds, before anything is stored
    elif args.backend == "ray" and args.gpus_per_trial:
        from nas.backends.ray import check_local_gpus

        check_local_gpus(args.gpus_per_trial)
    probe_token_file = ""
    if args.latency_on:
        from nas.probe import connect

        connect(args.latency_on, args.probe_token_file, retries=1, backoff_s=1.0).device()  # answers now, or one line
        probe_token_file = str(Path(args.probe_token_file).resolve())
    elif args.probe_token_file:
        raise NasError("--probe-token-file is for --latency-on URL (a probe on the target device)")
    latency_model = ""
    if args.latency_model:
        from nas.latency_model import load_latency_model

        if args.latency_on:
            raise NasError("--latency-model predicts latency, --latency-on measures it on a probe: give one of them")
        latency_model = str(Path(args.latency_model).resolve())
        load_latency_model(latency_model)  # read and fitted now: a malformed profile is one line before anything is stored
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
        # (a supernet trial trains nothing: no rungs, no screen)
        early_stop={"eta": args.eta or 3.0, "calibrate": args.calibrate_rungs}
        if args.early_stop and (space.early_stop or args.eta) and args.strategy == "scratch" else None,
        screen=screen if args.strategy == "scratch" else 0.0,
        max_memory_mb=args.max_memory_mb,
        device=args.device,
        amp=args.amp,
        strategy=args.strategy,
        supernet_epochs=args.supernet_epochs,
        supernet_sandwich=args.supernet_sandwich,
        latency_on=args.latency_on or "",
        probe_token_file=probe_token_file,
        latency_model=latency_model,
        # the space's default only where siblings can run (an explicit --siblings elsewhere is refused above)
        siblings=args.siblings if args.siblings is not None else
        (space.siblings if args.backend == "optuna" and args.strategy == "scratch" else 0),
    )
    from rich.console import Console

    from nas.backends.optuna import check_existing

    check_existing(study_name, storage, task, space)
    if args.baseline:
        from nas.baseline import check_baseline

        for b in args.baseline:  # refused now, not after the search
            check_baseline(b, data, args.latency_threads)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if task.strategy == "supernet":  # trained (or loaded, or refused) before any trial starts
        from nas.strategy import load_or_train_supernet

        def epoch_line(epoch: int, loss: float) -> None:
            if not args.quiet and args.log_format != "json":
                err.print(f"supernet: epoch {epoch}/{task.supernet_epochs}, loss {loss:.3f}")

        load_or_train_supernet(space, data, task, on_epoch=epoch_line)
    if args.log_format == "json":  # stderr holds JSON lines only
        if not args.quiet:
            print(json.dumps({"event": "start", "study": study_name, "storage": redact_url(args.storage),
                              "dataset": data.name, "input_shape": data.describe()["input_shape"], "space": space.name,
                              "sampler": args.sampler, "objectives": list(objectives), "total": args.trials}),
                  file=sys.stderr, flush=True)
    elif not args.quiet:
        err.print(f"study {study_name!r} in {redact_url(args.storage)}: dataset {data.name} {data.describe()['input_shape']}, "
                  f"space {space.name}, sampler {args.sampler}, objectives {','.join(objectives)}")
    from nas.objectives import directions as objective_directions
    from nas.progress import SearchProgress

    progress = SearchProgress(objectives, objective_directions(objectives), args.trials, log_format=args.log_format,
                              quiet=args.quiet, timeout=args.timeout)
    import time

    from nas.finalists import TIMEOUT_SHARE, auto_finalists, finalist_epochs

    k = auto_finalists(len(data.y_train)) if args.finalists is None else args.finalists
    from nas.config import Recipe

    recipe_epochs = space.recipe["epochs"].options() if "epochs" in space.recipe else [Recipe().epochs]
    epochs = args.finalist_epochs or finalist_epochs(recipe_epochs, args.epochs)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def reserve_s(_st: Any) -> float:  # --timeout keeps a share for the finalists
        return TIMEOUT_SHARE * args.timeout if k and args.timeout else 0.0

    if args.backend == "ray":
        from nas.backends.ray import run_ray

        study = run_ray(space, task, study_name=study_name, storage_url=args.storage, sampler=args.sampler,
                        n_trials=args.trials, workers=args.workers, ray_address=args.ray_address, resume=args.resume,
                        quiet=args.quiet, timeout=args.timeout, progress=progress, gpus_per_trial=args.gpus_per_trial)
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
    return study


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


def open_study(name: str, storage: str | None = None) -> SearchResult:
    """A stored study, read back (``nas front NAME --storage URL``)."""
    from nas.study import DEFAULT_STORAGE, load_study

    url = storage or DEFAULT_STORAGE
    return SearchResult(load_study(name, url), url)
