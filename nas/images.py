"""Image folders as datasets (the torchvision ``ImageFolder`` convention).

    folder/                      folder/
      cat/ 001.png ...     or      train/ cat/ ... dog/ ...
      dog/ 001.jpg ...             test/  cat/ ... dog/ ...

One subfolder per class (labels are the sorted folder names); PNG and JPEG files, decoded with
Pillow. With ``train/`` and ``test/``, ``test/`` is the fixed held-out test split (it must hold
the same classes); otherwise a seeded 20% of the images is. Other file types are ignored.

Images are converted once to arrays and cached (``$NAS_CACHE_DIR``, else
``$XDG_CACHE_HOME/nas``, else ``~/.cache/nas``) under a key made of every file's relative path
and bytes plus the options, so an edited, added or removed file makes a new cache entry, and
an unchanged folder is never decoded twice. The cache is a plain ``.npz`` read without pickle.

A folder is untrusted input: symlinks that lead outside it are refused, decompression bombs
(Pillow's limit) and unreadable files get a one-line error naming the file, and images of
different sizes need an explicit size.

The dataset's identity (stored with a study, so export and verify rebuild the same splits) is
the folder's absolute path with the options: ``/data/pets?size=32x32&mode=rgb``.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from nas.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "MODES", "folder_dataset_id", "is_folder_dataset", "load_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MODES = ("grey", "rgb")
_SIZE = re.compile(r"^(\d{1,4})(?:x(\d{1,4}))?$")
CACHE_VERSION = 1
MAX_IMAGE_BYTES = 64 * 2**20
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")


def parse_size(text: str) -> tuple[int, int]:
    """``32`` or ``32x24`` (height x width) -> (32, 32) / (32, 24)."""
    m = _SIZE.match(str(text).strip())
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < 1):
        raise DataError(f"image size {text!r} is not allowed (allowed: N or HxW, e.g. 32 or 32x24, 1..9999)")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def split_id(name: str) -> tuple[str, dict[str, str]]:
    """``path?size=32x32&mode=grey`` -> (path, options). A folder whose own name holds a ``?``
    is a path without options; options follow the last ``?``."""
    if "?" not in name or Path(name).is_dir():
        return name, {}
    path, _, query = name.rpartition("?")
    opts = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(opts) - {"size", "mode"})
    if unknown:
        raise DataError(f"dataset {name!r}: unknown option(s) {', '.join(unknown)} (allowed: size, mode)")
    return path, opts


def is_folder_dataset(name: str) -> bool:
    if Path(name).is_dir():
        return True
    try:
        return "?" in name and Path(split_id(name)[0]).is_dir()
    except DataError:
        return False


def folder_dataset_id(folder: str | Path, size: str | None = None, mode: str | None = None) -> str:
    """The canonical identity stored with a study: absolute path plus the options given."""
    path, opts = split_id(str(folder))
    if size is not None:
        opts["size"] = size
    if mode is not None:
        opts["mode"] = mode
    if "size" in opts:
        h, w = parse_size(opts["size"])
        opts["size"] = f"{h}x{w}"
    if "mode" in opts and opts["mode"] not in MODES:
        raise DataError(f"image mode {opts['mode']!r} is not allowed (allowed: {', '.join(MODES)})")
    query = "&".join(f"{k}={opts[k]}" for k in ("size", "mode") if k in opts)
    return str(Path(path).resolve()) + (f"?{query}" if query else "")


def cache_dir() -> Path:
    if os.environ.get("NAS_CACHE_DIR"):
        return Path(os.environ["NAS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nas"


def _class_files(root: Path, part: Path) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted), refusing links that leave ``root``."""
    classes: dict[str, list[Path]] = {}
    for sub in sorted(p for p in part.iterdir() if not p.name.startswith(".")):
        if not sub.is_dir():
            continue
        if not sub.resolve().is_relative_to(root):
            raise DataError(f"{sub}: class folder links outside {root} (refused)")
        files = []
        for f in sorted(sub.rglob("*")):
            if f.name.startswith(".") or f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not f.resolve().is_relative_to(root):
                raise DataError(f"{f}: links outside {root} (refused)")
            if f.is_file():
                files.append(f)
        classes[sub.name] = files
    if not classes:
        raise DataError(f"{part}: no class subfolders (need one folder of PNG/JPEG images per class)")
    empty = [c for c, fs in classes.items() if not fs]
    if empty:
        raise DataError(f"{part}: class folder(s) {', '.join(repr(c) for c in empty)} hold no PNG/JPEG images")
    if len(classes) < 2:
        raise DataError(f"{part}: one class folder ({next(iter(classes))!r}); need at least 2 classes")
    return classes


