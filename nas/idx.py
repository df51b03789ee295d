"""MNIST-format (idx) datasets: Fashion-MNIST, MNIST, KMNIST, EMNIST and their look-alikes.

A folder of idx files is read when it holds the four files of one dataset, each plain or
gzipped::

    train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]

Any prefix is allowed (``kmnist-train-images-idx3-ubyte.gz``,
``emnist-balanced-train-images-idx3-ubyte``), ``test`` may stand for ``t10k`` (EMNIST's
naming) and ``.`` for the ``-`` before ``idx`` (``train-images.idx3-ubyte``). The ``t10k`` /
``test`` files are the fixed test split. Where both a plain file and its ``.gz`` are present
(torchvision keeps both), the plain one is read. A folder holding several prefixes (EMNIST's
``raw/`` has every split side by side) is refused: put the one wanted in a folder of its own.

Names (:func:`resolve_idx`), tried in order, the first folder that holds idx files wins:

- ``fashion-mnist`` (also ``fashion_mnist``, ``fashionmnist``, ``fmnist``):
  ``$NAS_DATA_DIR/fashion-mnist``, ``$NAS_DATA_DIR/FashionMNIST/raw`` (torchvision's layout),
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package);
- ``mnist``: ``$NAS_DATA_DIR/mnist``, ``$NAS_DATA_DIR/MNIST/raw``;
- ``kmnist``: ``$NAS_DATA_DIR/kmnist``, ``$NAS_DATA_DIR/KMNIST/raw``.

Only the bare names are names: ``./mnist`` is a path. A path to a folder resolves to itself
when it holds idx files, else to its ``raw/`` (a torchvision dataset folder such as
``root/FashionMNIST``), else to the one torchvision dataset under it (``root`` holding
``FashionMNIST/raw``; several are refused as ambiguous).

Labels are the stored bytes, classes ``0 .. max+1`` over train and test; Fashion-MNIST's
folders (a name or path that says "fashion") get the real class names. A test label that
never occurs in train is refused: the model could not learn it. EMNIST stores each image
transposed; files whose prefix or folder says "emnist" are transposed back. EMNIST's
``letters`` labels start at 1, so its class 0 stays empty; its ``mapping.txt`` is not read
(class names are the label numbers).

The files are untrusted input: the header is checked before any memory is allocated for the
data (magic, unsigned-byte type, dimensions >= 1, a declared size at most
:data:`MAX_DATA_BYTES` that the file can hold), a gzip stream is inflated in chunks into a
buffer of exactly the declared size and must end there, and every problem is one
:class:`~nas.errors.DataError` line naming the file. Decoding all of Fashion-MNIST (gzipped)
takes about 0.35 s, so nothing is cached on disk.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np

from nas.errors import DataError

__all__ = ["FASHION_MNIST_CLASSES", "IDX_NAMES", "MAX_DATA_BYTES", "is_idx_folder", "load_idx", "resolve_idx"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# bare name -> (canonical name, torchvision folder)
IDX_NAMES = {
    "fashion-mnist": ("fashion-mnist", "FashionMNIST"),
    "fashion_mnist": ("fashion-mnist", "FashionMNIST"),
    "fashionmnist": ("fashion-mnist", "FashionMNIST"),
    "fmnist": ("fashion-mnist", "FashionMNIST"),
    "mnist": ("mnist", "MNIST"),
    "kmnist": ("kmnist", "KMNIST"),
}
SYSTEM_DIRS = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}
_HOW_TO_GET = {
    "fashion-mnist": "on Debian: apt-get install dataset-fashion-mnist; or point NAS_DATA_DIR at a folder holding "
                     "fashion-mnist/ with the four files",
}
_TORCHVISION_DIRS = ("FashionMNIST", "MNIST", "KMNIST", "EMNIST", "QMNIST")
MAX_DATA_BYTES = 2**31  # per file; all of EMNIST byclass is 550 MB
_GZIP_MAX_RATIO = 1100  # deflate cannot inflate more than ~1032:1
_CHUNK = 1 << 20
_FILE = re.compile(r"^(?P<prefix>.*?)(?P<split>train|t10k|test)-(?P<kind>images|labels)[-.]"
                   r"idx(?P<ndim>[13])-ubyte(?P<gz>\.gz)?$")
_ROLES = (("train", "images"), ("train", "labels"), ("test", "images"), ("test", "labels"))
_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "16-bit int", 0x0C: "32-bit int",
          0x0D: "32-bit float", 0x0E: "64-bit float"}


def _files(folder: Path) -> dict[str, dict[tuple[str, str], list[Path]]]:
    """prefix -> (split, kind) -> matching files (plain before .gz)."""
    found: dict[str, dict[tuple[str, str], list[Path]]] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return {}
    for f in entries:
        m = _FILE.match(f.name)
        if not m or not f.is_file():
            continue
        if (m["kind"] == "images") != (m["ndim"] == "3"):
            continue  # train-images-idx1-ubyte: not a file of this format
        role = ("train" if m["split"] == "train" else "test", m["kind"])
        found.setdefault(m["prefix"], {}).setdefault(role, []).append(f)
    for roles in found.values():
        for fs in roles.values():
            fs.sort(key=lambda p: (p.name.endswith(".gz"), p.name))
    return found


def is_idx_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding at least one idx image or label file."""
    p = Path(path)
    return p.is_dir() and bool(_files(p))


