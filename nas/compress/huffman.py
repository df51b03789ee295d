"""Canonical Huffman coding of small-alphabet symbol streams (cluster indices, int codes).

Written here rather than taken from a library: the packed file needs canonical codes whose
exact bit length is known (it *is* the size objective) and a decoder that needs only the code
lengths stored in the header; the Python Huffman packages either pickle their tables or do
not expose canonical code lengths.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.compress.registry import Method, register_method
from nas.methods import HuffmanConfig

if TYPE_CHECKING:
    from nas.methods import CompressionConfig
    from nas.compress.pack import WeightPlan

__all__ = ["code_lengths", "encode", "decode", "Huffman"]


def code_lengths(symbols: np.ndarray) -> dict[int, int]:
    """Huffman code length for every symbol that occurs (a lone symbol gets length 1)."""
    values, counts = np.unique(symbols, return_counts=True)
    if len(values) == 1:
        return {int(values[0]): 1}
    tie = itertools.count()
    heap = [(int(c), next(tie), [int(v)]) for v, c in zip(values, counts)]
    heapq.heapify(heap)
    lengths = {int(v): 0 for v in values}
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, next(tie), s1 + s2))
    return lengths


def _canonical(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length), canonical order: by length, then symbol."""
    codes = {}
    code, prev_len = 0, 0
    for sym, length in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= length - prev_len
        codes[sym] = (code, length)
        code += 1
        prev_len = length
    return codes


def encode(symbols: np.ndarray) -> tuple[bytes, dict[int, int], int]:
    """Return (packed bit stream, code lengths, number of bits)."""
    lengths = code_lengths(symbols)
    codes = _canonical(lengths)
    table = {s: format(c, f"0{n}b") for s, (c, n) in codes.items()}
    bits = "".join(table[int(s)] for s in symbols.ravel())
    arr = np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")
    return np.packbits(arr).tobytes(), lengths, len(bits)


def decode(data: bytes, lengths: dict[int, int], n_symbols: int, n_bits: int) -> np.ndarray:
    codes = _canonical(lengths)
    lookup = {(n, c): s for s, (c, n) in codes.items()}
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:n_bits]
    out = np.empty(n_symbols, dtype=np.int64)
    code = length = k = 0
    for b in bits.tolist():
        code = (code << 1) | b
        length += 1
        sym = lookup.get((length, code))
        if sym is not None:
            out[k] = sym
            k += 1
            code = length = 0
    if k != n_symbols:
        raise ValueError(f"Huffman stream decoded {k} symbols, expected {n_symbols}")
    return out


@register_method
class Huffman(Method):
    """Huffman-code the stored integer codes or codebook indices (float weights have none)."""

    config = HuffmanConfig
    example, effect = {"huffman": True, "quant": "int4"}, ("bytes",)

    def plan(self, plan: WeightPlan, layer: str, model: Any, cfg: CompressionConfig) -> WeightPlan:
        return dataclasses.replace(plan, entropy=True)

    def value_dependent(self, cfg: CompressionConfig) -> bool:
        return True  # code lengths follow the trained symbol frequencies
