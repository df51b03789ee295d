"""The ``nas`` command line's arguments: one parser, its subcommands, and the argument types
that refuse a bad value in one line (argparse then exits with status 2)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

from nas.objectives import DEFAULT_OBJECTIVES

__all__ = ["build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: type, ok: Callable[[Any], bool], must: str, bad: str | None = None) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` that satisfies ``ok``, else one line saying it
    ``must`` be (``bad``: one message for both cases, formatted with ``text``)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(bad.format(text=text) if bad else f"{text!r} is not {noun}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(bad.format(text=text) if bad else f"{text} must be {must}")
        return v

    return parse


# a rank correlation over fewer pairs says nothing (2 pairs are always +-1)
_calibration_trials = _number(int, lambda v: v == 0 or v >= 5, "0 (trust every rung) or at least 5")


_positive_int = _number(int, lambda v: v >= 1, ">= 1")


_count = _number(int, lambda v: 0 <= v <= 1000, "in 0..1000")


_seed = _number(int, lambda v: 0 <= v < 2**32, "in 0..4294967295")


_eta = _number(float, lambda v: 1 < v < float("inf"), "> 1 (it keeps the best 1/eta of each rung)")


_fraction = _number(float, lambda v: 0 <= v < 1, "", bad="{text!r} is not a fraction in [0, 1) (0 turns the screen off)")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return v


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity), as training's default threads count them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _per_core(what: str) -> Callable[[str], int]:
    """A count of threads or concurrent trials: 1 .. this host's cores. More only oversubscribes
    the cores (every trial is CPU-bound), and ONNX Runtime dies by SIGSEGV at 100,000 threads."""

    def parse(text: str) -> int:
        v = _positive_int(text)
        if v > host_cores():
            raise argparse.ArgumentTypeError(f"{text} must be in 1..{host_cores()} (this host's cores; more {what} "
                                             f"only share the same cores)")
        return v

    return parse


_gpus = _number(float, lambda v: 0 <= v <= 64 and math.isfinite(v), "a number of GPUs in 0..64 (fractions allowed)")


_port = _number(int, lambda v: 1 <= v <= 65535, "a port in 1..65535")


_epochs = _number(int, lambda v: 1 <= v <= 10_000, "in 1..10000")


def build_parser() -> argparse.ArgumentParser:
    from nas.study import DEFAULT_STORAGE  # here, not at the top: the probe server's arguments need no Optuna

    p = _Parser(prog="nas", description="Compression-aware neural architecture search.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="examples:\n  nas search                      # 20 trials on digits, prints the Pareto front\n"
                       "  nas front digits-default        # the front again\n"
                       "  nas export digits-default --pick knee && nas verify runs/bundles/digits-default-trial7\n"
                       "run 'nas COMMAND --help' for each command's options and examples")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="run (or resume) a search and print its Pareto front",
                       epilog="examples:\n  nas search\n  nas search --dataset mnist1d --space mnist1d_compress --timeout 1800 --trials 1000\n  nas search --dataset data.npz --objectives accuracy,size_bytes --max-latency-ms 0.05\n  nas search --dataset photos/ --image-size 32 --image-mode rgb\n  nas search --backend ray --workers 2 --storage postgresql://user:pass@host/db", formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--dataset", default="digits",
                   help="digits (default), mnist1d, a .npz path, or a folder of images with one subfolder per class")
    s.add_argument("--image-size", metavar="HxW", help="image folders: resize every image to this (e.g. 32 or 32x24); "
                   "needed when the images differ in size")
    s.add_argument("--image-mode", choices=("grey", "rgb"), help="image folders: colour mode (default: rgb if any "
                   "image has colour, else grey)")
    s.add_argument("--space", default=None, help="space name or YAML path (default: by input size: 'default' up to 23 px, "
                        "'default28' for 24-64 px, 'mnist1d' for 1-D data)")
    s.add_argument("--study", default=None, help="study name (default: DATASET-SPACE)")
    s.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL or journal .log path (default {DEFAULT_STORAGE})")
    s.add_argument("--trials", type=_positive_int, default=20, help="finished trials the study should hold (default 20)")
    s.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="start no trial after this many seconds (running ones finish); --trials still caps the total")
    s.add_argument("--sampler", default="surrogate",
                   help="surrogate (default: screens candidates with models of every finished trial), surrogate-gp (the same with Gaussian-process surrogates), nsga2, tpe, random, gp")
    s.add_argument("--objectives", default=",".join(DEFAULT_OBJECTIVES),
                   help="comma list of accuracy, latency_ms, size_bytes, flops, params")
    s.add_argument("--seed", type=_seed, default=0, help="seeds the data splits, the sampler and training (default 0)")
    s.add_argument("--epochs", type=_epochs, default=None, help="override the space's training epochs")
    s.add_argument("--jobs", type=_per_core("trials"), default=1,
                   help="concurrent trials in this process (at most the host's cores; each trains with cores/jobs threads)")
    s.add_argument("--latency-threads", type=_per_core("threads"), default=1, help="ONNX Runtime threads when timing")
    s.add_argument("--latency-on", default=None, metavar="URL",
                   help="time every trial's deployable model on a probe on the target device (http://HOST:PORT, "
                        "started there with 'nas probe serve'); the probe's --threads apply")
    s.add_argument("--probe-token-file", default=None, metavar="FILE",
                   help="the probe's token (with --latency-on; the same file the probe was started with)")
    s.add_argument("--latency-model", default=None, metavar="DEVICE_JSON",
                   help="predict every latency with a model of the device fitted on its profile (nas probe profile)")
    s.add_argument("--train-threads", type=_per_core("threads"), default=None,
                   help="torch threads per trial (default: the host's cores divided by the concurrent trials, "
                        "--jobs or Ray --workers; two searches on one host: give each its share)")
    s.add_argument("--artifacts", default="runs/artifacts", help="folder for trial weights (default runs/artifacts)")
    for cost in ("latency_ms", "size_bytes", "flops", "params"):
        s.add_argument(f"--max-{cost.replace('_', '-')}", dest=f"max_{cost}", type=_positive_float, default=None,
                       help=f"hard limit on {cost}: rejected before training")
    s.add_argument("--reward", choices=("soft", "hard"), default=None,
                   help="optimize MnasNet's scalar reward ACC*(COST/T)^w instead of a Pareto front")
    s.add_argument("--reward-on", default="latency_ms", help="cost in the reward: latency_ms (default) or size_bytes")
    s.add_argument("--reward-target", type=_positive_float, default=None, help="target T of the reward's cost")
    s.add_argument("--no-early-stop", dest="early_stop", action="store_false",
                   help="train every trial to its full budget (default: Pareto successive halving)")
    s.add_argument("--eta", type=_eta, default=None,
                   help="early stopping keeps ~1/eta of each rung (default 3; on unless the space sets "
                        "early_stop: false, as mnist1d_compress does, or --no-early-stop is given)")
    s.add_argument("--calibrate-rungs", type=_calibration_trials, default=12, metavar="N",
                   help="early stopping waits for N finished trials and uses a rung only if its accuracy rank-"
                        "correlates with the final one (80%% lower bound of Spearman >= 0.5; default 12, 0 trusts every rung)")
    s.add_argument("--screen-fraction", type=_fraction, default=None, metavar="F",
                   help="with early stopping on, first train each trial on this fraction of the training data and "
                        "stop it there like at any rung (default 1/8 for 20,000+ training samples, else 0 = off)")
    s.add_argument("--finalists", type=_count, default=None, metavar="K",
                   help="after the search, retrain the K front members nearest the knee with --finalist-epochs and "
                        "record them as trials (default 0: off; --timeout keeps their estimated time)")
    s.add_argument("--siblings", type=_count, default=None, metavar="K",
                   help="after each trial trains, run K other settings of the space's compression genes on its "
                        "trained weights as trials of their own (no training: compression, fine-tuning, scoring; "
                        "optuna backend, scratch strategy; default: the space's `siblings`, 2 for default28, "
                        "else 0 = off)")
    s.add_argument("--finalist-epochs", type=_epochs, default=None, metavar="E",
                   help="epochs a finalist trains (default 3x the space's longest recipe, or 3x --epochs)")
    s.add_argument("--strategy", choices=("scratch", "supernet"), default="scratch",
                   help="scratch (default): every trial trains its candidate; supernet: trials inherit weights "
                        "from one weight-sharing supernet trained once per study (optuna backend)")
    s.add_argument("--supernet-epochs", type=_epochs, default=10, metavar="E",
                   help="epochs the study's supernet trains (--strategy supernet; default 10)")
    s.add_argument("--supernet-sandwich", choices=("fixed", "typed"), default="fixed",
                   help="the supernet's sandwich rule: fixed (default: the largest and smallest block types "
                        "every step) or typed (each stage's block type drawn per step; see the README)")
    s.add_argument("--device", default="auto",
                   help="where trials train: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps (latency is "
                        "always timed in ONNX Runtime on the CPU)")
    s.add_argument("--amp", action="store_true",
                   help="train with autocast: bfloat16 where the device has it, else float16 with a gradient scaler")
    s.add_argument("--gpus-per-trial", type=_gpus, default=0.0, metavar="F",
                   help="Ray: GPUs each trial reserves (fractions share one GPU; default 0)")
    s.add_argument("--backend", choices=("optuna", "ray"), default="optuna", help="optuna (default, in-process) or ray (Ray Tune)")
    s.add_argument("--workers", type=_positive_int, default=2, help="Ray: concurrent trials (default 2)")
    s.add_argument("--ray-address", default=None, help="Ray: connect to a cluster ('auto' or host:port); default a local instance")
    s.add_argument("--resume", action="store_true", help="Ray: continue an interrupted run (Tuner.restore)")
    s.add_argument("--max-memory-mb", type=_positive_float, default=4096.0,
                   help="candidates estimated to need more memory to train fail in pre-flight (default 4096)")
    s.add_argument("--config", default=None, help="experiment YAML whose keys are these flags (flags given here win)")
    s.add_argument("--quiet", action="store_true", help="no per-trial progress")
    s.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="progress on stderr: text (a live bar on a terminal, a line per trial otherwise) or json "
                        "(one object per line: each finished trial, then the end)")
    s.add_argument("--baseline", action="append", default=[], metavar="MODEL",
                   help="your own model (.onnx, or .pt2 from torch.export) measured on the study's data and "
                   "shown beside the front; stored with the study (repeatable)")

    f = sub.add_parser("front", help="print a study's Pareto-optimal trials",
                       epilog="examples:\n  nas front digits-default\n  nas front digits-default --all --format csv\n  nas front digits-default --baseline my_model.onnx", formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("study")
    f.add_argument("--storage", default=DEFAULT_STORAGE)
    f.add_argument("--format", default="table", help="table (default), csv, json, markdown")
    f.add_argument("--all", action="store_true", help="every trial, with state and failure reason")
    f.add_argument("--baseline", action="append", default=[], metavar="MODEL",
                   help="your own model (.onnx, or .pt2 from torch.export) measured on the study's data and "
                   "shown beside the front; stored with the study (repeatable)")
    r = sub.add_parser("report", help="HTML page and PNG plots of one study, or several compared",
                       epilog="examples:\n  nas report digits-default\n  nas report run-a run-b --out runs/reports/compare\n  nas report digits-default --baseline my_model.pt2", formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("studies", nargs="+", metavar="STUDY")
    r.add_argument("--storage", default=DEFAULT_STORAGE)
    r.add_argument("--out", default=None, help="output folder (default runs/reports/STUDY)")
    r.add_argument("--baseline", action="append", default=[], metavar="MODEL",
                   help="your own model (.onnx, or .pt2 from torch.export) measured on the study's data and "
                   "shown beside the front; stored with the study (repeatable)")

    e = sub.add_parser("export", help="write a bundle (ONNX, torch.export, packed weights, manifest, model card)",
                       epilog="examples:\n  nas export digits-default --pick knee\n  nas export digits-default --trial 7 --out my-model", formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("study")
    e.add_argument("--storage", default=DEFAULT_STORAGE)
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="trial number")
    which.add_argument("--pick", help="'knee', or e.g. 'max accuracy with latency_ms <= 0.02'")
    e.add_argument("--out", default=None, help="bundle folder (default runs/bundles/STUDY-trialN)")
    e.add_argument("--retrain", type=_epochs, default=None, metavar="EPOCHS",
                   help="retrain the candidate for EPOCHS before export; both figures are reported")

    v = sub.add_parser("verify", help="re-check a bundle against its manifest (exit 1 on any mismatch)",
                       epilog="examples:\n  nas verify runs/bundles/digits-default-trial7", formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("bundle")
    v.add_argument("--no-latency", action="store_true", help="skip re-timing latency")

    d = sub.add_parser("dashboard", help="open optuna-dashboard on the study's storage (localhost only)",
                       epilog="examples:\n  nas dashboard digits-default --port 8080", formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("study")
    d.add_argument("--storage", default=DEFAULT_STORAGE)
    d.add_argument("--port", type=_port, default=8080)

    pr = sub.add_parser("probe", help="time models on this device for a search elsewhere (nas search --latency-on)",
                        epilog="examples:\n  nas probe serve --port 8765 --token-file token\n"
                               "  nas probe profile --dataset fashion-mnist --samples 300 -o device.json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    prs = pr.add_subparsers(dest="probe_command", required=True, parser_class=_Parser)
    serve = prs.add_parser("serve", help="serve latency timings over HTTP, token required (ONNX Runtime only, no torch)",
                           epilog="examples:\n  python -c 'import secrets; print(secrets.token_hex(16))' > token\n"
                                  "  nas probe serve --port 8765 --token-file token\n"
                                  "  nas search --latency-on http://DEVICE:8765 --probe-token-file token   # on the search host",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_probe_serve_arguments(serve)
    prof = prs.add_parser("profile", help="time a sample of a space's deployable graphs: a latency model of the device",
                          epilog="examples:\n  nas probe profile --dataset fashion-mnist --samples 300 -o device.json   # on the device\n"
                                 "  nas probe profile --samples 300 -o device.json --latency-on http://DEVICE:8765 "
                                 "--probe-token-file token\n"
                                 "  nas search --dataset fashion-mnist --latency-model device.json   # then, offline",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    prof.add_argument("--dataset", default="digits", help="whose input shape and classes the graphs take (default digits)")
    prof.add_argument("--space", default=None, help="a bundled space or a YAML path (default: by input size, as search)")
    prof.add_argument("--samples", type=_number(int, lambda v: 20 <= v <= 100_000, "in 20..100000"), default=300,
                      help="graphs to time (default 300)")
    prof.add_argument("-o", "--out", required=True, help="the device profile to write (JSON)")
    prof.add_argument("--latency-on", default=None, metavar="URL", help="time on this probe instead of this host")
    prof.add_argument("--probe-token-file", default=None, metavar="FILE")
    prof.add_argument("--threads", type=_per_core("threads"), default=1, help="ONNX Runtime threads on this host (default 1)")
    prof.add_argument("--seed", type=_seed, default=0)
    return p


def probe_serve_parser() -> argparse.ArgumentParser:
    """``python -m nas.probe serve ...``: the probe's own command line (no torch, no Optuna)."""
    ap = _Parser(prog="nas probe", description="time ONNX models on this device for a search elsewhere")
    sub = ap.add_subparsers(dest="probe_command", required=True, parser_class=_Parser)
    add_probe_serve_arguments(sub.add_parser("serve", help="serve latency timings over HTTP (token required)"))
    return ap


def add_probe_serve_arguments(s: argparse.ArgumentParser) -> None:
    """``nas probe serve``'s options (also ``python -m nas.probe serve``, which needs no torch or Optuna)."""
    s.add_argument("--port", type=_port, required=True, help="TCP port to listen on")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 serves other hosts: keep the token secret)")
    s.add_argument("--token-file", required=True, help="a file whose first line is the shared token (>= 16 characters)")
    s.add_argument("--threads", type=_per_core("threads"), default=1,
                   help="ONNX Runtime intra-op threads of every timing (default 1, as the search times)")
