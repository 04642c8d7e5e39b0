"""Reference blockwise quantization: the specification of ``bnbfuse::quantize_blockwise``
and ``bnbfuse::dequantize_blockwise`` (schemas in bnbfuse/ops/quantize.py)."""
from __future__ import annotations

import torch

from ...ops.quantize import check_map_has_no_nan, nearest_thresholds, one_block_at_most


def quantize_to_map(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the value of ``code`` nearest each element of fp32 ``x``.

    NaN counts no threshold (compares are false) and gets the smallest value's index, as in
    the native kernels; ``searchsorted`` alone would sort it above every threshold.
    """
    thr, order = nearest_thresholds(code.to(x.device))
    flat = x.reshape(-1).contiguous()
    rank = torch.searchsorted(thr, flat, right=True).clamp_(max=255).masked_fill_(flat.isnan(), 0)
    return order[rank].to(torch.uint8).view(x.shape)


def blocks_of(A: torch.Tensor, blocksize: int) -> torch.Tensor:
    """A flattened to fp32 and zero-padded to whole blocks, shape (blocks, blocksize)."""
    blocksize = one_block_at_most(A.numel(), blocksize)
    flat = A.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def block_divisor(absmax: torch.Tensor) -> torch.Tensor:
    """absmax, with 1 for all-zero blocks so that 0/0 never happens."""
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    check_map_has_no_nan(code)
    n = A.numel()
    x = blocks_of(A, blocksize)
    absmax = x.abs().amax(dim=1) if n else x.new_zeros(0)
    codes = quantize_to_map(x / block_divisor(absmax)[:, None], code)
    return codes.reshape(-1)[:n].view(A.shape), absmax


def dequantize_blockwise(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, dtype: torch.dtype):
    check_map_has_no_nan(code)
    n = A.numel()
    blocksize = one_block_at_most(n, blocksize)
    codes = A.reshape(-1).long()
    pad = (-n) % blocksize
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    values = code.to(device=A.device, dtype=torch.float32)[codes].view(-1, blocksize)
    out = values * absmax.reshape(-1)[: values.shape[0], None]
    return out.reshape(-1)[:n].to(dtype).view(A.shape)


torch.library.impl("bnbfuse::quantize_blockwise", "CompositeExplicitAutograd")(quantize_blockwise)
torch.library.impl("bnbfuse::dequantize_blockwise", "CompositeExplicitAutograd")(dequantize_blockwise)
