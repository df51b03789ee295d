"""A study remembers its data's content: a resume on changed data at the same path is refused,
and verify names the cause."""

from __future__ import annotations

import numpy as np
import optuna
from PIL import Image

from nas.cli import main

SPACE = "name: s\nstem_channels: 8\nstages:\n  - block: conv\n    width: 8\n    stride: 2\nrecipe: {epochs: 1}\n"


def _npz(path, n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32) + y[:, None, None, None]
    np.savez(path, x=x, y=y)


def _search(in_tmp, dataset, trials, *extra):
    return main(["search", "--dataset", str(dataset), "--space", str(in_tmp / "s.yaml"), "--study", "d",
                 "--storage", f"sqlite:///{in_tmp}/d.db", "--quiet", "--no-early-stop", "--sampler", "random",
                 "--trials", str(trials), "--artifacts", str(in_tmp / "art"), *extra])


def test_resume_on_a_changed_npz_is_refused_and_verify_names_the_cause(in_tmp, capsys):
    (in_tmp / "s.yaml").write_text(SPACE)
    data = in_tmp / "d.npz"
    _npz(data)
    assert _search(in_tmp, data, 1) == 0
    assert main(["export", "d", "--storage", f"sqlite:///{in_tmp}/d.db", "--trial", "0", "--out",
                 str(in_tmp / "bundle")]) == 0
    with np.load(data) as f:
        x, y = f["x"], f["y"]
    np.savez(data, x=x[:-300], y=y[:-300])  # 300 rows dropped, same path
    capsys.readouterr()
    assert _search(in_tmp, data, 2) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "created with other data at --dataset" in err and "d.npz" in err, err
    assert len(optuna.load_study(study_name="d", storage=f"sqlite:///{in_tmp}/d.db").trials) == 1  # nothing added
    assert main(["verify", str(in_tmp / "bundle"), "--no-latency"]) == 1
    out = capsys.readouterr().out
    assert "FAIL dataset content" in out and "changed since the search" in out
    np.savez(data, x=x, y=y)  # the same content again: resumes
    assert _search(in_tmp, data, 2) == 0


def test_resume_on_an_image_folder_with_one_more_image_is_refused(in_tmp, capsys):
    (in_tmp / "s.yaml").write_text(SPACE)
    rng = np.random.default_rng(0)
    root = in_tmp / "imgs"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray((rng.random((8, 8)) * 80 + 150 * c).astype(np.uint8), "L").save(root / f"c{c}" / f"{i}.png")
    assert _search(in_tmp, root, 1) == 0
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(root / "c0" / "new.png")
    capsys.readouterr()
    assert _search(in_tmp, root, 2) == 2
    assert "created with other data" in capsys.readouterr().err


def test_two_studies_of_one_name_in_two_storages_never_share_trial_folders(in_tmp, capsys):
    from nas.study import OWNER_FILE

    (in_tmp / "s.yaml").write_text(SPACE)
    base = ["search", "--space", "s.yaml", "--quiet", "--no-early-stop", "--sampler", "random", "--trials", "1",
            "--epochs", "1"]
    assert main([*base, "--storage", "sqlite:///a.db"]) == 0
    assert main([*base, "--storage", "b.log", "--seed", "1"]) == 0  # same study name, another storage
    a = optuna.load_study(study_name="digits-s", storage="sqlite:///a.db").trials[0].user_attrs["artifact_dir"]
    from nas.study import load_study

    b = load_study("digits-s", str(in_tmp / "b.log")).trials[0].user_attrs["artifact_dir"]
    assert a != b and (in_tmp / "runs" / "artifacts" / "digits-s" / OWNER_FILE).is_file()
    assert main([*base, "--storage", "sqlite:///a.db", "--trials", "2"]) == 0  # a resume keeps its own folder
    again = optuna.load_study(study_name="digits-s", storage="sqlite:///a.db").trials[1].user_attrs["artifact_dir"]
    from pathlib import Path

    assert Path(again).parent == Path(a).parent
    assert main(["export", "digits-s", "--storage", "sqlite:///a.db", "--trial", "0", "--out", "bun"]) == 0


def test_screen_fraction_too_small_is_refused_and_cannot_change_on_resume(in_tmp, capsys):
    (in_tmp / "s.yaml").write_text(SPACE)
    base = ["search", "--space", "s.yaml", "--quiet", "--sampler", "random", "--epochs", "1", "--study", "sf"]
    assert main([*base, "--trials", "1", "--screen-fraction", "1e-9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leaves 0 of" in err and "at least 256" in err
    assert main([*base, "--trials", "1", "--screen-fraction", "0.3"]) == 0
    capsys.readouterr()
    assert main([*base, "--trials", "2", "--screen-fraction", "0.5"]) == 2
    assert "--screen-fraction 0.3; this run gives 0.5" in capsys.readouterr().err
    assert main(["search", "--study", "  ", "--trials", "1"]) == 2
    assert "is empty" in capsys.readouterr().err
