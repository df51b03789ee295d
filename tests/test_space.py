from __future__ import annotations

import optuna
import torch
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.blocks import BLOCKS
from nas.builder import build
from nas.errors import SpaceError
from nas.space import load_space, parse_space

BASE = {
    "name": "t",
    "spatial": "2d",
    "stem_channels": [8, 16],
    "stages": [{"block": ["conv", "mbconv"], "depth": {"low": 1, "high": 2}, "width": [8, 16], "kernel": [3, 5],
                "stride": 2, "expansion": [2, 4]}],
    "recipe": {"epochs": 2, "lr": {"low": 0.001, "high": 0.01, "log": True}},
}


def _sample(space, n=10, in_shape=(1, (8, 8)), seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        t = study.ask()
        out.append(space.suggest(t, in_channels=in_shape[0], input_size=in_shape[1], num_classes=10))
        study.tell(t, 0.0)
    return out


@pytest.mark.parametrize("name", ["default", "mnist1d", "mnist1d_compress", "early_exit"])
def test_bundled_spaces_load_and_sample_buildable_candidates(name):
    from nas.compress.passes import trained_model

    space = load_space(name)
    size = ((32, 32) if name == "early_exit" else (8, 8)) if space.spatial == "2d" else (1, 40)
    for cand in _sample(space, 8, (1, size)):
        model = trained_model(cand)  # with the modules compression methods add (exit heads)
        assert sum(p.numel() for p in model.parameters()) > 0
        assert all(b.type in BLOCKS for b in cand.arch.blocks)
        with torch.no_grad():
            assert model.eval()(torch.zeros(2, 1, *size)).shape == (2, 10)


def test_default_space_offers_every_block_type():
    space = load_space("default")
    offered = {v for st in space.stages for v in st.block.options()}
    assert offered == set(BLOCKS)


def test_1d_space_uses_only_1xn_kernels_and_no_factorized():
    space = load_space("mnist1d")
    assert space.spatial == "1d"
    for cand in _sample(space, 10, (1, (1, 40))):
        assert all(b.type != "factorized" for b in cand.arch.blocks)
        model = build(cand.arch)
        for m in model.modules():
            if hasattr(m, "kernel_size") and isinstance(m.kernel_size, tuple):
                assert m.kernel_size[0] == 1


def test_suggest_is_define_by_run_and_conditional():
    space = parse_space(BASE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(12):
        t = study.ask()
        cand = space.suggest(t, in_channels=1, input_size=(8, 8), num_classes=10)
        assert ("s0.expansion" in t.params) == (t.params["s0.block"] == "mbconv")
        assert len(cand.arch.blocks) == t.params["s0.depth"]
        assert cand.arch.blocks[0].stride == 2 and all(b.stride == 1 for b in cand.arch.blocks[1:])
        assert 0.001 <= cand.recipe.lr <= 0.01 and cand.recipe.epochs == 2
        study.tell(t, 0.0)


def test_fixed_trial_rebuilds_a_candidate():
    space = parse_space(BASE)
    params = {"stem_channels": 16, "s0.block": "mbconv", "s0.depth": 2, "s0.width": 8, "s0.kernel": 5,
              "s0.expansion": 4, "recipe.lr": 0.005}
    a = space.suggest(optuna.trial.FixedTrial(params), in_channels=1, input_size=(8, 8), num_classes=10)
    b = space.suggest(optuna.trial.FixedTrial(params), in_channels=1, input_size=(8, 8), num_classes=10)
    assert a == b and a.arch.blocks[0].expansion == 4


def _mutate(path, value):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    node = raw
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


BAD = [
    (("stages", 0, "block"), ["conv", "transformer"], r"stages\[0\]\.block: 'transformer' is not a block type \(allowed: conv, dsconv"),
    (("stages", 0, "width"), [], r"stages\[0\]\.width: the list of choices is empty"),
    (("stages", 0, "width"), [-8], r"stages\[0\]\.width: -8 must be in 1..4096 \(channels\)"),
    (("stages", 0, "kernel"), [4], r"stages\[0\]\.kernel: 4 must be an odd kernel size"),
    (("stages", 0, "depth"), "two", r"stages\[0\]\.depth: 'two' is not an int"),
    (("stages", 0, "widht"), [8], r"stages\[0\]: unknown key\(s\) \['widht'\]"),
    (("stages", 0, "width"), KeyError, r"stages\[0\]: missing required key 'width'"),
    (("stages",), [], r"stages: must be a non-empty list"),
    (("spatial",), "3d", r"spatial: '3d' is not allowed \(allowed: 1d, 2d\)"),
    (("colour",), "red", r"unknown key\(s\) \['colour'\]"),
    (("recipe", "epoch"), 3, r"recipe: unknown key 'epoch' \(allowed: augment, batch_size, epochs, lr, weight_decay\)"),
    (("recipe", "augment"), ["none", "flip"], r"recipe\.augment: 'flip' is not an augmentation for 2d inputs \(allowed: none, shift, affine\)"),
    (("recipe", "lr"), {"low": 0.1, "high": 0.01}, r"recipe\.lr: low 0\.1 is greater than high 0\.01"),
    (("head",), "mlp", r"head: 'mlp' is not a head \(allowed: gap, flatten\)"),
]


@pytest.mark.parametrize("path,value,message", BAD)
def test_malformed_space_names_field_and_allowed_values(path, value, message):
    with pytest.raises(SpaceError, match=message):
        parse_space(_mutate(path, value), "bad.yaml")


def test_affine_augmentation_rejected_in_1d_space():
    raw = _mutate(("spatial",), "1d")
    raw["stages"] = [{"block": ["conv"], "width": [8], "kernel": [3], "stride": 2}]
    raw["recipe"] = {"augment": ["none", "shift"]}
    assert parse_space(raw, "ok.yaml").recipe["augment"].values == ("none", "shift")
    raw["recipe"] = {"augment": ["shift", "affine"]}
    with pytest.raises(SpaceError, match=r"recipe\.augment: 'affine' is not an augmentation for 1d inputs \(allowed: none, shift\)"):
        parse_space(raw, "bad.yaml")


def test_factorized_rejected_in_1d_space():
    raw = _mutate(("spatial",), "1d")
    raw["stages"][0]["block"] = ["factorized"]
    with pytest.raises(SpaceError, match="needs a 2-D input"):
        parse_space(raw, "bad.yaml")


def test_load_space_reports_yaml_syntax_and_missing_files(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("stages: [\n  - block: conv\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(str(p))
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(str(tmp_path / "missing.yaml"))
    with pytest.raises(SpaceError, match=r"unknown space 'nope' \(allowed: default, default28, early_exit, mnist1d"):
        load_space("nope")


def test_compression_genes_sampled_per_stage_and_globally():
    space = load_space("mnist1d_compress")
    assert set(space.per_stage) == {"quant"}
    for cand in _sample(space, 6, (1, (1, 40))):
        cfg = cand.compression
        # per stage, unless a codebook replaces the precision (then quant is not sampled at all)
        assert len(cfg.stage_quant) == (0 if cfg.cluster_bits else len(space.stages))
        assert cfg.prune in ("none", "l1", "bn")
        assert cfg.finetune_epochs == 3


def test_genes_without_effect_are_not_sampled():
    """quant under a codebook, prune settings without pruning, distill_T without distillation,
    Huffman over float weights: never sampled, so equivalent candidates are not drawn twice."""
    import optuna

    space = load_space("mnist1d_compress")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(150):
        trial = study.ask()
        cfg = space.suggest(trial, in_channels=1, input_size=(1, 40), num_classes=10).compression
        params = trial.params
        quant_params = [k for k in params if k.endswith(".quant") or k == "compress.quant"]
        assert bool(quant_params) == (cfg.cluster_bits == 0)
        assert ("compress.prune_ratio" in params) == (cfg.prune != "none")
        assert ("compress.slimming_l1" in params) == (cfg.prune == "bn")
        assert ("compress.distill_T" in params) == (cfg.distill_alpha > 0)
        codes = cfg.cluster_bits > 0 or any(p not in ("fp32", "fp16") for p in cfg.precisions)
        assert ("compress.huffman" in params) == codes
        seen.add(cfg.cluster_bits > 0)
        study.tell(trial, 0.0)
    assert seen == {True, False}


@pytest.mark.parametrize("genes,message", [
    ({"quant": ["int3"]}, r"compression\.quant: 'int3' is not a precision \(allowed: fp32, fp16, int8"),
    ({"prune_ratio": [0.99]}, r"compression\.prune_ratio: 0\.99 must be in \[0, 0\.95\]"),
    ({"prune": "random"}, r"compression\.prune: 'random' is not a pruning method \(allowed: none, l1, bn\)"),
    ({"huffman": "yes"}, r"compression\.huffman: 'yes' is not a bool"),
    ({"stage_quant": ["int8"]}, r"'stage_quant' is set per stage with `per_stage"),
    ({"per_stage": ["lowrank"], "lowrank": [0.5]}, r"compression\.per_stage: \['lowrank'\] must be a list of genes from: prune_ratio, quant"),
    ({"per_stage": ["quant"]}, r"gene 'quant' needs a value"),
    ({"cluster_bits": [12]}, r"compression\.cluster_bits: 12 must be 0 \(off\) to 8"),
])
def test_bad_compression_genes(genes, message):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["compression"] = genes
    with pytest.raises(SpaceError, match=message):
        parse_space(raw, "bad.yaml")


def test_gene_can_be_fixed_off_or_ranged():
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["compression"] = {"quant": "int8", "sparsity": {"low": 0.0, "high": 0.9}, "huffman": False}
    space = parse_space(raw)
    for cand in _sample(space, 5):
        assert cand.compression.quant == "int8" and not cand.compression.huffman
        assert 0.0 <= cand.compression.sparsity <= 0.9


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=True),
                     st.text(max_size=8), st.sampled_from(["conv", "dsconv", "mbconv", "skip", "factorized", "gap", "2d", "1d"]))


_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.sampled_from(["low", "high", "step", "log", "x"]), inner, max_size=4)),
                       max_leaves=8)


