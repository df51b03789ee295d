"""Search spaces: YAML files validated on load, sampled define-by-run.

A space file is data::

    name: default
    spatial: 2d                 # 2d images, or 1d signals (1xN kernels only)
    stem_channels: [8, 16]      # a list is a choice
    head: gap                   # a scalar is fixed
    stages:
      - block: [conv, dsconv, factorized, mbconv, skip]
        depth: {low: 1, high: 2}  # a mapping is a range (int, or float; `log: true` allowed)
        width: [16, 24]
        kernel: [3, 5]
        stride: 2
        expansion: [2, 4]       # used by mbconv only
    recipe: {epochs: 10, lr: {low: 0.001, high: 0.01, log: true}}
    compression: {quant: [fp32, int8], prune: [none, l1], prune_ratio: [0.25, 0.5]}

:meth:`Space.suggest` turns an Optuna trial (or Ray Tune's define-by-run trial, which is the
same object) into a :class:`~nas.config.Candidate` without running anything.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nas.config import BLOCK_TYPES, ArchConfig, BlockConfig, Candidate, CompressionConfig, Recipe, augments_for
from nas.errors import SpaceError
from nas.genes import genes as _compression_genes
from nas.genes import per_stage_genes, sampling_order
from nas.yamlfile import load_yaml

__all__ = ["Param", "StageSpace", "Space", "load_space", "resolve_space_path", "per_stage_genes", "SPACES_DIR"]

# The bundled spaces: inside the package when installed from a wheel (nas/search_spaces), the
# checkout's top-level search_spaces/ folder otherwise (a source tree or an editable install).
_HERE = Path(__file__).resolve().parent
SPACES_DIR = _HERE / "search_spaces" if (_HERE / "search_spaces").is_dir() else _HERE.parent / "search_spaces"

_TOP_KEYS = {"name", "spatial", "stem_channels", "stem_kernel", "stem_stride", "head", "dropout", "stages", "recipe",
             "compression", "early_stop", "input_size", "siblings", "start"}
_STAGE_KEYS = {"block", "depth", "width", "kernel", "stride", "expansion"}
_HEADS = ("gap", "flatten")


@dataclass(frozen=True)
class Param:
    """One searchable value: fixed, a categorical choice, or an int/float range."""

    kind: str  # fixed | choice | int | float
    values: tuple[Any, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def options(self) -> list[Any]:
        """Every value this parameter can take (ranges: their two ends)."""
        if self.kind in ("fixed", "choice"):
            return list(self.values)
        return [self.low, self.high]


@dataclass(frozen=True)
class StageSpace:
    block: Param
    depth: Param
    width: Param
    kernel: Param
    stride: Param
    expansion: Param


@dataclass(frozen=True)
class Space:
    name: str
    spatial: str
    stem_channels: Param
    head: Param
    dropout: Param
    stages: tuple[StageSpace, ...]
    recipe: dict[str, Param]
    compression: dict[str, Param]
    per_stage: tuple[str, ...] = ()
    source: str = ""
    # left out of repr (and so of the fingerprint) at their defaults: studies made before the
    # stem was searchable keep their fingerprint and resume
    stem_kernel: Param = dataclasses.field(default=Param("fixed", (3,)), repr=False)
    stem_stride: Param = dataclasses.field(default=Param("fixed", (1,)), repr=False)
    # whether rung accuracy predicts final accuracy well enough here to stop trials early
    # (experiments/rung_correlation.py measures it per bundled space)
    early_stop: bool = dataclasses.field(default=True, repr=False)
    # siblings per trained trial when the search does not say (--siblings K; nas.siblings): how a
    # search spends its time, not what it samples, so not part of the fingerprint
    siblings: int = dataclasses.field(default=0, repr=False, compare=False)
    # the input sizes (smaller side, pixels) the space is written for: picks the default space
    # for a dataset; not part of the fingerprint (it changes nothing a search samples)
    input_size: tuple[int, int] | None = dataclasses.field(default=None, repr=False, compare=False)
    # the first trials of a new study (``start:``, each a mapping of parameter names to values,
    # as Optuna's ``enqueue_trial``; names left out are the sampler's to choose): where a search
    # begins, not what it can sample, so not part of the fingerprint
    start: tuple[dict[str, Any], ...] = dataclasses.field(default=(), repr=False, compare=False)

    def fingerprint(self) -> str:
        """A digest of everything this space can sample (not where it was loaded from)."""
        import hashlib

        text = repr(dataclasses.replace(self, source=""))
        later = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                 if not f.repr and f.name not in ("source", "input_size", "start")]
        text += "".join(f"{f}={p!r}" for f, p in later if p != Space.__dataclass_fields__[f].default)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def suggest(self, trial: Any, *, in_channels: int, input_size: tuple[int, int], num_classes: int) -> Candidate:
        """Sample a candidate define-by-run; conditional genes are only asked when they matter."""
        blocks: list[BlockConfig] = []
        for i, st in enumerate(self.stages):
            p = f"s{i}."
            block = st.block.suggest(trial, p + "block")
            if block == "skip":  # the stage is left out: no node in the graph, no gene sampled for it
                continue
            depth = st.depth.suggest(trial, p + "depth")
            width = st.width.suggest(trial, p + "width")
            stride = st.stride.suggest(trial, p + "stride")
            kernel = st.kernel.suggest(trial, p + "kernel")
            expansion = st.expansion.suggest(trial, p + "expansion") if block == "mbconv" else 1
            for j in range(depth):
                blocks.append(
                    BlockConfig(block, width, kernel, stride if j == 0 else 1, expansion, stage=i)
                )
        arch = ArchConfig(
            in_channels=in_channels,
            num_classes=num_classes,
            input_size=tuple(input_size),
            spatial=self.spatial,
            stem_channels=self.stem_channels.suggest(trial, "stem_channels"),
            stem_kernel=self.stem_kernel.suggest(trial, "stem_kernel"),
            stem_stride=self.stem_stride.suggest(trial, "stem_stride"),
            blocks=tuple(blocks),
            head=self.head.suggest(trial, "head"),
            dropout=self.dropout.suggest(trial, "dropout"),
        )
        recipe = Recipe(**{k: p.suggest(trial, "recipe." + k) for k, p in self.recipe.items()})
        genes: dict[str, Any] = {}
        known = _compression_genes()
        for k in sampling_order(list(self.compression)):  # every gene after the genes it depends on
            p = self.compression[k]
            if known[k].matters is not None and not known[k].matters(genes):
                continue  # no effect at these settings: not sampled, left at its default
            if k in self.per_stage:  # mixed precision / per-stage pruning: one gene per stage that has blocks
                present = {b.stage for b in blocks} or {0}  # (stem and head go with stage 0)
                genes[known[k].per_stage] = tuple(p.suggest(trial, f"compress.s{i}.{k}") if i in present
                                                  else p.options()[0] for i in range(len(self.stages)))
            else:
                genes[k] = p.suggest(trial, "compress." + k)
        compression = CompressionConfig(**genes)
        return Candidate(arch, compression, recipe)


# --------------------------------------------------------------------------- validation


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _param(where: str, raw: Any, elem: str, check: Any = None) -> Param:
    """Parse one value spec; `elem` is 'int', 'float', 'str' or 'bool'; `check(v) -> str|None`."""

    def ok(v: Any) -> bool:
        if elem == "int":
            return isinstance(v, int) and not isinstance(v, bool)
        if elem == "float":
            return _is_num(v)
        if elem == "bool":
            return isinstance(v, bool)
        return isinstance(v, str)

    def validate(v: Any) -> None:
        if not ok(v):
            hint = f" (YAML reads {v!r} as a number: write it in quotes, '{v}')" if elem == "str" and _is_num(v) else ""
            raise SpaceError(f"{where}: {v!r} is not a{'n' if elem == 'int' else ''} {elem}{hint}")
        if check is not None:
            msg = check(v)
            if msg:
                raise SpaceError(f"{where}: {v!r} {msg}")

    if isinstance(raw, dict):
        if elem not in ("int", "float"):
            raise SpaceError(f"{where}: a range {{low, high}} needs numbers; give a list of choices instead")
        unknown = set(raw) - {"low", "high", "step", "log"}
        if unknown:
            raise SpaceError(f"{where}: unknown range key(s) {sorted(map(str, unknown))} (allowed: low, high, step, log)")
        if "low" not in raw or "high" not in raw:
            raise SpaceError(f"{where}: a range needs both 'low' and 'high'")
        low, high, step, log = raw["low"], raw["high"], raw.get("step"), raw.get("log", False)
        validate(low)
        validate(high)
        if low > high:
            raise SpaceError(f"{where}: low {low} is greater than high {high}")
        if step is not None and (not _is_num(step) or step <= 0 or (elem == "int" and not isinstance(step, int))):
            raise SpaceError(f"{where}: step {step!r} must be a positive {elem}")
        if not isinstance(log, bool):
            raise SpaceError(f"{where}: log must be true or false, got {log!r}")
        if log and (low <= 0 or step not in (None, 1)):
            raise SpaceError(f"{where}: a log range needs low > 0 and no step")
        kind = "int" if elem == "int" else "float"
        return Param(kind, (), float(low) if kind == "float" else low, float(high) if kind == "float" else high, step, log)
    if isinstance(raw, list):
        if not raw:
            raise SpaceError(f"{where}: the list of choices is empty (give at least one value)")
        for v in raw:
            validate(v)
        values = tuple(dict.fromkeys(raw))  # drop repeats, keep order
        return Param("fixed", values) if len(values) == 1 else Param("choice", values)
    validate(raw)
    return Param("fixed", (raw,))


# Bounds a stage's values must keep: a depth of 5,000 on 8x8 digits ran past a 5-minute limit in
# its first trial, and a kernel far wider than any feature map only adds padding.
MAX_DEPTH = 32
MAX_WIDTH = 4096
MAX_KERNEL = 15
MAX_EXPANSION = 16


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _section(where: str, raw: Any, defaults: dict[str, Any], checks: dict[str, Any] | None = None,
             per_stage: tuple[str, ...] = ()) -> dict[str, Param]:
    """One section of genes: ``defaults`` gives each allowed key and (by its type) the value
    type; ``checks`` the gene's own validation (default: positive ints, non-negative floats)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: must be a mapping of gene -> value, got {type(raw).__name__}")
    out = {}
    for key, val in raw.items():
        if key in per_stage:  # per-stage tuples are filled by `per_stage`, not given directly
            raise SpaceError(f"{where}: {key!r} is set per stage with `per_stage: [...]`, not directly")
        if key not in defaults:
            raise SpaceError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(map(str, defaults)))})")
        elem = {bool: "bool", int: "int", float: "float", str: "str"}[type(defaults[key])]
        check = (checks or {}).get(key) or {"int": _positive, "float": _non_negative}.get(elem)
        out[key] = _param(f"{where}.{key}", val, elem, check)
    return out


