"""Weight-only quantization at deploy time: integer-coded weights (int8 down to binary) run as
their exact decoded fp32 values, with no Q/DQ nodes and float activations.

At the scale of small models the runtime's cost is its node count, not arithmetic: an int8
QDQ graph adds a QuantizeLinear/DequantizeLinear pair around every layer, and a 3-layer
MNIST-1D network runs slower in int8 than in fp32 on ONNX Runtime's CPU kernels. The packed
file (what is stored and shipped) keeps the integer codes either way; this gene only decides
the runtime form, and then the deployed graph is exactly the packed model (its accuracy is the
packed model's). Which form pays is a searched choice, measured per candidate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nas.compress.registry import CODECS, Gene, Method, register_method

__all__ = ["WeightOnly"]


def _int_codes(cfg_or_genes: Any) -> list[str]:
    if isinstance(cfg_or_genes, Mapping):
        precisions = cfg_or_genes.get("stage_quant") or (cfg_or_genes.get("quant", "fp32"),)
    else:
        precisions = cfg_or_genes.precisions
    return [p for p in precisions if p in CODECS and CODECS[p].deploy == "int8"]


@register_method
class WeightOnly(Method):
    name, order, phase = "weight_only", 45, "none"
    example, effect = {"quant": "int4", "weight_only": True}, ("nodes",)
    genes = (Gene("weight_only", False, needs=("quant", "cluster_bits"),
                  matters=lambda g: bool(_int_codes(g)) and not g.get("cluster_bits", 0),
                  doc="integer-coded weights deploy as exact fp32 (no Q/DQ nodes, float activations)"),)

    def active(self, cfg) -> bool:  # noqa: ANN001
        return bool(cfg.weight_only) and not cfg.cluster_bits and bool(_int_codes(cfg))

    def float_deploy(self, cfg) -> str | None:  # noqa: ANN001
        return f"fp32 ({'/'.join(dict.fromkeys(_int_codes(cfg)))} weights)"

    def summary(self, cfg) -> str | None:  # noqa: ANN001
        return "weight-only"

    def card_notes(self, cfg) -> list[str]:  # noqa: ANN001
        return ["- Weight-only quantization: the packed integer codes run as their exact fp32 values "
                "(no Q/DQ nodes, float activations); the deployed model is exactly the packed one."]
