"""A throwaway PostgreSQL server from the binaries on this machine, for tests and benchmarks.

A fresh data directory in a temp folder, its own free TCP port on 127.0.0.1 and its own socket
folder, password authentication; stopped (by its own data directory, never another server)
and removed at the end. ``initdb`` refuses to run as root: then the server runs as the
system's ``postgres`` user. Written by hand because pytest-postgresql would add a plugin and
its own process handling for what is two commands here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Unavailable", "throwaway_postgres"]

PASSWORD = "s3cret-pw"


class Unavailable(RuntimeError):
    """What is missing to start a server here (binaries, driver, a user to run it as)."""


@contextlib.contextmanager
def throwaway_postgres(fsync: bool = False) -> Iterator[tuple[str, int, str, str]]:
    """Start a server with one empty database ``nas``; yields ``(host, port, user, password)``.
    ``fsync=False`` (tests) trades durability for speed; benchmarks keep PostgreSQL's default."""
    import pwd

    missing = [b for b in ("initdb", "pg_ctl", "postgres") if shutil.which(b) is None]
    if missing:
        raise Unavailable(f"PostgreSQL server binaries not found: {', '.join(missing)}")
    try:
        import psycopg
    except ImportError:
        raise Unavailable("the psycopg driver is not installed (pip install -e '.[postgres]')") from None
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="nas-pg-", dir="/tmp"))
    try:
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root and there is no 'postgres' user to run the server as") from None
            os.chown(root, pw.pw_uid, pw.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        (root / "pw").write_text(PASSWORD + "\n")
        if as_user:
            os.chown(root / "pw", pw.pw_uid, pw.pw_gid)
        data = root / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        def run(*cmd: str) -> None:
            subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)

        run("initdb", "-D", str(data), "-U", "nas", f"--pwfile={root / 'pw'}", "--auth=scram-sha-256", "-E", "UTF8")
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200" + ("" if fsync else " -c fsync=off")
        run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o", opts, "start")
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="nas", password=PASSWORD, dbname="postgres",
                                 autocommit=True) as conn:
                conn.execute("CREATE DATABASE nas")
            yield ("127.0.0.1", port, "nas", PASSWORD)
        finally:
            subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
