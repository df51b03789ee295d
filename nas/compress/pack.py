"""The packed weights file: the bytes that ``size_bytes`` counts.

Layout: ``b"NASPACK1"``, a little-endian u32 header length, a zlib-compressed JSON header
(tensor names, shapes, encodings, offsets, Huffman code lengths) and the payload. Weight
tensors are stored by their plan: raw fp32/fp16, integer codes bit-packed at 8/4/2 bits with
one fp32 scale per output channel, ternary (2 bits) and binary (1 bit) codes with scales, or
cluster indices into a codebook; optionally only the nonzero entries behind a 1-bit mask
(unstructured sparsity) and optionally Huffman-coded. Scales and codebooks are stored in fp16
when their values are fp16 values (quantization and clustering put them there). Shared tensors
(cross-layer sharing) are stored once and aliased. A BatchNorm is stored as its inference form,
one scale and one shift per channel (its running mean and variance folded in), and decodes to
a BatchNorm with zero mean and unit variance. Everything else (biases) is fp32, or fp16 when
the model's weights are quantized (and then the BatchNorm vectors too).

:func:`unpack_state` decodes the file into a state dict; loading it into the model built from
the same candidate gives the compressed model's outputs exactly.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import nas.compress.huffman as huffman
from nas.compress.quantize import dequantize_codes, quantize_codes
from nas.compress.registry import CODECS

__all__ = ["WeightPlan", "pack_state", "unpack_state", "write_file"]

MAGIC = b"NASPACK1"
BN_EPS = 1e-5  # every BatchNorm the builder makes uses PyTorch's default eps
CODEBOOK = "cluster"  # the encoding name of codebook indices in the header
_FLOAT_DTYPE = {32: np.float32, 16: np.float16}


@dataclass(frozen=True)
class WeightPlan:
    """How one weight tensor is stored: its codec (precision), or a codebook of
    ``2**codebook_bits`` values; entropy-coded symbols; only the nonzeros behind a bit mask.
    Each compression method fills in its own field (:meth:`Method.plan`)."""

    codec: str = "fp32"
    codebook_bits: int = 0
    entropy: bool = False
    sparse: bool = False


def _pack_bits(symbols: np.ndarray, bits: int) -> bytes:
    if symbols.size == 0:
        return b""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    matrix = ((symbols.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(matrix.ravel()).tobytes()


def _unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits].reshape(n, bits).astype(np.int64)
    return flat @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))


class _Writer:
    def __init__(self) -> None:
        self.payload = bytearray()

    def put(self, data: bytes) -> list[int]:
        off = len(self.payload)
        self.payload += data
        return [off, len(data)]


def _encode_symbols(w: _Writer, entry: dict, symbols: np.ndarray, bits: int, use_huffman: bool) -> None:
    entry["b"] = bits
    entry["n_sym"] = int(symbols.size)
    if use_huffman and symbols.size:
        stream, lengths, n_bits = huffman.encode(symbols)
        if n_bits < symbols.size * bits:  # else the plain codes are smaller (and need no table)
            # code lengths by symbol, 0 for absent symbols
            entry["h"] = [int(lengths.get(i, 0)) for i in range(max(lengths) + 1)]
            entry["nb"] = n_bits
            entry["sy"] = w.put(stream)
            return
    entry["sy"] = w.put(_pack_bits(symbols, bits))


def _decode_symbols(payload: bytes, entry: dict) -> np.ndarray:
    off, n = entry["sy"]
    data = payload[off : off + n]
    if "h" in entry:
        table = entry["h"]
        lengths = ({s: ln for s, ln in table} if table and isinstance(table[0], list)  # version 1 files
                   else {s: ln for s, ln in enumerate(table) if ln})
        return huffman.decode(data, lengths, entry["n_sym"], entry["nb"])
    return _unpack_bits(data, entry["b"], entry["n_sym"])


def _put_floats(w: _Writer, entry: dict, flag: str, values: np.ndarray) -> list[int]:
    """Store float values as fp16 when that is exact (``entry[flag] = 16``), else fp32."""
    v32 = np.asarray(values, dtype=np.float32)
    if np.array_equal(v32.astype(np.float16).astype(np.float32), v32):
        entry[flag] = 16
        return w.put(v32.astype(np.float16).tobytes())
    return w.put(v32.tobytes())


def _batchnorms(state: dict[str, torch.Tensor]) -> set[str]:
    """Prefixes of the BatchNorm layers in a state dict (weight, bias and running statistics)."""
    return {k.removesuffix(".running_var") for k in state if k.endswith(".running_var")
            and all(f"{k.removesuffix('.running_var')}.{p}" in state for p in ("weight", "bias", "running_mean"))}


def _encode_batchnorm(w: _Writer, entry: dict, state: dict[str, torch.Tensor], prefix: str, other: str) -> None:
    var, mean = state[f"{prefix}.running_var"].double(), state[f"{prefix}.running_mean"].double()
    scale = state[f"{prefix}.weight"].detach().double() / torch.sqrt(var + BN_EPS)
    shift = state[f"{prefix}.bias"].detach().double() - mean * scale
    entry["e"], entry["d"] = "bn", CODECS[other].bits
    entry["v"] = w.put(torch.cat([scale, shift]).numpy().astype(_FLOAT_DTYPE[CODECS[other].bits]).tobytes())


def _decode_batchnorm(payload: bytes, entry: dict) -> dict[str, torch.Tensor]:
    off, ln = entry["v"]
    (c,) = entry["s"]
    v = torch.from_numpy(np.frombuffer(payload[off : off + ln], dtype=_FLOAT_DTYPE[entry["d"]]).astype(np.float32))
    p = entry["n"]
    return {f"{p}.weight": v[:c].clone(), f"{p}.bias": v[c:].clone(), f"{p}.running_mean": torch.zeros(c),
            f"{p}.running_var": torch.full((c,), 1.0 - BN_EPS)}


def _encode_weight(w: _Writer, entry: dict, t: torch.Tensor, plan: WeightPlan) -> None:
    flat = t.detach().float().reshape(-1)
    mask = None
    codec = CODECS[plan.codec]
    if plan.sparse or (codec.halves and not plan.codebook_bits and bool((flat == 0).any())):
        # (codes without a zero symbol, like binary's: zeros need the mask)
        mask = (flat != 0).numpy()
        entry["m"] = w.put(np.packbits(mask.astype(np.uint8)).tobytes())
    if plan.codebook_bits:
        vals = flat.numpy() if mask is None else flat.numpy()[mask]
        codebook, idx = np.unique(vals, return_inverse=True)
        if len(codebook) > 2**plan.codebook_bits:
            raise ValueError(f"{entry['n']}: {len(codebook)} distinct values exceed a {plan.codebook_bits}-bit codebook")
        entry["e"] = CODEBOOK
        entry["cb"] = _put_floats(w, entry, "cd", codebook)
        _encode_symbols(w, entry, idx.astype(np.int64), plan.codebook_bits, plan.entropy)
    elif codec.kind == "int":
        codes, scale = quantize_codes(t, codec.name)
        entry["e"] = codec.name
        entry["sc"] = _put_floats(w, entry, "sd", scale.numpy())
        c = codes.reshape(-1).numpy().astype(np.int64)
        if mask is not None:
            c = c[mask]
        entry["zo"] = codec.offset
        _encode_symbols(w, entry, codec.symbols(c), codec.bits, plan.entropy)
    else:
        vals = flat.numpy() if mask is None else flat.numpy()[mask]
        entry["e"] = codec.name
        entry["v"] = w.put(vals.astype(_FLOAT_DTYPE[codec.bits]).tobytes())


def _decode_weight(payload: bytes, entry: dict) -> torch.Tensor:
    shape = entry["s"]
    n = int(np.prod(shape)) if shape else 1
    mask = None
    if "m" in entry:
        off, ln = entry["m"]
        mask = np.unpackbits(np.frombuffer(payload[off : off + ln], dtype=np.uint8))[:n].astype(bool)
    enc = entry["e"]
    if enc == CODEBOOK:
        off, ln = entry["cb"]
        codebook = np.frombuffer(payload[off : off + ln], dtype=_FLOAT_DTYPE[entry.get("cd", 32)])
        vals = codebook[_decode_symbols(payload, entry)]
    elif CODECS[enc].kind == "float":
        off, ln = entry["v"]
        vals = np.frombuffer(payload[off : off + ln], dtype=_FLOAT_DTYPE[CODECS[enc].bits]).astype(np.float32)
    else:
        sym = _decode_symbols(payload, entry)
        codes_nz = CODECS[enc].codes(sym)
        codes = np.zeros(n, dtype=np.int64)
        if mask is None:
            codes = codes_nz
        else:
            codes[mask] = codes_nz
        off, ln = entry["sc"]
        scale = torch.from_numpy(np.frombuffer(payload[off : off + ln], dtype=_FLOAT_DTYPE[entry.get("sd", 32)])
                                 .astype(np.float32))
        t = dequantize_codes(torch.from_numpy(codes.reshape(shape)).to(torch.int8), scale)
        return t.reshape(shape).float()
    full = np.zeros(n, dtype=np.float32)
    if mask is None:
        full = vals.astype(np.float32)
    else:
        full[mask] = vals
    return torch.from_numpy(full.reshape(shape).copy())


def pack_state(state: dict[str, torch.Tensor], plans: dict[str, WeightPlan], other: str = "fp32") -> bytes:
    """Encode a state dict: tensors named in ``plans`` by their plan, the rest as ``other``
    (``fp32`` or ``fp16``). ``num_batches_tracked`` counters are not needed for inference."""
    w = _Writer()
    entries = []
    first_name: dict[tuple, str] = {}
    bns = _batchnorms(state)
    bn_parts = {f"{p}.{s}" for p in bns for s in ("weight", "bias", "running_mean", "running_var")}
    for name, t in state.items():
        if name.endswith("num_batches_tracked") or (name in bn_parts and not name.endswith(".running_var")):
            continue
        if name in bn_parts:  # a BatchNorm, stored once as its per-channel scale and shift
            prefix = name.removesuffix(".running_var")
            key = ("bn", state[f"{prefix}.weight"].data_ptr())
            entry = {"n": prefix, "s": list(t.shape)}
            if key in first_name:
                entry.update(a=first_name[key], e="bn")
            else:
                first_name[key] = prefix
                _encode_batchnorm(w, entry, state, prefix, other)
            entries.append(entry)
            continue
        # the same memory, shape, strides and dtype: a shared parameter (not just a view of one buffer)
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else (id(t), (), (), t.dtype)
        entry: dict = {"n": name, "s": list(t.shape)}
        if key in first_name:  # a shared tensor: store once
            entry["a"] = first_name[key]
            entries.append(entry)
            continue
        first_name[key] = name
        _encode_weight(w, entry, t, plans.get(name, WeightPlan(codec=other)))
        entries.append(entry)
    header = zlib.compress(json.dumps({"v": 2, "t": entries}, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<I", len(header)) + header + bytes(w.payload)


def unpack_state(blob: bytes) -> dict[str, torch.Tensor]:
    if blob[:8] != MAGIC:
        raise ValueError("not a nas packed weights file (bad magic)")
    (hlen,) = struct.unpack("<I", blob[8:12])
    header = json.loads(zlib.decompress(blob[12 : 12 + hlen]))
    payload = blob[12 + hlen :]
    out: dict[str, torch.Tensor] = {}
    for entry in header["t"]:
        if entry.get("e") == "bn":
            if "a" in entry:
                out.update({f"{entry['n']}.{s}": out[f"{entry['a']}.{s}"] for s in ("weight", "bias", "running_mean", "running_var")})
            else:
                out.update(_decode_batchnorm(payload, entry))
            continue
        out[entry["n"]] = out[entry["a"]] if "a" in entry else _decode_weight(payload, entry)
    return out


def write_file(path: str | os.PathLike[str], blob: bytes) -> int:
    """Write atomically (temp file, then rename); return the file's length in bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return path.stat().st_size


def tensor_bytes(blob: bytes) -> dict[str, int]:
    """Payload bytes each tensor occupies in a packed file (aliases of shared tensors: 0)."""
    (hlen,) = struct.unpack("<I", blob[8:12])
    header = json.loads(zlib.decompress(blob[12 : 12 + hlen]))
    out = {}
    for e in header["t"]:
        out[e["n"]] = sum(e[k][1] for k in ("m", "cb", "sc", "sy", "v") if k in e)
    return out
