"""Trials tables as text: a rich table for terminals, CSV, JSON and markdown.

Counts (trial numbers, bytes, params, FLOPs, threads) are integers in every format; the table
and markdown formats show numbers as people read them (``97.8%``, ``64,139 B``, ``0.0131 ms``; the
table names the unit in its header instead). csv, json and markdown hold every column in full; the
table fits the terminal (``$COLUMNS``, 80 columns into a pipe or file): see :func:`_text_table`.
"""

from __future__ import annotations

import io
import json
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


def render(df: pd.DataFrame, objectives: Sequence[str], fmt: str, title: str, full: bool = False,
           width: int | None = None) -> str:
    """The trials ``df`` as ``fmt``. csv, json and markdown hold every column in full; the text
    table fits ``width`` columns (default: the terminal's, ``$COLUMNS``, or 80 when not a terminal)."""
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
    return _text_table(view, cols, objectives, title, width)


# ----------------------------------------------------------------------------- the text table
# It fits the terminal (80 columns when there is none): header words are never split, every
# row is one line, numbers are shown whole or their column is left out (and named below the
# table), and long text is cut with an ellipsis. Objectives keep their names (they are what
# --objectives and --pick rules say); other headers are short, with the unit in the header
# instead of in every cell.

HEADERS = {"test_accuracy": "test acc", "latency_iqr_ms": "iqr ms", "packed_val_accuracy": "packed val",
           "packed_test_accuracy": "packed test", "deploy_precision": "deploy", "fail_reason": "reason",
           "timing_host": "timed on"}
LEFT = ("state", "arch", "compression", "deploy_precision", "fail_reason", "timing_host")
SHRINK = ("arch", "compression", "fail_reason", "timing_host")  # cut with an ellipsis to fit
MIN_SHRUNK = 12  # the narrowest a cut column is shown
# Which columns beyond the trial number, its state and the objectives a narrow table keeps first.
# A column that fits whole is shown whole; a text column that does not is cut to the room left.
PRIORITY = ("vs ", "fail_reason", "accuracy", "latency_ms", "size_bytes", "test_accuracy", "compression", "arch",
            "params", "flops", "latency_iqr_ms", "packed_val_accuracy", "packed_test_accuracy", "deploy_precision",
            "timing_host")
_COMPACT = {"weight-only": "w-only", "huffman": "huff"}


def compact_compression(text: str) -> str:
    """The compression summary in a few characters: ``prune l1 0.5 | int4 | weight-only |
    huffman`` -> ``prune l1 0.5+int4+w-only+huff``; early exits as ``exit@2``."""
    parts = []
    for p in str(text).split(" | "):
        if p.startswith("early exit after stage "):
            p = "exit@" + p.removeprefix("early exit after stage ").split(" ")[0]
        parts.append(_COMPACT.get(p, p))
    return "+".join(parts)


def _short(col: str, v: Any) -> str:
    """A cell of the text table: :func:`human`, less the unit its header names."""
    text = human(col, v)
    if not text:
        return text
    if col in ("latency_ms", "latency_iqr_ms"):
        return text.removesuffix(" ms")
    if col == "size_bytes":
        return text.removesuffix(" B")
    if col == "compression":
        return compact_compression(text)
    return text


def terminal_width() -> int:
    """``$COLUMNS``, else the terminal's width, else 80 (a pipe, a file)."""
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


def _rank(col: str) -> int:
    for i, p in enumerate(PRIORITY):
        if col == p or (p.endswith(" ") and col.startswith(p)):
            return i
    return len(PRIORITY)


def _layout(cols: list[str], heads: dict[str, str], cells: dict[str, list[str]], keep: list[str],
            width: int) -> tuple[dict[str, int], list[str]]:
    """Each shown column's width, and the columns left out, so the table is at most ``width``
    wide (it is wider only if the ``keep`` columns alone are)."""
    from rich.cells import cell_len

    natural = {c: max([cell_len(heads[c])] + [cell_len(x) for x in cells[c]]) for c in cols}
    shown = {c: natural[c] for c in keep}
    used = 1 + sum(w + 3 for w in shown.values())  # a border after each column and its 1-space padding
    hidden = []
    for c in sorted((c for c in cols if c not in shown), key=_rank):
        if not any(cells[c]) and not c.startswith("vs "):  # nothing to show (a baseline's empty column says none beats it)
            continue
        room = width - used - 3
        if natural[c] <= room:
            shown[c] = natural[c]
        elif c in SHRINK and room >= max(MIN_SHRUNK, cell_len(heads[c])):
            shown[c] = room  # cut to the room that is left
        else:
            hidden.append(c)
            continue
        used += shown[c] + 3
    return {c: shown[c] for c in cols if c in shown}, hidden


def _text_table(view: pd.DataFrame, cols: list[str], objectives: Sequence[str], title: str, width: int | None) -> str:
    import textwrap

    from rich import box
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    width = width or terminal_width()
    heads = {c: HEADERS.get(c, c) for c in cols}
    cells = {c: [_short(c, v) for v in view[c]] for c in cols}
    keep = [c for c in cols if c in ("trial", "state") or c in objectives]
    widths, hidden = _layout(cols, heads, cells, keep, width)
    table = Table(box=box.HEAVY_HEAD)  # Text everywhere: names such as 'model[v2].onnx' are not rich markup
    for c, w in widths.items():
        table.add_column(Text(heads[c]), justify="left" if c in LEFT else "right", width=w, no_wrap=True,
                         overflow="ellipsis")
    for i in range(len(view)):
        row = []
        for c, w in widths.items():
            t = Text(cells[c][i])
            t.truncate(w, overflow="ellipsis")
            row.append(t)
        table.add_row(*row)
    table_width = 1 + sum(w + 3 for w in widths.values())
    console = Console(width=max(width, table_width), record=True, file=io.StringIO(), color_system=None)
    # the title over the table, centred; a longer one wrapped (between words) to the terminal's width
    pad = (table_width - cell_len(title)) // 2
    lines = [" " * pad + title] if pad >= 0 else textwrap.wrap(title, width)
    console.print(table)
    out = "\n".join(lines) + "\n" + console.export_text()
    if hidden:
        note = (f"Not shown in {width} columns: {', '.join(heads[c] for c in hidden)} "
                "(a wider terminal or COLUMNS=N shows more; --format csv, json or markdown shows every column).")
        out += "\n".join(textwrap.wrap(note, max(width, 40))) + "\n"
    return out
