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


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
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


# ----------------------------------------------------------------------------- journal files


def _journal(path, values=(0.0, 1.0, 2.0)):
    """A journal written by Optuna through nas (one study 'j', a COMPLETE trial per value)."""
    study = optuna.create_study(study_name="j", storage=open_storage(str(path), create=True))
    for v in values:
        _add(study, v)
    return study


def _add(study, v):
    study.add_trial(optuna.trial.create_trial(params={"x": int(v)}, value=float(v),
                                              distributions={"x": optuna.distributions.IntDistribution(0, 99)}))


def _records(data: bytes) -> list[dict]:
    import json

    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]  # every line a record: nothing glued together


def test_a_torn_last_journal_record_is_cut_before_the_next_write(tmp_path):
    """A writer killed mid-append leaves an incomplete last line. Optuna's reader skips it, but
    the next append used to be glued onto it: a garbage line that made the journal unreadable
    for every later reader. Now the next writer cuts it (only it: complete records stay)."""
    log = tmp_path / "study.log"
    _journal(log)
    whole = log.read_bytes()
    torn = whole[:-25]  # the last record (trial 2) cut mid-write
    log.write_bytes(torn)
    kept = torn[: torn.rfind(b"\n") + 1]
    assert [t.value for t in load_study("j", str(log)).trials] == [0.0, 1.0]  # readers skip the torn line
    writer = optuna.load_study(study_name="j", storage=open_storage(str(log), create=True))
    for v in (7.0, 8.0):  # a resume writes on
        _add(writer, v)
    data = log.read_bytes()
    assert data.startswith(kept) and len(_records(data)) == kept.count(b"\n") + 2
    assert [t.value for t in load_study("j", str(log)).trials] == [0.0, 1.0, 7.0, 8.0]


def test_a_last_record_lacking_only_its_newline_is_completed_not_dropped(tmp_path):
    log = tmp_path / "study.log"
    _journal(log)
    whole = log.read_bytes()
    log.write_bytes(whole[:-1])  # every record whole, the final newline missing
    assert [t.value for t in load_study("j", str(log)).trials] == [0.0, 1.0, 2.0]  # read back, all of them
    assert log.read_bytes() == whole
    log.write_bytes(whole[:-1])
    writer = optuna.load_study(study_name="j", storage=open_storage(str(log), create=True))
    _add(writer, 5.0)
    assert [t.value for t in load_study("j", str(log)).trials] == [0.0, 1.0, 2.0, 5.0]


def test_a_writer_killed_mid_write_leaves_a_journal_the_next_writer_repairs(tmp_path):
    """A real kill: a process SIGKILLs itself halfway through writing a record."""
    import signal
    import subprocess
    import sys

    log = tmp_path / "study.log"
    _journal(log, (0.0, 1.0))
    before = log.read_bytes()
    code = """if True:
        import builtins, os, signal, sys
        import optuna
        from nas.study import open_storage

        real_open = builtins.open

        class HalfThenDie:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *exc): self.f.close()
            def __getattr__(self, name): return getattr(self.f, name)
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush(); os.fsync(self.f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

        def torn_open(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            return HalfThenDie(f) if str(file) == sys.argv[1] and "a" in mode else f

        study = optuna.load_study(study_name="j", storage=open_storage(sys.argv[1], create=True))
        builtins.open = torn_open
        study.add_trial(optuna.trial.create_trial(params={"x": 5}, value=5.0,
                                                  distributions={"x": optuna.distributions.IntDistribution(0, 99)}))
    """
    proc = subprocess.run([sys.executable, "-c", code, str(log)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    data = log.read_bytes()
    assert data.startswith(before) and len(data) > len(before) and not data.endswith(b"\n")  # torn
    # It died holding the journal's lock file; Optuna's writers force it open after a 30 s
    # grace period. The test does not wait that long.
    lock = tmp_path / "study.log.lock"
    assert lock.is_symlink()
    lock.unlink()
    assert [t.value for t in load_study("j", str(log)).trials] == [0.0, 1.0]
    writer = optuna.load_study(study_name="j", storage=open_storage(str(log), create=True))
    for v in (6.0, 7.0):
        _add(writer, v)
    data = log.read_bytes()
    assert data.startswith(before) and len(_records(data)) == before.count(b"\n") + 2
    assert [t.value for t in load_study("j", str(log)).trials] == [0.0, 1.0, 6.0, 7.0]


def test_a_damaged_journal_is_one_line_and_left_as_it_is(in_tmp, capsys):
    """Garbage anywhere but a torn last line is not repaired: `nas front` and `nas search` say
    which line, exit 2, and write nothing."""
    from nas.cli import main

    log = in_tmp / "study.log"
    _journal(log)
    lines = log.read_bytes().split(b"\n")
    lines[2] = b"garbage"
    log.write_bytes(b"\n".join(lines))
    damaged = log.read_bytes()
    for argv in (["front", "j", "--storage", "study.log"],
                 ["search", "--study", "j", "--storage", "study.log", "--trials", "1", "--epochs", "1", "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "journal file is damaged (line 3 is not a journal record)" in err, err
        assert log.read_bytes() == damaged


@pytest.mark.parametrize("text", ["epoch 1 loss 0.51\n", "epoch 1 loss 0.51\nepoch 2 loss 0.43\n", "no newline",
                                  '{"not": "a journal"}\n'])
def test_a_file_that_is_not_a_journal_is_never_written_to(in_tmp, capsys, text):
    """`--storage train.log` naming someone's log file: refused before anything is appended."""
    from nas.cli import main

    (in_tmp / "train.log").write_text(text)
    assert main(["search", "--storage", "train.log", "--trials", "1", "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "storage 'train.log' is not an Optuna journal file" in err, err
    assert (in_tmp / "train.log").read_text() == text
    assert not (in_tmp / "train.log.lock").exists()


def test_new_empty_and_torn_first_record_journals_are_journals(tmp_path):
    for name, content in (("new.log", None), ("empty.log", b""), ("torn.log", b'{"op_code":0,"worker_i')):
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        study = optuna.create_study(study_name="s", storage=open_storage(str(path), create=True))
        _add(study, 3.0)
        assert [t.value for t in load_study("s", str(path)).trials] == [3.0]
        _records(path.read_bytes())


def test_path_component_keeps_names_inside_their_folder():
    from nas.study import path_component

    assert path_component("digits-default") == "digits-default"  # safe names are kept as they are
    assert path_component("run.2") == "run.2"
    for name in ("../../x", "digits-../../../../x", "..", ".", "/etc", "a/b", "a b", "", "x" * 300, "\u00e9t\u00e9",
                 ".hidden", "a\\b", "C:"):
        comp = path_component(name)
        assert comp not in ("", ".", "..") and not comp.startswith(".") and len(comp) <= 100
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in comp), comp
    assert path_component("a/b") != path_component("a_b") != path_component("a b")  # no two names share a folder