def _decode(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG", "JPEG"]) as im:  # never another decoder (EPS would run Ghostscript)
                im.load()
                out = im.convert("L" if mode == "grey" else "RGB")
                if size is not None and out.size != (size[1], size[0]):
                    out = out.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(out, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _key(root: Path, parts: list[tuple[str, dict[str, list[Path]]]], opts: dict[str, str]) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{opts.get('size')}|{opts.get('mode')}".encode())
    for split, classes in parts:
        for cls, files in classes.items():
            for f in files:
                h.update(f"\0{split}/{cls}/{f.relative_to(root / split if split else root)}\0".encode())
                if f.stat().st_size > MAX_IMAGE_BYTES:
                    raise DataError(f"{f}: {f.stat().st_size:,} bytes is larger than an image file may be "
                                    f"({MAX_IMAGE_BYTES >> 20} MiB)")
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
    return h.hexdigest()[:32]


def _to_arrays(files: list[tuple[Path, int]], mode: str, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    imgs = [(_decode(f, mode, size), f) for f, _ in files]
    shapes = {a.shape for a, _ in imgs}
    if len(shapes) > 1:
        (a0, f0), (a1, f1) = imgs[0], next((a, f) for a, f in imgs if a.shape != imgs[0][0].shape)
        raise DataError(f"images have different sizes ({f0.name} {a0.shape[1]}x{a0.shape[2]}, {f1.name} "
                        f"{a1.shape[1]}x{a1.shape[2]}); give one size (--image-size HxW) to resize them all")
    return np.stack([a for a, _ in imgs]), np.array([y for _, y in files], dtype=np.int64)


def load_folder(name: str) -> dict[str, np.ndarray | list[str]]:
    """Arrays ``x`` (N, C, H, W) uint8, ``y``; ``x_test``/``y_test`` for a ``test/`` subfolder;
    ``classes``. Decoded once per content, then read from the cache."""
    path, opts = split_id(name)
    root = Path(path).resolve()
    if not root.is_dir():
        raise DataError(f"dataset folder {path!r} does not exist")
    size = parse_size(opts["size"]) if "size" in opts else None
    mode = opts.get("mode")
    if mode is not None and mode not in MODES:
        raise DataError(f"image mode {mode!r} is not allowed (allowed: {', '.join(MODES)})")
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    named = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_NAMES)
    if named and (not split_layout or len(named) > 2):
        raise DataError(f"{root}: subfolders {', '.join(named)} look like splits; the layouts read are one folder per "
                        "class, or train/ and test/ each holding one folder per class (validation is split from train/)")
    parts = [("train", _class_files(root, root / "train")), ("test", _class_files(root, root / "test"))] if split_layout \
        else [("", _class_files(root, root))]
    classes = list(parts[0][1])
    if split_layout and list(parts[1][1]) != classes:
        raise DataError(f"{root / 'test'}: classes {list(parts[1][1])} differ from train/'s {classes}")
    cache = cache_dir() / "images" / f"{_key(root, parts, opts)}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                return {k: f[k] for k in f.files} | {"classes": [str(c) for c in f["classes"]]}
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    out: dict[str, np.ndarray] = {}
    for split, cls in parts:
        labelled = [(f, classes.index(c)) for c, fs in cls.items() for f in fs]
        x, y = _to_arrays(labelled, mode or "rgb", size)
        out["x_test" if split == "test" else "x"], out["y_test" if split == "test" else "y"] = x, y
    if mode is None:  # no mode given: grey unless some image has colour (one mode for the folder)
        arrays = [out[k] for k in ("x", "x_test") if k in out]
        if all((a[:, 0] == a[:, 1]).all() and (a[:, 1] == a[:, 2]).all() for a in arrays):
            for k in ("x", "x_test"):
                if k in out:
                    out[k] = np.ascontiguousarray(out[k][:, :1])
    if "x_test" in out and out["x_test"].shape[1:] != out["x"].shape[1:]:
        raise DataError(f"test/ images are {out['x_test'].shape[2]}x{out['x_test'].shape[3]}, train/ images "
                        f"{out['x'].shape[2]}x{out['x'].shape[3]}; give one size (--image-size HxW)")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, classes=np.array(classes), **out)
        os.replace(tmp, cache)  # atomic: concurrent workers never read half a file
    except OSError:
        pass  # a read-only cache only costs decoding again
    return out | {"classes": classes}