def _stage(where: str, raw: Any, spatial: str) -> StageSpace:
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: must be a mapping with keys {', '.join(sorted(_STAGE_KEYS))}")
    unknown = set(raw) - _STAGE_KEYS
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {sorted(map(str, unknown))} (allowed: {', '.join(sorted(_STAGE_KEYS))})")
    for key in ("block", "width"):
        if key not in raw:
            raise SpaceError(f"{where}: missing required key {key!r}")
    allowed_blocks = sorted(b for b, t in BLOCK_TYPES.items() if not (spatial == "1d" and t.needs_2d))

    def block_ok(v: str) -> str | None:
        if v not in BLOCK_TYPES:
            return f"is not a block type (allowed: {', '.join(sorted(BLOCK_TYPES))})"
        if v not in allowed_blocks:
            return f"needs a 2-D input; a 1d space allows: {', '.join(allowed_blocks)}"
        return None

    def odd(v: int) -> str | None:
        return None if 1 <= v <= MAX_KERNEL and v % 2 == 1 else f"must be an odd kernel size in 1..{MAX_KERNEL}"

    def depth_ok(v: int) -> str | None:
        return None if 1 <= v <= MAX_DEPTH else f"must be in 1..{MAX_DEPTH} (blocks in one stage)"

    def width_ok(v: int) -> str | None:
        return None if 1 <= v <= MAX_WIDTH else f"must be in 1..{MAX_WIDTH} (channels)"

    def expansion_ok(v: int) -> str | None:
        return None if 1 <= v <= MAX_EXPANSION else f"must be in 1..{MAX_EXPANSION}"

    def stride_ok(v: int) -> str | None:
        return None if v in (1, 2, 3) else "must be 1, 2 or 3"

    return StageSpace(
        block=_param(f"{where}.block", raw["block"], "str", block_ok),
        depth=_param(f"{where}.depth", raw.get("depth", 1), "int", depth_ok),
        width=_param(f"{where}.width", raw["width"], "int", width_ok),
        kernel=_param(f"{where}.kernel", raw.get("kernel", 3), "int", odd),
        stride=_param(f"{where}.stride", raw.get("stride", 1), "int", stride_ok),
        expansion=_param(f"{where}.expansion", raw.get("expansion", 1), "int", expansion_ok),
    )


