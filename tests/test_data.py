from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.cli import main
from nas.data import load_dataset
from nas.errors import DataError


def _rows(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t}


def test_digits_splits_are_disjoint_fixed_by_seed_and_cover_the_data():
    d = load_dataset("digits", seed=0)
    assert d.input_size == (8, 8) and d.in_channels == 1 and d.num_classes == 10 and d.spatial == "2d"
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797
    assert not (_rows(d.x_val) & _rows(d.x_test))
    again = load_dataset("digits", seed=0)
    assert torch.equal(d.x_test, again.x_test) and torch.equal(d.y_val, again.y_val)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(d.y_test, other.y_test)


def test_mnist1d_is_generated_locally_with_the_published_split():
    d = load_dataset("mnist1d", seed=0)
    assert d.input_size == (1, 40) and d.spatial == "1d" and d.num_classes == 10
    assert len(d.y_test) == 1000
    assert len(d.y_train) + len(d.y_val) == 4000
    # the test split does not depend on the seed: it is the package's fixed 1,000
    assert torch.equal(d.y_test, load_dataset("mnist1d", seed=3).y_test)


def test_unknown_dataset_names_allowed_values():
    with pytest.raises(DataError, match=r"unknown dataset 'cifar' \(allowed: digits, mnist1d, fashion-mnist, a path to a \.npz.*or a folder of PNG/JPEG images"):
        load_dataset("cifar")


def test_npz_dataset_loads(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "toy.npz"
    np.savez(p, x=rng.standard_normal((60, 3, 4, 4)).astype(np.float32), y=rng.integers(0, 3, 60))
    d = load_dataset(str(p))
    assert d.in_channels == 3 and d.input_size == (4, 4) and d.num_classes == 3
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 60


def _grouped(tmp_path, n_groups=120, copies=3, with_test=False):
    """`copies` rows per group; each row carries its group id g as pixels (g, g + 1, copy, 0, ...),
    so the group survives the loader's normalization (one scale and shift for all pixels)."""
    ids = np.arange(n_groups) * 7 + 3  # ids need not be 0..G-1
    x = np.zeros((n_groups * copies, 1, 4, 4), np.float32)
    groups = np.repeat(ids, copies)
    x[:, 0, 0, 0], x[:, 0, 0, 1], x[:, 0, 0, 2] = groups, groups + 1, np.tile(np.arange(copies), n_groups)
    arrays = {"x": x, "y": np.repeat(np.arange(n_groups) % 3, copies), "groups": groups}
    if with_test:
        arrays |= {"x_test": np.zeros((30, 1, 4, 4), np.float32), "y_test": np.arange(30) % 3}
    p = tmp_path / "grouped.npz"
    np.savez(p, **arrays)
    return p


def _groups_in(split: torch.Tensor) -> list[int]:
    px = split[:, 0, 0].numpy()
    return [round(float((r[0] - r[3]) / (r[1] - r[0]))) for r in px]


@pytest.mark.parametrize("with_test", [False, True])
def test_npz_groups_keep_copies_of_one_sample_in_one_split(tmp_path, with_test):
    p = _grouped(tmp_path, with_test=with_test)
    vals = []
    for seed in (0, 1):
        d = load_dataset(str(p), seed)
        splits = [d.x_train, d.x_val] + ([] if with_test else [d.x_test])
        seen = [_groups_in(s) for s in splits]
        for ids in seen:  # whole groups only: every id appears exactly `copies` times
            assert ids and all(ids.count(g) == 3 for g in ids)
        flat = [g for ids in seen for g in ids]
        assert sorted(set(flat)) == list(np.arange(120) * 7 + 3)  # disjoint and covering
        assert len(flat) == 360
        n_trval = len(d.y_train) + len(d.y_val)
        assert abs(len(d.y_val) - 0.15 * n_trval) <= 3
        if not with_test:
            assert abs(len(d.y_test) - 0.2 * 360) <= 3
        vals.append(set(seen[1]))
    assert vals[0] != vals[1]  # the seed picks which groups validate


BAD_NPZ = [
    ({"x": np.zeros((10, 1, 4, 4))}, "missing key"),
    ({"x": np.zeros((10, 16)), "y": np.zeros(10, int)}, r"'x' must have shape \(N, C, H, W\)"),
    ({"x": np.zeros((10, 1, 4, 4)), "y": np.zeros(9, int)}, "has 10 samples but 'y' has 9"),
    ({"x": np.zeros((0, 1, 4, 4)), "y": np.zeros(0, int)}, "is empty"),
    ({"x": np.zeros((10, 1, 4, 4)), "y": -np.ones(10, int)}, "labels must be 0..K-1"),
    ({"x": np.full((10, 1, 4, 4), np.nan), "y": np.zeros(10, int)}, "NaN"),
    ({"x": np.zeros((10, 1, 4, 4)), "y": np.full(10, 0.5)}, "integer class labels"),
    ({"x": np.zeros((10, 1, 0, 4)), "y": np.arange(10) % 2}, "zero-sized axis"),
    ({"x": np.zeros((10, 0, 4, 4)), "y": np.arange(10) % 2}, "zero-sized axis"),
    ({"x": np.zeros((10, 1, 4, 4)), "y": np.arange(10) % 2, "groups": np.arange(9)}, "one id per sample"),
    ({"x": np.zeros((10, 1, 4, 4)), "y": np.arange(10) % 2, "groups": np.arange(10) / 2}, "integer group ids"),
    ({"x": np.zeros((10, 1, 4, 4)), "y": np.arange(10) % 2, "groups": np.ones(10, bool)}, "integer group ids"),
    ({"x": np.zeros((10, 1, 4, 4)), "y": np.arange(10) % 2, "groups": np.arange(10) % 2}, "need at least 3"),
]


@pytest.mark.parametrize("arrays,message", BAD_NPZ)
def test_bad_npz_is_a_clear_data_error(tmp_path, arrays, message):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(str(p))


def test_missing_and_corrupt_npz(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.npz"))
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(p))


def test_zero_sized_images_fail_before_a_study_exists(tmp_path, capsys, monkeypatch):

    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "z.npz", x=np.zeros((20, 1, 8, 0)), y=np.arange(20) % 2)
    assert main(["search", "--dataset", "z.npz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zero-sized axis" in err
    assert not (tmp_path / "runs").exists()  # nothing created


_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


_arrays = st.tuples(_shapes, st.sampled_from(["float32", "float64", "int64", "int8", "bool", "complex64", "U3"]),
                    st.sampled_from(["zeros", "ones", "neg", "nan", "rand"]))


def _make(spec):
    shape, dtype, fill = spec
    if dtype == "U3":
        return np.full(shape, "abc")
    a = np.random.default_rng(0).integers(0, 3, size=shape).astype(dtype) if fill == "rand" else np.zeros(shape, dtype)
    if fill == "ones":
        a = a + 1
    if fill == "neg" and dtype not in ("bool",):
        a = a - 2
    if fill == "nan" and np.dtype(dtype).kind in "fc":
        a = a + np.nan
    return a


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["x", "y", "x_test", "y_test", "groups", "z"]), _arrays, max_size=5))
def test_npz_loader_accepts_or_raises_its_own_error(tmp_path, arrays):
    p = tmp_path / "fuzz.npz"
    np.savez(p, **{k: _make(v) for k, v in arrays.items()})
    try:
        d = load_dataset(str(p))
    except DataError:
        return
    assert d.x_train.dtype == torch.float32 and len(d.y_train) > 0 and d.num_classes >= 2


