from __future__ import annotations

import json

import pytest

from nas.builder import build
from nas.config import ArchConfig, BlockConfig, Candidate, CompressionConfig, Recipe
from nas.errors import ConfigError


def _arch() -> ArchConfig:
    return ArchConfig(
        in_channels=1, num_classes=10, input_size=(8, 8), spatial="2d", stem_channels=8,
        blocks=(BlockConfig("dsconv", 16, 3, 1, stage=0), BlockConfig("mbconv", 24, 5, 2, 4, stage=1)),
        head="gap",
    )


def test_candidate_json_round_trip_is_exact():
    cand = Candidate(_arch(), CompressionConfig(), Recipe(epochs=3, lr=0.01))
    again = Candidate.from_json(cand.to_json())
    assert again == cand
    assert json.loads(cand.to_json())["version"] == 1


def test_same_candidate_builds_same_structure():
    cand = Candidate.from_json(Candidate(_arch()).to_json())
    a, b = build(cand.arch), build(cand.arch)
    assert str(a) == str(b)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


def test_unknown_schema_version_is_rejected():
    d = Candidate(_arch()).to_dict()
    d["version"] = 99
    with pytest.raises(ConfigError, match="schema version 99"):
        Candidate.from_dict(d)


def test_summary_groups_stages():
    assert _arch().summary() == "stem8 | dsconv k3 w16 | mbconv k5 e4 w24 /2 | gap"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True),
                                 st.text(max_size=12)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                       max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["dataset", "space", "storage", "trials", "seed", "eta", "epochs", "objectives",
                                        "sampler", "backend", "early_stop", "max-size-bytes", "jobs", "quiet", "config",
                                        "bogus", "study", "reward"]), _VALUES, max_size=5))
def test_config_parser_fuzz_only_raises_nas_errors(tmp_path_factory, raw):
    """Whatever an experiment file holds: values land with the flag's own type, or one NasError."""
    import yaml

    from nas.cli import _apply_config, _build_parser
    from nas.errors import NasError

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    parser = _build_parser()
    argv = ["search", "--config", str(path)]
    args = parser.parse_args(argv)
    try:
        _apply_config(args, parser, argv)
    except NasError as exc:
        assert "\n" not in str(exc)
        return
    for flag, kind in (("trials", int), ("seed", int), ("eta", (float, type(None))), ("jobs", int), ("early_stop", bool),
                       ("quiet", bool), ("dataset", str), ("storage", str), ("sampler", str)):
        assert isinstance(getattr(args, flag), kind), (flag, getattr(args, flag))
