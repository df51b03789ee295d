"""Compression methods, one module each, registered in :mod:`nas.compress.registry`.

Importing this package registers every built-in method and codec: each module is imported here
by name (as timm's ``models/__init__.py`` does), so what is registered is what this file lists.
A method of your own is one module holding its config class and handler; importing it registers
both (see the README's "Adding a compression method").
"""

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

__all__ = ["METHODS", "CODECS", "Method", "Codec", "register_method", "register_codec"]
