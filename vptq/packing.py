"""Index bit-packing in the published VPTQ layout (vptq-method.md section 2.3).

Code c of a row occupies stream bits [c*w, (c+1)*w), LSB first; the stream is cut into
32-bit little-endian words stored as int32. Main index in the low `b` bits, residual above.
"""

from __future__ import annotations

import math

import torch


def pack_indices(codes: torch.Tensor, width: int) -> torch.Tensor:
    """(..., S) non-negative ints < 2**width -> (..., ceil(S*width/32)) int32."""
    if width < 1 or width > 32:
        raise ValueError(f"code width {width} must be in 1..32")
    codes = codes.to(torch.int64)
    *lead, s = codes.shape
    shifts = torch.arange(width, device=codes.device)
    bits = ((codes.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(*lead, s * width)
    words = math.ceil(s * width / 32)
    pad = words * 32 - s * width
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*lead, words, 32).to(torch.int64)
    packed = (bits << torch.arange(32, device=codes.device)).sum(-1)  # uint32 value in int64
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_indices(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of pack_indices: (..., words) int32 -> (..., count) int64."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, device=packed.device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : count * width]
    bits = bits.reshape(*packed.shape[:-1], count, width)
    return (bits << torch.arange(width, device=packed.device)).sum(-1)


def split_codes(codes: torch.Tensor, main_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined code -> (main index, residual index); the residual is masked correctly."""
    return codes & ((1 << main_bits) - 1), codes >> main_bits


def to_int16(x: torch.Tensor) -> torch.Tensor:
    """Values 0..65535 stored with the same 16 bits in an int16 tensor."""
    x = x.to(torch.int64)
    return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)


def from_int16(x: torch.Tensor) -> torch.Tensor:
    """int16 bits reinterpreted as uint16, returned as int64."""
    return x.to(torch.int64) & 0xFFFF
