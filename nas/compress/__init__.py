"""Compression methods, one module each, registered in :mod:`nas.compress.registry`.

Importing this package registers every built-in method and codec: each module is imported here
by name (as timm's ``models/__init__.py`` does), so what is registered is what this file lists.
A method of your own is one module holding its config class and handler; importing it registers
both, and every command (and Ray worker) imports the modules that ``$NAS_PLUGINS`` names
(comma-separated, importable from ``sys.path``) and those of the ``nas.plugins`` entry-point
group, after the built-ins (see the README's "Adding a compression method").
"""

import importlib as _importlib
import os as _os
from importlib import metadata as _metadata

from nas.compress import (  # noqa: F401 - imported to register their methods and codecs
    cluster,
    distill,
    early_exit,
    huffman,
    lowrank,
    passes,
    prune,
    quantize,
    share,
    sparsity,
    weight_only,
)
from nas.compress.registry import CODECS, METHODS, Codec, Method, register_codec, register_method
from nas.errors import ConfigError

__all__ = ["METHODS", "CODECS", "Method", "Codec", "register_method", "register_codec", "load_plugins"]


def load_plugins() -> list[str]:
    """Import the compression methods of your own that ``$NAS_PLUGINS`` and the ``nas.plugins``
    entry points name (once each); returns the module names imported."""
    names = [n.strip() for n in _os.environ.get("NAS_PLUGINS", "").split(",") if n.strip()]
    names += [ep.value.split(":")[0] for ep in _metadata.entry_points(group="nas.plugins")]
    for name in names:
        try:
            _importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"compression plugin {name!r} (from $NAS_PLUGINS or a nas.plugins entry point) "
                              f"cannot be imported: {exc}") from exc
    return names


load_plugins()
