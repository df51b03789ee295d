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


def _unusual() -> Candidate:
    """Every field away from its default, so a decoder that drops or mixes one is caught."""
    arch = ArchConfig(in_channels=3, num_classes=7, input_size=(12, 10), spatial="2d", stem_channels=12,
                      blocks=(BlockConfig("factorized", 16, 5, 1, stage=0), BlockConfig("mbconv", 16, 3, 1, 2, stage=0),
                              BlockConfig("mbconv", 16, 3, 1, 2, stage=0), BlockConfig("conv", 24, 3, 2, stage=1,
                                                                                      hidden=20, residual=False)),
                      head="flatten", dropout=0.25, share=True, stem_kernel=5, stem_stride=2)
    comp = CompressionConfig(prune="l1", prune_ratio=0.5, stage_prune_ratios=(0.25, 0.5), prune_rounds=2, quant="int4",
                             stage_quant=("int8", "int4"), huffman=True, sparsity=0.3, distill_alpha=0.5, distill_T=2.0,
                             finetune_epochs=3, lowrank=0.5, share=True, weight_only=True)
    return Candidate(arch, comp, Recipe(epochs=7, lr=0.02, batch_size=32, weight_decay=0.001, augment="shift"))


def test_every_field_survives_the_json_round_trip():
    cand = _unusual()
    again = Candidate.from_json(cand.to_json())
    assert again == cand and again.to_dict() == cand.to_dict()
    for field in ("arch", "compression", "recipe"):
        assert getattr(again, field) == getattr(cand, field), field
    assert again.compression.stage_quant == ("int8", "int4") and again.arch.input_size == (12, 10)


def test_same_candidate_builds_same_structure():
    cand = _unusual()
    decoded = Candidate.from_json(cand.to_json())
    a, b = build(cand.arch), build(decoded.arch)  # the original and what its record decodes to
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

    from nas.cli import apply_config
    from nas.cliparser import build_parser as _build_parser
    from nas.errors import NasError

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    parser = _build_parser()
    argv = ["search", "--config", str(path)]
    args = parser.parse_args(argv)
    try:
        apply_config(args, parser, argv)
    except NasError as exc:
        assert "\n" not in str(exc)
        return
    for flag, kind in (("trials", int), ("seed", int), ("eta", (float, type(None))), ("jobs", int), ("early_stop", bool),
                       ("quiet", bool), ("dataset", str), ("storage", str), ("sampler", str)):
        assert isinstance(getattr(args, flag), kind), (flag, getattr(args, flag))
