from __future__ import annotations

import os

import pytest
import torch

# Tiny models and 2 cores: more threads only add contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_lock(tmp_path_factory, monkeypatch):
    # Tests time latency concurrently with nothing else, but keep their lock file private.
    monkeypatch.setenv("NAS_MEASURE_LOCK", str(tmp_path_factory.getbasetemp() / "measure.lock"))
    yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server (:mod:`nas.pgserver`) for the session: ``(host, port, user,
    password)``. Skips, naming what is missing, when the binaries or the driver are absent,
    unless NAS_REQUIRE_POSTGRES is set (CI sets it: there the tests must run)."""
    from nas.pgserver import Unavailable, throwaway_postgres

    try:
        server = throwaway_postgres()
        info = server.__enter__()
    except Unavailable as exc:
        if os.environ.get("NAS_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL tests required (NAS_REQUIRE_POSTGRES) but {exc}")
        pytest.skip(str(exc))
    try:
        yield info
    finally:
        server.__exit__(None, None, None)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh database on the throwaway server for one test: ``postgresql://nas:PW@host:port/DB``."""
    import re

    import psycopg

    host, port, user, password = postgres_server
    db = "t_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    with psycopg.connect(host=host, port=port, user=user, password=password, dbname="postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{db}"')
        c.execute(f'CREATE DATABASE "{db}"')
    return f"postgresql://{user}:{password}@{host}:{port}/{db}"


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """One small exported bundle (a 1-trial search), shared by the tests that tamper with copies."""
    from nas.cli import main

    root = tmp_path_factory.mktemp("bundle")
    (root / "space.yaml").write_text("name: t\nstem_channels: 8\nstages:\n  - block: conv\n    width: 8\n    stride: 2\n"
                                     "recipe: {epochs: 2, lr: 0.01}\n")
    db = f"sqlite:///{root}/t.db"
    assert main(["search", "--trials", "1", "--study", "t", "--storage", db, "--quiet", "--no-early-stop",
                 "--space", str(root / "space.yaml"), "--artifacts", str(root / "art")]) == 0
    assert main(["export", "t", "--storage", db, "--trial", "0", "--out", str(root / "good")]) == 0
    return root / "good"


@pytest.fixture
def copy(bundle, tmp_path):
    """A copy of ``bundle`` to tamper with."""
    import shutil

    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    return out
