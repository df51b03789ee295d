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


def test_processes_creating_one_new_database_together_all_open_it(tmp_path):
    """Searches started together on a new SQLite file race on its schema; every one opens it."""
    import subprocess
    import sys

    code = ("import sys; from nas.study import open_storage; import optuna; "
            "s = open_storage(sys.argv[1], create=True); optuna.create_study(storage=s, study_name=sys.argv[2])")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path}/race{round_}.db"
        procs = [subprocess.Popen([sys.executable, "-c", code, url, f"s{i}"], stderr=subprocess.PIPE, text=True)
                 for i in range(4)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errors


def test_latencies_from_different_timing_hosts_get_their_own_fronts(tmp_path, capsys):
    """A trial timed on a slower kind of machine is never dropped as 'dominated' by figures from
    another kind: each timing host gets its own front, and `nas front` prints one table each."""
    import optuna

    from nas.cli import main
    from nas.study import META_KEY, front_frame

    db = f"sqlite:///{tmp_path}/h.db"
    study = optuna.create_study(study_name="h", storage=db, directions=["maximize", "minimize", "minimize"])
    study.set_user_attr(META_KEY, {"objectives": ["accuracy", "latency_ms", "size_bytes"],
                                   "directions": ["maximize", "minimize", "minimize"]})
    dist = {"w": optuna.distributions.IntDistribution(0, 9)}
    for i, (acc, lat, size, cpu) in enumerate([(0.9, 0.01, 1000, "fast"), (0.8, 0.05, 2000, "slow"),
                                               (0.7, 0.02, 3000, "fast")]):
        study.add_trial(optuna.trial.create_trial(
            params={"w": i}, distributions=dist, values=[acc, lat, size],
            user_attrs={"latency_cpu": cpu, "latency_cores": 2, "latency_onnxruntime": "1.2", "summary": "s"}))
    front = front_frame(study)
    assert sorted(front["trial"]) == [0, 1]  # trial 1 is dominated only by another host's trial 0
    assert main(["front", "h", "--storage", db]) == 0
    out = capsys.readouterr().out
    assert "timed on fast x2, onnxruntime 1.2" in out and "timed on slow x2, onnxruntime 1.2" in out