_stage = st.dictionaries(st.one_of(st.sampled_from(["block", "depth", "width", "kernel", "stride", "expansion", "bogus"]),
                                   st.integers(0, 3)), _values, max_size=7)


_space = st.fixed_dictionaries({}, optional={
    "name": _values, "spatial": _values, "stem_channels": _values, "head": _values, "dropout": _values,
    "stages": st.one_of(_values, st.lists(_stage, max_size=3)),
    "recipe": st.one_of(_values, st.dictionaries(st.sampled_from(["epochs", "lr", "batch_size", "weight_decay", "x"]), _values, max_size=3)),
    "compression": st.one_of(_values, st.dictionaries(st.sampled_from(["quant", "prune", "prune_ratio", "huffman", "per_stage", "share", "x"]), _values, max_size=4)),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_space)
def test_space_loader_accepts_or_raises_its_own_error(raw):
    try:
        space = parse_space(raw, "fuzz.yaml")
    except SpaceError:
        return
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    t = study.ask()
    cand = space.suggest(t, in_channels=1, input_size=(8, 8), num_classes=10)
    assert len(cand.arch.blocks) >= 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_space_yaml_text_fuzz(tmp_path, text):
    from nas.space import load_space

    p = tmp_path / "fuzz.yaml"
    p.write_text(text)
    try:
        space = load_space(str(p))
    except SpaceError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)  # names the file, one line
        return
    assert space.stages


