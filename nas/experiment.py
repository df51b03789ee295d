"""Experiment config files: YAML whose keys are ``nas search`` flags.

Untrusted input: every value must have its flag's type (a string flag takes a string or a
number, a switch takes true/false, never lists or mappings; a repeatable flag such as
``baseline`` takes one string or a list of strings) and passes the flag's own
validation, or the file gets one line naming the key. Flags given on the command line win,
abbreviated ones included.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from nas.errors import NasError

__all__ = ["apply_config", "coerce", "search_actions", "SKIP"]


def given_dests(sub: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The flags the command line really gave (abbreviations included): parse it again with
    every default suppressed, so only given flags land in the namespace."""
    import copy

    quiet = copy.deepcopy(sub)
    for a in quiet._actions:
        a.default = argparse.SUPPRESS
        a.required = False
    ns, _ = quiet.parse_known_args(list(argv))
    return set(vars(ns))


def search_actions(parser: argparse.ArgumentParser) -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """The ``search`` subcommand's parser and its options by destination (not help, config)."""
    sub = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" search"))
    return sub, {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}


def apply_config(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> None:
    """Fill flags from an experiment YAML (keys are flag names, '-' or '_'); explicit flags win."""
    import yaml

    from nas.yamlfile import load_yaml

    path = Path(args.config)
    try:
        raw = load_yaml(path.read_text())
    except OSError as exc:
        raise NasError(f"experiment config {path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise NasError(f"experiment config {path}: not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        raise NasError(f"experiment config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise NasError(f"experiment config {path}: must be a mapping of flag -> value")
    sub, actions = search_actions(parser)
    argv = list(argv or [])
    given = given_dests(sub, argv[argv.index("search") + 1 :] if "search" in argv else argv)
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise NasError(f"experiment config {path}: unknown key {key!r} (allowed: {', '.join(sorted(actions))})")
        if dest in given:
            continue
        value = coerce(f"experiment config {path}", key, value, actions[dest])
        if value is not SKIP:
            setattr(args, dest, value)


SKIP = object()  # coerce(): a None value (the option keeps its default)


def coerce(where: str, key: object, value: object, action: argparse.Action) -> object:
    """``value`` for flag ``action`` from a config file or the Python API, validated as the flag
    itself is (its type function, its choices); ``where`` starts the one-line error."""
    if isinstance(value, (list, tuple)) and action.dest == "objectives" and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise NasError(f"{where}: {key}: {value!r} is not allowed (allowed: true, false)")
        return value
    if value is None:
        return SKIP
    if isinstance(action, argparse._AppendAction):  # a repeatable flag (--baseline): a list of values
        return _repeated(where, key, value, action)
    if isinstance(value, (bool, list, dict)) or not isinstance(value, (str, int, float)):
        raise NasError(f"{where}: {key}: {value!r} is not allowed "
                       f"(give a single {'number' if action.type not in (None, str) else 'string'})")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise NasError(f"{where}: {key}: {exc}") from exc
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise NasError(f"{where}: {key}: {value!r} is not allowed (allowed: {', '.join(map(str, action.choices))})")
    return value


def _repeated(where: str, key: object, value: object, action: argparse.Action) -> list:
    """A repeatable flag's value: one string (or number) is a one-element list; a list must hold
    strings or numbers only."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise NasError(f"{where}: {key}: {value!r} is not allowed (give a string, or a list of strings)")
    out = []
    for item in items:
        if action.type is not None:
            try:
                item = action.type(str(item))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise NasError(f"{where}: {key}: {exc}") from exc
        out.append(item if action.type is not None else str(item))
    return out