def _idx_name_dirs(name: str) -> list[Path] | None:
    entry = IDX_NAMES.get(name.strip().lower())
    if entry is None:
        return None
    canonical, tv = entry
    dirs: list[Path] = []
    if os.environ.get("NAS_DATA_DIR"):
        base = Path(os.environ["NAS_DATA_DIR"]).expanduser()
        dirs += [base / canonical, base / tv / "raw"]
    return dirs + list(SYSTEM_DIRS.get(canonical, ()))


def resolve_idx(name: str) -> Path | None:
    """The folder of idx files that ``name`` stands for; None when it is no idx dataset.

    Raises :class:`DataError` for a known name whose files are nowhere (naming every path
    tried), and for a folder holding several torchvision datasets."""
    dirs = _idx_name_dirs(name)
    if dirs is not None:
        for d in dirs:
            if is_idx_folder(d):
                return d
        canonical = IDX_NAMES[name.strip().lower()][0]
        how = _HOW_TO_GET.get(canonical, f"point NAS_DATA_DIR at a folder holding {canonical}/ with the four files")
        tried = ", ".join(str(d) for d in dirs) if dirs else "nothing (NAS_DATA_DIR is not set)"
        raise DataError(f"dataset {name!r}: no idx files (train-images-idx3-ubyte[.gz] and the other three) "
                        f"found; tried {tried}; to get them: {how}")
    path = Path(name)
    try:
        if not path.is_dir():
            return None
    except OSError:
        return None
    if is_idx_folder(path):
        return path
    if is_idx_folder(path / "raw"):
        return path / "raw"
    subs = [path / d / "raw" for d in _TORCHVISION_DIRS if is_idx_folder(path / d / "raw")]
    if len(subs) > 1:
        raise DataError(f"{path}: holds several idx datasets ({', '.join(str(s.parent) for s in subs)}); "
                        "name one of those folders")
    return subs[0] if subs else None


