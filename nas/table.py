"""Trials tables as text: a rich table for terminals, CSV, JSON and markdown.

Counts (trial numbers, bytes, params, FLOPs, threads) are integers in every format; the table
and markdown formats show numbers as people read them (``97.8%``, ``64,139 B``, ``0.0131 ms``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd

__all__ = ["FORMATS", "render", "human", "counts_sentence"]

FORMATS = ("table", "csv", "json", "markdown")




ACCURACIES = ("accuracy", "test_accuracy", "val_accuracy", "packed_val_accuracy", "packed_test_accuracy")


def human(col: str, v: Any) -> str:
    """A value as a person reads it: ``97.8%``, ``64,139 B``, ``0.0131 ms``, ``12,345``."""
    if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
        return ""
    if col in ACCURACIES:
        return f"{100 * float(v):.1f}%"
    if col in ("latency_ms", "latency_iqr_ms", "latency_raw_ms"):
        return f"{float(v):.4f} ms"
    if col == "size_bytes":
        return f"{int(v):,} B"
    if col == "trial":
        return str(int(v))
    if col in ("params", "flops", "bytes"):
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def counts_sentence(states: dict[str, int]) -> str:
    """Trial counts by state as a sentence: ``40 trials: 17 complete, 23 stopped early or
    rejected by a limit, 0 failed``."""
    total = sum(states.values())
    parts = [f"{states.get('COMPLETE', 0)} complete", f"{states.get('PRUNED', 0)} stopped early or rejected by a limit",
             f"{states.get('FAIL', 0)} failed"]
    if states.get("RUNNING"):
        parts.append(f"{states['RUNNING']} running")
    return f"{total} trial{'s' if total != 1 else ''}: " + ", ".join(parts)


def _columns(df: pd.DataFrame, objectives: Sequence[str], full: bool) -> list[str]:
    cols = ["trial"] + (["state"] if full else []) + list(objectives)
    for extra in ("accuracy", "test_accuracy", "latency_ms", "latency_iqr_ms", "params", "flops", "size_bytes", "arch", "compression"):
        if extra not in cols and extra in df.columns:
            cols.append(extra)
    if full:  # the packed model's accuracy beside the deployed one (they differ where int8 QDQ quantizes activations)
        cols += ["packed_val_accuracy", "packed_test_accuracy", "deploy_precision", "fail_reason"]
    if full or ("timing_host" in df.columns and df["timing_host"].nunique() > 1):
        cols.append("timing_host")
    cols += [c for c in df.columns if isinstance(c, str) and c.startswith("vs ")]  # how much each beats a baseline
    return [c for c in cols if c in df.columns]


COUNTS = ("trial", "size_bytes", "params", "flops", "latency_threads")


def render(df: pd.DataFrame, objectives: Sequence[str], fmt: str, title: str, full: bool = False) -> str:
    cols = _columns(df, objectives, full)
    view = df[cols].copy() if not df.empty else pd.DataFrame(columns=cols)
    for c in COUNTS:  # counts are integers in every format (NaN-safe)
        if c in view.columns and not view.empty:
            view[c] = pd.to_numeric(view[c], errors="coerce").round().astype("Int64")
    if fmt == "csv":
        return view.to_csv(index=False)
    if fmt == "json":
        return json.dumps(json.loads(view.to_json(orient="records")), indent=2) + "\n"
    if fmt == "markdown":
        def cell(text: str) -> str:  # a '|' inside a cell (arch summaries have them) would split it
            return str(text).replace("\\", "\\\\").replace("|", "\\|")

        head = "| " + " | ".join(cell(c) for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
        body = "".join("| " + " | ".join(cell(human(c, r[c])) for c in cols) + " |\n" for _, r in view.iterrows())
        return head + body
    from rich.console import Console
    from rich.table import Table

    from rich.text import Text

    table = Table(title=Text(title))  # Text: names such as 'model[v2].onnx' are not rich markup
    for c in cols:
        table.add_column(Text(c), justify="left" if c in ("arch", "compression", "state", "fail_reason") else "right",
                         overflow="fold")
    for _, r in view.iterrows():
        table.add_row(*(Text(human(c, r[c])) for c in cols))
    import shutil

    # On a terminal, fit it; into a pipe or file, never fold cells.
    width = max(shutil.get_terminal_size().columns, 120) if sys.stdout.isatty() else 400
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    console.print(table)
    return console.export_text()


