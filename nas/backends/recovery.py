"""Which trials of a study are really running, and what happens to those that are not: a dead
worker's trial (SIGKILL, OOM, power) or an interrupted one (Ctrl-C) is failed with the reason
and enqueued once more, and does not count towards ``--trials``. Shared by both backends."""

from __future__ import annotations

import datetime
import os
import socket

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from nas.trial import counts_toward_total

__all__ = ["FINISHED", "RUNNING_HERE", "INTERRUPTED", "finished_count", "worker_id", "fail_for_retry",
           "recover_dead_trials", "fail_interrupted_trials", "committed_count", "storage_key"]


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


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
RUNNING_HERE: set[tuple[str, int]] = set()


def _worker_alive(study: optuna.Study, t: optuna.trial.FrozenTrial, host: str) -> bool | None:
    """Whether the worker recorded on RUNNING trial ``t`` is alive: ``None`` when it cannot be
    told (no worker recorded yet, or a worker on another host: stale ones there are failed by the
    RDB heartbeat)."""
    worker = str(t.user_attrs.get("worker", ""))
    h, _, pid = worker.rpartition(":")
    if not worker or h != host or not pid.isdigit():
        return None
    if int(pid) == os.getpid():
        return (storage_key(study._storage), t._trial_id) in RUNNING_HERE
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
            system_attrs={"retry_of": t.system_attrs.get("retry_of", t.number)},
            # a finalist's retry is a finalist too
            user_attrs={k: t.user_attrs[k] for k in ("finalist_of", "finalist_epochs") if k in t.user_attrs}))
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


def storage_key(storage: optuna.storages.BaseStorage) -> str:
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
