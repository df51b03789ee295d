"""Optuna backend: a named study in a storage URL, driven by ``pipeline.evaluate``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from nas.config import Candidate
from nas.early_stop import EarlyStopped
from nas.errors import ConfigError
from nas.finalists import FINALIST_EPOCHS, finalist_candidate
from nas.siblings import enqueue_siblings, is_sibling
from nas.objectives import directions as objective_directions
from nas.pipeline import Task, artifact_name, evaluate, get_dataset, reference_floor
from nas.space import Space
from nas.study import META_KEY, open_storage
from nas.backends.recovery import (  # noqa: F401 - finished_count, worker_id: re-exported for callers
    INTERRUPTED,
    RUNNING_HERE,
    committed_count,
    fail_for_retry,
    fail_interrupted_trials,
    finished_count,
    recover_dead_trials,
    storage_key,
    worker_id,
)
from nas.trial import outcome, record_rung_and_judge, rung_decided_off, rung_names

__all__ = ["SAMPLERS", "make_sampler", "make_objective", "create_study", "run_optuna"]

SAMPLERS = ("surrogate", "surrogate-gp", "nsga2", "tpe", "random", "gp")


def make_sampler(name: str, seed: int, n_trials: int = 50, space: Space | None = None,
                 task: Task | None = None) -> optuna.samplers.BaseSampler:
    """Samplers are always chosen explicitly (Optuna's defaults changed between majors).
    ``surrogate`` (:class:`nas.samplers.SurrogateSampler`) needs the space and task;
    ``surrogate-gp`` is the same screening with Gaussian-process surrogates instead of trees,
    scored by expected hypervolume improvement."""
    if name in ("surrogate", "surrogate-gp"):
        if space is None or task is None:
            raise ConfigError("the surrogate sampler needs the search space and task")
        from nas.samplers import SurrogateSampler

        data = get_dataset(task.dataset, task.seed)
        dims = {"in_channels": data.in_channels, "input_size": tuple(data.input_size), "num_classes": data.num_classes}
        return SurrogateSampler(SpaceProposer(space, dims), objective_directions(task.objectives), seed=seed,
                                n_startup=max(4, min(10, n_trials // 5)), objectives=task.objectives,
                                model="gp" if name == "surrogate-gp" else "trees",
                                # with GPs, expected hypervolume improvement: NAS-Bench-201 0.944 vs 0.933
                                # for mean minus one deviation (experiments/results/nasbench201_gp.json)
                                acquisition="ehvi" if name == "surrogate-gp" else "optimistic",
                                # inherited-weight trials cost seconds, about what a fit costs: plan 8 per fit
                                batch=8 if getattr(task, "strategy", "scratch") == "supernet" else 1)
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


def trials_before(study: optuna.Study) -> int:
    """How many trials a run finds in its study, the space's ``start:`` entries still waiting
    left out: a new study that begins with them is not a resume (its sampler keeps ``--seed``)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if not (t.state == optuna.trial.TrialState.WAITING and SPACE_START in t.user_attrs))


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

    # read by the pipeline: a screen its calibration turned off is not trained (see evaluate)
    at_rung.decided_off = lambda epoch: rung_decided_off(trial.study, rule, epoch)  # type: ignore[attr-defined]
    return at_rung


def make_objective(space: Space, task: Task,
                   on_start: Callable[[optuna.Trial], None] | None = None,
                   on_progress: Callable[[int, str], None] | None = None) -> Callable[[optuna.Trial], tuple[float, ...]]:
    """The objective both backends run: suggest -> evaluate -> record, failures with a reason.
    ``on_start`` is called once the trial is recorded as this worker's (``run_optuna`` releases
    its start lock there). Ctrl-C during the trial marks it failed ("interrupted"), not counted,
    and enqueues it to run again (:func:`fail_for_retry`)."""

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        trial.set_user_attr("worker", worker_id())
        if on_start is not None:
            on_start(trial)
        try:
            return _evaluate_trial(trial, space, task, on_progress)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception, KeyboardInterrupt):  # a second Ctrl-C: leave it to the resume
                # Optuna itself then sets the trial FAIL and raises the KeyboardInterrupt on
                fail_for_retry(trial.study, trial.study._storage.get_trial(trial._trial_id), INTERRUPTED,
                               flag="interrupted", set_state=False)
            raise

    return objective


