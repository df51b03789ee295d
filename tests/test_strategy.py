"""--strategy supernet (issue 25, in progress): one supernet per study, trained before the first
trial, stored with a key, reused by a resumed search, refused when it was trained for something
else; trials inherit weights and go through the same compression, deploy and scoring."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest

from nas.cli import main


def _study_folder(root):
    (meta,) = root.rglob("supernet.json")
    return meta.parent


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_trials_inherit_from_one_stored_supernet_reused_on_resume(in_tmp, capsys):
    db = f"sqlite:///{in_tmp}/s.db"
    base = ["search", "--strategy", "supernet", "--supernet-epochs", "1", "--epochs", "1", "--finalists", "0",
            "--study", "s", "--storage", db]
    assert main([*base, "--trials", "3"]) == 0
    assert "supernet: epoch 1/1" in capsys.readouterr().err
    folder = _study_folder(in_tmp / "runs")
    weights = folder / "supernet.safetensors"
    meta = json.loads((folder / "supernet.json").read_text())
    assert weights.is_file() and meta["recipe"]["epochs"] == 1 and len(meta["key"]) == 24
    trials = optuna.load_study(study_name="s", storage=db).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.user_attrs["epochs"] == 0 and t.user_attrs["epoch_s_estimate"] > 0 for t in trials)  # nothing trained
    assert all(0 <= t.values[0] <= 1 and t.user_attrs["size_bytes"] > 0 for t in trials)
    stamp = weights.stat().st_mtime_ns
    # a resumed search in another process loads it: not trained again
    again = subprocess.run([sys.executable, "-m", "nas.cli", *base, "--trials", "5"], cwd=in_tmp,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "supernet: epoch" not in again.stderr and weights.stat().st_mtime_ns == stamp
    trials = optuna.load_study(study_name="s", storage=db).trials
    assert len(trials) == 5 and all(t.user_attrs.get("supernet_s", 0) == 0 for t in trials[3:])


def test_a_supernet_trained_for_something_else_is_refused_in_one_line(in_tmp, capsys):
    db = f"sqlite:///{in_tmp}/r.db"
    base = ["search", "--strategy", "supernet", "--supernet-epochs", "1", "--epochs", "1", "--finalists", "0",
            "--study", "r", "--storage", db, "--trials", "1"]
    assert main(base) == 0
    folder = _study_folder(in_tmp / "runs")
    meta = json.loads((folder / "supernet.json").read_text())
    (folder / "supernet.json").write_text(json.dumps({**meta, "key": "0" * 24, "space": "other"}))
    capsys.readouterr()
    assert main([*base[:-1], "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a supernet for space 'other'" in err and meta["key"] in err
    assert len(optuna.load_study(study_name="r", storage=db).trials) == 1  # nothing ran


def test_the_supernet_strategy_is_fixed_on_resume(in_tmp, capsys):
    db = f"sqlite:///{in_tmp}/f.db"
    assert main(["search", "--trials", "1", "--epochs", "1", "--study", "f", "--storage", db, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", "--trials", "2", "--epochs", "1", "--study", "f", "--storage", db,
                 "--strategy", "supernet"]) == 2
    assert "--strategy" in capsys.readouterr().err


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_two_workers_share_one_supernet_trained_once(in_tmp):
    """Two processes start the same supernet study at once: one trains the supernet (under the
    folder's file lock), the other waits and loads it; both run trials on it."""
    db = f"sqlite:///{in_tmp}/w.db"
    cmd = [sys.executable, "-m", "nas.cli", "search", "--strategy", "supernet", "--supernet-epochs", "2", "--epochs",
           "1", "--study", "w", "--storage", db, "--train-threads", "1"]
    # the study is made first (one finished trial), so the two below race only for the supernet
    subprocess.run([*cmd, "--trials", "1", "--quiet"], cwd=in_tmp, check=True, timeout=600, capture_output=True)
    for f in in_tmp.rglob("supernet.*"):
        f.unlink()
    procs = [subprocess.Popen([*cmd, "--trials", "9"], cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    trained = ["supernet: epoch 2/2" in err for _, err in outs]
    assert sorted(trained) == [False, True], [err[-800:] for _, err in outs]  # one trained it, the other loaded it
    trials = optuna.load_study(study_name="w", storage=db).trials
    done = [t for t in trials[1:] if t.state.name == "COMPLETE"]
    assert len(done) >= 8 and len({t.user_attrs["worker"] for t in done}) == 2, [t.user_attrs.get("worker") for t in done]
    assert len(json.loads((_study_folder(in_tmp / "runs") / "supernet.json").read_text())["key"]) == 24


def test_the_sandwich_rule_is_part_of_the_supernet_key_and_fixed_keeps_the_old_one():
    """A typed-sandwich supernet is another supernet (another key); "fixed" adds nothing to the
    recipe, so supernets stored before the option keep their key. The flag reaches the task."""
    from nas.cliparser import build_parser
    from nas.pipeline import Task, get_dataset
    from nas.space import load_space
    from nas.strategy import _recipe, supernet_key

    space, data = load_space("default"), get_dataset("digits", 0)
    fixed, typed = Task(supernet_epochs=3), Task(supernet_epochs=3, supernet_sandwich="typed")
    assert _recipe(fixed) == {"epochs": 3, "lr": 0.05, "batch_size": 128, "randoms": 2, "version": 1}
    assert _recipe(typed)["sandwich"] == "typed"
    assert supernet_key(space, data, fixed) != supernet_key(space, data, typed)
    args = build_parser().parse_args(["search", "--strategy", "supernet", "--supernet-sandwich", "typed"])
    assert args.supernet_sandwich == "typed"
    assert "supernet_sandwich" in Task.fixed_on_resume()
