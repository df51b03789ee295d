"""Ray Tune backend: the same space, pipeline and study storage, on one machine or a cluster.

The Tuner's search algorithm is Ray's ``OptunaSearch`` driven by the *same* define-by-run
space (:meth:`nas.space.Space.suggest`) and the same explicit, seeded sampler, on the same
Optuna storage; so ``nas front / report / export`` read a Ray-run study unchanged. Workers
only run :func:`nas.pipeline.evaluate` and report back; the driver writes every result into
the study. Multi-objective early stopping runs as a Ray scheduler applying the same Pareto
rung rule as the Optuna backend. Latency timing stays serialized per node by the pipeline's
host-wide lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import optuna

from nas.backends.optuna import (
    create_study,
    finished_count,
    make_sampler,
    resume_seed,
    trials_before,
    with_study_floor,
    worker_id,
)
from nas.config import Candidate
from nas.early_stop import RungRule
from nas.errors import ConfigError
from nas.pipeline import Task, artifact_name, evaluate, get_dataset
from nas.space import Space
from nas.study import open_storage
from nas.trial import outcome, record_rung_and_judge, rung_names

__all__ = ["run_ray", "experiment_dir", "check_ray_address", "check_local_gpus"]

for _k, _v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0", "RAY_AUTH_MODE": "token",
               "TUNE_GLOBAL_CHECKPOINT_S": "2", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
               # rung reports and pruned trials carry no objective values
               "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}.items():
    os.environ.setdefault(_k, _v)


class DefineByRun:
    """OptunaSearch's space: our suggest(), plus the candidate and Optuna trial id as constants.
    A module-level class so the searcher can be pickled for resume."""

    def __init__(self, space: Space, shape: tuple[int, tuple[int, int], int], task: dict[str, Any]) -> None:
        self.space, self.shape, self.task = space, shape, task

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        c, size, k = self.shape
        cand = self.space.suggest(trial, in_channels=c, input_size=size, num_classes=k)
        trial.set_user_attr("candidate", cand.to_dict())
        trial.set_user_attr("summary", cand.arch.summary())
        trial.set_user_attr("compression_summary", cand.compression.summary())
        config = {"candidate": cand.to_dict(), "optuna_number": trial.number, "task": self.task}
        if self.task.get("strategy") == "supernet":  # the worker builds the supernet's inheritor from it
            config["space"] = self.space
        return config


def _make_searcher_class():  # noqa: ANN202
    from ray.tune.search.optuna import OptunaSearch

    class NasOptunaSearch(OptunaSearch):
        """Records nas metrics as user attributes and maps our outcomes to trial states
        (OptunaSearch alone tells a multi-objective trial with missing values as COMPLETE).
        It stops suggesting once the study holds the ``--trials`` total (finished trials in the
        storage plus the ones running now), so a resumed run never overshoots it: trials that
        finished after Tune's last checkpoint are already in the study."""

        total: int | None = None  # set by run_ray; kept in the searcher's checkpoint

        def suggest(self, trial_id: str) -> dict | str | None:
            from ray.tune.search import Searcher

            if self.total is not None:
                # live: asked and not yet recorded. After a resume, a trial the restored searcher
                # still thinks live may already be recorded (it finished after the checkpoint):
                # it is counted by finished_count, so not here too (else the budget ends short).
                storage = self._ot_study._storage
                live = sum(1 for tid, ot in self._ot_trials.items() if tid not in self._completed_trials
                           and not storage.get_trial(ot._trial_id).state.is_finished())
                if finished_count(self._ot_study) + live >= self.total:
                    return Searcher.FINISHED
            return super().suggest(trial_id)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
                # Re-run after a resume, but already recorded before the driver died: keep the first.
                self._completed_trials.add(trial_id)
                return
            result = result or {}
            metrics = dict(result.get("nas_metrics") or {})
            # Tune may hand results over flattened ("nas_metrics/test_accuracy")
            metrics.update({k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("nas_metrics/")})
            for k, v in metrics.items():
                ot_trial.set_user_attr(k, v)
            state, values = optuna.trial.TrialState.FAIL, None
            if result.get("nas_state") == "COMPLETE":
                state, values = optuna.trial.TrialState.COMPLETE, [result[m] for m in self.metric]
            elif result.get("nas_state") in ("PRUNED", "FAIL"):
                state = getattr(optuna.trial.TrialState, result["nas_state"])
                ot_trial.set_user_attr("fail_reason", result.get("fail_reason", ""))
            elif "rung" in result:  # stopped by the scheduler after a rung report
                state = optuna.trial.TrialState.PRUNED
                ot_trial.set_user_attr("rung_reached", result["rung"])
                ot_trial.set_user_attr("fail_reason", f"early-stopped at epoch {result['rung']} by the Pareto rung "
                                                      "rule (Ray scheduler)")
            else:
                ot_trial.set_user_attr("fail_reason", "worker error" if error else "no result reported")
            self._ot_study.tell(ot_trial, values, state=state)
            self._completed_trials.add(trial_id)

    return NasOptunaSearch


