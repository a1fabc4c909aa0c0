"""The packed layouts of docs/FORMATS.md in code: quantized weights and residual rows.

One place that packs and unpacks, shared by the quantizers that write these tensors (`models/`)
and by the kernels' CPU references (`ops/`). Pure PyTorch on the CPU; no Numba, so importing it
never touches CUDA.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (3, 4)
PACK_INPUTS = 32  # inputs per packing unit: 3-bit packs 32 inputs into 3 int32 words
WORD_BITS = 32  # qweight words are int32
NIBBLE_OFFSET = 8  # a residual code is stored as code + 8, so every nibble is unsigned (8 means 0)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_width(in_features: int) -> None:
    if in_features <= 0 or in_features % PACK_INPUTS:
        raise ValueError(
            f"input width must be a positive multiple of {PACK_INPUTS} to pack, got {in_features}"
        )


def words_to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _or_fields(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Pack the last dim of `fields` (each < 2**width) into one word, field j at bits width*j."""
    shifts = torch.arange(fields.shape[-1], dtype=torch.int64, device=fields.device) * width
    # the fields occupy disjoint bits, so a sum is a bitwise OR
    return (fields.to(torch.int64) << shifts).sum(-1)


def _split_fields(words: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of `_or_fields` on int32 words [...] -> uint8 fields [..., count]. The mask drops the
    copies of the sign bit that a right shift of a negative int32 brings in, so the words need no
    widening to int64."""
    shifts = torch.arange(count, dtype=torch.int32, device=words.device) * width
    return ((words[..., None] >> shifts) & ((1 << width) - 1)).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [out, in] (each in [0, 2**bits)) into int32 words [out, in * bits / 32].

    4-bit: word w holds inputs 8w..8w+7, input 8w+j at bits 4j..4j+3.
    3-bit: per 32 inputs, word 0 = low 2 bits of inputs 0..15 (input j at bits 2j, 2j+1),
    word 1 = low 2 bits of inputs 16..31, word 2 = high bit of inputs 0..31 (input j at bit j).
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    out_features, in_features = codes.shape
    _check_width(in_features)
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    if bits == 4:
        words = _or_fields(codes.reshape(out_features, -1, WORD_BITS // 4), 4)
    else:
        units = codes.reshape(out_features, -1, PACK_INPUTS)  # [out, in/32, 32]
        low = units & 0b11
        half = PACK_INPUTS // 2  # 16 two-bit fields per word
        words = torch.stack(
            [
                _or_fields(low[..., :half], 2),  # word 0: low bits of inputs 0..15
                _or_fields(low[..., half:], 2),  # word 1: low bits of inputs 16..31
                _or_fields(units >> 2, 1),  # word 2: high bits of inputs 0..31
            ],
            dim=-1,
        )  # [out, in/32, 3]
    return words_to_int32(words.reshape(out_features, -1))


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 [out, in * bits / 32] -> uint8 codes [out, in]."""
    _check_bits(bits)
    _check_width(in_features)
    if qweight.dim() != 2 or qweight.shape[1] * WORD_BITS != in_features * bits:
        raise ValueError(
            f"qweight of shape {tuple(qweight.shape)} does not hold {in_features} inputs "
            f"at {bits} bits"
        )
    out_features = qweight.shape[0]
    if bits == 4:
        codes = _split_fields(qweight, 4, WORD_BITS // 4)  # [out, in/8, 8]
    else:
        units = qweight.reshape(out_features, -1, 3)  # [out, in/32, (low 0..15, low 16..31, high)]
        half = PACK_INPUTS // 2
        low = torch.cat(
            [_split_fields(units[..., 0], 2, half), _split_fields(units[..., 1], 2, half)], dim=-1
        )
        codes = low | (_split_fields(units[..., 2], 1, PACK_INPUTS) << 2)  # [out, in/32, 32]
    return codes.reshape(out_features, in_features)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """codes [out, in] with per-(row, group) scales/zeros [out, n_groups] -> float32 (q - zero) * scale.
    Per group with broadcast scales and zeros (a zero-padded partial last group is dropped again):
    a per-element gather of them costs many times more."""
    out_features, in_features = codes.shape
    n_groups = scales.shape[-1]
    groups = torch.nn.functional.pad(codes, (0, n_groups * group_size - in_features)).reshape(out_features, n_groups, -1)
    deq = groups.float().sub_(zeros.float()[..., None]).mul_(scales.float()[..., None])
    return deq.reshape(out_features, -1)[:, :in_features]


def dequantize(qweight, scales, zeros, bits: int, in_features: int, group_size: int = 128) -> torch.Tensor:
    """Packed int32 qweight -> float32 W' [out, in]."""
    return dequantize_codes(unpack_codes(qweight, bits, in_features), scales, zeros, group_size)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes [out, in] -> uint8 rows [in, ceil(out / 2)]: byte j of row i holds output 2j in
    its low nibble and output 2j+1 in its high nibble. An odd last output is padded with a zero
    residual (nibble 8), so a reader that decodes the pad gets 0, never garbage."""
    nibbles = (codes.T.to(torch.int16) + NIBBLE_OFFSET).to(torch.uint8)  # [in, out]
    if nibbles.shape[1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=NIBBLE_OFFSET)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_rows(rows: torch.Tensor, out_features: int) -> torch.Tensor:
    """uint8 rows [k, ceil(out / 2)] -> signed codes float32 [k, out] (padding dropped)."""
    nibbles = torch.stack([rows & 0x0F, rows >> 4], dim=-1).reshape(rows.shape[0], -1)
    return nibbles[:, :out_features].float() - NIBBLE_OFFSET
