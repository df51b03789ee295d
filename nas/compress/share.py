"""Cross-layer parameter sharing (ALBERT-style): blocks of a stage with identical shapes share
one set of weights. Structural: the builder ties the modules (``ArchConfig.share``), the
packed file stores each shared tensor once, and structured pruning keeps tied channels tied."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from nas.compress.registry import Method, register_method
from nas.methods import ShareConfig

if TYPE_CHECKING:
    from nas.config import ArchConfig
    from nas.methods import CompressionConfig

__all__ = ["Share"]


@register_method
class Share(Method):
    config, phase = ShareConfig, "none"
    example, effect = {"share": True}, ("params", "bytes")

    def build_arch(self, arch: ArchConfig, cfg: CompressionConfig) -> ArchConfig:
        return dataclasses.replace(arch, share=True)
