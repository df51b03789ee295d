"""Compression methods, one module each, registered in :mod:`nas.compress.registry`.

Importing this package registers every method and codec: every module in this folder is
imported, so a new method is a new module and nothing else (see the README's "Adding a
compression method").
"""

import importlib as _importlib
import pkgutil as _pkgutil

from nas.compress.registry import (
    CODECS,
    METHODS,
    Codec,
    Gene,
    Method,
    register_codec,
    register_method,
)

_importlib.import_module(f"{__name__}.passes")  # first: deploy and passes import each other
for _info in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "CODECS", "Method", "Gene", "Codec", "register_method", "register_codec"]
