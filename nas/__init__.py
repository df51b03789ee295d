"""nas: compression-aware neural architecture search.

Architecture and compression are searched together; every cost is measured on what would
ship (ONNX Runtime latency, bytes of the packed weights file).
"""

import importlib
from typing import Any

# Imported on first use (PEP 562): `nas front` and `nas report` need no PyTorch, and importing
# it costs ~1.5 s of every command's start-up.
_LAZY = {
    "ArchConfig": "nas.config", "BlockConfig": "nas.config", "Candidate": "nas.config",
    "CompressionConfig": "nas.config", "Recipe": "nas.config", "NasError": "nas.errors",
    "Task": "nas.task", "TrialResult": "nas.pipeline", "evaluate": "nas.pipeline",
    "Space": "nas.space", "load_space": "nas.space", "load_bundle": "nas.verify",
    "search": "nas.api", "open_study": "nas.api", "SearchResult": "nas.api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nas' has no attribute {name!r}")


__all__ = [
    "ArchConfig",
    "BlockConfig",
    "Candidate",
    "CompressionConfig",
    "NasError",
    "Recipe",
    "SearchResult",
    "Space",
    "Task",
    "TrialResult",
    "evaluate",
    "load_bundle",
    "load_space",
    "open_study",
    "search",
]
__version__ = "0.1.0"
