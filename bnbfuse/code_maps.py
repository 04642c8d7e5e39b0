"""Quantization code maps under bitsandbytes' names (re-exported by ``bnbfuse.functional``).

Each builder returns the float32 tensor bitsandbytes 0.50 returns for the same arguments
(tests/test_bitsandbytes_compat.py compares them with the installed bitsandbytes), built here
from the format's definition:

- :func:`create_linear_map`: evenly spaced values in ``[-1, 1]`` (or ``[0, 1]``).
- :func:`create_fp8_map`: every value of a small float format (sign, exponent, mantissa bits),
  divided by the largest.
- :func:`create_normal_map`: NormalFloat, quantiles of N(0, 1) (QLoRA), without scipy.
- :func:`get_4bit_type`: the 16-value maps of the 4-bit formats, in code order.

Example:
    >>> from bnbfuse import functional as F
    >>> F.create_linear_map(signed=True).shape
    torch.Size([256])
    >>> [round(v, 4) for v in F.get_4bit_type("fp4", device="cpu")[:4].tolist()]
    [0.0, 0.0052, 0.6667, 1.0]
"""
from __future__ import annotations

import itertools

import torch

from .row_quantization import fp4_map, quant_map

__all__ = ["create_linear_map", "create_fp8_map", "create_normal_map", "get_4bit_type"]


def _pad_middle(values: torch.Tensor) -> torch.Tensor:
    """A map shorter than 256 gets zeros between its lower and upper halves (so that the
    codes of the values keep bitsandbytes' positions)."""
    gap = 256 - values.numel()
    if gap <= 0:
        return values
    half = values.numel() // 2
    zeros = torch.zeros(gap, dtype=values.dtype)
    return torch.cat([values[:half], zeros, values[half:]])


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """``2**total_bits`` evenly spaced values from -1 (0 when unsigned) to 1, float32.

    A signed map with a zero (``add_zero``, or fewer than 8 bits) has one value less, so
    that 0 is one of them. Maps of fewer than 256 values are padded with zeros in the middle.

    Example:
        >>> m = create_linear_map(signed=True, total_bits=8)
        >>> float(m[0]), float(m[127]), float(m[255])  # m[127] is the padding zero
        (-1.0, 0.0, 1.0)
    """
    count = 2**total_bits
    if signed and (add_zero or total_bits < 8):
        count -= 1
    values = torch.linspace(-1.0 if signed else 0.0, 1.0, count, dtype=torch.float32,
                            device="cpu")
    return _pad_middle(values)


def create_fp8_map(signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2,
                   total_bits: int = 8) -> torch.Tensor:
    """Every value of a float format with ``exponent_bits`` and ``precision_bits`` (mantissa),
    sorted and divided by the largest, float32 (padded with zeros to 256 below 8 bits).

    The exponent field ``e`` has bias ``b = 2**(exponent_bits - 1)``; the mantissa bits are
    the fraction ``f = sum(bit_i * 2**-(i + 1))``. ``e = 0`` is subnormal, ``f * 2**-b``;
    otherwise the value is ``(1 + f) * 2**(b + 1 - e)`` (bitsandbytes' convention: a larger
    field is a smaller value; only the ratios matter after the division).

    Raises:
        ValueError: when sign, exponent and mantissa bits do not add up to ``total_bits``,
            or a signed format has no exponent bit (bitsandbytes refuses both).

    Example:
        >>> m = create_fp8_map(signed=True, exponent_bits=4, precision_bits=3)
        >>> float(m.min()), float(m.max()), m.numel()
        (-1.0, 1.0, 256)
    """
    if exponent_bits + precision_bits != total_bits - (1 if signed else 0):
        raise ValueError(f"{'1 sign + ' if signed else ''}{exponent_bits} exponent + "
                         f"{precision_bits} mantissa bits do not make {total_bits} bits")
    if signed and exponent_bits < 1:
        raise ValueError("a signed float format needs at least one exponent bit")
    bias = 2 ** (exponent_bits - 1)
    values = []
    for field in range(2**exponent_bits):
        for bits in itertools.product((0, 1), repeat=precision_bits):
            fraction = sum(bit * 2.0 ** -(i + 1) for i, bit in enumerate(bits))
            if field == 0:
                magnitude = fraction * 2.0**-bias
            else:
                magnitude = (1 + fraction) * 2.0 ** (bias + 1 - field)
            values += [magnitude, -magnitude] if signed else [magnitude]
    values += [0.0] * max(0, 256 - len(values)) if total_bits < 8 else []
    code = torch.tensor(sorted(values), dtype=torch.float32, device="cpu")
    return code / code.max()


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The NormalFloat map (Dettmers et al., QLoRA): 256 float32 values whose non-zero ones are
    the N(0, 1) quantiles at evenly spaced probabilities from ``offset`` down to 0.5, on both
    sides (one more positive value with ``use_extra_value``), sorted and divided by the
    largest. bitsandbytes needs scipy for it; this uses ``torch.special.ndtri``.

    Example:
        >>> m = create_normal_map()
        >>> float(m[0]), float(m[-1]), int((m != 0).sum())
        (-1.0, 1.0, 15)
    """
    def quantiles(points: int) -> torch.Tensor:
        probs = torch.linspace(offset, 0.5, points, dtype=torch.float32, device="cpu")[:-1]
        return torch.special.ndtri(probs.double())

    positive = quantiles(9 if use_extra_value else 8)
    negative = -quantiles(8)
    zeros = torch.zeros(256 - positive.numel() - negative.numel(), dtype=torch.float64)
    values = torch.cat([positive, zeros, negative]).float().sort().values
    return values / values.max()


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16 values of a 4-bit format, indexed by code, scaled to ``[-1, 1]``: ``"nf4"``
    (NormalFloat) or ``"fp4"`` (1 sign, 2 exponent, 1 mantissa bit).

    ``device`` defaults to the CPU (bitsandbytes defaults to CUDA). ``blocksize`` is
    accepted for bitsandbytes' signature (it only matters for its ``"af4"``, not provided).

    Example:
        >>> get_4bit_type("nf4")[[0, 7, 15]].tolist()
        [-1.0, 0.0, 1.0]
    """
    if typename == "nf4":
        values = quant_map("nf4")
    elif typename == "fp4":
        values = fp4_map()
    else:
        raise NotImplementedError(f"4-bit type {typename!r} is not provided by bnbfuse "
                                  "(supported: 'nf4', 'fp4')")
    return values.clone().to("cpu" if device is None else device)
