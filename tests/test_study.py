"""Study storage and the trials table (nas.study)."""

from __future__ import annotations

import optuna
import pytest

from nas.errors import NasError
from nas.study import front_frame, load_study, open_storage, trials_frame


def test_reading_never_creates_a_database(tmp_path):
    with pytest.raises(NasError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path}/none.db", create=False)
    with pytest.raises(NasError, match="journal file does not exist"):
        open_storage(str(tmp_path / "none.log"), create=False)
    assert not list(tmp_path.iterdir())


def test_storage_errors_mask_the_password():
    with pytest.raises(NasError) as exc:
        open_storage("postgresql://u:s3cret@127.0.0.1:1/d", create=True)
    assert "s3cret" not in str(exc.value) and "u:***@" in str(exc.value)


def test_trials_frame_and_front_of_a_foreign_study(tmp_path):
    db = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=db, directions=["maximize", "minimize"])
    for a, c in ((0.9, 5.0), (0.8, 1.0), (0.7, 3.0)):  # the last is dominated by the second
        study.enqueue_trial({})
        t = study.ask()
        study.tell(t, [a, c])
    loaded = load_study("s", db)
    df = trials_frame(loaded)
    assert list(df["trial"]) == [0, 1, 2] and set(df["state"]) == {"COMPLETE"}
    assert {"obj0", "obj1"} <= set(df.columns)  # a study not made by nas: objectives by position
    assert sorted(front_frame(loaded)["trial"]) == [0, 1] == sorted(t.number for t in loaded.best_trials)
    with pytest.raises(NasError, match="study 'x' not found .*existing: s"):
        load_study("x", db)
