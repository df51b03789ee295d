"""Optuna journal files that survive a writer killed mid-append.

Optuna's JournalFileBackend appends one JSON record per line under a lock file. A writer
killed mid-append leaves an incomplete last line: Optuna's reader skips it, but the next
append would be glued onto it, turning it into a garbage line in the middle of the file, and
from then on every reader fails. Writers here first cut such a torn tail (an incomplete last
line, never a complete record), under the same lock, then append.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from nas.errors import ConfigError

__all__ = ["RepairingJournalFileBackend", "journal_storage"]

_log = logging.getLogger(__name__)


_JOURNAL_HEAD = b'{"op_code":'  # how every record Optuna writes begins


def _torn_tail_start(f: Any, size: int) -> int | None:
    """Offset of the incomplete last line of an open journal of ``size`` bytes (``None``: the
    file ends with a newline, or is empty)."""
    if size == 0:
        return None
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return None
    pos, chunk = size, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        block = f.read(pos - start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def _looks_torn(tail: bytes) -> bool:
    """``tail`` (an incomplete last line) is the start of a journal record."""
    return tail.startswith(_JOURNAL_HEAD) or _JOURNAL_HEAD.startswith(tail)


def _is_record(line: bytes) -> bool:
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(rec, dict) and "op_code" in rec


def _drop_torn_tail(path: str) -> int:
    """Cut an incomplete last line that is the start of a record off the journal at ``path``;
    return the bytes cut. Only call it holding the journal's lock (a live writer's half-written
    line looks the same). Any other incomplete last line is refused, never cut or written after."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:  # removed meanwhile: the append creates it again
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        cut = _torn_tail_start(f, size)
        if cut is None:
            return 0
        f.seek(cut)
        if _is_record(f.read(size - cut) if size - cut <= 1 << 20 else b""):
            # a whole record whose newline alone is missing (a writer killed just before it, or an
            # editor): complete it, never drop it
            f.seek(size)
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            _log.warning("journal %s: completed a last record that lacked its newline", path)
            return 0
        f.seek(cut)
        if not _looks_torn(f.read(min(size - cut, len(_JOURNAL_HEAD)))):
            raise ConfigError(f"journal {path}: its last line is neither a record nor the start of one; nothing "
                              "was written to it")
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    _log.warning("journal %s: cut an incomplete last record (%d bytes) left by a writer killed mid-write",
                 path, size - cut)
    return size - cut


def _check_journal(path: Path, shown: str) -> None:
    """Refuse (before anything is written) a file that is not an Optuna journal: its first and
    last complete lines must be journal records. An empty file, or one holding only the start of
    a first record (a writer killed mid-write), is a journal."""
    refuse = (f"storage {shown!r} is not an Optuna journal file ({{}}); give a new or empty file, "
              f"or a journal written by nas search")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(0)
            first = f.readline(1 << 20)
            if not first.endswith(b"\n"):
                if len(first) == size and _looks_torn(first):
                    return  # only a torn first record
                raise ConfigError(refuse.format("line 1 is not a journal record"))
            if not _is_record(first):
                raise ConfigError(refuse.format("line 1 is not a journal record"))
            end = _torn_tail_start(f, size)
            if end is None:
                end = size  # the complete lines end here
            else:
                f.seek(end)
                if not _looks_torn(f.read(min(size - end, len(_JOURNAL_HEAD)))):
                    raise ConfigError(refuse.format("its incomplete last line is not the start of a record"))
            start = max(0, end - (1 << 20))
            f.seek(start)
            lines = f.read(end - start).split(b"\n")[:-1]
            if len(lines) > 1 and not _is_record(lines[-1]):
                raise ConfigError(refuse.format("its last complete line is not a journal record"))
    except FileNotFoundError:
        return  # a new journal
    except OSError as exc:
        raise ConfigError(f"storage {shown!r}: cannot read the journal file ({exc.strerror})") from exc


def _bad_journal_line(path: Path) -> int | None:
    """Number of the first complete line of ``path`` that is not a journal record."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.endswith(b"\n") and not _is_record(line):
                return number
    return None


class RepairingJournalFileBackend(JournalFileBackend):
    """Optuna's journal file backend (same format, same lock file), whose every write first cuts
    a torn last line, holding the lock (see above)."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        self._lock.acquire()  # the lock object Optuna's own writers use on this file
        try:
            _drop_torn_tail(self._file_path)
            with open(self._file_path, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._lock.release()


def journal_storage(path: Path, shown: str) -> optuna.storages.BaseStorage:
    _check_journal(path, shown)  # before the backend creates or writes anything
    try:
        backend = RepairingJournalFileBackend(str(path))
        if path.is_file() and path.stat().st_size:
            backend._lock.acquire()  # Optuna skips an unterminated last line when it reads: a whole
            try:                     # record lacking only its newline is completed first
                with open(path, "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    cut = _torn_tail_start(f, size)
                    f.seek(cut or 0)
                    whole = cut is not None and size - cut <= 1 << 20 and _is_record(f.read(size - cut))
                if whole:
                    _drop_torn_tail(str(path))
            finally:
                backend._lock.release()
        return JournalStorage(backend)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:  # a record Optuna cannot replay
        line = _bad_journal_line(path)
        where = f"line {line} is not a journal record" if line else f"a record cannot be replayed ({type(exc).__name__})"
        raise ConfigError(f"storage {shown!r}: the journal file is damaged ({where}); nothing was written to it") from exc