def test_mnist1d_compress_samples_a_strided_stem_and_stages_left_out():
    """The lean-graph options: stem kernel/stride are genes, a `skip` stage adds no block and
    samples none of its genes, and every sampled candidate builds to the width its head expects."""
    space = load_space("mnist1d_compress")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen_stride, skipped = set(), 0
    for _ in range(30):
        t = study.ask()
        cand = space.suggest(t, in_channels=1, input_size=(1, 40), num_classes=10)
        seen_stride.add(cand.arch.stem_stride)
        for i in range(3):
            if t.params[f"s{i}.block"] == "skip":
                skipped += 1
                assert not any(k.startswith(f"s{i}.") and k != f"s{i}.block" for k in t.params)
                assert all(b.stage != i for b in cand.arch.blocks)
        out = build(cand.arch)(torch.zeros(2, 1, 1, 40))
        assert out.shape == (2, 10)
        study.tell(t, 0.0)
    assert seen_stride == {1, 2} and skipped > 0
    stem = build(cand.arch).stem[0]
    assert stem.kernel_size == (1, cand.arch.stem_kernel) and stem.stride == (1, cand.arch.stem_stride)


def test_new_space_keys_leave_old_fingerprints_and_are_validated(tmp_path):
    base = parse_space(BASE)
    same = parse_space({**BASE, "stem_kernel": 3, "stem_stride": 1, "early_stop": True})
    assert same.fingerprint() == base.fingerprint()  # studies made before these keys still resume
    assert parse_space({**BASE, "stem_stride": [1, 2]}).fingerprint() != base.fingerprint()
    assert parse_space({**BASE, "early_stop": False}).fingerprint() != base.fingerprint()
    with pytest.raises(SpaceError, match="early_stop: 'no' is not allowed"):
        parse_space({**BASE, "early_stop": "no"})
    with pytest.raises(SpaceError, match="stem_kernel.*odd"):
        parse_space({**BASE, "stem_kernel": 4})
