"""Blockwise quantization ops: schemas, fake impls, and the exact-nearest contract.

``quantize_blockwise(A, code, blocksize) -> (codes uint8 of A's shape, absmax float32 of
ceil(n / blocksize))``: each block of the flattened ``A`` is divided by its absolute maximum
and every element gets the index of the ``code`` value nearest it (exact round-to-nearest,
ties to the larger value: :func:`nearest_thresholds`). ``dequantize_blockwise`` is
``code[codes] * absmax[block]`` in ``dtype``.
"""
from __future__ import annotations

import torch

from .library import lib

__all__ = ["nearest_thresholds", "check_code", "check_blocksize", "one_block_at_most"]

lib.define("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)")
lib.define(
    "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype)"
    " -> Tensor"
)


@torch.library.register_fake("bnbfuse::quantize_blockwise")
def _(A, code, blocksize):
    torch._check(A.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"quantize_blockwise takes float32/float16/bfloat16, got {A.dtype}")
    n = A.numel()
    blocks = -(n // -blocksize)
    return (torch.empty(A.shape, dtype=torch.uint8, device=A.device),
            torch.empty(blocks, dtype=torch.float32, device=A.device))


@torch.library.register_fake("bnbfuse::dequantize_blockwise")
def _(A, absmax, code, blocksize, dtype):
    torch._check(A.dtype == torch.uint8, lambda: f"codes must be uint8, got {A.dtype}")
    return torch.empty(A.shape, dtype=dtype, device=A.device)


def nearest_thresholds(code: torch.Tensor):
    """(thresholds, order) such that nearest-in-map = order[searchsorted(thr, x, right=True)].

    thr[k] is the smallest float32 >= the exact midpoint of the k-th and (k+1)-th sorted map
    values, so ``x >= thr[k]`` is exact for float32 x and ties go to the larger value. The
    definition of rounding shared by every quantizer in bnbfuse (blockwise, optimizer
    state, embedding tables) and mirrored by the native kernels (csrc/cpu/qmap.h).
    """
    values, order = torch.sort(code.to(torch.float32), stable=True)
    mid = (values[:-1].double() + values[1:].double()) / 2
    thr = mid.float()
    up = torch.nextafter(thr, torch.full_like(thr, float("inf")))
    return torch.where(thr.double() < mid, up, thr), order


def check_code(code: torch.Tensor, device) -> torch.Tensor:
    """The 256-value map as a contiguous float32 tensor on ``device`` (ValueError otherwise)."""
    if code.numel() != 256:
        raise ValueError(f"the quantization map must have 256 values, got {code.numel()}")
    return code.to(device=device, dtype=torch.float32).contiguous()


def one_block_at_most(n: int, blocksize: int) -> int:
    """A block longer than the tensor (or the table row) is the tensor: the same blocks,
    without padding a 5-element tensor to a blocksize of 2**63 - 1."""
    return min(blocksize, max(n, 1))


def check_blocksize(blocksize: int) -> None:
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
