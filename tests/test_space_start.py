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


@pytest.mark.parametrize("entry, message", [
    # a value equal to a choice but of another type would reach the builder (range(2.0), a float width)
    ({"s1.depth": 2.0}, "s1.depth: 2.0 is not allowed (allowed: 1, 2)"),
    ({"s0.block": "conv", "s0.width": 16.0}, "s0.width: 16.0 is not allowed (allowed: 8, 16, 24)"),
    ({"s1.depth": True}, "s1.depth: True is not allowed (allowed: 1, 2)"),
    ({"compress.quant": "int8", "compress.weight_only": 1}, "compress.weight_only: 1 is not allowed (allowed: False, True)"),
    ({"recipe.lr": "0.01"}, "recipe.lr: '0.01' is not allowed (allowed: 0.002 to 0.02)"),
    ({"recipe.lr": float("nan")}, "recipe.lr: nan is not allowed"),
    ({"s1.depth": 10 ** 400}, "s1.depth: 1000"),  # a YAML integer too large for a float: no OverflowError
    # a name asked only at some draws of what the entry leaves out: the gene it depends on is named
    ({"s0.expansion": 4}, "'s0.expansion' is asked only at some values of genes this entry leaves out "
                          "(allowed: names asked whatever the others are; set s0.block too)"),
    ({"compress.weight_only": True}, "compress.quant"),
])
def test_start_values_of_another_type_or_names_that_depend_on_a_draw_are_refused(entry, message):
    with pytest.raises(SpaceError) as err:
        parse_space({**RAW, "start": [entry]}, "s")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_start_entries_are_normalised_once_and_refused_twice_and_long_values_are_cut():
    space = parse_space({**RAW, "start": [{**ENTRY, "recipe.lr": 0.01}]}, "s")
    assert space.start[0]["recipe.lr"] == 0.01 and type(space.start[0]["recipe.lr"]) is float
    with pytest.raises(SpaceError, match=r"start\[1\] repeats start\[0\] \(allowed: each setting once\)"):
        parse_space({**RAW, "start": [ENTRY, dict(ENTRY)]}, "s")
    for start in ([[0] * 100000], {"a": [0] * 100000}, [{"x" * 100000: 1}]):
        with pytest.raises(SpaceError) as err:
            parse_space({**RAW, "start": start}, "s")
        assert len(str(err.value)) < 400, len(str(err.value))


def test_a_bad_start_value_is_one_line_and_exit_2_from_the_cli(in_tmp, capsys):
    (in_tmp / "space.yaml").write_text(yaml.safe_dump({**RAW, "start": [{"s1.depth": 2.0}]}))
    assert main(["search", "--space", "space.yaml", "--trials", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s1.depth: 2.0 is not allowed" in err and "Traceback" not in err
    assert not (in_tmp / "runs").exists()


def test_waiting_start_entries_do_not_make_a_new_study_a_resume():
    # a resumed study reseeds its sampler from its progress; the space's own enqueued entries are
    # not progress: a new study keeps --seed, with or without start entries
    from nas.backends.optuna import trials_before

    study = optuna.create_study()
    study.enqueue_trial({"x": 1}, user_attrs={SPACE_START: 0})
    assert trials_before(study) == 0
    study.enqueue_trial({"x": 2})  # a retry or a sibling is progress
    assert trials_before(study) == 1
    study.optimize(lambda t: t.suggest_int("x", 0, 3), n_trials=1)
    assert trials_before(study) == 2