@pytest.mark.parametrize("sizes,with_test,message", [
    ([1, 1, 100], False, r"the test split would hold 1 of 102 samples \(1%, target 20%\): group 2 holds 98% .* \(or give x_test/y_test\)"),
    ([95, 5], True, r"the validation split would hold 5 of 100 samples \(5%, target 15%\): group 0 holds 95%"),
    ([920] + [2] * 40, False, r"the test split would hold 78 of 1,000 samples .* group 0 holds 92% of all samples and there are 41 groups"),
    ([100, 100, 100], False, r"the validation split would hold 100 of 200 samples \(50%, target 15%\)"),
])
def test_groups_that_cannot_make_sensible_splits_are_refused(tmp_path, sizes, with_test, message):
    groups = np.repeat(np.arange(len(sizes)), sizes)
    arrays = {"x": np.zeros((len(groups), 1, 4, 4)), "y": np.arange(len(groups)) % 2, "groups": groups}
    if with_test:
        arrays |= {"x_test": np.zeros((10, 1, 4, 4)), "y_test": np.arange(10) % 2}
    np.savez(tmp_path / "g.npz", **arrays)
    for seed in range(4):
        with pytest.raises(DataError, match=message):
            load_dataset(str(tmp_path / "g.npz"), seed)


def test_a_large_group_is_never_held_out_when_smaller_ones_fit(tmp_path):
    # 800 / 100 / 100: the test and validation splits take a 100 each, whatever the seed
    groups = np.repeat([7, 8, 9], [800, 100, 100])
    np.savez(tmp_path / "g.npz", x=groups.reshape(-1, 1, 1, 1) * np.ones((1, 1, 4, 4)), y=np.arange(1000) % 2,
             groups=groups)
    for seed in range(8):
        d = load_dataset(str(tmp_path / "g.npz"), seed)
        assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (800, 100, 100)
        assert len(torch.unique(d.x_train)) == 1  # the big group, whole, in training


def test_integral_float_group_ids_are_accepted(tmp_path):
    p = _grouped(tmp_path)
    arrays = dict(np.load(p))
    np.savez(p, **(arrays | {"groups": arrays["groups"].astype(np.float64)}))
    d = load_dataset(str(p), 0)
    for ids in (_groups_in(d.x_train), _groups_in(d.x_val), _groups_in(d.x_test)):
        assert all(ids.count(g) == 3 for g in ids)
