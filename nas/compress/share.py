"""Cross-layer parameter sharing (ALBERT-style): blocks of a stage with identical shapes share
one set of weights. Structural: the builder ties the modules (``ArchConfig.share``), the
packed file stores each shared tensor once, and structured pruning keeps tied channels tied."""

from __future__ import annotations

import dataclasses

from nas.compress.registry import Gene, Method, register_method

__all__ = ["Share"]


@register_method
class Share(Method):
    name, order, phase = "share", 0, "none"
    example, effect = {"share": True}, ("params", "bytes")
    genes = (Gene("share", False, doc="blocks of a stage with identical shapes share one set of weights"),)

    def active(self, cfg) -> bool:  # noqa: ANN001
        return bool(cfg.share)

    def build_arch(self, arch, cfg):  # noqa: ANN001, ANN201
        return dataclasses.replace(arch, share=True)

    def summary(self, cfg) -> str | None:  # noqa: ANN001
        return "share"
