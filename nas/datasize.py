"""How much a dataset a bundle's manifest names would load, told from headers alone: verify
refuses one over :data:`MAX_DATASET_BYTES` before anything is read in full (a manifest's
author chooses the host path)."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

from nas.errors import BundleError, NasError

__all__ = ["check_dataset_size", "memory_budget", "MAX_DATASET_BYTES", "MAX_NPZ_MEMBERS", "MAX_FOLDER_ENTRIES"]


# What verify may load for the dataset a manifest names (a host path the bundle's author
# chose): counted as the float32 arrays it becomes, before anything is read in full.
MAX_DATASET_BYTES = 2**31


MAX_NPZ_MEMBERS = 64


def memory_budget() -> int:
    """What ``nas search`` may load for a user's own ``.npz`` (as float32): half this host's
    physical memory (a header declaring 10^12 elements would otherwise ask numpy for 3.6 TiB)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # not a POSIX host
        return 2**33


MAX_FOLDER_ENTRIES = 2_000_000


def _npy_declared(fh: Any, what: str, error: type = BundleError) -> int:
    """Bytes the array of an ``.npy`` stream declares (as float32 at least), from its header alone."""
    import numpy as np

    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        shape, _fortran, dtype = (fmt.read_array_header_1_0(fh) if version == (1, 0) else fmt.read_array_header_2_0(fh))
    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile, SyntaxError, TypeError) as exc:
        raise error(f"{what} has no readable array header ({type(exc).__name__})") from exc
    n = 1
    for d in shape:
        n *= int(d)
    return n * max(dtype.itemsize, 4)


def check_dataset_size(name: str, limit: int | None = None, *, error: type = BundleError,
                       who: str = "the dataset the manifest names") -> None:
    """Refuse a dataset that would take more than ``limit`` bytes (default
    :data:`MAX_DATASET_BYTES`) once loaded, judged before it is read: a ``.npz`` (or ``.npy``
    under that name) by the shapes and dtypes its array headers declare (each zip member
    inflated no further than its header) and the sizes of its other members; an image folder
    by its images' dimensions, read from their headers. Names the loader does not read as a
    file (``digits``, ``mnist1d``, idx folders, unknown names) pass: the loader bounds or
    rejects those itself. ``error``/``who``: the exception raised and how the dataset is named
    (``nas search`` checks a user's own ``.npz`` the same way, as a :class:`DataError`)."""
    import os
    import stat

    limit = MAX_DATASET_BYTES if limit is None else limit
    from nas.images import IMAGE_SUFFIXES, is_folder_dataset, parse_size, split_id

    def over(total: int, what: str) -> NasError:
        return error(f"{what}: {who} would take more than {limit:,} bytes to load "
                           f"({total:,} or more declared); refused")

    if name in ("digits", "mnist1d"):
        return
    if is_folder_dataset(name):
        folder, opts = split_id(name)
        try:
            size = parse_size(opts["size"]) if "size" in opts else None
        except NasError:  # a bad option: the loader says so in its own words
            return
        channels = 1 if opts.get("mode") == "grey" else 3  # decoded as RGB unless grey is asked for
        total = entries = 0
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            entries += len(dirnames) + len(filenames)
            if entries > MAX_FOLDER_ENTRIES:
                raise error(f"{folder}: {who} (a folder) holds more than "
                                  f"{MAX_FOLDER_ENTRIES:,} entries; refused")
            for f in filenames:
                if f.startswith(".") or Path(f).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                p = Path(dirpath) / f
                try:
                    if not stat.S_ISREG(os.stat(p).st_mode):
                        continue  # (FIFOs, devices: never opened; the loader skips them too)
                except OSError:
                    continue
                if size is not None:
                    h, w = size
                else:
                    h = w = 0
                    try:
                        from PIL import Image

                        with Image.open(p, formats=["PNG", "JPEG"]) as im:  # the header only
                            w, h = im.size
                    except Exception:  # noqa: BLE001 - unreadable: the loader names the file
                        pass
                total += int(h) * int(w) * channels * 4
                if total > limit:
                    raise over(total, folder)
        return
    p = Path(name)
    try:
        if p.suffix != ".npz" or not p.is_file():
            return
        with open(p, "rb") as fh:
            head = fh.read(6)
            if head == b"\x93NUMPY":  # np.load reads a bare .npy whatever its name
                fh.seek(0)
                total = _npy_declared(fh, str(p), error)
                if total > limit:
                    raise over(total, str(p))
                return
    except OSError:
        return  # the loader reports it
    if not zipfile.is_zipfile(p):
        return
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError):
        return
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS:
            raise error(f"{p}: {who} holds {len(infos):,} arrays (at most "
                              f"{MAX_NPZ_MEMBERS} are read); refused")
        total = 0
        for info in infos:
            if info.filename.endswith(".npy"):
                try:
                    with zf.open(info) as fh:
                        total += max(_npy_declared(fh, f"{p}: {info.filename}", error), info.file_size)
                except (zipfile.BadZipFile, OSError, NotImplementedError, zlib.error, RuntimeError) as exc:
                    raise error(f"{p}: {info.filename} cannot be read ({type(exc).__name__})") from exc
            else:
                total += info.file_size  # read whole by np.load, no further than its declared size
            if total > limit:
                raise over(total, str(p))
