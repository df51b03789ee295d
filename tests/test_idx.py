from __future__ import annotations

import gzip
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from nas.errors import DataError
from nas.idx import FASHION_MNIST_CLASSES, MAX_DATA_BYTES, is_idx_folder, load_idx, resolve_idx

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
NAMES = {("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
         ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte"}


def _idx(a: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _arrays(n=12, nt=6, h=4, w=3, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return {("train", "images"): rng.integers(0, 256, (n, h, w), dtype=np.uint8),
            ("train", "labels"): np.arange(n, dtype=np.uint8) % k,
            ("test", "images"): rng.integers(0, 256, (nt, h, w), dtype=np.uint8),
            ("test", "labels"): np.arange(nt, dtype=np.uint8) % k}


def _dataset(folder: Path, gz=True, prefix="", arrays=None, raw: dict | None = None) -> Path:
    """Write the four files (``raw`` replaces a role's bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = arrays or _arrays()
    for role, name in NAMES.items():
        data = (raw or {}).get(role)
        _write(folder / f"{prefix}{name}", _idx(arrays[role]) if data is None else data, gz)
    return folder


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("gz", [True, False])
def test_round_trip(tmp_path, gz):
    a = _arrays()
    folder = _dataset(tmp_path / "toy", gz=gz, arrays=a)
    assert is_idx_folder(folder) and resolve_idx(str(folder)) == folder
    d = load_idx(folder)
    assert d["x"].dtype == np.uint8 and d["x"].shape == (12, 1, 4, 3) and d["x_test"].shape == (6, 1, 4, 3)
    assert d["y"].dtype == np.int64 and d["y_test"].dtype == np.int64
    np.testing.assert_array_equal(d["x"][:, 0], a[("train", "images")])
    np.testing.assert_array_equal(d["y_test"], a[("test", "labels")])
    assert d["classes"] == ("0", "1", "2") and d["name"] == "toy"


def test_prefixes_plain_beside_gz_and_emnist_transposed(tmp_path):
    a = _arrays()
    k = _dataset(tmp_path / "k", prefix="kmnist-", arrays=a)
    assert load_idx(k)["name"] == "kmnist"
    both = _dataset(tmp_path / "both", gz=True, arrays=a)
    _dataset(both, gz=False, arrays=_arrays(seed=1))  # torchvision keeps the .gz beside the extracted file
    np.testing.assert_array_equal(load_idx(both)["x"][:, 0], _arrays(seed=1)[("train", "images")])
    e = tmp_path / "e"
    e.mkdir()
    for (split, kind), arr in a.items():
        name = f"emnist-balanced-{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        _write(e / name, _idx(arr), True)
    d = load_idx(e)
    assert d["x"].shape == (12, 1, 3, 4) and d["name"] == "emnist-balanced"
    np.testing.assert_array_equal(d["x"][:, 0], a[("train", "images")].transpose(0, 2, 1))


def test_several_datasets_in_one_folder_are_refused(tmp_path):
    f = _dataset(tmp_path / "f", prefix="emnist-letters-")
    _dataset(f, prefix="emnist-digits-")
    with pytest.raises(DataError, match="several datasets.*'emnist-digits-', 'emnist-letters-'") as exc:
        load_idx(f)
    _one_line(exc)


def test_fashion_names_and_out_of_range_labels(tmp_path):
    a = _arrays(k=10, n=20)
    d = load_idx(_dataset(tmp_path / "FashionMNIST" / "raw", arrays=a))
    assert d["classes"] == FASHION_MNIST_CLASSES and d["name"] == "fashion-mnist"
    a[("train", "labels")][3] = 10
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label 10 is out of range for Fashion-MNIST"):
        load_idx(_dataset(tmp_path / "fashion-mnist-copy", arrays=a))
    # a folder that merely contains the word is another dataset: its labels, numbered classes
    d = load_idx(_dataset(tmp_path / "my-fashion-products", arrays=a))
    assert d["classes"] == tuple(str(k) for k in range(11)) and d["name"] == "my-fashion-products"


def test_name_resolution_order(tmp_path, monkeypatch):
    import nas.idx

    system = _dataset(tmp_path / "sys" / "fashion-mnist")
    monkeypatch.setattr(nas.idx, "SYSTEM_DIRS", {"fashion-mnist": (system,)})
    monkeypatch.delenv("NAS_DATA_DIR", raising=False)
    assert resolve_idx("fashion-mnist") == system
    data = tmp_path / "data"
    monkeypatch.setenv("NAS_DATA_DIR", str(data))
    assert resolve_idx("Fashion_MNIST") == system  # nothing under NAS_DATA_DIR yet
    tv = _dataset(data / "FashionMNIST" / "raw")
    assert resolve_idx("fmnist") == tv
    own = _dataset(data / "fashion-mnist")
    assert resolve_idx("fashion-mnist") == own
    assert load_idx(resolve_idx("fashion-mnist"), "fmnist")["classes"][0] == "T-shirt/top"
    m = _dataset(data / "MNIST" / "raw")
    assert resolve_idx("mnist") == m and load_idx(m)["name"] == "MNIST"


def test_names_that_are_no_idx_dataset_give_none(tmp_path):
    assert resolve_idx("digits") is None and resolve_idx("cifar") is None
    assert resolve_idx(str(tmp_path / "nope")) is None
    (tmp_path / "cats" / "a").mkdir(parents=True)
    assert resolve_idx(str(tmp_path / "cats")) is None and not is_idx_folder(tmp_path / "cats")
    assert resolve_idx(str(tmp_path / "x.npz")) is None


def test_torchvision_root_layouts(tmp_path):
    root = tmp_path / "torchvision-root"
    raw = _dataset(root / "FashionMNIST" / "raw")
    assert resolve_idx(str(root)) == raw
    assert resolve_idx(str(root / "FashionMNIST")) == raw
    _dataset(root / "MNIST" / "raw")
    with pytest.raises(DataError, match="several idx datasets") as exc:
        resolve_idx(str(root))
    _one_line(exc)
    assert resolve_idx(str(root / "MNIST")) == root / "MNIST" / "raw"


def test_missing_files_name_every_path_tried(tmp_path, monkeypatch):
    import nas.idx

    monkeypatch.setattr(nas.idx, "SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "usr-share",)})
    monkeypatch.setenv("NAS_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DataError) as exc:
        resolve_idx("fashion-mnist")
    msg = _one_line(exc)
    for p in (tmp_path / "data" / "fashion-mnist", tmp_path / "data" / "FashionMNIST" / "raw", tmp_path / "usr-share"):
        assert str(p) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "NAS_DATA_DIR" in msg
    monkeypatch.delenv("NAS_DATA_DIR")
    with pytest.raises(DataError, match=r"dataset 'mnist'.*tried nothing \(NAS_DATA_DIR is not set\).*NAS_DATA_DIR"):
        resolve_idx("mnist")


def test_a_missing_one_of_four_is_named(tmp_path):
    f = _dataset(tmp_path / "f")
    (f / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]") as exc:
        load_idx(f)
    _one_line(exc)


def _hdr(code: int, dims: tuple[int, ...], dtype: int = 0x08) -> bytes:
    return struct.pack(">BBBB", 0, 0, dtype, code) + struct.pack(f">{len(dims)}I", *dims)


IMG = ("train", "images")
LAB = ("train", "labels")
MALFORMED = [
    ("magic", IMG, b"\x1f\x8b\x08\x03" + bytes(40), r"train-images-idx3-ubyte(\.gz)?: not an idx file \(magic 0x1f8b0803"),
    ("dtype", IMG, _hdr(3, (2, 2, 2), 0x0D) + bytes(32), r"holds 32-bit float data \(type code 0x0d\); only unsigned"),
    ("ndim", IMG, _hdr(1, (12,)) + bytes(12), r"has 1 dimension\(s\); an image file has 3"),
    ("short header", LAB, b"\0\0", r"train-labels-idx1-ubyte(\.gz)?: truncated: 2 byte"),
    ("short dims", IMG, _hdr(3, (12,)), r"truncated in the header \(8 of 16 bytes\)"),
    ("zero dim", IMG, _hdr(3, (12, 0, 3)), r"zero-sized dimension \(12, 0, 3\)"),
    ("huge", IMG, _hdr(3, (10**9, 28, 28)) + bytes(84), r"declares \(1000000000, 28, 28\) = 784,000,000,000 bytes.*more than an idx file may hold"),
    ("1e9 in 100 bytes", IMG, _hdr(3, (10**9, 1, 1)) + bytes(84),
     r"declares \(1000000000, 1, 1\) = 1,000,000,000 bytes of data(,| but) (more than a \d+-byte gzip|the file holds only 84)"),
    ("truncated", IMG, _hdr(3, (12, 4, 3)) + bytes(100), r"(holds only 100 after the header|truncated: .* holds 100)"),
    ("too long", LAB, _hdr(1, (12,)) + bytes(13), r"longer than its header declares"),
    ("count", LAB, _hdr(1, (11,)) + bytes(11), r"has 12 images but train-labels-idx1-ubyte(\.gz)? has 11 labels"),
    ("unseen", ("test", "labels"), _hdr(1, (6,)) + bytes([0, 1, 2, 7, 0, 1]), r"label\(s\) 7 never occur in train-labels"),
    ("one class", LAB, _hdr(1, (12,)) + bytes(12), r"labels span a single class"),
    ("test size", ("test", "images"), _hdr(3, (6, 3, 3)) + bytes(54), r"t10k-images.*images are 3x3, train-images"),
]


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("case, role, data, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_are_one_line_errors(tmp_path, gz, case, role, data, message):
    f = _dataset(tmp_path / "bad", gz=gz, raw={role: data})
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataError, match=message) as exc:
            load_idx(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2 and peak < 1 << 20  # refused from the header, nothing big allocated
    _one_line(exc)
    assert str(f) in str(exc.value)


def test_declared_size_the_file_cannot_hold_is_refused_before_allocating(tmp_path):
    f = tmp_path / "g"
    f.mkdir()
    # 1 GB declared in a tiny gzip: deflate cannot inflate that far, so no buffer is made
    _dataset(f, raw={IMG: _hdr(3, (10**6, 1000, 1)) + bytes(100)})
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"more than a \d+-byte gzip file can inflate to"):
            load_idx(f)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    _dataset(f, raw={IMG: _hdr(3, (2**16, 2**8, 2**8))}, gz=False)  # over the cap: refused before the file size
    (f / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=f"more than an idx file may hold here \\({MAX_DATA_BYTES:,}\\)"):
        load_idx(f)


def test_gzip_that_inflates_past_the_declared_size_is_refused(tmp_path):
    f = tmp_path / "bomb"
    # the header declares 12 labels; the stream goes on for 20 MB of zeros (a 20 kB file)
    _dataset(f, raw={LAB: _hdr(1, (12,)) + bytes(12) + bytes(20 << 20)})
    assert (f / "train-labels-idx1-ubyte.gz").stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: longer than its header declares") as exc:
            load_idx(f)
        assert tracemalloc.get_traced_memory()[1] < 4 << 20  # never inflated it all
    finally:
        tracemalloc.stop()
    _one_line(exc)


@pytest.mark.parametrize("damage", ["cut", "flip", "not gzip"])
def test_corrupt_gzip_streams(tmp_path, damage):
    f = _dataset(tmp_path / "z")
    p = f / "train-images-idx3-ubyte.gz"
    blob = bytearray(gzip.compress(_idx(_arrays()[IMG]), mtime=0))
    if damage == "cut":
        blob = blob[: len(blob) - 12]
    elif damage == "flip":
        blob[-6] ^= 0xFF  # the CRC
    else:
        blob = bytearray(b"plain text, not gzip at all" * 4)
    p.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: (corrupt or truncated gzip stream|truncated)") as exc:
        load_idx(f)
    _one_line(exc)


def test_zlib_is_what_gzip_raises_on_bad_deflate(tmp_path):
    f = _dataset(tmp_path / "d")
    p = f / "train-labels-idx1-ubyte.gz"
    good = gzip.compress(_idx(_arrays()[LAB]), mtime=0)
    p.write_bytes(good[:10] + b"\xff" * 20 + good[30:])  # garbage deflate data after a valid gzip header
    with pytest.raises(DataError, match=r"corrupt or truncated gzip stream") as exc:
        load_idx(f)
    _one_line(exc)
    assert isinstance(exc.value.__cause__, (zlib.error, OSError, EOFError))


@pytest.mark.skipif(not DEBIAN.is_dir(), reason=f"{DEBIAN} absent (Debian package dataset-fashion-mnist)")
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv("NAS_DATA_DIR", raising=False)
    folder = resolve_idx("fashion-mnist")
    assert folder == DEBIAN
    d = load_idx(folder)
    assert d["x"].shape == (60000, 1, 28, 28) and d["x_test"].shape == (10000, 1, 28, 28)
    assert d["y"].shape == (60000,) and d["y_test"].shape == (10000,)
    assert d["classes"] == FASHION_MNIST_CLASSES and d["name"] == "fashion-mnist"
    assert set(np.unique(d["y"])) == set(range(10)) == set(np.unique(d["y_test"]))
    assert np.bincount(d["y"]).tolist() == [6000] * 10


def test_cli_reads_an_idx_folder_and_refuses_a_malformed_one_with_exit_2(tmp_path, capsys, monkeypatch):
    """`nas search --dataset DIR` on an idx folder (here a tiny one) runs a search; a truncated
    file in it is one line on stderr and exit 2, before anything is stored."""
    from nas.cli import main

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {("train", "images"): rng.integers(0, 256, (120, 12, 12), dtype=np.uint8),
              ("train", "labels"): np.arange(120, dtype=np.uint8) % 3,
              ("test", "images"): rng.integers(0, 256, (30, 12, 12), dtype=np.uint8),
              ("test", "labels"): np.arange(30, dtype=np.uint8) % 3}
    folder = _dataset(tmp_path / "tiny", arrays=arrays)
    args = ["search", "--dataset", str(folder), "--trials", "1", "--epochs", "1", "--quiet", "--no-early-stop",
            "--storage", f"sqlite:///{tmp_path}/s.db", "--sampler", "random"]
    assert main(args) == 0
    import optuna

    study = optuna.load_study(study_name="tiny-default", storage=f"sqlite:///{tmp_path}/s.db")
    assert study.user_attrs["nas"]["task"]["dataset"] == str(folder.resolve())  # stored absolute
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(_idx(arrays[("test", "images")])[:-50]))
    capsys.readouterr()
    assert main([*args, "--study", "other"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err and "t10k-images" in err, err


@pytest.mark.skipif(not DEBIAN.is_dir() and not __import__("os").environ.get("NAS_REQUIRE_FASHION_MNIST"),
                    reason=f"{DEBIAN} absent: apt-get install dataset-fashion-mnist")
def test_search_on_fashion_mnist_by_name(tmp_path, monkeypatch):
    """`nas search --dataset fashion-mnist` on the Debian copy: the 28 px default space, one short trial."""
    from nas.cli import main

    monkeypatch.delenv("NAS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("name: tinyfm\ninput_size: [24, 64]\nstem_channels: 8\nstem_stride: 2\n"
                                     "stages:\n  - block: dsconv\n    width: 16\n    stride: 2\nrecipe: {epochs: 1, batch_size: 256}\n")
    assert main(["search", "--dataset", "fashion-mnist", "--trials", "1", "--quiet", "--no-early-stop",
                 "--space", "s.yaml", "--storage", f"sqlite:///{tmp_path}/f.db", "--sampler", "random"]) == 0
    import optuna

    (t,) = optuna.load_study(study_name="fashion-mnist-tinyfm", storage=f"sqlite:///{tmp_path}/f.db").trials
    assert t.state.name == "COMPLETE" and t.user_attrs["val_accuracy"] > 0.3  # one epoch of a tiny net; chance is 0.1
