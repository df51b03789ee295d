"""A space's ``start:`` entries: the first trials of a new study (as Optuna's ``enqueue_trial``),
checked against the space when it loads, enqueued once, and left out of the space's fingerprint."""

from __future__ import annotations

import optuna
import pytest
import yaml

from nas.backends.optuna import SPACE_START
from nas.cli import main
from nas.errors import SpaceError
from nas.space import SPACES_DIR, load_space, parse_space

RAW = yaml.safe_load((SPACES_DIR / "default.yaml").read_text())
ENTRY = {"s0.block": "mbconv", "s0.expansion": 4, "s1.block": "dsconv", "s1.width": 32, "compress.quant": "int8",
         "compress.weight_only": True}


def test_start_entries_are_checked_as_the_space_asks_its_genes():
    space = parse_space({**RAW, "start": [ENTRY]}, "s")
    assert space.start == (ENTRY,)
    assert space.fingerprint() == parse_space(RAW, "s").fingerprint()  # where a study begins, not what it samples
    bad = [
        ({**ENTRY, "s9.block": "conv"}, r"start\[0\]: 's9.block' is not a parameter this space asks at these settings"),
        # expansion is asked only of an mbconv stage
        ({**ENTRY, "s1.expansion": 2}, r"'s1.expansion' is not a parameter this space asks"),
        # weight_only only matters for int8/int4
        ({**ENTRY, "compress.quant": "fp32"}, r"'compress.weight_only' is not a parameter this space asks"),
        ({**ENTRY, "s1.width": 40}, r"start\[0\]: s1.width: 40 is not allowed \(allowed: 16, 24, 32\)"),
        ({**ENTRY, "recipe.lr": 0.5}, r"recipe.lr: 0.5 is not allowed \(allowed: 0.002 to 0.02\)"),
        ({**ENTRY, "s0.block": "resnet"}, r"s0.block: 'resnet' is not allowed \(allowed: 'conv', 'dsconv'"),
    ]
    for entry, msg in bad:
        with pytest.raises(SpaceError, match=msg):
            parse_space({**RAW, "start": [entry]}, "s")
    for start in ({"s0.block": "conv"}, ["conv"], [[1]]):
        with pytest.raises(SpaceError, match=r"start.*is not allowed \(allowed: a (list of )?mappings? of parameter names"):
            parse_space({**RAW, "start": start}, "s")
    with pytest.raises(SpaceError, match="start"):  # through the CLI's loader: one line, the file named
        parse_space({**RAW, "start": [{1: 2}]}, "s")


def test_the_bundled_28px_space_starts_from_the_benchmarks_small_mobilenet():
    space = load_space("default28")
    cand = space.suggest(optuna.trial.FixedTrial({**space.start[0], "recipe.lr": 0.01}),
                         in_channels=1, input_size=(28, 28), num_classes=10)
    assert [(b.type, b.out_channels, b.stride) for b in cand.arch.blocks] == \
        [("dsconv", 32, 2), ("dsconv", 64, 2), ("dsconv", 128, 2), ("dsconv", 128, 1)]
    assert cand.arch.stem_channels == 16 and (cand.compression.quant, cand.compression.weight_only) == ("int4", True)


def test_a_new_study_runs_the_start_entries_first_and_a_resume_does_not_repeat_them(in_tmp):
    (in_tmp / "space.yaml").write_text(yaml.safe_dump({**RAW, "start": [ENTRY]}))
    db = f"sqlite:///{in_tmp}/s.db"
    args = ["search", "--space", "space.yaml", "--epochs", "1", "--study", "s", "--storage", db, "--quiet"]
    assert main([*args, "--trials", "1"]) == 0
    first, = optuna.load_study(study_name="s", storage=db).trials
    assert first.state == optuna.trial.TrialState.COMPLETE and first.user_attrs[SPACE_START] == 0
    assert {k: first.params[k] for k in ENTRY} == ENTRY
    assert "s0.width" in first.params and "recipe.lr" in first.params  # the sampler chose what it left out
    assert main([*args, "--trials", "2"]) == 0
    trials = optuna.load_study(study_name="s", storage=db).trials
    assert len(trials) == 2 and SPACE_START not in trials[1].user_attrs and trials[1].params != first.params
