"""Siblings: other compressions of a trained candidate, as trials of their own (``--siblings K``).

At real size a trial's cost is training (Fashion-MNIST: minutes), while its compression genes
act after training: pruning, quantization, clustering and Huffman coding start from the trained
weights and cost a fine-tuning epoch at most. A search that samples architecture and
compression jointly pays a whole training for each compression it tries, and a good
architecture drawn with a ruinous compression (half its channels pruned) is lost to the front.
Here, once a trial has trained, ``K`` other settings of the space's compression genes for the
same architecture and recipe are enqueued into the study (``sibling_of`` names the trial);
each runs as an ordinary trial, its training replaced by the trained weights the pipeline keeps
for it (:func:`nas.pipeline.training_key`: seeded training makes that a cache, not an
approximation), then compressed, deployed, measured and scored like every trial. APQ's
observation is the same: quantization policies are cheap to evaluate on shared trained weights.

Which settings: every combination of the space's categorical compression genes that matters
(conditional genes only where they apply), less those the study already holds for this
architecture and recipe, ``K`` of them drawn at random (seeded by the trial). Siblings do not
count towards ``--trials`` (like finalists) and run only with the Optuna backend, in the
process that trained their parent (the weights are kept in its memory).
"""

from __future__ import annotations

import random
from typing import Any

import optuna

__all__ = ["SIBLING_OF", "is_sibling", "compression_variants", "enqueue_siblings"]

SIBLING_OF = "sibling_of"  # user attribute: the trial whose trained weights a sibling compresses
PREFIX = "compress."
MAX_VARIANTS = 4096  # enumeration bound: spaces with more combinations are sampled from the first ones


def is_sibling(trial: Any) -> bool:
    return trial.user_attrs.get(SIBLING_OF) is not None


class _Recorder:
    """A stand-in trial: fixed answers for the parameters it is given, the first choice for a
    new categorical (recorded, so the caller can branch on it), the base value otherwise."""

    def __init__(self, base: dict[str, Any], assigned: dict[str, Any]) -> None:
        self.base, self.assigned, self.asked, self.new = base, assigned, {}, None

    def _answer(self, name: str, choices: list[Any] | None, low: Any = None) -> Any:
        if not name.startswith(PREFIX):
            value = self.base[name]  # the parent's architecture and recipe
        elif name in self.assigned:
            value = self.assigned[name]
        elif choices is not None:
            self.new = self.new or (name, choices)
            value = choices[0]
        else:  # a numeric compression gene: the parent's value where it had one, else its low end
            value = self.base.get(name, low)
        self.asked[name] = value
        return value

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._answer(name, list(choices))

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        return self._answer(name, None, low)

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return self._answer(name, None, low)


def compression_variants(space: Any, params: dict[str, Any], dims: dict[str, Any]) -> list[dict[str, Any]]:
    """Every setting of ``space``'s categorical compression genes for the architecture and
    recipe in ``params`` (a trial's parameters), each as the full parameters of a trial: only
    the genes that matter at that setting are present, as the space itself would ask them."""
    out: list[dict[str, Any]] = []
    stack: list[dict[str, Any]] = [{}]
    while stack and len(out) < MAX_VARIANTS:
        assigned = stack.pop()
        rec = _Recorder(params, assigned)
        space.suggest(rec, **dims)
        if rec.new is None:
            out.append(dict(rec.asked))
            continue
        name, choices = rec.new
        stack.extend({**assigned, name: c} for c in reversed(choices))
    return out


def _arch_and_recipe(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items() if not k.startswith(PREFIX)))


def enqueue_siblings(study: optuna.Study, trial: Any, space: Any, dims: dict[str, Any], k: int, seed: int) -> int:
    """Enqueue up to ``k`` siblings of the finished ``trial``: compressions of its trained
    weights that the study does not hold yet. Returns how many were enqueued."""
    if k <= 0:
        return 0
    params = dict(trial.params)
    mine = _arch_and_recipe(params)
    held = {tuple(sorted((n, repr(v)) for n, v in t.params.items()))
            for t in study.get_trials(deepcopy=False) if _arch_and_recipe(t.params) == mine}
    held |= {tuple(sorted((n, repr(v)) for n, v in t.system_attrs.get("fixed_params", {}).items()))
             for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))}
    fresh = [v for v in compression_variants(space, params, dims)
             if tuple(sorted((n, repr(x)) for n, x in v.items())) not in held]
    picks = random.Random(f"{seed}:{trial.number}").sample(fresh, min(k, len(fresh)))
    for v in picks:
        study.enqueue_trial(v, user_attrs={SIBLING_OF: trial.number})
    return len(picks)
