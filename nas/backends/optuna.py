"""Optuna backend: a named study in a storage URL, driven by ``pipeline.evaluate``."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
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
from nas.trial import counts_toward_total, outcome, record_rung_and_judge, rung_names

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


def _evaluate_trial(trial: optuna.Trial, space: Space, task: Task,
                    on_progress: Callable[[int, str], None] | None = None) -> tuple[float, ...]:
    cand = suggest_candidate(trial, space, task)
    progress = None if on_progress is None else (lambda text: on_progress(trial.number, text))
    try:
        result = evaluate(cand, task, trial_id=f"trial-{trial.number:05d}", at_rung=rung_hook(trial, task),
                          progress=progress)
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
                "reward": "--reward/--reward-on/--reward-target",
                # rung 0's accuracies are comparable only on one subset of one size
                "screen": "--screen-fraction"}


def check_resume(study_name: str, meta: dict[str, Any], task: Task, space: Space) -> None:
    """Refuse (one line, naming the setting and both values) to resume ``study_name`` with a
    setting that changes the splits, the space, the objectives or the recipe."""
    old, new = meta.get("task", {}), task.to_dict()
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


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards ``--trials``: completed, pruned, or failed by the pipeline with
    a reason. Trials whose process died or was interrupted (and were retried) do not count."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if counts_toward_total(t))


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


INTERRUPTED = "interrupted"
JUST_ASKED_S = 60.0  # a RUNNING trial not yet claimed by a worker is being started for this long
# (storage, trial id) of the trials this process's run_optuna is running now. A RUNNING trial
# recorded with this process's own host:pid but not here is stale: left by an earlier search in
# this process, or by a dead process whose pid this one reuses (containers restart with the
# same hostname and small pids).
_RUNNING_HERE: set[tuple[str, int]] = set()


def _worker_alive(study: optuna.Study, t: optuna.trial.FrozenTrial, host: str) -> bool | None:
    """Whether the worker recorded on RUNNING trial ``t`` is alive: ``None`` when it cannot be
    told (no worker recorded yet, or a worker on another host: stale ones there are failed by the
    RDB heartbeat)."""
    worker = str(t.user_attrs.get("worker", ""))
    h, _, pid = worker.rpartition(":")
    if not worker or h != host or not pid.isdigit():
        return None
    if int(pid) == os.getpid():
        return (_storage_key(study._storage), t._trial_id) in _RUNNING_HERE
    return _alive(int(pid))


def fail_for_retry(study: optuna.Study, t: optuna.trial.FrozenTrial, reason: str, *, flag: str,
                   set_state: bool = True, retry: bool = True) -> bool:
    """Record ``reason`` on the RUNNING trial ``t``, flag it (``killed``, ``interrupted``: it does
    not count towards ``--trials``), fail it (unless ``set_state`` is false: Optuna's own loop
    fails it next), and, if ``retry``, enqueue its parameters once more as a WAITING trial that
    the next ``ask`` of any worker (a resume, or another process on the study) runs. Returns
    False if another process finished the trial first (it then enqueued the retry)."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
        storage.set_trial_user_attr(t._trial_id, flag, True)
        if set_state:
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    if retry and t.params:
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=t.params, distributions=t.distributions,
            system_attrs={"retry_of": t.system_attrs.get("retry_of", t.number)}))
    return True


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker process on this host is gone (SIGKILL, OOM, power),
    and enqueue each once more with the same parameters. Works for every storage, including
    journal files, which have no heartbeat; RDB storages also get Optuna's heartbeat for
    workers on other hosts."""
    host = socket.gethostname()
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if _worker_alive(study, t, host) is not False:
            continue
        worker = t.user_attrs["worker"]
        # one retry: a candidate that kills its worker twice stays failed
        if fail_for_retry(study, t, f"worker {worker} died during the trial; retried", flag="killed",
                          retry="retry_of" not in t.system_attrs):
            recovered.append(t.number)
    return recovered


def fail_interrupted_trials(study: optuna.Study, worker: str | None = None) -> list[int]:
    """After Ctrl-C: fail this process's trials still RUNNING (``--jobs`` threads, or an
    interrupt outside the objective) as "interrupted", each enqueued to run again."""
    worker = worker or worker_id()
    done = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("worker") == worker and fail_for_retry(study, t, INTERRUPTED, flag="interrupted"):
            done.append(t.number)
    return done


def _in_flight(study: optuna.Study, t: optuna.trial.FrozenTrial, host: str) -> bool:
    """A RUNNING trial that is really running: its worker on this host is alive, or its worker is
    on another host, or it was asked for moments ago and no worker has claimed it yet."""
    alive = _worker_alive(study, t, host)
    if alive is not None:
        return alive
    if t.user_attrs.get("worker"):
        return True  # another host's
    start = t.datetime_start
    return start is None or (datetime.datetime.now(start.tzinfo) - start).total_seconds() < JUST_ASKED_S


def committed_count(study: optuna.Study) -> int:
    """Trials counting towards ``--trials`` (:func:`finished_count`) plus those running now in
    live workers: a trial is started only while this is below the total."""
    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:
            n += _in_flight(study, t, host)
        elif t.state in FINISHED:
            n += counts_toward_total(t)
    return n


def _storage_key(storage: optuna.storages.BaseStorage) -> str:
    """What ``storage`` is, the same for every storage object of this process open on it: a
    journal or SQLite file's real path, another database's URL (password masked), or the object
    (in-memory storages)."""
    backend = getattr(storage, "_backend", storage)  # Optuna wraps RDB storages in a cache
    if hasattr(backend, "_file_path"):  # a JournalStorage's file backend
        return "journal:" + os.path.realpath(backend._file_path)
    if hasattr(backend, "url"):
        from nas.trust import redact_url

        url = str(backend.url)
        return "sqlite:" + os.path.realpath(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else redact_url(url)
    return f"memory:{id(backend)}"


def _start_lock_path(storage: optuna.storages.BaseStorage) -> Path | None:
    """The host-wide lock file serializing trial starts on ``storage`` (``None``: an in-memory
    storage, which only this process sees)."""
    key = _storage_key(storage)
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
) -> optuna.Study:
    """Run (or resume) a search until the study holds ``n_trials`` finished trials, or until
    ``timeout`` seconds have passed (no trial starts after it).

    Each of ``jobs`` workers starts a trial only while the study's finished trials plus the
    trials running in live workers (this process's, other processes') are fewer than
    ``n_trials``, checked under a host-wide lock held until the new trial is claimed, so the
    total holds across processes and resumes. Ctrl-C fails this process's running trials as
    "interrupted" (not counted) and enqueues each to run again, then raises KeyboardInterrupt."""
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
    key, lock_path = _storage_key(study._storage), _start_lock_path(study._storage)
    stop = threading.Event()
    local = threading.local()  # each worker thread's start lock, released by the objective
    started: list[int] = []  # trials this run started

    def claimed(trial: optuna.Trial) -> None:  # the trial is this worker's: others may start theirs
        started.append(trial.number)
        local.running = (key, trial._trial_id)
        _RUNNING_HERE.add(local.running)
        lock = getattr(local, "lock", None)
        if lock is not None:
            lock.release()

    objective = make_objective(space, task, on_start=claimed, on_progress=on_progress)

    def work() -> None:
        while not stop.is_set():
            lock = local.lock = _StartLock(lock_path)
            lock.acquire()
            try:
                if timeout is not None and started and time.monotonic() - started_at >= timeout:
                    break  # (the first trial of a run always starts)
                recover_dead_trials(study)  # a peer that died meanwhile: its trial is failed, its retry queued
                if committed_count(study) >= n_trials:
                    break
                study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks,
                               gc_after_trial=False)
                if study._stop_flag:  # a callback called study.stop()
                    stop.set()
            finally:
                lock.release()  # (already released once the trial was claimed)
                _RUNNING_HERE.discard(getattr(local, "running", None))
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
