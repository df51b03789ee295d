"""Image folders as datasets: generated PNGs of two sizes, grey and RGB, one corrupt file, and a
held-out test/ subfolder, through the loader, the cache, the CLI errors and a search + export."""

from __future__ import annotations

import shutil

import numpy as np
import optuna
import pytest
from PIL import Image

from nas import images
from nas.cli import main
from nas.data import load_dataset
from nas.errors import DataError

CLASSES = ("circle", "cross", "stripes")


def _draw(cls: int, size: int, rgb: bool, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[:size, :size] / (size - 1) - 0.5
    shape = [(xx ** 2 + yy ** 2 < 0.12), (np.abs(xx) < 0.1) | (np.abs(yy) < 0.1), (np.sin(xx * 18) > 0)][cls]
    img = np.clip(shape * 200 + rng.normal(0, 20, (size, size)) + 20, 0, 255).astype(np.uint8)
    if rgb:  # colour that carries no label information
        return Image.fromarray(np.stack([img, img // 2, 255 - img], -1), "RGB")
    return Image.fromarray(img, "L")


def make_folder(root, per_class=(8, 3), sizes=(12, 16), corrupt=True):
    """train/ and test/ with per_class images per class; every other image RGB, sizes alternating."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                suffix = ".JPG" if i == 2 else ".png"  # PNG and JPEG, any case of suffix
                _draw(c, sizes[i % len(sizes)], rgb=i % 2 == 1, rng=rng).save(d / f"{i:03d}{suffix}", format="PNG" if suffix == ".png" else "JPEG")
            (d / "notes.txt").write_text("ignored: not an image")
    if corrupt:
        (root / "train" / "cross" / "999.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    return root


def make_flat(root, per_class: int, seed: int, size: int = 10, classes=CLASSES):
    """One folder per class of grey PNGs, no train/ or test/."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _draw(c, size, rgb=False, rng=rng).save(root / name / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path / "cache"))


def test_corrupt_file_and_mixed_sizes_are_one_line_errors(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"999\.png: cannot read as an image"):
        load_dataset(str(root))
    assert main(["search", "--dataset", str(root), "--trials", "1", "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "999.png: cannot read as an image" in err
    (root / "train" / "cross" / "999.png").unlink()
    with pytest.raises(DataError, match=r"different sizes \(.*12x12.*16x16.*--image-size"):
        load_dataset(str(root))
    assert not (tmp_path / "s.db").exists() or optuna.get_all_study_names(f"sqlite:///{tmp_path}/s.db") == []


def test_sized_folder_loads_train_and_held_out_test(tmp_path):
    root = make_folder(tmp_path / "imgs", corrupt=False)
    ds = load_dataset(images.folder_dataset_id(root, "12"), seed=0)
    assert ds.in_channels == 3 and ds.input_size == (12, 12)  # RGB: some images have colour
    assert len(ds.y_test) == 3 * 3  # exactly the test/ folder
    assert len(ds.y_train) + len(ds.y_val) == 3 * 8
    assert sorted(set(ds.y_test.tolist())) == [0, 1, 2]
    grey = load_dataset(images.folder_dataset_id(root, "12x12", "grey"), seed=0)
    assert grey.in_channels == 1
    # the same seed gives the same splits; the normalized pixels come from the files
    again = load_dataset(images.folder_dataset_id(root, "12x12", "grey"), seed=0)
    assert np.array_equal(grey.x_train.numpy(), again.x_train.numpy())


def test_all_grey_folder_loads_as_one_channel_and_flat_folder_splits_test(tmp_path):
    root = make_flat(tmp_path / "flat", per_class=10, seed=1)
    ds = load_dataset(str(root), seed=0)
    assert ds.in_channels == 1 and ds.input_size == (10, 10)
    assert len(ds.y_test) == 6  # a seeded 20% of 30


def test_cache_is_keyed_by_content(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", corrupt=False)
    name = images.folder_dataset_id(root, "12")
    first = images.load_folder(name)
    assert len(list((tmp_path / "cache" / "images").glob("*.npz"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although nothing changed")

    monkeypatch.setattr(images, "_decode", no_decoding)
    cached = images.load_folder(name)
    assert np.array_equal(cached["x"], first["x"]) and cached["classes"] == list(CLASSES)
    monkeypatch.undo()
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path / "cache"))
    _draw(0, 12, rgb=False, rng=np.random.default_rng(9)).save(root / "train" / "circle" / "000.png")  # edited
    changed = images.load_folder(name)
    assert not np.array_equal(changed["x"], first["x"])
    assert len(list((tmp_path / "cache" / "images").glob("*.npz"))) == 2


def test_bad_folders_are_refused_by_name(tmp_path):
    root = make_folder(tmp_path / "imgs", corrupt=False)
    for f in (root / "test" / "stripes").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"'stripes' hold no PNG/JPEG images"):
        load_dataset(images.folder_dataset_id(root, "12"))
    shutil.rmtree(root / "test" / "stripes")
    with pytest.raises(DataError, match=r"differ from train/"):
        load_dataset(images.folder_dataset_id(root, "12"))
    outside = tmp_path / "secret"
    outside.mkdir()
    _draw(0, 12, False, np.random.default_rng(0)).save(outside / "a.png")
    (root / "test" / "stripes").mkdir()
    (root / "test" / "stripes" / "a.png").symlink_to(outside / "a.png")
    with pytest.raises(DataError, match=r"links outside"):
        load_dataset(images.folder_dataset_id(root, "12"))
    with pytest.raises(DataError, match=r"image size '0' is not allowed"):
        images.folder_dataset_id(root, "0")
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    _draw(0, 12, False, np.random.default_rng(0)).save(one / "a.png")
    with pytest.raises(DataError, match=r"need at least 2 classes"):
        load_dataset(str(tmp_path / "one"))


def test_image_flags_need_a_folder(tmp_path, capsys):
    assert main(["search", "--dataset", "digits", "--image-size", "8", "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    assert "--image-size and --image-mode are for image folders" in capsys.readouterr().err


def test_search_on_a_folder_then_export_and_verify(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", per_class=(14, 4), corrupt=False)
    (tmp_path / "space.yaml").write_text(
        "name: tiny2d\nstem_channels: [4]\nstages:\n  - block: [conv]\n    width: [8]\n    stride: 2\n"
        "recipe: {epochs: 2}\ncompression: {quant: [fp32, int8]}\n")
    db = f"sqlite:///{tmp_path}/s.db"
    assert main(["search", "--dataset", str(root), "--image-size", "12", "--image-mode", "grey", "--trials", "2",
                 "--study", "img", "--storage", db, "--quiet", "--no-early-stop", "--space", str(tmp_path / "space.yaml"),
                 "--artifacts", str(tmp_path / "art")]) == 0
    study = optuna.load_study(study_name="img", storage=db)
    task = study.user_attrs["nas"]["task"]
    assert task["dataset"] == f"{root.resolve()}?size=12x12&mode=grey"  # the identity export/verify rebuild from
    out = tmp_path / "bundle"
    assert main(["export", "img", "--storage", db, "--pick", "max accuracy", "--out", str(out)]) == 0
    assert main(["verify", str(out), "--no-latency"]) == 0
    # a changed option is a different dataset: resuming with it is refused
    capsys.readouterr()
    assert main(["search", "--dataset", str(root), "--image-size", "16", "--trials", "3", "--study", "img",
                 "--storage", db, "--quiet", "--space", str(tmp_path / "space.yaml")]) == 2
    assert "--dataset" in capsys.readouterr().err


def test_only_png_and_jpeg_decoders_run_and_split_like_folders_are_refused(tmp_path, monkeypatch):
    root = make_flat(tmp_path / "flat", per_class=5, seed=2)
    rng = np.random.default_rng(2)
    # another format under a .png name: Pillow would pick its decoder (EPS runs Ghostscript)
    _draw(0, 10, rgb=False, rng=rng).save(root / "circle" / "sneaky.png", format="BMP")
    with pytest.raises(DataError, match=r"sneaky\.png: cannot read as an image"):
        load_dataset(str(root))
    (root / "circle" / "sneaky.png").unlink()
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)  # a file larger than an image may be: refused unread
    with pytest.raises(DataError, match=r"larger than an image file may be"):
        load_dataset(str(root))
    monkeypatch.undo()
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path / "cache"))
    split = tmp_path / "tv"
    for part in ("train", "val"):
        shutil.copytree(root, split / part)
    with pytest.raises(DataError, match=r"subfolders train, val look like splits"):
        load_dataset(str(split))


def test_a_folder_whose_name_holds_a_question_mark(tmp_path):
    root = make_flat(tmp_path / "q?size=4", per_class=6, seed=3, classes=CLASSES[:2])
    assert load_dataset(str(root)).input_size == (10, 10)
    ident = images.folder_dataset_id(root, "8")
    assert ident == f"{root.resolve()}?size=8x8" and load_dataset(ident).input_size == (8, 8)
