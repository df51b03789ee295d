"""Progress of a running search, as people and scripts expect it.

- ``text`` on a terminal: a live bar (rich) with trials done/total, elapsed and ETA, the running,
  stopped-early and failed counts, and the current front's size and hypervolume; each finished
  trial is printed above the bar.
- ``text`` into a pipe or file: one line per finished trial (``[done/total] trial N ...``) with
  the same counts, no control characters.
- ``json``: one JSON object per line per finished trial (``"event": "trial"``) and one at the
  end (``"event": "finished"``), with the same fields, for scripts.
- ``--quiet``: nothing per trial.

Everything goes to stderr: stdout carries the result (the front table) only. The hypervolume is
the report's (costs on a log scale, bounds from this study's trials so far), so it can move
down when a new trial widens the bounds.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

__all__ = ["LOG_FORMATS", "SearchProgress", "front_stats", "trial_line"]

LOG_FORMATS = ("text", "json")


def front_stats(trials: Sequence[Any], objectives: Sequence[str], directions: Sequence[str]) -> tuple[int, float | None]:
    """(size of the Pareto front, its hypervolume) over the COMPLETE trials."""
    from nas.pareto import normalized_hypervolume

    vals = np.array([t.values for t in trials if t.state.name == "COMPLETE" and t.values
                     and len(t.values) == len(objectives)], dtype=float)
    return normalized_hypervolume(vals, objectives, directions)


def trial_line(trial: Any, objectives: Sequence[str]) -> str:
    """One finished trial as a person reads it."""
    head = f"trial {trial.number} {trial.state.name.lower()}"
    if trial.user_attrs.get("finalist_of") is not None:
        head += f" (finalist: trial {trial.user_attrs['finalist_of']} for {trial.user_attrs.get('finalist_epochs')} epochs)"
    if trial.values:
        from nas.table import human

        vals = "  ".join(f"{n}={human(n, v)}" for n, v in zip(objectives, trial.values))
        dur = f"  ({trial.duration.total_seconds():.1f}s)" if trial.duration else ""
        return f"{head}  {vals}{dur}  {trial.user_attrs.get('summary', '')}"
    return f"{head}: {trial.user_attrs.get('fail_reason', 'no reason recorded')}"


def _counts(trials: Sequence[Any]) -> dict[str, int]:
    """Counts by state. ``failed`` holds only failures that count towards ``--trials``; trials
    whose worker died or was interrupted (retried, not counted) are ``retried``, so ``done``
    agrees with the total the search stops at."""
    from nas.trial import counts_toward_total

    c = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "retried": 0, "finalists": 0}
    for t in trials:
        if t.user_attrs.get("finalist_of") is not None:  # retrained after the search: not one of --trials
            c["finalists"] += t.state.name in ("COMPLETE", "FAIL")
            continue
        key = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}.get(t.state.name)
        if key == "failed" and not counts_toward_total(t):
            key = "retried"
        if key:
            c[key] += 1
    return c


class SearchProgress:
    """Called once per finished trial with the study's trials; renders in the chosen mode."""

    def __init__(self, objectives: Sequence[str], directions: Sequence[str], total: int, *, log_format: str = "text",
                 quiet: bool = False, stream: IO[str] | None = None, timeout: float | None = None,
                 started_at: float | None = None, live: bool | None = None) -> None:
        self.objectives, self.directions, self.total = list(objectives), list(directions), total
        self.log_format, self.quiet, self.timeout = log_format, quiet, timeout
        self.stream = stream or sys.stderr
        self.start = started_at if started_at is not None else time.time()
        self.done_at_start: int | None = None
        self._bar: Any = None
        self.running_at: dict[int, str] = {}  # running trial -> where its training is
        self._counts_info = ""
        self._task: Any = None
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.live = not quiet and log_format == "text" and (tty if live is None else live and tty)

    # -- state
    def _state(self, trials: Sequence[Any]) -> dict[str, Any]:
        counts = _counts(trials)
        done = counts["complete"] + counts["pruned"] + counts["failed"]
        if self.done_at_start is None:
            self.done_at_start = max(0, done - 1)
        elapsed = time.time() - self.start
        new = done - self.done_at_start
        eta = (self.total - done) * elapsed / new if new > 0 and done < self.total else (0.0 if done >= self.total else None)
        if self.timeout is not None and eta is not None:
            eta = min(eta, max(0.0, self.timeout - elapsed))
        size, hv = front_stats(trials, self.objectives, self.directions)
        return {"done": done, "total": self.total, **counts, "front_size": size, "hypervolume": hv,
                "elapsed_s": round(elapsed, 2), "eta_s": None if eta is None else round(eta, 1)}

    def _summary(self, s: dict[str, Any]) -> str:
        hv = "-" if s["hypervolume"] is None else f"{s['hypervolume']:.4f}"
        retried = f", {s['retried']} retried" if s["retried"] else ""
        retried += f", {s['finalists']} finalists" if s.get("finalists") else ""
        return (f"{s['running']} running, {s['pruned']} stopped early, {s['failed']} failed{retried}; "
                f"front {s['front_size']}, HV {hv}")

    # -- events
    def trial_progress(self, number: int, text: str) -> None:
        """Where running trial ``number`` is ("epoch 3/12", "screen 2/12"): shown on the live bar
        beside the counts, one ``progress`` event per call in json mode, nothing in a pipe."""
        self.running_at[number] = text
        if self.quiet:
            return
        if self.log_format == "json":
            self._write(json.dumps({"event": "progress", "trial": number, "at": text,
                                    "elapsed_s": round(time.time() - self.start, 2)}))
        elif self.live:
            self._start_bar()
            self._bar.update(self._task, info=self._info(), refresh=True)

    def _running_text(self) -> str:
        return "  ".join(f"#{n} {t}" for n, t in sorted(self.running_at.items()))

    def _info(self) -> str:
        """The bar's text: the counts, then where each running trial is (when one has said)."""
        return "  ".join(x for x in (self._counts_info, self._running_text()) if x)

    def trial_finished(self, trials: Sequence[Any], trial: Any, line: str) -> None:
        """``line``: the human description of ``trial`` (text mode)."""
        self.running_at.pop(trial.number, None)
        if self.quiet:
            return
        s = self._state(trials)
        if self.log_format == "json":
            event = {"event": "trial", "trial": trial.number, "state": trial.state.name,
                     "values": dict(zip(self.objectives, trial.values)) if trial.values else None,
                     "duration_s": trial.duration.total_seconds() if trial.duration else None,
                     "fail_reason": trial.user_attrs.get("fail_reason"), **s}
            self._write(json.dumps(event))
            return
        if self.live:
            self._live(s, line)
            return
        self._write(f"[{s['done']}/{s['total']}] {line}  [{self._summary(s)}]")

    def finished(self, trials: Sequence[Any]) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.quiet:
            return
        s = self._state(trials)
        if self.log_format == "json":
            self._write(json.dumps({"event": "finished", **s}))
        else:
            self._write(f"search finished in {s['elapsed_s']:.0f}s: {s['done']} trials ({self._summary(s)})")

    # -- output
    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self._bar is None:
            self._bar = Progress(TextColumn("search"), BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(file=self.stream, highlight=False), transient=False)
            self._task = self._bar.add_task("search", total=self.total, completed=self.done_at_start or 0, info="")
            self._bar.start()

    def _live(self, s: dict[str, Any], line: str) -> None:
        self._start_bar()
        self._bar.console.print(line, highlight=False, markup=False, soft_wrap=True)
        hv = "-" if s["hypervolume"] is None else f"{s['hypervolume']:.4f}"
        self._counts_info = (f"run {s['running']} · early {s['pruned']} · fail {s['failed']}"
                             + (f" · retried {s['retried']}" if s["retried"] else "") + f" · front {s['front_size']} · HV {hv}")
        self._bar.update(self._task, completed=s["done"], refresh=True, info=self._info())
