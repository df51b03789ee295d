"""Datasets that work offline, split into train / validation / test by a fixed seed.

The search trains on ``train``, scores the ``accuracy`` objective on ``val`` and never
touches ``test``; ``test`` is reported alongside and re-checked by ``nas verify``.

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images).
- ``mnist1d``: generated locally by the ``mnist1d`` package (4,000 train / 1,000 test,
  length 40), as an image of height 1.
- a path to a ``.npz`` file with ``x`` (N, C, H, W) and integer labels ``y`` (N,); optional
  ``x_test`` / ``y_test`` give a fixed test split, and optional integer ``groups`` (N,) keep
  related samples together: samples that share a group id (augmented copies of one image, one
  writer's digits) land in the same split, so validation never scores a twin of a training
  sample (the same contract as scikit-learn's ``GroupShuffleSplit``).
- a folder of PNG/JPEG images, one subfolder per class, optionally under ``train/`` and
  ``test/`` (see :mod:`nas.images`).
- ``fashion-mnist`` (Debian's ``dataset-fashion-mnist``, ``$NAS_DATA_DIR``, or torchvision's
  ``raw`` layout) or any folder of MNIST-format idx files; the t10k files are the test split
  (see :mod:`nas.idx`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas.errors import DataError

__all__ = ["Dataset", "load_dataset", "DATASETS"]

DATASETS = ("digits", "mnist1d", "fashion-mnist")
_ALLOWED = ("digits, mnist1d, fashion-mnist, a path to a .npz file with x (N,C,H,W) and y (N,), a folder of "
            "MNIST-format idx files, or a folder of PNG/JPEG images with one subfolder per class")


@dataclass(frozen=True)
class Dataset:
    """Splits normalised with the training split's ``mean`` and ``std`` (what networks train
    on), and the validation and test splits also raw (``x_val_raw``, ``x_test_raw``: what a
    shipped model, which normalises inside itself, is fed and scored on)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    seed: int
    mean: float = 0.0
    std: float = 1.0
    x_val_raw: torch.Tensor | None = None
    x_test_raw: torch.Tensor | None = None
    classes: tuple[str, ...] = ()
    # what the raw inputs are, in words a user can reproduce ("pixel values / 255")
    input_scale: str = "as stored"
    input_range: tuple[float, float] = (0.0, 1.0)
    fingerprint: str = ""  # sha256 of the data's content (arrays, before splitting)

    @property
    def normalization(self) -> tuple[float, float]:
        return self.mean, self.std

    def raw(self, split: str) -> torch.Tensor:
        """The raw (un-normalised) inputs of ``val`` or ``test``."""
        return {"val": self.x_val_raw, "test": self.x_test_raw}[split]

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    @property
    def spatial(self) -> str:
        return "1d" if self.input_size[0] == 1 else "2d"

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "seed": self.seed,
            "input_shape": [self.in_channels, *self.input_size],
            "num_classes": self.num_classes,
            "n_train": len(self.y_train),
            "n_val": len(self.y_val),
            "n_test": len(self.y_test),
            "fingerprint": self.fingerprint,
        }

    def input_spec(self) -> dict[str, object]:
        """How a shipped model is fed: recorded in bundle manifests and model cards."""
        return {"layout": "NCHW", "dtype": "float32", "shape": [1, self.in_channels, *self.input_size],
                "batch": "model.onnx takes one input at a time (batch 1, as timed); model.pt2 and load_bundle any N",
                "scale": self.input_scale, "range": [float(v) for v in self.input_range],
                "normalization": {"mean": self.mean, "std": self.std,
                                  "applied": "inside the model: (x - mean) / std, its first operation"},
                "classes": list(self.classes or (str(k) for k in range(self.num_classes)))}


