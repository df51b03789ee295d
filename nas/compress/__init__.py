"""Compression methods, one module each, registered in :mod:`nas.compress.registry`.

Importing this package registers every method and codec; a new method is a new module listed
here (see the README's "Adding a compression method").
"""

from nas.compress import (  # noqa: F401
    cluster,
    distill,
    huffman,
    lowrank,
    passes,
    prune,
    quantize,
    share,
    sparsity,
    weight_only,
)
from nas.compress.registry import (
    CODECS,
    METHODS,
    Codec,
    Gene,
    Method,
    register_codec,
    register_method,
)

__all__ = ["METHODS", "CODECS", "Method", "Gene", "Codec", "register_method", "register_codec"]
