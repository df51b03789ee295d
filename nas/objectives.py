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
    return ["maximize" if n == "reward" else OBJECTIVES[n] for n in names]


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


# MnasNet (Tan et al. 2019): reward = ACC * (COST / T) ** w, w = alpha if COST <= T else beta.
REWARD_FORMS = {"soft": (-0.07, -0.07), "hard": (0.0, -1.0)}


def mnasnet_reward(accuracy: float, cost: float, target: float, form: str = "soft") -> float:
    """MnasNet's scalarized reward on a cost (latency or size) with target ``target``.

    ``soft`` (alpha = beta = -0.07) trades accuracy for cost smoothly on both sides of the
    target; ``hard`` (alpha = 0, beta = -1) leaves models under the target unpenalized and
    punishes those over it sharply.
    """
    if form not in REWARD_FORMS:
        raise ConfigError(f"unknown reward form {form!r} (allowed: {', '.join(REWARD_FORMS)})")
    if not target > 0:
        raise ConfigError(f"reward target must be > 0, got {target}")
    alpha, beta = REWARD_FORMS[form]
    w = alpha if cost <= target else beta
    return float(accuracy * (cost / target) ** w)