def _make_scheduler_class():  # noqa: ANN202
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class ParetoHalvingScheduler(FIFOScheduler):
        """Successive halving on Pareto dominance (see nas.early_stop), as a Ray scheduler.

        Rung records are written to and read from the study storage (:mod:`nas.trial`), as the
        Optuna backend does: a resumed driver, or another process on the same study, compares
        against every trial recorded at the rung, not only those this scheduler has seen."""

        def __init__(self, rule: RungRule, names: list[str], storage_url: str, study_name: str) -> None:
            super().__init__()
            self.rule, self.names = rule, names
            self.storage_url, self.study_name = storage_url, study_name
            self._study: optuna.Study | None = None

        def __getstate__(self) -> dict[str, Any]:  # Tune pickles its scheduler: not the open storage
            return {**self.__dict__, "_study": None}

        def study(self) -> optuna.Study:
            if self._study is None:
                self._study = optuna.load_study(study_name=self.study_name,
                                                storage=open_storage(self.storage_url, create=True, heartbeat=False))
            return self._study

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            if "rung" not in result or result.get("nas_state"):
                return TrialScheduler.CONTINUE
            study = self.study()
            number = int(trial.config["optuna_number"])
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
            costs = {n: result[n] for n in self.names[1:]}
            verdict = record_rung_and_judge(study, trial_id, number, self.rule, self.names, int(result["rung"]),
                                            float(result["rung_accuracy"]), costs)
            return TrialScheduler.STOP if verdict else TrialScheduler.CONTINUE

    return ParetoHalvingScheduler


def _progress_callback(objectives: list[str], quiet: bool, progress: Any, study_name: str, storage_url: str):  # noqa: ANN202
    from ray import tune

    settings = None if progress is None else {
        "directions": progress.directions, "total": progress.total, "log_format": progress.log_format,
        "timeout": progress.timeout, "started_at": progress.start}

    class Progress(tune.Callback):
        """Per finished trial, the same progress as the optuna backend's (lines or JSON: no live bar,
        Tune owns the terminal). Holds only plain settings: the Tuner pickles its callbacks."""

        def __init__(self) -> None:
            self._p: Any = None
            self._study: Any = None

        def __getstate__(self) -> dict[str, Any]:
            return {"_p": None, "_study": None}

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if quiet or settings is None:
                return
            from nas.progress import SearchProgress, trial_line

            if self._p is None:
                self._p = SearchProgress(objectives, settings["directions"], settings["total"], live=False,
                                         log_format=settings["log_format"], timeout=settings["timeout"],
                                         started_at=settings["started_at"])
                self._study = optuna.load_study(study_name=study_name,
                                                storage=open_storage(storage_url, create=False, heartbeat=False))
            r = trial.last_result or {}
            number = r.get("config", {}).get("optuna_number")
            frozen = self._study.get_trials(deepcopy=False)
            mine = next((t for t in frozen if t.number == number), None)
            if mine is None or not mine.state.is_finished():
                return  # not recorded (yet): shown with the next one's counts
            self._p.trial_finished(frozen, mine, "ray " + trial_line(mine, objectives))

    return Progress()


