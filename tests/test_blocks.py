from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nas.blocks import BLOCKS
from nas.builder import build
from nas.config import ArchConfig, BlockConfig
from nas.measure import export_onnx

CASES = [(name, spatial, stride) for name in sorted(BLOCKS) for spatial in ("2d", "1d") for stride in (1, 2)
         if not (name == "factorized" and spatial == "1d")]


def _arch(block: str, spatial: str, stride: int) -> ArchConfig:
    size = (8, 8) if spatial == "2d" else (1, 40)
    # Two blocks: the first changes width (projection paths), the second keeps it (residual paths).
    blocks = (BlockConfig(block, 12, 3, stride, 2, stage=0), BlockConfig(block, 12, 5, 1, 2, stage=1))
    return ArchConfig(2, 5, size, spatial, 8, blocks)


@pytest.mark.parametrize("block,spatial,stride", CASES)
def test_block_forward_backward_and_onnx_export(block, spatial, stride, tmp_path):
    torch.manual_seed(0)
    arch = _arch(block, spatial, stride)
    model = build(arch)
    x = torch.randn(4, 2, *arch.input_size)
    out = model(x)
    assert out.shape == (4, 5)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    example = x[:1]
    path = export_onnx(model, example, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    with torch.no_grad():
        want = model(example).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_factorized_block_refuses_1d():
    with pytest.raises(ValueError, match="2-D input"):
        build(_arch("factorized", "1d", 1))


def test_flatten_head_sees_downsampled_size():
    arch = ArchConfig(1, 10, (1, 40), "1d", 8, (BlockConfig("conv", 16, 5, 2), BlockConfig("conv", 16, 5, 2)), head="flatten")
    model = build(arch)
    assert model.classifier.in_features == 16 * 1 * 10
    assert model(torch.randn(2, 1, 1, 40)).shape == (2, 10)
