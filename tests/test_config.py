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