def _node_id() -> str:
    """The Ray node this trial ran on (several nodes can share a host name)."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests call the trainable directly)
        return ""


def _retry_recorder(study_name: str, storage_url: str):  # noqa: ANN202
    """A Tune callback that records, on the Optuna trial, each time Tune restarted it after its
    worker or node died (``FailureConfig(max_failures=1)``: one retry, on any live node)."""
    from ray import tune

    class RetryRecorder(tune.Callback):
        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            number = (trial.config or {}).get("optuna_number")
            if number is None:
                return
            storage = open_storage(storage_url, create=False, heartbeat=False)
            study = optuna.load_study(study_name=study_name, storage=storage)
            mine = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
            if mine is not None and not mine.state.is_finished():
                storage.set_trial_user_attr(mine._trial_id, "retries", int(mine.user_attrs.get("retries", 0)) + 1)
                storage.set_trial_user_attr(mine._trial_id, "retry_reason", str(getattr(trial, "error_file", "") or
                                                                                 "its worker or node died"))

    return RetryRecorder()


def _trainable(config: dict[str, Any]) -> None:
    """One trial on a Ray worker: evaluate, then report objectives and metrics to the driver."""
    from ray import tune

    task = Task.from_dict(config["task"])
    cand = Candidate.from_dict(config["candidate"])
    names = rung_names(task.objectives)

    def at_rung(epoch: int, acc: float, costs: dict[str, Any]) -> None:
        tune.report({"rung": epoch, "rung_accuracy": acc, **{n: float(costs[n]) for n in names[1:]}})

    inherit = None
    if task.strategy == "supernet":  # the driver trained (or loaded) it before Tune started: this loads it
        from nas.strategy import inheritor

        inherit = inheritor(config["space"], task)
    try:
        res = evaluate(cand, task, trial_id=artifact_name(config['optuna_number']),
                       at_rung=at_rung if task.early_stop and inherit is None else None, inherit=inherit)
    except Exception as exc:  # a bug in a block, say: recorded, the study goes on
        state, attrs = outcome(exc)
        tune.report({"nas_state": state, "fail_reason": attrs["fail_reason"],
                     "nas_metrics": {"worker": worker_id(), "ray_node": _node_id(),
                                     **{k: v for k, v in attrs.items() if k != "fail_reason"}}})
        return
    metrics = {**res.metrics, "worker": worker_id(), "ray_node": _node_id()}
    if res.artifact_dir:
        metrics["artifact_dir"] = res.artifact_dir
    tune.report({"nas_state": "COMPLETE", **{o: res.objectives[o] for o in task.objectives}, "nas_metrics": metrics})


def experiment_dir(runs_dir: str | Path, study_name: str) -> Path:
    from nas.study import path_component

    return Path(runs_dir).resolve() / "ray" / path_component(study_name)  # inside runs/ray, whatever the name


def check_ray_address(address: str, timeout_s: float = 3.0) -> None:
    """Refuse, in one line within ``timeout_s``, a ``host:port`` (or ``ray://host:port``) where
    nothing listens: ``ray.init`` would retry for minutes, then raise a long traceback. ``auto``
    is left to Ray (it reads the running cluster's address from this host's files)."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        raise ConfigError(f"--ray-address {address!r} is not allowed (allowed: 'auto', HOST:PORT or ray://HOST:PORT)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({why}); start one with "
                          f"'ray start --head', or leave --ray-address out for a local instance") from None


def check_local_gpus(gpus_per_trial: float) -> None:
    """A local Ray instance has this host's GPUs only: with none, Tune would wait for ever."""
    import torch

    if gpus_per_trial and not torch.cuda.is_available():
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g}: this host has no CUDA device for the local "
                          f"Ray instance (give --ray-address for a cluster with GPUs)")


