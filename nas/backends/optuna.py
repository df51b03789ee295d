"""Optuna backend: a named study in a storage URL, driven by ``pipeline.evaluate``."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError

from nas.config import Candidate
from nas.early_stop import EarlyStopped
from nas.errors import ConfigError
from nas.objectives import directions as objective_directions
from nas.pipeline import Task, evaluate, get_dataset, reference_floor
from nas.space import Space
from nas.study import META_KEY, open_storage
from nas.trial import outcome, record_rung_and_judge, rung_names

__all__ = ["SAMPLERS", "make_sampler", "make_objective", "create_study", "run_optuna"]

SAMPLERS = ("surrogate", "nsga2", "tpe", "random", "gp")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def make_sampler(name: str, seed: int, n_trials: int = 50, space: Space | None = None,
                 task: Task | None = None) -> optuna.samplers.BaseSampler:
    """Samplers are always chosen explicitly (Optuna's defaults changed between majors).
    ``surrogate`` (:class:`nas.samplers.SurrogateSampler`) needs the space and task."""
    if name == "surrogate":
        if space is None or task is None:
            raise ConfigError("the surrogate sampler needs the search space and task")
        from nas.samplers import SurrogateSampler

        data = get_dataset(task.dataset, task.seed)
        dims = {"in_channels": data.in_channels, "input_size": tuple(data.input_size), "num_classes": data.num_classes}
        return SurrogateSampler(SpaceProposer(space, dims), objective_directions(task.objectives), seed=seed,
                                n_startup=max(4, min(10, n_trials // 5)), objectives=task.objectives)
    if name == "nsga2":
        # Small budgets need small generations, or NSGA-II never leaves its random first one.
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, n_trials // 3)), seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(4, min(10, n_trials // 3)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(4, min(10, n_trials // 3)))
    raise ConfigError(f"unknown sampler {name!r} (allowed: {', '.join(SAMPLERS)})")


def resume_seed(seed: int, existing: int) -> int:
    """The sampler seed for a run that finds ``existing`` trials already in its study:
    reproducible for a given history, different from the first run's."""
    return int(np.random.SeedSequence([seed, existing]).generate_state(1)[0])


class SpaceProposer:
    """``space.suggest`` for one dataset's shapes, as a picklable callable (Ray pickles the
    search algorithm with its sampler)."""

    def __init__(self, space: Space, dims: dict[str, Any]) -> None:
        self.space, self.dims = space, dims

    def __call__(self, trial: Any) -> Candidate:
        return self.space.suggest(trial, **self.dims)


def suggest_candidate(trial: Any, space: Space, task: Task) -> Candidate:
    data = get_dataset(task.dataset, task.seed)
    cand = space.suggest(trial, in_channels=data.in_channels, input_size=data.input_size, num_classes=data.num_classes)
    trial.set_user_attr("candidate", cand.to_dict())
    trial.set_user_attr("summary", cand.arch.summary())
    trial.set_user_attr("compression_summary", cand.compression.summary())
    return cand


def rung_hook(trial: Any, task: Task) -> Callable[[int, float, dict[str, Any]], None] | None:
    """Record this trial's accuracy at a rung in the study and apply the rung rule against the
    trials already recorded there (read back from the same storage, so it works across
    processes and Ray workers alike)."""
    rule = task.rung_rule()
    if rule is None:
        return None
    names = rung_names(task.objectives)

    def at_rung(epoch: int, acc: float, costs: dict[str, Any]) -> None:
        reason = record_rung_and_judge(trial.study, trial._trial_id, trial.number, rule, names, epoch, acc, costs)
        if reason:
            raise EarlyStopped(reason, epoch)

    return at_rung


def make_objective(space: Space, task: Task) -> Callable[[optuna.Trial], tuple[float, ...]]:
    """The objective both backends run: suggest -> evaluate -> record, failures with a reason."""

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        trial.set_user_attr("worker", worker_id())
        cand = suggest_candidate(trial, space, task)
        try:
            result = evaluate(cand, task, trial_id=f"trial-{trial.number:05d}", at_rung=rung_hook(trial, task))
        except Exception as exc:
            state, attrs = outcome(exc)
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            if state == "PRUNED":
                raise optuna.TrialPruned(attrs["fail_reason"]) from exc
            raise
        for k, v in result.metrics.items():
            trial.set_user_attr(k, v)
        if result.artifact_dir:
            trial.set_user_attr("artifact_dir", result.artifact_dir)
        return tuple(result.objectives[o] for o in task.objectives)

    return objective


def create_study(
    study_name: str, storage: str | optuna.storages.BaseStorage, task: Task, space: Space, sampler: optuna.samplers.BaseSampler,
    extra_meta: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create the study (or reopen it to resume) and check it matches this search's setup."""
    if isinstance(storage, str):
        storage = open_storage(storage, create=True)
    dirs = objective_directions(task.objectives)
    try:
        study = optuna.create_study(
            study_name=study_name, storage=storage, sampler=sampler, directions=dirs, load_if_exists=True
        )
    except ValueError as exc:
        raise ConfigError(f"study {study_name!r}: {exc}") from exc
    meta = study.user_attrs.get(META_KEY)
    if meta is None:
        if task.latency_floor_ms is None:  # the host speed every timing of this study is scaled to
            task = dataclasses.replace(task, latency_floor_ms=reference_floor(task))
        meta = {
            "version": 1,
            "objectives": list(task.objectives),
            "directions": dirs,
            "task": task.to_dict(),
            "space": {"name": space.name, "source": space.source, "fingerprint": space.fingerprint()},
            **(extra_meta or {}),
        }
        study.set_user_attr(META_KEY, meta)
        with warnings.catch_warnings():  # experimental since 3.2, but it is what labels the dashboard
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(task.objectives))
    else:
        check_resume(study_name, meta, task, space)
    return study


# Settings a resumed study must keep: they decide the data splits (dataset, seed), what is
# searched (space, objectives) and how candidates are trained and timed. Changing one would
# mix incomparable trials, or make earlier trials' validation/test data later trials' training
# data. (Limits, early stopping, jobs and workers may change between runs.)
RESUME_FIXED = {"dataset": "--dataset", "seed": "--seed", "objectives": "--objectives", "epochs": "--epochs",
                "latency_threads": "--latency-threads", "teachers": "teachers", "teacher_epochs": "teacher epochs",
                "reward": "--reward/--reward-on/--reward-target"}


def check_resume(study_name: str, meta: dict[str, Any], task: Task, space: Space) -> None:
    """Refuse (one line, naming the setting and both values) to resume ``study_name`` with a
    setting that changes the splits, the space, the objectives or the recipe."""
    old, new = meta.get("task", {}), task.to_dict()
    hint = "resume with the same value, or choose another --study name"
    for key, flag in RESUME_FIXED.items():
        if key in old and old[key] != new.get(key):
            raise ConfigError(f"study {study_name!r} was created with {flag} {_show(old[key])}; this run gives "
                              f"{_show(new.get(key))} ({hint})")
    old_space = meta.get("space", {})
    if "fingerprint" in old_space and old_space["fingerprint"] != space.fingerprint():
        what = "another space" if old_space.get("name") != space.name else "a changed space file"
        raise ConfigError(f"study {study_name!r} was created with --space {old_space.get('name')!r} "
                          f"({old_space.get('source')}); this run gives {what} {space.name!r} ({space.source}) ({hint})")


def check_existing(study_name: str, storage: optuna.storages.BaseStorage, task: Task, space: Space) -> None:
    """Before any work or output: if the study exists, refuse settings it cannot resume with."""
    names = {s.study_name: s for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    if study_name in names:
        meta = names[study_name].user_attrs.get(META_KEY)
        if meta:
            check_resume(study_name, meta, task, space)


def _show(v: Any) -> str:
    if v is None:
        return "(unset)"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def with_study_floor(task: Task, study: optuna.Study) -> Task:
    """``task`` with the reference runtime floor the study was created with (resumes and
    other workers scale their timings to the same host speed)."""
    stored = (study.user_attrs.get(META_KEY) or {}).get("task", {}).get("latency_floor_ms")
    return dataclasses.replace(task, latency_floor_ms=stored) if stored else task


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards ``--trials``: completed, pruned, or failed by the pipeline with
    a reason. Trials whose process died (and were retried) do not count."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        if t.state == optuna.trial.TrialState.FAIL and (t.user_attrs.get("killed") or "fail_reason" not in t.user_attrs):
            continue
        n += 1
    return n


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker process on this host is gone (SIGKILL, OOM, power),
    and enqueue each once more with the same parameters. Works for every storage, including
    journal files, which have no heartbeat; RDB storages also get Optuna's heartbeat for
    workers on other hosts."""
    host = socket.gethostname()
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = str(t.user_attrs.get("worker", ""))
        h, _, pid = worker.rpartition(":")
        if h != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", f"worker {worker} died during the trial; retried")
            study._storage.set_trial_user_attr(t._trial_id, "killed", True)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another process recovered it first and enqueued the retry
        if "retry_of" not in t.system_attrs:  # one retry: a candidate that kills its worker twice stays failed
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=t.params,
                                                      distributions=t.distributions, system_attrs={"retry_of": t.number}))
        recovered.append(t.number)
    return recovered


def run_optuna(
    space: Space,
    task: Task,
    *,
    study_name: str,
    storage: str | optuna.storages.BaseStorage,
    sampler: str = "surrogate",
    n_trials: int = 20,
    jobs: int = 1,
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None = None,
    extra_meta: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> optuna.Study:
    """Run (or resume) a search until the study holds ``n_trials`` finished trials, or until
    ``timeout`` seconds have passed (Optuna's semantics: no trial starts after it)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)  # failed trials are reported by our callback
    study = create_study(study_name, storage, task, space, make_sampler(sampler, task.seed, n_trials, space, task), extra_meta)
    existing = len(study.get_trials(deepcopy=False))
    if existing:
        # A resumed (or joined) study: a sampler seeded as before would replay its first draws
        # (Optuna's RandomSampler and the random generation of NSGA-II start from the seed),
        # re-training candidates the study already holds. Seed it from the study's progress.
        study.sampler = make_sampler(sampler, resume_seed(task.seed, existing), n_trials, space, task)
    task = with_study_floor(task, study)
    recover_dead_trials(study)
    remaining = n_trials - finished_count(study)

    def stop_at_total(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        # other processes may be filling the same study: stop when the total is reached
        if finished_count(study) >= n_trials:
            study.stop()

    if remaining > 0:
        study.optimize(
            make_objective(space, task),
            n_trials=remaining,
            n_jobs=jobs,
            timeout=timeout,
            catch=(Exception,),
            callbacks=[stop_at_total, *(callbacks or [])],
            gc_after_trial=False,
        )
    return study
