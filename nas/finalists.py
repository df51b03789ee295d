"""Finalists: after a search, the front members that matter most are trained again with the long
recipe a shipped model gets, and recorded as ordinary trials (``--finalists K``).

At real size a search trains each candidate briefly (Fashion-MNIST: 6-12 epochs, screened on an
eighth of the data first) so that it sees more of them; the models a user exports should be
trained the way they ship. A finalist is the same candidate (the same parameters, enqueued into
the study) trained for ``--finalist-epochs``, with no screen and no early stopping, then
compressed, deployed, measured and scored by the same pipeline as every trial. It is an ordinary
trial of the study (``finalist_of`` names the trial it retrains), so the front, ``export`` and
``verify`` treat it like any other; it and its original are both on the study, and validation
decides which is on the front. Finalists do not count towards ``--trials``.

Which members: the K nearest the ideal point of the validation front, each objective scaled to
[0, 1] over the front: the knee, which ``nas export --pick knee`` exports, and its neighbours.
Ranking by validation accuracy alone, as a first reading of "the best K" would, retrains only
the largest models, which gain least from it and are not what a compression search is for; the
exclusive hypervolume contribution (costs on the reports' log scale) was tried on the 87-minute
Fashion-MNIST study and picked the three smallest members (84-92% accurate, 1.7-10 KB), the
extreme a user exports least. Selection reads validation figures only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from nas.config import Candidate
from nas.pareto import knee_order

__all__ = ["FINALIST_OF", "FINALIST_EPOCHS", "TIMEOUT_SHARE", "auto_finalists", "finalist_epochs", "is_finalist", "choose_finalists",
           "finalist_candidate", "finalist_cost_s", "run_finalists"]

FINALIST_OF = "finalist_of"  # user attribute: the trial a finalist retrains
FINALIST_EPOCHS = "finalist_epochs"  # user attribute: the epochs it trains for
EPOCH_FACTOR = 3  # default finalist epochs: this many times the space's longest recipe
# With --timeout, the search starts no trial after (1 - this) of it; the finalists get the rest,
# each only if its estimated cost fits what is left. (A reserve estimated from the current front
# stopped an 85-minute search after 34 minutes: early fronts hold large, slow models.)
TIMEOUT_SHARE = 0.25


def auto_finalists(n_train: int) -> int:
    """The default number of finalists: none. Measured on Fashion-MNIST (the 88-minute default
    search, 2026-12-01): four finalists trained for 36 epochs scored 91.3, 91.3, 91.1 and 91.6%
    on validation against 91.5, 91.0, 90.5 and 92.1% for their originals (12, 6, 6 and 12
    epochs): 6 -> 36 epochs gained 0.2-0.6 points, 12 -> 36 lost 0.2-0.5, and the quarter of
    --timeout they took would have trained ~10 more candidates. ``--finalists K`` turns them on."""
    del n_train
    return 0


def finalist_epochs(recipe_epochs: Sequence[int], override: int | None = None) -> int:
    """Epochs a finalist trains: ``EPOCH_FACTOR`` x the longest recipe a trial trains
    (``recipe_epochs``: the space's epoch choices, or ``--epochs`` where that overrides them)."""
    if override is not None:
        return EPOCH_FACTOR * int(override)
    return EPOCH_FACTOR * int(max(recipe_epochs))


def is_finalist(trial: Any) -> bool:
    return trial.user_attrs.get(FINALIST_OF) is not None


def finalist_candidate(cand: Candidate, epochs: int) -> Candidate:
    """The candidate trained for ``epochs`` (the rest of its recipe as the search found it)."""
    return dataclasses.replace(cand, recipe=dataclasses.replace(cand.recipe, epochs=int(epochs)))


def choose_finalists(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """Of the ``k`` front members nearest the ideal point (the knee, which ``nas export --pick
    knee`` exports, and its neighbours), those not yet finalists, nearest first. A study whose
    ``k`` knee members are all finalists gets none: running the same search again adds nothing."""
    from nas.study import front_frame, study_meta

    if k <= 0:
        return []
    front = front_frame(study)
    if front.empty:
        return []
    meta = study_meta(study)
    trials = study.get_trials(deepcopy=False)
    done = {t.user_attrs[FINALIST_OF] for t in trials if is_finalist(t) and t.state != optuna.trial.TrialState.FAIL}
    by_number = {t.number: t for t in trials}
    order = knee_order(front[meta["objectives"]].to_numpy(dtype=float), meta["directions"])
    members = [by_number[int(front["trial"].iloc[int(i)])] for i in order[:k]]
    # two members that differ only in their epochs are one finalist (both would train the same
    # candidate for the same epochs: on Fashion-MNIST two such runs gave the same 8,827-byte model)
    taken = {_without_epochs(t) for t in trials if is_finalist(t) and t.state != optuna.trial.TrialState.FAIL}
    out = []
    for t in members:
        key = _without_epochs(t)
        if is_finalist(t) or t.number in done or key in taken:
            continue
        taken.add(key)
        out.append(t)
    return out


def _without_epochs(t: optuna.trial.FrozenTrial) -> str:
    import json

    if not isinstance(t.user_attrs.get("candidate"), dict):
        return f"trial {t.number}"  # (no candidate recorded: nothing to compare)
    cand = dict(t.user_attrs["candidate"])
    if isinstance(cand.get("recipe"), dict):
        cand["recipe"] = {k: v for k, v in cand["recipe"].items() if k != "epochs"}
    return json.dumps(cand, sort_keys=True, default=str)


def finalist_cost_s(trial: optuna.trial.FrozenTrial, epochs: int) -> float:
    """Estimated seconds to retrain ``trial`` for ``epochs``: its measured seconds per epoch
    (full-data training only) times ``epochs``, plus its pre-flight, compression and scoring."""
    ua = trial.user_attrs
    train_s = float(ua.get("train_s") or 0.0)
    rest = float(ua.get("total_s") or train_s) - train_s - float(ua.get("screen_s") or 0.0)
    if not ua.get("epochs") and "epoch_s_estimate" in ua:  # inherited from a supernet: it trained nothing
        return float(ua["epoch_s_estimate"]) * epochs + max(0.0, rest)
    trained = max(1, int(ua.get("epochs") or 1))
    return train_s / trained * epochs + max(0.0, rest)


def run_finalists(study: optuna.Study, objective: Callable[[optuna.Trial], Any], k: int, epochs: int,
                  callbacks: list | None = None, deadline: float | None = None,
                  on_chosen: Callable[[optuna.trial.FrozenTrial, float], None] | None = None,
                  on_skipped: Callable[[optuna.trial.FrozenTrial, float, float], None] | None = None) -> list[int]:
    """Retrain the chosen front members one at a time, nearest the knee first: each is enqueued
    with its parameters (marked ``finalist_of`` and ``finalist_epochs``) and run through
    ``objective``, the backends' (which trains a marked trial as a finalist: see
    :func:`finalist_candidate`). With a ``deadline`` (``time.monotonic()``), a member whose
    estimated cost (:func:`finalist_cost_s`) does not fit the time left is skipped
    (``on_skipped(trial, estimate, left)``). Returns the numbers of the retrained trials."""
    import time

    done = []
    for t in choose_finalists(study, k):
        cost = finalist_cost_s(t, epochs)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and cost > left:
            if on_skipped is not None:
                on_skipped(t, cost, left)
            continue
        if on_chosen is not None:
            on_chosen(t, cost)
        study.enqueue_trial(dict(t.params), user_attrs={FINALIST_OF: t.number, FINALIST_EPOCHS: int(epochs)})
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks, gc_after_trial=False)
        done.append(t.number)
    return done