def run_ray(
    space: Space,
    task: Task,
    *,
    study_name: str,
    storage_url: str,
    sampler: str = "surrogate",
    n_trials: int = 20,
    workers: int = 2,
    ray_address: str | None = None,
    resume: bool = False,
    runs_dir: str | Path = "runs",
    quiet: bool = False,
    timeout: float | None = None,
    progress: Any = None,
    gpus_per_trial: float = 0.0,
) -> optuna.Study:
    """Run (or, with ``resume``, restore) a Ray Tune search into the Optuna study; ``timeout``:
    seconds after which no new trial starts (Tune's ``time_budget_s``)."""
    import ray
    from ray import tune

    if "://" not in storage_url:
        raise ConfigError(f"the Ray backend needs a database storage URL (sqlite:///... or postgresql://...), not {storage_url!r}")
    # Workers may run in other folders (or machines): give them absolute paths.
    if task.artifacts_dir:
        task = dataclasses.replace(task, artifacts_dir=str(Path(task.artifacts_dir).resolve()))
    if ray_address is not None and not ray.is_initialized():
        check_ray_address(ray_address)  # before the study is made: nothing is stored for a cluster not there
    if gpus_per_trial and ray_address is None:
        check_local_gpus(gpus_per_trial)
    if task.dataset.endswith(".npz"):
        task = dataclasses.replace(task, dataset=str(Path(task.dataset).resolve()))
    task = dataclasses.replace(task, train_threads=task.train_threads or 1)
    storage = open_storage(storage_url, create=True, heartbeat=False)  # Tune asks/tells: no optimize() heartbeat
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = create_study(study_name, storage, task, space, make_sampler(sampler, task.seed, n_trials, space, task),
                         {"backend": "ray"})
    task = with_study_floor(task, study)
    exp = experiment_dir(runs_dir, study_name)

    started = False
    if not ray.is_initialized():
        # "local": a new instance of our own, never silently a cluster someone else started
        try:
            ray.init(address=ray_address or "local", num_cpus=None if ray_address else workers,
                     include_dashboard=False, log_to_driver=False, logging_level="warning")
        except ConnectionError as exc:  # 'auto' with no cluster running, or one that went away
            raise ConfigError(f"--ray-address {ray_address}: no Ray cluster answers there "
                              f"({str(exc).splitlines()[0][:200]})") from exc
        started = True
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    try:
        trainable = tune.with_resources(_trainable, {"cpu": 1, **({"gpu": gpus_per_trial} if gpus_per_trial else {})})
        if resume:
            if not tune.Tuner.can_restore(str(exp)):
                raise ConfigError(f"nothing to resume for study {study_name!r}: no Ray experiment in {exp}")
            tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            remaining = n_trials - finished_count(study)
            if remaining <= 0:
                return study
            existing = trials_before(study)  # a resumed study: do not replay its draws
            data = get_dataset(task.dataset, task.seed)
            searcher = _make_searcher_class()(
                space=DefineByRun(space, (data.in_channels, data.input_size, data.num_classes), task.to_dict()),
                metric=list(task.objectives), mode=["max" if d == "maximize" else "min" for d in study_directions(study)],
                sampler=make_sampler(sampler, resume_seed(task.seed, existing) if existing else task.seed, n_trials, space,
                                     task), study_name=study_name, storage=storage,
            )
            searcher.total = n_trials
            rule = task.rung_rule()
            scheduler = _make_scheduler_class()(rule, rung_names(task.objectives), storage_url, study_name) if rule else None
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                                            max_concurrent_trials=workers, reuse_actors=True,
                                            time_budget_s=timeout),
                run_config=tune.RunConfig(name=exp.name, storage_path=str(exp.parent), verbose=0,
                                          # a trial whose worker or node dies (our trainable catches its own
                                          # errors) is restarted once, from scratch, wherever a CPU is free
                                          failure_config=tune.FailureConfig(max_failures=1),
                                          callbacks=[_progress_callback(list(task.objectives), quiet, progress,
                                                                        study_name, storage_url),
                                                     _retry_recorder(study_name, storage_url)]),
            )
        tuner.fit()
    finally:
        if started:
            ray.shutdown()
    # A driver killed mid-run leaves trials it had asked for but not saved: they never finish.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "driver stopped before this trial was recorded")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return study


def study_directions(study: optuna.Study) -> list[str]:
    return ["maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