def _split(n: int, fraction: float, rng: np.random.Generator, groups: np.ndarray | None = None,
           keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``fraction`` of ``n`` samples; with ``groups``, whole groups only, and at
    least ``keep`` groups stay on the kept side."""
    if groups is None:
        perm = rng.permutation(n)
        k = max(1, int(round(n * fraction)))
        return perm[k:], perm[:k]
    # Greedy over the groups in a seeded order: hold a group out if it still fits under the
    # target, skip it otherwise (so one large group cannot swallow the held-out side); if none
    # fits, hold out the smallest. GroupShuffleSplit would split by the number of groups,
    # which misses the target by far when group sizes differ.
    uniq, inverse = np.unique(groups, return_inverse=True)
    counts = np.bincount(inverse)
    target = n * fraction
    held: list[int] = []
    total = 0
    for g in rng.permutation(len(uniq)):
        if len(uniq) - len(held) <= keep:
            break
        if total + counts[g] <= target:
            held.append(int(g))
            total += int(counts[g])
    if not held:
        held = [int(np.argmin(counts))]
    mask = np.isin(inverse, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _check_grouped(name: str, split: str, held: int, n: int, fraction: float, groups: np.ndarray) -> None:
    """Whole groups cannot always meet a split's target: refuse splits off by more than 2x."""
    if fraction / 2 <= held / n <= fraction * 2:
        return
    ids, counts = np.unique(groups, return_counts=True)
    big = int(np.argmax(counts))
    raise DataError(
        f"{name}: with these 'groups' the {split} split would hold {held:,} of {n:,} samples ({held / n:.0%}, target "
        f"{fraction:.0%}): group {ids[big]} holds {counts[big] / len(groups):.0%} of all samples and there are "
        f"{len(ids):,} groups; use more, smaller groups" + (" (or give x_test/y_test)" if split == "test" else ""))


def _finish(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    seed: int,
    num_classes: int,
    groups: np.ndarray | None = None,
    *,
    classes: tuple[str, ...] = (),
    scale: str = "as stored",
) -> Dataset:
    fingerprint = content_fingerprint(x, y, x_test, y_test, groups)
    rng = np.random.default_rng(seed)
    all_groups = groups
    if x_test is None or y_test is None:
        train_idx, test_idx = _split(len(y), 0.2, rng, groups, keep=2)  # two left for train and val
        if groups is not None:
            _check_grouped(name, "test", len(test_idx), len(y), 0.2, all_groups)
        x, y, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
        groups = None if groups is None else groups[train_idx]
    train_idx, val_idx = _split(len(y), 0.15, rng, groups)
    if groups is not None:
        _check_grouped(name, "validation", len(val_idx), len(y), 0.15, all_groups)
    x_train, y_train, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    # Normalize with training statistics only: nothing about val/test leaks into training.
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0

    # float32 throughout, the exact operations nas.preprocess.Normalize and the deployed graph's
    # Sub/Div apply to raw inputs: a shipped model sees bit-identical normalised values
    mean32, std32 = np.float32(mean), np.float32(std)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a.astype(np.float32) - mean32) / std32)

    def raw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def lab(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    lo, hi = (float(x_train.min()), float(x_train.max())) if x_train.size else (0.0, 0.0)
    return Dataset(name, t(x_train), lab(y_train), t(x_val), lab(y_val), t(x_test), lab(y_test), num_classes, seed,
                   mean=float(mean32), std=float(std32), x_val_raw=raw(x_val), x_test_raw=raw(x_test),
                   classes=tuple(classes) or tuple(str(k) for k in range(num_classes)), input_scale=scale,
                   input_range=(lo, hi), fingerprint=fingerprint)


def content_fingerprint(*arrays: np.ndarray | None) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes: a resumed study or a verify run refuses
    data whose content changed at the same path (300 rows dropped, one image added)."""
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    return _finish("digits", x, bunch.target, None, None, seed, 10,
                   scale="scikit-learn load_digits().images / 16 (0 to 1)")


@functools.lru_cache(maxsize=4)
def _mnist1d_raw(seed: int) -> dict[str, np.ndarray]:
    # make_dataset generates locally; the package's get_dataset() would download a pickle.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    return make_dataset(args)


def _mnist1d(seed: int) -> Dataset:
    raw = _mnist1d_raw(42)  # the published dataset; `seed` only picks the validation split
    x = raw["x"].reshape(-1, 1, 1, raw["x"].shape[-1])
    xt = raw["x_test"].reshape(-1, 1, 1, raw["x_test"].shape[-1])
    return _finish("mnist1d", x, raw["y"], xt, raw["y_test"], seed, 10,
                   scale="mnist1d make_dataset() signals as generated, shaped (N, 1, 1, 40)")


MAX_CHANNELS = 1024  # input channels of a sample (hyperspectral images have a few hundred)
MIN_SIDE = 4  # the smallest side a candidate's stem and one strided stage can take
MAX_CLASSES = 100_000  # labels 0..K-1; a label of 10^9 would ask for a 10^9-way classifier
FLOAT32_SAFE = 1e18  # |x| beyond this: x^2 (the variance) overflows float32 (3.4e38)


def _check_xy(path: Path, x: np.ndarray, y: np.ndarray, xk: str, yk: str) -> None:
    if x.ndim != 4:
        raise DataError(f"{path}: '{xk}' must have shape (N, C, H, W), got {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{path}: '{yk}' must have shape (N,), got {y.shape}")
    if len(x) == 0:
        raise DataError(f"{path}: '{xk}' is empty (need at least one sample per split)")
    if 0 in x.shape[1:]:
        raise DataError(f"{path}: '{xk}' samples have a zero-sized axis {x.shape[1:]} (C, H and W must be >= 1)")
    if len(x) != len(y):
        raise DataError(f"{path}: '{xk}' has {len(x)} samples but '{yk}' has {len(y)}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{path}: '{xk}' must be real numbers, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{path}: '{xk}' contains NaN or infinite values")
    if x.shape[1] > MAX_CHANNELS:
        raise DataError(f"{path}: '{xk}' samples have {x.shape[1]:,} channels (at most {MAX_CHANNELS:,})")
    h, w = x.shape[2], x.shape[3]
    if w < MIN_SIDE or (h != 1 and h < MIN_SIDE):
        raise DataError(f"{path}: '{xk}' samples are {h}x{w}; a 2-D sample needs at least {MIN_SIDE}x{MIN_SIDE} "
                        f"and a 1-D one (H=1) at least {MIN_SIDE} values (W)")
    big = max(abs(float(x.min())), abs(float(x.max())))
    if big > FLOAT32_SAFE:
        raise DataError(f"{path}: '{xk}' holds {big:.3g}; values must be within +-{FLOAT32_SAFE:.0e} "
                        f"(training is float32: their mean and variance must not overflow)")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise DataError(f"{path}: '{yk}' must hold integer class labels, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{path}: '{yk}' has label {int(y.min())}; labels must be 0..K-1")
    if y.max() >= MAX_CLASSES:
        raise DataError(f"{path}: '{yk}' has label {y.max()}; labels must be "
                        f"0..K-1 with K at most {MAX_CLASSES:,}")


def _npz(path: Path, seed: int) -> Dataset:
    import zipfile
    import zlib

    from nas.datasize import check_dataset_size, memory_budget

    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (need a .npz with x (N,C,H,W) and y (N,))")
    # declared shapes and dtypes (and each member's declared size) against a limit, before reading
    check_dataset_size(str(path), memory_budget(), error=DataError, who="the dataset")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
        raise DataError(f"{path}: cannot read as .npz ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)} (need x (N,C,H,W) and y (N,))")
    x, y = arrays["x"], arrays["y"]
    _check_xy(path, x, y, "x", "y")
    x_test = y_test = None
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: give both x_test and y_test, or neither")
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        _check_xy(path, x_test, y_test, "x_test", "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test samples have shape {x_test.shape[1:]}, x has {x.shape[1:]}")
    if y_test is not None:
        unseen = np.setdiff1d(np.unique(y_test), np.unique(y))
        if len(unseen):
            raise DataError(f"{path}: y_test holds class(es) {', '.join(map(str, unseen[:5].astype(np.int64)))}"
                            f"{' ...' if len(unseen) > 5 else ''} that y never has: test accuracy would count classes "
                            f"the model is never trained on")
    labels = y if y_test is None else np.concatenate([y, y_test])
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise DataError(f"{path}: labels span a single class; need at least 2 classes")
    if len(y) < 10:
        raise DataError(f"{path}: {len(y)} samples is too few to split into train/val/test (need >= 10)")
    groups = arrays.get("groups")
    if groups is not None:
        if groups.shape != y.shape:
            raise DataError(f"{path}: 'groups' must have one id per sample of x, shape {y.shape}, got {groups.shape}")
        if not np.issubdtype(groups.dtype, np.integer):
            if not (np.issubdtype(groups.dtype, np.floating) and np.all(np.isfinite(groups))
                    and np.all(groups == np.round(groups))):
                raise DataError(f"{path}: 'groups' must hold integer group ids, got dtype {groups.dtype}")
            groups = groups.astype(np.int64)
        need = 2 if x_test is not None else 3  # one group per split at least
        if len(np.unique(groups)) < need:
            raise DataError(f"{path}: 'groups' has {len(np.unique(groups))} distinct id(s); need at least {need} "
                            f"to split into {'train/val' if need == 2 else 'train/val/test'}")
    classes = _class_names(path, arrays.get("classes"), num_classes)
    return _finish(path.stem, x.astype(np.float32), y.astype(np.int64),
                   None if x_test is None else x_test.astype(np.float32),
                   None if y_test is None else y_test.astype(np.int64), seed, num_classes, groups,
                   classes=classes, scale=f"the values of {path.name}'s x, as stored ({x.dtype})")


def _class_names(path: Path, names: np.ndarray | None, num_classes: int) -> tuple[str, ...]:
    """Optional ``classes`` in a ``.npz``: one string per label (a unicode array, not objects)."""
    if names is None:
        return ()
    if names.dtype.kind != "U" or names.ndim != 1 or len(names) != num_classes:
        raise DataError(f"{path}: 'classes' must be {num_classes} strings, one per label (a unicode array of shape "
                        f"({num_classes},)), got dtype {names.dtype} shape {names.shape}")
    return tuple(str(n) for n in names)


def _folder(name: str, seed: int) -> Dataset:
    from nas.images import load_folder, split_id

    arrays = load_folder(name)
    x, y = arrays["x"], arrays["y"]
    if len(y) < 10:
        raise DataError(f"{split_id(name)[0]}: {len(y)} images is too few to split into train/val/test (need >= 10)")
    xt, yt = arrays.get("x_test"), arrays.get("y_test")
    return _finish(Path(split_id(name)[0]).name, x.astype(np.float32) / 255.0, y,
                   None if xt is None else xt.astype(np.float32) / 255.0, yt, seed, len(arrays["classes"]),
                   classes=tuple(str(c) for c in arrays["classes"]), scale="pixel values / 255 (0 to 1)")


def _idx(folder: Path, name: str, seed: int) -> Dataset:
    from nas.idx import load_idx

    arrays = load_idx(folder, name)
    # uint8 -> [0, 1] as torchvision's ToTensor does; the t10k files are the fixed test split
    return _finish(Path(str(arrays["name"])).name or str(arrays["name"]), arrays["x"].astype(np.float32) / 255.0, arrays["y"],
                   arrays["x_test"].astype(np.float32) / 255.0, arrays["y_test"], seed, len(arrays["classes"]),
                   classes=tuple(arrays["classes"]), scale="pixel values / 255 (0 to 1)")


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """Load a dataset by name (``digits``, ``mnist1d``), ``.npz`` path or image folder, split by ``seed``."""
    if name == "digits":
        return _digits(seed)
    if name == "mnist1d":
        return _mnist1d(seed)
    from nas.idx import resolve_idx

    idx = resolve_idx(name)  # fashion-mnist (and mnist, kmnist) by name, or a folder of idx files
    if idx is not None:
        return _idx(idx, name, seed)
    from nas.images import is_folder_dataset

    if is_folder_dataset(name):
        return _folder(name, seed)
    path = Path(name)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"dataset file {name!r} does not exist")
        return _npz(path, seed)
    raise DataError(f"unknown dataset {name!r} (allowed: {_ALLOWED})")