def parse_space(raw: Any, source: str = "<space>") -> Space:
    """Validate a parsed YAML document and build a :class:`Space` (raises :class:`SpaceError`)."""
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: a space file must be a mapping with keys {', '.join(sorted(_TOP_KEYS))}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise SpaceError(f"{source}: unknown key(s) {sorted(map(str, unknown))} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    spatial = raw.get("spatial", "2d")
    if spatial not in ("1d", "2d"):
        raise SpaceError(f"{source}: spatial: {spatial!r} is not allowed (allowed: 1d, 2d)")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise SpaceError(f"{source}: stages: must be a non-empty list of stage mappings")
    comp = raw.get("compression")
    per_stage: tuple[str, ...] = ()
    if isinstance(comp, dict) and "per_stage" in comp:
        comp = dict(comp)
        ps = comp.pop("per_stage")
        staged = per_stage_genes()
        if not isinstance(ps, list) or any(not isinstance(g, str) or g not in staged for g in ps):
            raise SpaceError(f"{source}: compression.per_stage: {ps!r} must be a list of genes from: {', '.join(staged)}")
        missing = [g for g in ps if g not in comp]
        if missing:
            raise SpaceError(f"{source}: compression.per_stage: gene {missing[0]!r} needs a value in the compression section")
        per_stage = tuple(ps)
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise SpaceError(f"{source}: name: must be a non-empty string")
    space = Space(
        name=name,
        spatial=spatial,
        stem_channels=_param(f"{source}: stem_channels", raw.get("stem_channels", 16), "int",
                             lambda v: None if 1 <= v <= MAX_WIDTH else f"must be in 1..{MAX_WIDTH} (channels)"),
        stem_kernel=_param(f"{source}: stem_kernel", raw.get("stem_kernel", 3), "int",
                           lambda v: None if 1 <= v <= MAX_KERNEL and v % 2 == 1
                           else f"must be an odd kernel size in 1..{MAX_KERNEL}"),
        stem_stride=_param(f"{source}: stem_stride", raw.get("stem_stride", 1), "int",
                           lambda v: None if v in (1, 2, 3) else "must be 1, 2 or 3"),
        head=_param(f"{source}: head", raw.get("head", "gap"), "str",
                    lambda v: None if v in _HEADS else f"is not a head (allowed: {', '.join(_HEADS)})"),
        dropout=_param(f"{source}: dropout", raw.get("dropout", 0.0), "float",
                       lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        stages=tuple(_stage(f"{source}: stages[{i}]", s, spatial) for i, s in enumerate(stages)),
        recipe=_section(f"{source}: recipe", raw.get("recipe"), {f.name: f.default for f in dataclasses.fields(Recipe)},
                        {"augment": lambda v: None if v in augments_for(spatial) else
                         f"is not an augmentation for {spatial} inputs (allowed: {', '.join(augments_for(spatial))})"}),
        compression=_section(f"{source}: compression", comp, {n: g.default for n, g in _compression_genes().items()},
                             {n: g.check for n, g in _compression_genes().items() if g.check},
                             tuple(per_stage_genes().values())),
        per_stage=per_stage,
        source=source,
        early_stop=_bool(f"{source}: early_stop", raw.get("early_stop", True)),
        siblings=_siblings(f"{source}: siblings", raw.get("siblings", 0)),
        input_size=_input_size(f"{source}: input_size", raw.get("input_size")),
    )
    start = raw.get("start", [])
    if not isinstance(start, list):
        raise SpaceError(f"{source}: start: {_short(start)} is not allowed (allowed: a list of mappings of parameter "
                         "names to values)")
    entries: list[dict[str, Any]] = []
    for i, s in enumerate(start):
        entry = _start(f"{source}: start[{i}]", space, s)
        # (values are normalised to their distribution's type, so == compares like with like)
        same = next((j for j, e in enumerate(entries) if e == entry), None)
        if same is not None:  # an enqueued trial bypasses the sampler's "never twice": it would train twice
            raise SpaceError(f"{source}: start[{i}] repeats start[{same}] (allowed: each setting once)")
        entries.append(entry)
    return dataclasses.replace(space, start=tuple(entries))


_START_DRAWS = 16  # random settings of the genes an entry leaves out, each checked


def _start(where: str, space: Space, entry: Any) -> dict[str, Any]:
    """One ``start:`` entry, checked as the space asks its genes: every value must be one its
    distribution holds, of its own type (``2.0`` is not the depth ``2``, ``true`` not ``1``,
    ``"0.01"`` not a learning rate), and every name a parameter the space asks at the entry's own
    settings whatever the sampler draws for the genes it leaves out (``s1.expansion`` only
    where the entry makes ``s1.block`` an mbconv)."""
    from nas.samplers import RecordingTrial

    import numpy as np

    if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
        raise SpaceError(f"{where}: {_short(entry)} is not allowed (allowed: a mapping of parameter names to values)")

    class Checked(RecordingTrial):  # the entry's values, type-checked before the space builds with them
        def _take(self, name: str, dist: Any, draw: Any) -> Any:
            if name not in self.plan:
                return super()._take(name, dist, draw)
            v = _start_value(dist, self.plan[name])
            if v is _REFUSED:
                raise SpaceError(f"{where}: {name}: {_short(self.plan[name])} is not allowed (allowed: {_allowed(dist)})")
            self.params[name], self.distributions[name] = v, dist
            return v

    side = (space.input_size or (28, 28))[0]
    size = (side, side) if space.spatial == "2d" else (side,)
    draws: list[dict[str, Any]] = []  # what each draw asked, at what values
    for seed in range(_START_DRAWS):
        rec = Checked(dict(entry), np.random.default_rng(seed))
        space.suggest(rec, in_channels=1, input_size=size, num_classes=10)
        draws.append(dict(rec.params))
    for name in entry:
        asked = [d for d in draws if name in d]
        if not asked:
            raise SpaceError(f"{where}: {_short(name)} is not a parameter this space asks at these settings "
                             f"(it asks: {_cut(', '.join(sorted(draws[0])) or 'none', 200)})")
        if len(asked) < len(draws):
            # the genes the entry leaves out whose values part the draws that asked it from those that did not
            others = [d for d in draws if name not in d]
            # (a continuous gene, distinct in every draw, parts them by chance: left out)
            on = sorted(g for g in {g for d in draws for g in d} - set(entry)
                        if len({repr(d.get(g)) for d in draws}) <= len(draws) // 2
                        and not ({repr(d.get(g)) for d in asked} & {repr(d.get(g)) for d in others}))
            raise SpaceError(f"{where}: {_short(name)} is asked only at some values of genes this entry leaves out "
                             f"(allowed: names asked whatever the others are; set {_cut(', '.join(on) or 'the genes it depends on', 120)} too)")
    return {name: draws[0][name] for name in entry}


_REFUSED = object()


def _start_value(dist: Any, v: Any) -> Any:
    """``v`` as ``dist`` takes it, or ``_REFUSED``: a categorical's choice of the same type, an
    integer (not a bool) for an integer range, a finite number for a float range."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from nas.samplers import valid_value

    if isinstance(dist, CategoricalDistribution):
        return next((c for c in dist.choices if type(c) is type(v) and c == v), _REFUSED)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(dist, IntDistribution) and not isinstance(v, int)):
        return _REFUSED
    if isinstance(dist, FloatDistribution):
        try:
            v = float(v)
        except OverflowError:
            return _REFUSED
        if not math.isfinite(v):
            return _REFUSED
    return v if valid_value(dist, v) else _REFUSED


_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlist, _REPR.maxdict = 60, 60, 40, 8, 6


def _short(v: Any) -> str:
    """A value for an error line, its repr abbreviated (a file may hold anything)."""
    return _REPR.repr(v)


def _cut(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _allowed(dist: Any) -> str:
    if hasattr(dist, "choices"):
        return ", ".join(map(repr, dist.choices))
    return f"{dist.low} to {dist.high}" + (f" in steps of {dist.step}" if getattr(dist, "step", None) else "")


def _input_size(where: str, v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    if (not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            or not 1 <= v[0] <= v[1]):
        raise SpaceError(f"{where}: {v!r} is not allowed (allowed: [min, max], the smallest and largest input side "
                         "in pixels the space is written for, 1 <= min <= max)")
    return int(v[0]), int(v[1])


def default_space_name(spatial: str, input_size: tuple[int, int]) -> str:
    """The bundled space for a dataset: ``mnist1d`` for 1-D inputs; for images, the bundled 2-D
    space whose ``input_size`` range holds the image's smaller side (``default`` for small
    images such as 8x8 digits, ``default28`` for 24-64 px such as Fashion-MNIST)."""
    if spatial == "1d":
        return "mnist1d"
    side = min(input_size)
    for name in ("default", "default28"):
        space = load_space(str(SPACES_DIR / f"{name}.yaml"))
        lo, hi = space.input_size or (1, 10**9)
        if lo <= side <= hi:
            return name
    return "default28" if side > 23 else "default"


def _siblings(where: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 64:
        raise SpaceError(f"{where}: {v!r} is not allowed (allowed: an integer from 0 to 64)")
    return v


def _bool(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SpaceError(f"{where}: {v!r} is not allowed (allowed: true, false)")
    return v


def resolve_space_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled space (``default``, ``mnist1d``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise SpaceError(f"space file {name_or_path!r} does not exist")
        return p
    bundled = SPACES_DIR / f"{name_or_path}.yaml"
    local = Path("search_spaces") / f"{name_or_path}.yaml"
    if bundled.is_file():
        # a bundled name always means the bundled space; a local file of that name is used only
        # by its path, and one that differs is pointed out (it used to shadow the bundled one)
        if local.is_file() and local.resolve() != bundled.resolve() and local.read_bytes() != bundled.read_bytes():
            import sys

            print(f"nas: note: space {name_or_path!r} is the bundled one; {local} differs from it "
                  f"(give --space {local} to use that file)", file=sys.stderr)
        return bundled
    if local.is_file():  # a space of the user's own in ./search_spaces, by name
        return local
    known = sorted(q.stem for q in SPACES_DIR.glob("*.yaml"))
    raise SpaceError(f"unknown space {name_or_path!r} (allowed: {', '.join(known)}, or a path to a .yaml file)")


def load_space(name_or_path: str) -> Space:
    """Load and validate a space file; any problem raises :class:`SpaceError` naming the field."""
    path = resolve_space_path(name_or_path)
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise SpaceError(f"{path}: not valid YAML ({first})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"{path}: cannot read ({exc})") from exc
    return parse_space(raw, str(path))
