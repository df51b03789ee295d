"""Study reports: pure data first (:func:`build_report`), then rendering at the edge
(matplotlib PNGs, one self-contained plotly HTML page).

Hypervolume is computed on normalized objectives: accuracy as is (a fraction, reference 0),
each cost on a log scale between its smallest value / 1.1 (0) and 1.1 x its largest value
(1, the reference) over all compared studies. Costs are compared as ratios (a model 10x smaller
is worth the same whether it goes from 200 KB to 20 KB or from 20 KB to 2 KB); on a linear
scale every model under a tenth of the largest one counts as about the same size, and the
hypervolume says almost nothing about compression. The search's surrogate sampler scores
candidates on the same scale. The reference point and the lower bounds are written into the
report in the objectives' own units.
"""

from __future__ import annotations

import html
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from nas.baseline import annotate, baseline_lines, stored_baselines
from nas.pareto import hypervolume_curve, log_floor, normalize_objectives, pareto_mask, reference_point
from nas.table import counts_sentence
from nas.study import front_frame, study_meta, trials_frame

__all__ = ["UNITS", "StudyData", "Report", "build_report", "write_report", "layer_costs"]

UNITS = {
    "accuracy": "accuracy (validation, fraction)",
    "latency_ms": "latency_ms (ONNX Runtime, batch 1, ms)",
    "size_bytes": "size_bytes (packed weights file, bytes)",
    "flops": "flops (fvcore multiply-adds)",
    "params": "params (count)",
    "reward": "reward (MnasNet)",
}


@dataclass
class StudyData:
    name: str
    trials: pd.DataFrame
    front: pd.DataFrame
    hv_curve: pd.DataFrame  # trial, elapsed_s, hypervolume
    layers: dict[int, pd.DataFrame] = field(default_factory=dict)
    baselines: list[dict] = field(default_factory=list)  # the user's own models, as stored with the study


@dataclass
class Report:
    objectives: list[str]
    directions: list[str]
    reference: dict[str, float]
    studies: list[StudyData]
    lower: dict[str, float] = field(default_factory=dict)  # log-scale costs: the 0 of each


def _hv_curve(df: pd.DataFrame, names: list[str], dirs: list[str], ref: dict[str, float],
              lower: dict[str, float] | None = None) -> pd.DataFrame:
    df = df.sort_values(["datetime_complete", "trial"], kind="stable")  # in the order trials finished
    if df.empty:
        return pd.DataFrame(columns=["trial", "elapsed_s", "hypervolume"])
    starts = pd.to_datetime(df["datetime_start"])
    ends = pd.to_datetime(df["datetime_complete"])
    t0 = starts.min()
    values, norm_ref = normalize_objectives(df[names].to_numpy(dtype=float), names, dirs, ref, lower)
    hv = hypervolume_curve(values, dirs, norm_ref)
    return pd.DataFrame({"trial": df["trial"].astype(int).to_numpy(),
                         "elapsed_s": [(e - t0).total_seconds() if pd.notna(e) else np.nan for e in ends],
                         "hypervolume": hv})


