"""Weight-only quantization at deploy time: integer-coded weights (int8 down to binary) run as
their exact decoded fp32 values, with no Q/DQ nodes and float activations.

At the scale of small models the runtime's cost is its node count, not arithmetic: an int8
QDQ graph adds a QuantizeLinear/DequantizeLinear pair around every layer, and a 3-layer
MNIST-1D network runs slower in int8 than in fp32 on ONNX Runtime's CPU kernels. The packed
file (what is stored and shipped) keeps the integer codes either way; this gene only decides
the runtime form, and then the deployed graph is exactly the packed model (its accuracy is the
packed model's). Which form pays is a searched choice, measured per candidate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nas.compress.registry import Method, register_method
from nas.methods import WeightOnlyConfig, int_codes

if TYPE_CHECKING:
    from nas.methods import CompressionConfig

__all__ = ["WeightOnly"]


@register_method
class WeightOnly(Method):
    config, phase = WeightOnlyConfig, "none"
    excludes = ("cluster",)  # active only without a codebook (its config reads cluster_bits)
    example, effect = {"quant": "int4", "weight_only": True}, ("nodes",)

    def float_deploy(self, cfg: CompressionConfig) -> str | None:
        return f"fp32 ({'/'.join(dict.fromkeys(int_codes(cfg)))} weights)"

    def card_notes(self, cfg: CompressionConfig) -> list[str]:
        return ["- Weight-only quantization: the packed integer codes run as their exact fp32 values "
                "(no Q/DQ nodes, float activations); the deployed model is exactly the packed one."]
