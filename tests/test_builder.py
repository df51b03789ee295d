"""Building networks from an ArchConfig (nas.builder): shapes, sharing, output size."""

from __future__ import annotations

import torch

from nas.builder import build, output_size, shared_with
from nas.config import ArchConfig, BlockConfig

BLOCKS = (BlockConfig("conv", 16, 3, 1, stage=0), BlockConfig("mbconv", 16, 3, 1, 2, stage=0),
          BlockConfig("mbconv", 16, 3, 1, 2, stage=0), BlockConfig("dsconv", 24, 3, 2, stage=1))


def test_build_gives_logits_for_2d_and_1d_inputs():
    two = build(ArchConfig(1, 10, (8, 8), "2d", 8, BLOCKS)).eval()
    assert two(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    one = build(ArchConfig(1, 7, (1, 40), "1d", 8, BLOCKS, head="flatten")).eval()
    assert one(torch.zeros(2, 1, 1, 40)).shape == (2, 7)


def test_sharing_ties_identical_blocks_of_a_stage_only():
    arch = ArchConfig(1, 10, (8, 8), "2d", 8, BLOCKS, share=True)
    assert shared_with(arch) == [0, 1, 1, 3]  # the second mbconv uses the first one's weights
    shared, plain = build(arch), build(ArchConfig(1, 10, (8, 8), "2d", 8, BLOCKS))
    assert shared.body[1] is shared.body[2]
    n = sum(p.numel() for p in shared.parameters())
    assert n < sum(p.numel() for p in plain.parameters())
    assert shared_with(ArchConfig(1, 10, (8, 8), "2d", 8, BLOCKS)) == [0, 1, 2, 3]


def test_output_size_follows_the_strides():
    assert output_size(ArchConfig(1, 10, (8, 8), "2d", 8, BLOCKS)) == (4, 4)
    assert output_size(ArchConfig(1, 10, (1, 40), "1d", 8, BLOCKS)) == (1, 20)
