"""Siblings (``--siblings K``): other compressions of a trial's trained weights, run as trials
of their own without training again; the kept weights are a cache, invisible in the results."""

from __future__ import annotations

import optuna
import pytest

from nas.cli import main
from nas.pipeline import Task, evaluate, training_key
from nas.siblings import SIBLING_OF, compression_variants
from nas.space import load_space
from nas.trial import counts_toward_total
from nas.config import Candidate

DIMS = {"in_channels": 1, "input_size": (28, 28), "num_classes": 10}


def _params(space, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    space.suggest(trial, **DIMS)
    return trial.params


def test_variants_cover_every_compression_setting_once_with_only_the_genes_that_matter():
    space = load_space("default28")
    params = _params(space)
    variants = compression_variants(space, params, DIMS)
    # prune: none, or l1 at 1/8 or 1/4; quant: fp32, or int8/int4 each with and without weight-only
    assert len(variants) == 3 * 5
    keys = {tuple(sorted((k, v) for k, v in var.items() if k.startswith("compress."))) for var in variants}
    assert len(keys) == 15
    for var in variants:
        assert {k: v for k, v in var.items() if not k.startswith("compress.")} == \
            {k: v for k, v in params.items() if not k.startswith("compress.")}
        assert ("compress.prune_ratio" in var) == (var["compress.prune"] != "none")
        assert ("compress.weight_only" in var) == (var["compress.quant"] != "fp32")
        cand = space.suggest(optuna.trial.FixedTrial(var), **DIMS)  # each is a valid trial of the space
        assert cand.compression.quant == var["compress.quant"]


def test_the_training_key_ignores_post_training_genes_only():
    space = load_space("default28")
    params = _params(space, seed=3)
    task = Task(dataset="digits")
    variants = [space.suggest(optuna.trial.FixedTrial(v), in_channels=1, input_size=(8, 8), num_classes=10)
                for v in compression_variants(space, params, {"in_channels": 1, "input_size": (8, 8), "num_classes": 10})]
    assert len({training_key(c, task, c.recipe) for c in variants}) == 1
    other = Candidate(variants[0].arch, variants[0].compression, variants[0].recipe.__class__(
        **{**variants[0].recipe.__dict__, "lr": variants[0].recipe.lr * 2}))
    assert training_key(other, task, other.recipe) != training_key(variants[0], task, variants[0].recipe)
    import dataclasses

    from nas.methods import CompressionConfig

    distilled = dataclasses.replace(variants[0], compression=CompressionConfig(**{**variants[0].compression.to_dict(),
                                                                                   "distill_alpha": 0.5}))
    assert training_key(distilled, task, distilled.recipe) != training_key(variants[0], task, variants[0].recipe)


def test_a_search_runs_siblings_on_their_parents_weights_and_they_equal_a_fresh_training(in_tmp):
    db = f"sqlite:///{in_tmp}/s.db"
    assert main(["search", "--trials", "1", "--epochs", "1", "--siblings", "2", "--study", "s", "--storage", db,
                 "--quiet", "--no-early-stop"]) == 0
    trials = optuna.load_study(study_name="s", storage=db).get_trials()
    siblings = [t for t in trials if t.user_attrs.get(SIBLING_OF) is not None]
    parents = [t for t in trials if t.user_attrs.get(SIBLING_OF) is None]
    assert len(parents) == 1 and len(siblings) == 2 and sum(counts_toward_total(t) for t in trials) == 1
    for s in siblings:
        parent = trials[s.user_attrs[SIBLING_OF]]
        assert s.state.name == "COMPLETE" and s.user_attrs["trained_by"] == parent.number
        same = {k: v for k, v in parent.params.items() if not k.startswith("compress.")}
        assert {k: v for k, v in s.params.items() if not k.startswith("compress.")} == same
        assert s.params != parent.params
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)  # no setting twice
    # the reused weights are what training would give: the same candidate trained afresh scores the same
    s = siblings[0]
    cand = Candidate.from_dict(s.user_attrs["candidate"])
    fresh = evaluate(cand, Task(dataset="digits", epochs=1, latency_floor_ms=0.001))
    assert fresh.objectives["accuracy"] == pytest.approx(s.values[0], abs=1e-12)
    assert fresh.metrics["size_bytes"] == s.user_attrs["size_bytes"]


@pytest.mark.parametrize("extra", [["--backend", "ray"], ["--strategy", "supernet"]])
def test_siblings_outside_the_optuna_scratch_search_are_one_line_and_exit_2(in_tmp, capsys, extra):
    assert main(["search", "--siblings", "2", "--trials", "1", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--siblings" in err[0]


def test_a_space_sets_the_default_siblings_and_the_flag_overrides_it(in_tmp):
    import yaml

    from nas.errors import SpaceError
    from nas.space import SPACES_DIR, parse_space

    raw = yaml.safe_load((SPACES_DIR / "default.yaml").read_text())
    assert parse_space(raw, "default").siblings == 0
    assert parse_space(yaml.safe_load((SPACES_DIR / "default28.yaml").read_text()), "default28").siblings == 2
    for bad in (-1, 65, 1.5, "2", True, [2]):
        with pytest.raises(SpaceError, match=r"siblings: .* is not allowed \(allowed: an integer from 0 to 64\)"):
            parse_space({**raw, "siblings": bad}, "s")
    (in_tmp / "space.yaml").write_text(yaml.safe_dump({**raw, "siblings": 1}))
    for extra, want in (([], 1), (["--siblings", "0"], 0)):
        db = f"sqlite:///{in_tmp}/d{want}.db"
        assert main(["search", "--space", "space.yaml", "--trials", "1", "--epochs", "1", "--study", "d", "--storage",
                     db, "--quiet", *extra]) == 0
        trials = optuna.load_study(study_name="d", storage=db).trials
        assert sum(t.user_attrs.get(SIBLING_OF) is not None for t in trials) == want
