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


PG_PASSWORD = "s3cret-pw"


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A throwaway PostgreSQL server from the binaries on this machine: a fresh data directory
    in a temp folder, its own free TCP port on 127.0.0.1 and its own socket folder, password
    authentication; stopped (by its own data directory) and removed at the end. Yields
    ``(host, port, user, password)``. Skips, naming what is missing, when the binaries or the
    driver are absent, unless NAS_REQUIRE_POSTGRES is set (CI sets it: there the tests must run)."""
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile
    from pathlib import Path

    def unavailable(why: str) -> None:
        if os.environ.get("NAS_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL tests required (NAS_REQUIRE_POSTGRES) but {why}")
        pytest.skip(why)

    missing = [b for b in ("initdb", "pg_ctl", "postgres") if shutil.which(b) is None]
    if missing:
        unavailable(f"PostgreSQL server binaries not found: {', '.join(missing)}")
    try:
        import psycopg
    except ImportError:
        unavailable("the psycopg driver is not installed (pip install -e '.[postgres]')")
    as_user: list[str] = []
    # initdb refuses to run as root: then the server runs as the system's postgres user
    root = Path(tempfile.mkdtemp(prefix="nas-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            unavailable("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    (root / "pw").write_text(PG_PASSWORD + "\n")
    if as_user:
        os.chown(root / "pw", pw.pw_uid, pw.pw_gid)
    data = root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run("initdb", "-D", str(data), "-U", "nas", f"--pwfile={root / 'pw'}", "--auth=scram-sha-256", "-E", "UTF8")
    run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="nas", password=PG_PASSWORD, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE nas")
        yield ("127.0.0.1", port, "nas", PG_PASSWORD)
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


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
