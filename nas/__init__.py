"""nas: compression-aware neural architecture search.

Architecture and compression are searched together; every cost is measured on what would
ship (ONNX Runtime latency, bytes of the packed weights file).
"""

from nas.config import ArchConfig, BlockConfig, Candidate, CompressionConfig, Recipe
from nas.errors import NasError
from nas.pipeline import Task, TrialResult, evaluate
from nas.space import Space, load_space
from nas.verify import load_bundle

__all__ = [
    "ArchConfig",
    "BlockConfig",
    "Candidate",
    "CompressionConfig",
    "NasError",
    "Recipe",
    "Space",
    "Task",
    "TrialResult",
    "evaluate",
    "load_bundle",
    "load_space",
]
__version__ = "0.1.0"