def layer_costs(artifact_dir: str | Path) -> pd.DataFrame:
    """Per block (stem, body.k, classifier) of a trial's shipped model: params, FLOPs, bytes."""
    from nas.compress.pack import tensor_bytes
    from nas.compress.passes import load_packed
    from nas.config import Candidate
    from nas.measure import flops_by_module
    from nas.pipeline import PACKED_NAME

    folder = Path(artifact_dir)
    cand = Candidate.from_json((folder / "candidate.json").read_text())
    blob = (folder / PACKED_NAME).read_bytes()
    model = load_packed(cand, blob)
    arch = cand.arch
    example = __import__("torch").zeros(1, arch.in_channels, *arch.input_size)
    flops = flops_by_module(model, example)
    sizes = tensor_bytes(blob)

    def group(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "body" else parts[0]

    groups = ["stem", *[f"body.{k}" for k in range(len(arch.blocks))], "pool", "classifier"]
    rows = []
    seen: set[int] = set()
    for g in groups:
        module = model.get_submodule(g)
        params = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
        block = arch.blocks[int(g.split(".")[1])] if g.startswith("body.") else None
        label = g if block is None else f"{g} {block.type} k{block.kernel} w{block.out_channels}"
        rows.append({"layer": label, "params": params, "flops": flops.get(g, 0),
                     "bytes": sum(v for k, v in sizes.items() if group(k) == g)})
    return pd.DataFrame(rows)


def build_report(studies: list[optuna.Study]) -> Report:
    """Everything the renderers show, as data. A study named twice is shown once."""
    studies = list({s.study_name: s for s in studies}.values())
    metas = [study_meta(s) for s in studies]
    names, dirs = metas[0]["objectives"], metas[0]["directions"]
    for s, m in zip(studies, metas):
        if m["objectives"] != names:
            raise ValueError(f"study {s.study_name!r} has objectives {m['objectives']}, not {names}: "
                             "only studies with the same objectives can be compared")
    frames = [trials_frame(s) for s in studies]
    ref = reference_point(frames, names, dirs)
    lower = log_floor(frames, names, dirs)
    out = []
    for s, df in zip(studies, frames):
        front = front_frame(s)
        baselines = stored_baselines(s)
        if baselines:
            front = annotate(front, baselines, list(names))
        data = StudyData(s.study_name, df, front, _hv_curve(df, names, dirs, ref, lower), baselines=baselines)
        if not front.empty:
            by_number = {t.number: t for t in s.get_trials(deepcopy=False)}  # (study.trials deep-copies them all)
            for _, row in front.iterrows():
                folder = by_number[int(row["trial"])].user_attrs.get("artifact_dir")
                if folder and Path(folder, "candidate.json").is_file():
                    data.layers[int(row["trial"])] = layer_costs(folder)
        out.append(data)
    return Report(list(names), list(dirs), ref, out, lower)


# ----------------------------------------------------------------------------- rendering

# One colour per study, the same in every plot of a report (PNG and HTML): the study's place in
# the report picks it. Hex strings, which matplotlib and plotly read alike.
PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
BASELINE_COLOR = "#ffd700"
DOMINATED_LABEL = "faded: dominated trials"
FRONT_LEGEND_TITLE = "ringed: Pareto-optimal trials"


def study_colors(rep: Report) -> dict[str, str]:
    """Each study's colour: the palette in order, then hues a golden-ratio step apart (never a repeat)."""
    import colorsys

    out = {}
    for i, st in enumerate(rep.studies):
        if i < len(PALETTE):
            out[st.name] = PALETTE[i]
        else:
            r, g, b = colorsys.hsv_to_rgb((i * 0.6180339887) % 1.0, 0.7, 0.8)
            out[st.name] = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
    return out


def _baselines(rep: Report) -> list[dict]:
    """Each baseline once (as measured on the first study that has it)."""
    seen: dict[str, dict] = {}
    for st in rep.studies:
        for b in st.baselines:
            seen.setdefault(b["name"], b)
    return list(seen.values())


# Dominated points drawn in the interactive page at most (a 10,000-trial study would make the
# page slow to open and pan); the front is always drawn in full.
MAX_DOMINATED_POINTS = 2000


def _pairs(names: list[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(names, 2)) or [(names[0], names[0])]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_below(fig, handles: list, labels: list[str], title: str | None = None) -> None:
    """One legend under the axes, outside them (``bbox_inches="tight"`` keeps it whole)."""
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, max(1, len(labels))), fontsize=8,
               title=title, title_fontsize=8, frameon=False)


def _png_front(rep: Report, a: str, b: str, path: Path) -> None:
    """``b`` against ``a``: each study in its colour (Pareto-optimal trials ringed, the rest faded,
    the front of this pair as a step line), each baseline a star. The legend names each study and
    each baseline once."""
    plt = _plt()
    colors = study_colors(rep)
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110, layout="constrained")
    handles, labels = [], []
    pair_dirs = [rep.directions[rep.objectives.index(a)], rep.directions[rep.objectives.index(b)]]
    any_dominated = False
    for st in rep.studies:
        color = colors[st.name]
        df = st.trials[st.trials["state"] == "COMPLETE"]
        dominated = df[~df["trial"].isin(st.front["trial"])] if not df.empty else df
        if not dominated.empty:
            any_dominated = True
            ax.scatter(dominated[a], dominated[b], color=color, alpha=0.25, s=18, linewidths=0)
        if not df.empty:  # the front of this pair of objectives
            pf = df[pareto_mask(df[[a, b]].to_numpy(dtype=float), pair_dirs)].sort_values(a)
            ax.step(pf[a], pf[b], where="post", color=color, lw=1.2, alpha=0.8)
        front = st.front if not st.front.empty else df.iloc[:0]
        handles.append(ax.scatter(front[a] if a in front else [], front[b] if b in front else [], color=color, s=36,
                                  edgecolors="black", linewidths=0.5))
        labels.append(st.name if not df.empty else f"{st.name} (no finished trials)")
    if any_dominated:
        handles.append(ax.scatter([], [], color="grey", alpha=0.35, s=18, linewidths=0))
        labels.append(DOMINATED_LABEL)
    for base in _baselines(rep):
        if a in base and b in base:
            handles.append(ax.scatter([base[a]], [base[b]], marker="*", s=220, color=BASELINE_COLOR,
                                      edgecolors="black", linewidths=0.8, zorder=5))
            labels.append(f"baseline {base['name']}")
    ax.set_xlabel(UNITS.get(a, a))
    ax.set_ylabel(UNITS.get(b, b))
    for axis, name in (("x", a), ("y", b)):
        if name in ("size_bytes", "flops", "params"):
            getattr(ax, f"set_{axis}scale")("log")
    ax.set_title(f"{b} vs {a}")
    ax.grid(alpha=0.3)
    _legend_below(fig, handles, labels, FRONT_LEGEND_TITLE)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _png_hv(rep: Report, path: Path) -> None:
    plt = _plt()
    colors = study_colors(rep)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), dpi=110, layout="constrained")
    handles = []
    for st in rep.studies:
        c = st.hv_curve
        color = colors[st.name]
        handles.append(axes[0].plot(np.arange(1, len(c) + 1), c["hypervolume"], color=color)[0])
        axes[1].plot(c["elapsed_s"], c["hypervolume"], color=color)
    axes[0].set_xlabel("trials finished (count)")
    axes[1].set_xlabel("wall-clock since the first trial started (s)")
    for ax in axes:
        ax.set_ylabel("hypervolume (normalized objectives)")
        ax.grid(alpha=0.3)
    fig.suptitle("Hypervolume; reference " + ", ".join(f"{k}={v:.4g}" for k, v in rep.reference.items()), fontsize=9)
    _legend_below(fig, handles, [st.name for st in rep.studies])
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _html_table(df: pd.DataFrame) -> str:
    from nas.table import human

    shown = df.copy().astype(object)
    for c in shown.columns:
        shown[c] = [human(c, v) for v in df[c]]
    return shown.to_html(index=False, border=0, classes="t", escape=True)


