"""Objective names users see, their directions, and hard constraints on costs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nas.errors import ConfigError

__all__ = ["OBJECTIVES", "COSTS", "parse_objectives", "directions", "parse_constraints", "check_constraints"]

OBJECTIVES: dict[str, str] = {
    "accuracy": "maximize",
    "latency_ms": "minimize",
    "size_bytes": "minimize",
    "flops": "minimize",
    "params": "minimize",
}
# Everything but accuracy is a cost, known before training.
COSTS = tuple(k for k in OBJECTIVES if k != "accuracy")

DEFAULT_OBJECTIVES = ("accuracy", "latency_ms", "size_bytes")


def parse_objectives(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"accuracy,latency_ms"`` -> ``("accuracy", "latency_ms")``; 1-4 distinct known names."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"unknown objective {unknown[0]!r} (allowed: {', '.join(OBJECTIVES)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"objectives repeat a name: {','.join(names)}")
    if not 1 <= len(names) <= 4:
        raise ConfigError(f"give 1 to 4 objectives, got {len(names)} (allowed: {', '.join(OBJECTIVES)})")
    return tuple(names)


def directions(names: Sequence[str]) -> list[str]:
    return [OBJECTIVES[n] for n in names]


def parse_constraints(limits: Mapping[str, float | None]) -> dict[str, float]:
    """Keep the given upper bounds on costs; each must be a known cost and positive."""
    out = {}
    for name, value in limits.items():
        if value is None:
            continue
        if name not in COSTS:
            raise ConfigError(f"unknown constraint {name!r} (allowed: {', '.join(COSTS)})")
        if not value > 0:
            raise ConfigError(f"constraint max {name} must be > 0, got {value}")
        out[name] = float(value)
    return out


def check_constraints(costs: Mapping[str, float], limits: Mapping[str, float]) -> str | None:
    """The first violated limit as a readable reason, or ``None`` if all hold."""
    for name, limit in limits.items():
        if costs[name] > limit:
            return f"constraint violated before training: {name} {costs[name]:g} > max {limit:g}"
    return None
