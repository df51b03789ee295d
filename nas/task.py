"""What every trial of a study shares (:class:`Task`): the data, the objectives, the limits,
the measurement and training settings, and which of them a resumed study must keep."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nas.early_stop import RungRule
from nas.errors import ConfigError
from nas.objectives import DEFAULT_OBJECTIVES

__all__ = ["Task", "Reward", "default_train_threads", "auto_screen"]


@dataclass(frozen=True)
class Reward:
    """MnasNet's single-objective reward on one cost (``--reward``): accuracy x (cost /
    target)^w, ``soft`` (w = -0.07 everywhere) or ``hard`` (w = 0 under the target)."""

    on: str
    target: float
    form: str = "soft"


def _fixed(default: Any, setting: str) -> Any:
    """A :class:`Task` field a resumed study must keep; ``setting`` is how a user sets it."""
    return field(default=default, metadata={"fixed_on_resume": setting})


@dataclass(frozen=True)
class Task:
    """What every trial of a study shares: data, objectives, limits, measurement settings.

    Fields made with ``_fixed`` may not change when a study is resumed: they decide the data
    splits (dataset, seed), what is searched (objectives) and how candidates are trained and
    timed; changing one would mix incomparable trials, or make earlier trials' validation/test
    data later trials' training data. Limits, early stopping, jobs and workers may change.
    :meth:`fixed_on_resume` lists them and the resume check is made from it."""

    dataset: str = _fixed("digits", "--dataset")
    seed: int = _fixed(0, "--seed")
    objectives: tuple[str, ...] = _fixed(DEFAULT_OBJECTIVES, "--objectives")
    constraints: dict[str, float] = field(default_factory=dict)
    latency_threads: int = _fixed(1, "--latency-threads")
    # The study's reference runtime floor (an Identity graph's latency when the study was made):
    # every timing is scaled to that host speed by the floor timed beside it (see timed()).
    latency_floor_ms: float | None = None
    train_threads: int | None = None
    epochs: int | None = _fixed(None, "--epochs")
    artifacts_dir: str | None = None
    teachers: int = _fixed(1, "Task(teachers=...)")  # no flag: the API sets it
    # bounded by ``epochs`` where that is set (see teacher_budget)
    teacher_epochs: int = _fixed(20, "Task(teacher_epochs=...)")
    max_memory_mb: float = 4096.0  # candidates estimated to need more to train fail in pre-flight
    reward: Reward | None = _fixed(None, "--reward/--reward-on/--reward-target")
    early_stop: RungRule | None = None  # None turns early stopping off
    # data-size fidelity: with early stopping on, every trial is first trained on this fraction
    # of the training split (the whole recipe, so ~this fraction of the cost) and judged at rung
    # 0 like any rung (calibrated, Pareto successive halving); 0 turns it off (see auto_screen).
    # Fixed: rung 0's accuracies are comparable only on one subset of one size.
    screen: float = _fixed(0.0, "--screen-fraction")
    # scratch: every trial trains its candidate; supernet: trials inherit weights from one
    # weight-sharing supernet trained once per study for supernet_epochs (nas.strategy)
    strategy: str = _fixed("scratch", "--strategy")
    supernet_epochs: int = _fixed(10, "--supernet-epochs")
    # how the supernet's sandwich rule picks block types (nas.supernet.SANDWICHES)
    supernet_sandwich: str = _fixed("fixed", "--supernet-sandwich")
    # where trials train (nas.device): auto | cpu | cuda | cuda:N | mps, and bf16/fp16 autocast.
    # Not fixed: a resumed study may move to another device (latency is timed on the CPU runtime)
    device: str = "cpu"
    amp: bool = False
    # --latency-on: every latency is timed on this probe (nas.probe) instead of this host, with
    # the token read from probe_token_file (the token itself is never stored). Not fixed: trials
    # record the device they were timed on and fronts group by it, as they group by timing host.
    latency_on: str = ""
    probe_token_file: str = ""
    # --latency-model: latency predicted from each deployable graph by a model of the device
    # fitted on its profile (nas.latency_model); recorded with latency_source: predicted
    latency_model: str = ""
    # --siblings K: after each trial trains, K other compressions of the same trained weights
    # are enqueued as trials of their own (nas.siblings); not fixed: it changes costs, not results
    siblings: int = 0

    def __post_init__(self) -> None:
        # the parts may be given as their records (dicts: JSON, YAML configs, the API)
        if isinstance(self.reward, dict):
            object.__setattr__(self, "reward", Reward(**self.reward))
        if isinstance(self.early_stop, dict):
            d = dict(self.early_stop)
            if "fractions" in d:
                d["fractions"] = tuple(d["fractions"])
            object.__setattr__(self, "early_stop", RungRule(**d))

    @classmethod
    def fixed_on_resume(cls) -> dict[str, str]:
        """Field -> how it is set, for every field a resumed study must keep."""
        return {f.name: f.metadata["fixed_on_resume"] for f in dataclasses.fields(cls) if "fixed_on_resume" in f.metadata}

    def teacher_budget(self) -> int:
        """Epochs a distillation teacher trains: ``--epochs`` bounds it as it bounds the students."""
        return self.teacher_epochs if self.epochs is None else min(self.teacher_epochs, self.epochs)

    def rung_rule(self) -> RungRule | None:
        return self.early_stop

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # the parts become their records
        d["objectives"] = list(self.objectives)
        if d["early_stop"] is not None:
            d["early_stop"]["fractions"] = list(d["early_stop"]["fractions"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        try:
            d = dict(d)
            d["objectives"] = tuple(d.get("objectives", DEFAULT_OBJECTIVES))
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"task: cannot read task record ({exc})") from exc


def default_train_threads(concurrent: int) -> int:
    """Training threads per trial: the cores this process may use divided by the trials that
    run at once (every trial training with all cores oversubscribes the host: with 4 other
    processes on it the quick start's trials took 30-280 s each against ~2 s idle)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, concurrent))


def auto_screen(n_train: int) -> float:
    """The default data fraction trials are screened on: 1/8 of a training split of 20,000
    samples or more (there one epoch is tens of seconds on 2 cores), none below."""
    return 0.125 if n_train >= 20_000 else 0.0