def _threads_text(rep: Report) -> str:
    """The thread counts the trials were actually timed with (recorded per trial)."""
    counts = sorted({int(v) for st in rep.studies if "latency_threads" in st.trials.columns
                     for v in st.trials["latency_threads"].dropna()})
    if not counts:
        return "thread count not recorded"
    return " / ".join(str(c) for c in counts) + (" thread" if counts == [1] else " threads")


def _html(rep: Report) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = _pairs(rep.objectives)
    colors = study_colors(rep)
    # One legend, under the plots (a legend to the right of a page wider than the window is cut
    # off): each study once (its Pareto-optimal trials; clicking it hides them in every subplot),
    # one entry for every study's faded dominated trials, each baseline once.
    legend = {"orientation": "h", "yanchor": "top", "y": -0.25, "xanchor": "left", "x": 0}
    front_legend = {**legend, "title": {"text": FRONT_LEGEND_TITLE + "; "}}
    fig = make_subplots(rows=1, cols=len(pairs), subplot_titles=[f"{b} vs {a}" for a, b in pairs])
    sampled = False
    for i, st in enumerate(rep.studies):
        color = colors[st.name]
        df = st.trials[st.trials["state"] == "COMPLETE"]
        on_front = df["trial"].isin(st.front["trial"])
        dominated = df[~on_front]
        if len(dominated) > MAX_DOMINATED_POINTS:  # a fixed sample of the dominated points, never of the front
            sampled = True
            dominated = dominated.sample(MAX_DOMINATED_POINTS, random_state=0).sort_index()
        for j, (a, b) in enumerate(pairs, start=1):
            for part, name, style in (
                    (dominated, f"{st.name}: dominated", {"legendgroup": "dominated", "showlegend": False, "opacity": 0.3,
                                                          "marker": {"color": color, "size": 7}}),
                    (df[on_front], st.name, {"legendgroup": st.name, "showlegend": j == 1,
                                             "marker": {"color": color, "size": 9, "line": {"color": "black", "width": 0.5}}})):
                fig.add_trace(go.Scatter(x=part[a], y=part[b], mode="markers", name=name, **style,
                                         text=[f"trial {t}<br>{ar}<br>{co}" for t, ar, co in zip(part["trial"], part["arch"], part["compression"])]),
                              row=1, col=j)
            if i == len(rep.studies) - 1:
                if any(len(s.trials[s.trials["state"] == "COMPLETE"]) > len(s.front) for s in rep.studies):
                    note = f" (at most {MAX_DOMINATED_POINTS:,} per study shown)" if sampled else ""
                    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=DOMINATED_LABEL + note,
                                             legendgroup="dominated", showlegend=j == 1, hoverinfo="skip",
                                             marker={"color": "grey", "size": 7, "opacity": 0.4}), row=1, col=j)
                for base in _baselines(rep):
                    if a in base and b in base:
                        fig.add_trace(go.Scatter(
                            x=[base[a]], y=[base[b]], mode="markers", name=f"baseline {base['name']}", showlegend=j == 1,
                            legendgroup=f"baseline {base['name']}",
                            marker={"symbol": "star", "size": 16, "color": BASELINE_COLOR, "line": {"color": "black", "width": 1}},
                            text=[f"baseline {base['name']}<br>{100 * base['accuracy']:.1f}% val / "
                                  f"{100 * base['test_accuracy']:.1f}% test"]), row=1, col=j)
            fig.update_xaxes(title_text=UNITS.get(a, a), row=1, col=j, type="log" if a in ("size_bytes", "flops", "params") else None)
            fig.update_yaxes(title_text=UNITS.get(b, b), row=1, col=j, type="log" if b in ("size_bytes", "flops", "params") else None)
    fig.update_layout(height=520, width=max(700, 450 * len(pairs)), legend=front_legend, showlegend=True)
    hv = go.Figure()
    for st in rep.studies:
        hv.add_trace(go.Scatter(x=st.hv_curve["elapsed_s"], y=st.hv_curve["hypervolume"], mode="lines+markers", name=st.name,
                                legendgroup=st.name, line={"color": colors[st.name]}, marker={"color": colors[st.name]}))
    hv.update_layout(xaxis_title="wall-clock since the first trial started (s)", yaxis_title="hypervolume (normalized)",
                     height=420, legend=legend, showlegend=True)

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>nas report</title>",
             "<style>body{font-family:sans-serif;margin:2em} table.t{border-collapse:collapse;font-size:13px}"
             " table.t td,table.t th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>",
             f"<h1>nas report: {html.escape(', '.join(s.name for s in rep.studies))}</h1>",
             "<p>Objectives: " + ", ".join(f"{n} ({d})" for n, d in zip(rep.objectives, rep.directions)) + ". "
             "Hypervolume on normalized objectives (costs on a log scale: they are compared as ratios); reference point: "
             + html.escape(json.dumps({k: round(v, 6) for k, v in rep.reference.items()}), quote=False)
             + "; log-scale zero: " + html.escape(json.dumps({k: round(v, 6) for k, v in rep.lower.items()}), quote=False) + ".</p>",
             "<p>Measurement: latency_ms is the median of 500 timed runs of the deployable ONNX model in ONNX "
             f"Runtime on CPU (batch 1, {html.escape(_threads_text(rep))}, 50 warm-up runs, re-measured when IQR/median &gt; 0.10); timings "
             "hold a host-wide lock, so no two trials were ever timed at the same moment, whatever ran in "
             "parallel. size_bytes is the length of the packed weights file. accuracy is the deployable "
             "model's, on the validation split. Models whose work depends on the input (early exits) are "
             "timed instead over the validation inputs, each at batch 1 in 5 passes: latency_ms is the mean "
             "over the inputs (per input the median of its passes), latency_p95_ms beside it; their FLOPs "
             "count every exit and the full depth.</p>",
             fig.to_html(full_html=False, include_plotlyjs="inline"),
             "<h2>Hypervolume over time</h2>", hv.to_html(full_html=False, include_plotlyjs=False)]
    for st in rep.studies:
        final_hv = st.hv_curve["hypervolume"].iloc[-1] if len(st.hv_curve) else 0.0
        counts = {str(k): int(v) for k, v in st.trials["state"].value_counts().items()} if not st.trials.empty else {}
        parts.append(f"<h2>{html.escape(st.name)}</h2><p>{html.escape(counts_sentence(counts))}; "
                     f"final hypervolume {final_hv:.4f}</p>")
        cols = [c for c in ["trial", *rep.objectives, "test_accuracy", "packed_val_accuracy", "packed_test_accuracy",
                            "deploy_precision", "latency_iqr_ms", "params", "flops", "size_bytes",
                            "arch", "compression"] if c in st.front.columns]
        cols = list(dict.fromkeys(cols)) + [c for c in st.front.columns if str(c).startswith("vs ")]
        parts.append("<h3>Pareto-optimal trials</h3>" + _html_table(st.front[cols]))
        for line in baseline_lines(st.baselines, st.front):
            parts.append(f"<p class='baseline'>{html.escape(line)}</p>")
        for trial, layers in st.layers.items():
            parts.append(f"<h3>Trial {trial}: cost per layer</h3>" + _html_table(layers))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(rep: Report, out: Path) -> list[Path]:
    """Write ``report.html`` and the PNGs into ``out``; return the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for a, b in _pairs(rep.objectives):
        p = out / f"front_{a}_vs_{b}.png"
        _png_front(rep, a, b, p)
        written.append(p)
    p = out / "hypervolume.png"
    _png_hv(rep, p)
    written.append(p)
    page = out / "report.html"
    tmp = page.with_suffix(".tmp")
    tmp.write_text(_html(rep))
    tmp.replace(page)
    written.append(page)
    return written
