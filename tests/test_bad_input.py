"""Inputs a careless user or an attacker gives (issue 29): each is one line on stderr, exit
status 2, no traceback, nothing stored; none makes the process die by a signal. Fuzzed: ``.npz``
array headers (shapes, dtypes, sizes) and every numeric flag of ``nas search``."""

from __future__ import annotations

import math

import io
import socket
import zipfile
from pathlib import Path

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.cli import main
from nas.cliparser import build_parser, host_cores
from nas.data import load_dataset
from nas.errors import DataError


def _one_line(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nas: error: "), err
    assert message in err, err
    assert "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def _npy(shape: tuple[int, ...], dtype: str, data: bytes = b"") -> bytes:
    """An .npy stream whose header declares ``shape`` and ``dtype``, followed by ``data``."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": tuple(shape)})
    return out.getvalue() + data


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    return path


# -- flags -------------------------------------------------------------------------------------
BAD_FLAGS = [
    (["search", "--latency-threads", "100000"], f"must be in 1..{host_cores()} (this host's cores"),
    (["search", "--train-threads", "100000"], "must be in 1.."),
    (["search", "--jobs", "1000"], "--jobs: 1000 must be in 1.."),
    (["search", "--max-size-bytes", "inf"], "--max-size-bytes: inf must be a finite number > 0"),
    (["search", "--max-latency-ms", "nan"], "must be a finite number > 0"),
    (["search", "--timeout", "1e999"], "must be a finite number > 0"),
    (["search", "--epochs", "100000000"], "--epochs: 100000000 must be in 1..10000"),
    (["dashboard", "s", "--port", "99999"], "--port: 99999 must be a port in 1..65535"),
    (["dashboard", "s", "--port", "0"], "must be a port in 1..65535"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS)
def test_bad_flag_values_are_one_line_and_exit_2(in_tmp, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (in_tmp / "runs").exists()


def test_an_unreachable_ray_cluster_is_one_line_within_seconds(in_tmp, capsys):
    import time

    t0 = time.monotonic()
    assert main(["search", "--backend", "ray", "--ray-address", f"127.0.0.1:{_free_port()}", "--trials", "1"]) == 2
    assert time.monotonic() - t0 < 30  # Ray itself retried for minutes
    _one_line(capsys, "no Ray cluster answers there")
    assert not (in_tmp / "runs").exists()  # nothing stored: no storage, no study
    assert main(["search", "--backend", "ray", "--ray-address", "nonsense", "--trials", "1"]) == 2
    _one_line(capsys, "is not allowed (allowed: 'auto', HOST:PORT or ray://HOST:PORT)")


# -- --out -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_trial_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    db = f"sqlite:///{root}/s.db"
    assert main(["search", "--trials", "1", "--epochs", "1", "--study", "s", "--storage", db, "--quiet",
                 "--artifacts", str(root / "art")]) == 0
    return root, db


@pytest.mark.parametrize("command", ["export", "report"])
@pytest.mark.parametrize("where,message", [
    ("afile", "is a file; give a folder path"),
    ("afile/sub", "afile is a file, not a folder"),
    ("/proc/nas-out", "cannot write there"),
])
def test_out_that_cannot_be_a_folder_is_one_line(one_trial_study, in_tmp, capsys, command, where, message):
    root, db = one_trial_study
    (in_tmp / "afile").write_text("mine")
    argv = ["export", "s", "--trial", "0"] if command == "export" else ["report", "s"]
    assert main([*argv, "--storage", db, "--out", where]) == 2
    _one_line(capsys, message)
    assert (in_tmp / "afile").read_text() == "mine"  # the user's file is untouched


# -- config and space files --------------------------------------------------------------------
@pytest.mark.parametrize("text,message", [
    ("max_latency_ms: .inf\n", "max_latency_ms: inf must be a finite number > 0"),
    ("trials: -5\n", "trials: -5 must be >= 1"),
    ("trials: 2.5\n", "trials: '2.5' is not an integer"),
    ("epochs: 0\n", "epochs: 0 must be in 1..10000"),
    ("trials: 3\nseed: 1\ntrials: 4\n", "key 'trials' appears twice (lines 1 and 3)"),
])
def test_config_files_get_the_flags_validation_and_no_repeated_keys(in_tmp, capsys, text, message):
    (in_tmp / "c.yaml").write_text(text)
    assert main(["search", "--config", "c.yaml"]) == 2
    _one_line(capsys, message)
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize("stage,message", [
    ("  - block: conv\n    width: 8\n    depth: 5000\n", "depth: 5000 must be in 1..32"),
    ("  - block: conv\n    width: 8\n    kernel: 99\n", "kernel: 99 must be an odd kernel size in 1..15"),
    ("  - block: conv\n    width: 100000\n", "width: 100000 must be in 1..4096"),
    ("  - block: conv\n    width: 8\n    width: 16\n", "key 'width' appears twice (lines 5 and 6)"),
])
def test_space_files_bound_depth_kernel_width_and_refuse_repeated_keys(in_tmp, capsys, stage, message):
    (in_tmp / "s.yaml").write_text("name: s\nstem_channels: 8\nstages:\n" + stage)
    assert main(["search", "--space", "s.yaml", "--trials", "1"]) == 2
    _one_line(capsys, message)
    assert not (in_tmp / "runs").exists()


# -- .npz datasets -----------------------------------------------------------------------------
def _good(n=40, c=1, h=8, w=8):
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, c, h, w)).astype(np.float32), "y": np.arange(n) % 2}


def _bomb(tmp_path: Path) -> Path:
    """A zip member of zeros that inflates ~1000x, its header declaring the same large array."""
    return _zip(tmp_path / "bomb.npz", {"x.npy": _npy((1000, 1, 100, 100), "<f8", bytes(8 * 10**7)),
                                        "y.npy": _npy((1000,), "<i8", bytes(8000))}, zipfile.ZIP_DEFLATED)


BAD_NPZ = [
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: _zip(p, {"x.npy": _npy((10**12, 1, 8, 8), "<f4"), "y.npy": _npy((10,), "<i8", bytes(80))}),
     "the dataset would take more than"),
    (lambda p: _zip(p, {"x.npy": _npy((10, 1, 8, 8), "<f4", b"\0" * 12), "y.npy": _npy((10,), "<i8", bytes(80))}),
     "cannot read as .npz"),  # truncated
    (lambda p: np.savez(p, **(_good() | {"y": np.arange(40) % 2 * 10**9})), "K at most 100,000"),
    (lambda p: np.savez(p, **(_good() | {"y": np.full(40, 2**63 - 5, np.uint64)})), "K at most 100,000"),
    (lambda p: np.savez(p, **(_good() | {"x_test": _good(10)["x"], "y_test": np.full(10, 7)})),
     "y_test holds class(es) 7 that y never has"),
    (lambda p: np.savez(p, **_good(c=10_000, h=4, w=4)), "10,000 channels (at most 1,024)"),
    (lambda p: np.savez(p, **_good(h=1, w=1)), "samples are 1x1; a 2-D sample needs at least 4x4"),
    (lambda p: np.savez(p, **(_good() | {"x": np.full((40, 1, 8, 8), 1e308)})), "values must be within +-1e+18"),
]


@pytest.mark.parametrize("write,message", BAD_NPZ)
def test_bad_npz_files_are_one_line_and_exit_2(in_tmp, capsys, write, message):
    write(in_tmp / "d.npz")
    assert main(["search", "--dataset", "d.npz", "--trials", "1"]) == 2
    _one_line(capsys, message)
    assert not (in_tmp / "runs").exists()


def test_a_zip_bomb_is_refused_by_its_declared_sizes_before_it_is_inflated(tmp_path, monkeypatch):
    import nas.datasize

    p = _bomb(tmp_path)
    assert p.stat().st_size < 200_000  # ~80 MB inflated
    monkeypatch.setattr(nas.datasize, "memory_budget", lambda: 10**7)
    inflated = []
    real = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: inflated.append(n) or real(self, n))
    with pytest.raises(DataError, match="would take more than 10,000,000 bytes"):
        load_dataset(str(p))
    assert all(0 <= n < 10**6 for n in inflated)  # headers only: never the member whole
    # a member whose header lies (a small array) but whose zip entry inflates large
    q = _zip(tmp_path / "liar.npz", {"x.npy": _npy((4, 1, 8, 8), "<f4", bytes(4 * 64 * 4) + bytes(5 * 10**7)),
                                     "y.npy": _npy((4,), "<i8", bytes(32))}, zipfile.ZIP_DEFLATED)
    with pytest.raises(DataError, match="would take more than"):
        load_dataset(str(q))


_DTYPES = ["<f4", "<f8", "<i8", "|u1", "<u8", "|b1", "<c8", "<U3", ">f4"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.one_of(st.integers(0, 12), st.integers(0, 10**13)), min_size=0, max_size=5).map(tuple),
       dtype=st.sampled_from(_DTYPES), data_len=st.integers(0, 4096), y_len=st.integers(0, 64),
       y_dtype=st.sampled_from(_DTYPES))
def test_fuzzed_npz_headers_load_or_raise_a_data_error(tmp_path_factory, shape, dtype, data_len, y_len, y_dtype):
    p = tmp_path_factory.mktemp("fz") / "f.npz"
    _zip(p, {"x.npy": _npy(shape, dtype, bytes(data_len)),
             "y.npy": _npy((y_len,), y_dtype, bytes(y_len * np.dtype(y_dtype).itemsize))})
    try:
        d = load_dataset(str(p))
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    assert d.x_train.dtype.is_floating_point and d.num_classes >= 2


# every numeric flag of `nas search`, with values people (and fuzzers) type
_NUMERIC = ["--trials", "--timeout", "--seed", "--epochs", "--jobs", "--latency-threads", "--train-threads",
            "--max-latency-ms", "--max-size-bytes", "--max-flops", "--max-params", "--reward-target", "--eta",
            "--calibrate-rungs", "--screen-fraction", "--finalists", "--finalist-epochs", "--workers",
            "--max-memory-mb"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(_NUMERIC),
       value=st.one_of(st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.sampled_from(["inf", "-inf", "nan", "1e999", "0x10", "1_000", " 3", "", "1e-320", "٣"]),
                       st.text(max_size=8)))
def test_fuzzed_numeric_flags_parse_or_exit_2_in_one_line(flag, value, capsys):
    parser = build_parser()
    capsys.readouterr()  # (the fixture is shared by the examples: read this one's output only)
    try:
        args = parser.parse_args(["search", f"{flag}={value}"])
    except SystemExit as exc:
        assert exc.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return
    v = getattr(args, flag[2:].replace("-", "_"))
    assert isinstance(v, (int, float)) and math.isfinite(v)  # (math: ints beyond int64 too)


def test_nothing_stored_changes_when_a_run_is_refused(one_trial_study, capsys):
    root, db = one_trial_study
    before = [(t.number, t.state.name, t.values) for t in optuna.load_study(study_name="s", storage=db).trials]
    (root / "c.yaml").write_text("study: s\nstudy: s\n")
    assert main(["search", "--config", str(root / "c.yaml"), "--storage", db]) == 2
    with pytest.raises(SystemExit):
        main(["search", "--study", "s", "--storage", db, "--latency-threads", "100000"])
    after = [(t.number, t.state.name, t.values) for t in optuna.load_study(study_name="s", storage=db).trials]
    assert after == before
    capsys.readouterr()



@pytest.mark.parametrize("command", [["front", "s"], ["search", "--trials", "1"]])
@pytest.mark.parametrize("name,content,message", [
    ("g.log", b"garbage{\n", "is not an Optuna journal file (line 1 is not a journal record)"),
    ("n.db", bytes(range(100)), "cannot be opened: file is not a database"),
])
def test_a_storage_that_is_not_one_is_exit_2_and_left_as_it_was(in_tmp, capsys, command, name, content, message):
    (in_tmp / name).write_bytes(content)
    url = name if name.endswith(".log") else f"sqlite:///{name}"
    assert main([*command, "--storage", url]) == 2
    _one_line(capsys, message)
    assert (in_tmp / name).read_bytes() == content


@pytest.mark.parametrize("kind", ["space", "config"])
def test_a_yaml_file_with_a_python_tag_runs_nothing(in_tmp, capsys, kind):
    """The YAML loader is a SafeLoader subclass: a crafted tag that would run a command under
    yaml.load's full loader is a one-line error, and the command never runs."""
    evil = "!!python/object/apply:os.system ['touch pwned']"
    if kind == "space":
        (in_tmp / "s.yaml").write_text(f"name: {evil}\nstem_channels: 8\nstages:\n  - block: conv\n    width: 8\n")
        argv = ["search", "--space", "s.yaml", "--trials", "1"]
    else:
        (in_tmp / "c.yaml").write_text(f"study: {evil}\n")
        argv = ["search", "--config", "c.yaml"]
    assert main(argv) == 2
    _one_line(capsys, "not valid YAML")
    assert not (in_tmp / "pwned").exists() and not (in_tmp / "runs").exists()