def _read_exact(stream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """One idx file of unsigned bytes with ``ndim`` dimensions, checked before allocating."""
    what = "an image file" if ndim == 3 else "a label file"
    gz = path.name.endswith(".gz")
    try:
        with open(path, "rb") as raw:
            on_disk = os.fstat(raw.fileno()).st_size
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            head = _read_exact(stream, 4)
            if len(head) < 4:
                raise DataError(f"{path}: truncated: {len(head)} byte(s), too short for an idx header")
            if head[:2] != b"\0\0" or head[3] == 0:
                raise DataError(f"{path}: not an idx file (magic 0x{head.hex()}; {what} starts with "
                                f"0x0000080{ndim})")
            if head[2] != 0x08:
                kind = _TYPES.get(head[2], "unknown")
                raise DataError(f"{path}: holds {kind} data (type code 0x{head[2]:02x}); only unsigned bytes "
                                "(0x08), as in MNIST-family files, are read")
            if head[3] != ndim:
                raise DataError(f"{path}: has {head[3]} dimension(s); {what} has {ndim} (magic 0x0000080{ndim})")
            dims_raw = _read_exact(stream, 4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path}: truncated in the header ({4 + len(dims_raw)} of {4 + 4 * ndim} bytes)")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, ">u4"))
            if 0 in dims:
                raise DataError(f"{path}: declares a zero-sized dimension {dims} (each must be >= 1)")
            declared = 1
            for d in dims:
                declared *= d
            header = 4 + 4 * ndim
            if declared > MAX_DATA_BYTES:
                raise DataError(f"{path}: declares {dims} = {declared:,} bytes of data, more than an idx file may "
                                f"hold here ({MAX_DATA_BYTES:,})")
            if not gz and declared > on_disk - header:
                raise DataError(f"{path}: declares {dims} = {declared:,} bytes of data but the file holds only "
                                f"{on_disk - header:,} after the header")
            if gz and declared > on_disk * _GZIP_MAX_RATIO:
                raise DataError(f"{path}: declares {dims} = {declared:,} bytes of data, more than a "
                                f"{on_disk:,}-byte gzip file can inflate to")
            buf = np.empty(declared, np.uint8)
            view = memoryview(buf)
            got = 0
            while got < declared:
                n = stream.readinto(view[got:got + _CHUNK])
                if not n:
                    break
                got += n
            if got < declared:
                raise DataError(f"{path}: truncated: declares {dims} = {declared:,} bytes of data, holds {got:,}")
            if stream.read(1):
                raise DataError(f"{path}: longer than its header declares ({dims} = {declared:,} bytes of data); "
                                "not a well-formed idx file")
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        what_failed = "corrupt or truncated gzip stream" if gz else "cannot read"
        raise DataError(f"{path}: {what_failed} ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    return buf.reshape(dims)


def _pick(folder: Path) -> tuple[str, dict[tuple[str, str], Path]]:
    found = _files(folder)
    if not found:
        raise DataError(f"{folder}: no idx files (need train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz)")
    if len(found) > 1:
        names = ", ".join(repr(p) if p else "'' (no prefix)" for p in sorted(found))
        raise DataError(f"{folder}: holds idx files of several datasets (prefixes {names}); put the one wanted "
                        "in a folder of its own")
    prefix, roles = next(iter(found.items()))
    missing = [f"{prefix}{'t10k' if s == 'test' else s}-{k}-idx{3 if k == 'images' else 1}-ubyte[.gz]"
               for s, k in _ROLES if (s, k) not in roles]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (an idx dataset is four files)")
    for role, fs in roles.items():
        names = {f.name.removesuffix(".gz") for f in fs}
        if len(names) > 1:  # t10k- and test- side by side
            raise DataError(f"{folder}: several {role[0]} {role[1]} files ({', '.join(f.name for f in fs)}); "
                            "keep one")
    return prefix, {role: fs[0] for role, fs in roles.items()}


def _says(folder: Path, prefix: str, word: str) -> bool:
    """Whether the file prefix or the folder's own name (its parent's for torchvision's ``raw``)
    *is* the dataset's name (``fashion-mnist``, ``FashionMNIST``, ``emnist-balanced``): a folder
    merely containing the word (``my-fashion-products``) is some other dataset."""
    known = {"fashion": ("fashionmnist",), "emnist": ("emnist",)}.get(word, (word,))
    parts = [prefix, folder.name] + ([folder.parent.name] if folder.name.lower() == "raw" else [])
    return any(any(re.sub(r"[^a-z]", "", p.lower()).startswith(k) for k in known) for p in parts)


def load_idx(folder: str | Path, name: str | None = None) -> dict[str, object]:
    """Arrays of the idx dataset in ``folder``: ``x`` (N, 1, H, W) uint8, ``y`` (N,) int64,
    ``x_test``, ``y_test``, ``classes`` (tuple of str) and ``name`` (``name`` if given, else
    ``fashion-mnist`` / the prefix / the folder's name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"idx dataset folder {str(folder)!r} does not exist")
    prefix, files = _pick(folder)
    arrays = {role: _read_idx(path, 3 if role[1] == "images" else 1) for role, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[(split, "images")], arrays[(split, "labels")]
        if len(x) != len(y):
            raise DataError(f"{files[(split, 'images')]} has {len(x):,} images but {files[(split, 'labels')].name} "
                            f"has {len(y):,} labels")
    x, y = arrays[("train", "images")], arrays[("train", "labels")]
    xt, yt = arrays[("test", "images")], arrays[("test", "labels")]
    if x.shape[1:] != xt.shape[1:]:
        raise DataError(f"{files[('test', 'images')]}: images are {xt.shape[1]}x{xt.shape[2]}, "
                        f"{files[('train', 'images')].name}'s are {x.shape[1]}x{x.shape[2]}")
    fashion = IDX_NAMES.get((name or "").strip().lower(), ("",))[0] == "fashion-mnist" or _says(folder, prefix, "fashion")
    seen = np.bincount(y, minlength=256)
    if np.count_nonzero(seen) < 2:
        raise DataError(f"{files[('train', 'labels')]}: labels span a single class; need at least 2 classes")
    unseen = sorted(set(np.unique(yt).tolist()) - set(np.flatnonzero(seen).tolist()))
    if unseen:
        raise DataError(f"{files[('test', 'labels')]}: label(s) {', '.join(map(str, unseen[:10]))} never occur in "
                        f"{files[('train', 'labels')].name} (a model cannot learn them)")
    k = int(max(y.max(), yt.max())) + 1
    if fashion and k > len(FASHION_MNIST_CLASSES):
        bad = files[("train", "labels")] if y.max() >= k - 1 else files[("test", "labels")]
        raise DataError(f"{bad}: label {k - 1} is out of range for Fashion-MNIST (labels 0..9)")
    classes = FASHION_MNIST_CLASSES if fashion else tuple(str(i) for i in range(k))
    if _says(folder, prefix, "emnist"):  # EMNIST stores each image transposed
        x, xt = (np.ascontiguousarray(a.transpose(0, 2, 1)) for a in (x, xt))
    if name is None:
        stem = prefix.strip("-_.") or (folder.parent.name if folder.name.lower() == "raw" else folder.name)
        name = "fashion-mnist" if fashion else stem
    return {"x": x[:, None], "y": y.astype(np.int64), "x_test": xt[:, None], "y_test": yt.astype(np.int64),
            "classes": classes, "name": name}