def _inheritor(space: Space, task: Task) -> Callable:
    from nas.strategy import inheritor  # (torch-heavy supernet code: only under --strategy supernet)

    return inheritor(space, task)


def _evaluate_trial(trial: optuna.Trial, space: Space, task: Task,
                    on_progress: Callable[[int, str], None] | None = None) -> tuple[float, ...]:
    cand = suggest_candidate(trial, space, task)
    progress = None if on_progress is None else (lambda text: on_progress(trial.number, text))
    final = trial.user_attrs.get(FINALIST_EPOCHS)
    if final:  # a finalist (nas.finalists): the long recipe, no screen and no early stopping
        cand, task = finalist_candidate(cand, final), dataclasses.replace(task, epochs=int(final))
        trial.set_user_attr("candidate", cand.to_dict())
    try:
        result = evaluate(cand, task, trial_id=artifact_name(trial.number), number=trial.number,
                          at_rung=None if final or task.strategy == "supernet" else rung_hook(trial, task),
                          progress=progress, inherit=_inheritor(space, task) if task.strategy == "supernet" and not final
                          else None)
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
    if task.siblings and not final and task.strategy == "scratch" and not is_sibling(trial):
        data = get_dataset(task.dataset, task.seed)
        enqueue_siblings(trial.study, trial, space, {"in_channels": data.in_channels, "input_size": data.input_size,
                                                     "num_classes": data.num_classes}, task.siblings, task.seed)
    return tuple(result.objectives[o] for o in task.objectives)


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
            # the data's content: the same path with other contents would mix splits on resume
            "data_fingerprint": get_dataset(task.dataset, task.seed).fingerprint,
            **(extra_meta or {}),
        }
        study.set_user_attr(META_KEY, meta)
        if not study.get_trials(deepcopy=False):  # a new study begins where its space says (``start:``)
            for i, params in enumerate(space.start):
                # skip_if_exists: a second process creating the same study at once enqueues nothing twice
                study.enqueue_trial(dict(params), user_attrs={SPACE_START: i}, skip_if_exists=True)
        with warnings.catch_warnings():  # experimental since 3.2, but it is what labels the dashboard
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(task.objectives))
    else:
        check_resume(study_name, meta, task, space)
    return study


SPACE_START = "space_start"  # user attribute: the trial is the space's ``start:`` entry of this index

# Settings a resumed study must keep, with how each is set: marked on the Task's fields
RESUME_FIXED = Task.fixed_on_resume()


def check_resume(study_name: str, meta: dict[str, Any], task: Task, space: Space) -> None:
    """Refuse (one line, naming the setting and both values) to resume ``study_name`` with a
    setting that changes the splits, the space, the objectives or the recipe."""
    old, new = meta.get("task", {}), task.to_dict()
    try:  # the stored record as this version writes it (a reward given without "form", say)
        old = {k: v for k, v in Task.from_dict(old).to_dict().items() if k in old}
    except ConfigError:
        pass
    hint = "resume with the same value, or choose another --study name"
    for key, flag in RESUME_FIXED.items():
        if key in old and old[key] != new.get(key):
            raise ConfigError(f"study {study_name!r} was created with {flag} {_show(old[key])}; this run gives "
                              f"{_show(new.get(key))} ({hint})")
    recorded = meta.get("data_fingerprint")
    if recorded and recorded != (now := get_dataset(task.dataset, task.seed).fingerprint):
        raise ConfigError(f"study {study_name!r} was created with other data at --dataset {_show(old.get('dataset'))} "
                          f"(content sha256 {recorded[:12]}..., now {now[:12]}...): its splits would mix; restore the "
                          f"data, or choose another --study name")
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


def _start_lock_path(storage: optuna.storages.BaseStorage) -> Path | None:
    """The host-wide lock file serializing trial starts on ``storage`` (``None``: an in-memory
    storage, which only this process sees)."""
    key = storage_key(storage)
    if key.startswith("memory:"):
        return None
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(os.environ.get("NAS_START_LOCK_DIR", tempfile.gettempdir())) / f"nas-start-{digest}.lock"


_memory_start_lock = threading.Lock()


class _StartLock:
    """Held from the check "may a trial start?" until the started trial is recorded as a live
    worker's, so two workers (threads or processes on this host) never both start the last trial.
    Workers on other hosts (PostgreSQL) are not serialized: at worst they overshoot by the
    trials started within the same few milliseconds."""

    def __init__(self, path: Path | None) -> None:
        self.path, self._fh, self._held = path, None, False

    def acquire(self) -> None:
        if self.path is None:
            _memory_start_lock.acquire()
        else:
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
            except BaseException:
                fh.close()
                raise
            self._fh = fh
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self.path is None:
            _memory_start_lock.release()
        else:
            import fcntl

            fh, self._fh = self._fh, None
            try:
                fcntl.flock(fh, fcntl.LOCK_UN)
            finally:
                fh.close()


def _siblings_waiting(study: optuna.Study) -> bool:
    return any(is_sibling(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


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
    on_progress: Callable[[int, str], None] | None = None,
    reserve_s: Callable[[optuna.Study], float] | None = None,
) -> optuna.Study:
    """Run (or resume) a search until the study holds ``n_trials`` finished trials, or until
    ``timeout`` seconds have passed (no trial starts after it).

    Each of ``jobs`` workers starts a trial only while the study's finished trials plus the
    trials running in live workers (this process's, other processes') are fewer than
    ``n_trials``, checked under a host-wide lock held until the new trial is claimed, so the
    total holds across processes and resumes. Ctrl-C fails this process's running trials as
    "interrupted" (not counted) and enqueues each to run again, then raises KeyboardInterrupt.
    ``reserve_s(study)``: seconds of ``timeout`` kept for what runs after the search (finalists)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)  # failed trials are reported by our callback
    study = create_study(study_name, storage, task, space, make_sampler(sampler, task.seed, n_trials, space, task), extra_meta)
    existing = trials_before(study)
    if existing:
        # A resumed (or joined) study: a sampler seeded as before would replay its first draws
        # (Optuna's RandomSampler and the random generation of NSGA-II start from the seed),
        # re-training candidates the study already holds. Seed it from the study's progress.
        study.sampler = make_sampler(sampler, resume_seed(task.seed, existing), n_trials, space, task)
    task = with_study_floor(task, study)
    recover_dead_trials(study)
    key, lock_path = storage_key(study._storage), _start_lock_path(study._storage)
    stop = threading.Event()
    local = threading.local()  # each worker thread's start lock, released by the objective
    started: list[int] = []  # trials this run started

    def claimed(trial: optuna.Trial) -> None:  # the trial is this worker's: others may start theirs
        started.append(trial.number)
        local.running = (key, trial._trial_id)
        RUNNING_HERE.add(local.running)
        lock = getattr(local, "lock", None)
        if lock is not None:
            lock.release()

    objective = make_objective(space, task, on_start=claimed, on_progress=on_progress)

    def work() -> None:
        while not stop.is_set():
            lock = local.lock = _StartLock(lock_path)
            lock.acquire()
            try:
                left = None if timeout is None else timeout - (reserve_s(study) if reserve_s else 0.0)
                if left is not None and started and time.monotonic() - started_at >= left:
                    break  # (the first trial of a run always starts)
                recover_dead_trials(study)  # a peer that died meanwhile: its trial is failed, its retry queued
                if committed_count(study) >= n_trials and not _siblings_waiting(study):
                    break  # (siblings queued by the last trials still run: they do not count, and train nothing)
                study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks,
                               gc_after_trial=False)
                if study._stop_flag:  # a callback called study.stop()
                    stop.set()
            finally:
                lock.release()  # (already released once the trial was claimed)
                RUNNING_HERE.discard(getattr(local, "running", None))
                local.running = None

    started_at = time.monotonic()
    try:
        if jobs == 1:
            work()  # in this thread, so Ctrl-C interrupts the trial itself
        else:
            errors: list[BaseException] = []

            def thread_main() -> None:
                try:
                    work()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    errors.append(exc)
                    stop.set()

            # daemon threads: after Ctrl-C their trials are failed below and the process exits
            threads = [threading.Thread(target=thread_main, name=f"nas-job-{i}", daemon=True) for i in range(jobs)]
            for th in threads:
                th.start()
            for th in threads:
                while th.is_alive():
                    th.join(0.2)
            if errors:
                raise errors[0]
    except KeyboardInterrupt:
        stop.set()
        with contextlib.suppress(Exception, KeyboardInterrupt):
            fail_interrupted_trials(study)
        raise
    return study
