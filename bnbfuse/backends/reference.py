"""Pure-PyTorch reference kernels: the specification the native kernels are tested against.

They run on any device and are registered as ``CompositeExplicitAutograd``, so they serve
every device that has no native kernel. They favour clarity over speed.
"""
from __future__ import annotations

import torch

# ---- blockwise quantization ----------------------------------------------------------------


def nearest_thresholds(code: torch.Tensor):
    """(thresholds, order) such that nearest-in-map = order[searchsorted(thr, x, right=True)].

    thr[k] is the smallest float32 >= the exact midpoint of the k-th and (k+1)-th sorted map
    values, so ``x >= thr[k]`` is exact for float32 x and ties go to the larger value.
    """
    values, order = torch.sort(code.to(torch.float32), stable=True)
    mid = (values[:-1].double() + values[1:].double()) / 2
    thr = mid.float()
    thr = torch.where(thr.double() < mid, torch.nextafter(thr, torch.tensor(float("inf"), device=thr.device)), thr)
    return thr, order


def quantize_to_map(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the value of ``code`` nearest each element of fp32 ``x``."""
    thr, order = nearest_thresholds(code.to(x.device))
    return order[torch.searchsorted(thr, x.reshape(-1).contiguous(), right=True).clamp_(max=255)] \
        .to(torch.uint8).view(x.shape)


def _blocks(A: torch.Tensor, blocksize: int) -> torch.Tensor:
    """A flattened to fp32 and zero-padded to whole blocks, shape (blocks, blocksize)."""
    flat = A.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def block_divisor(absmax: torch.Tensor) -> torch.Tensor:
    """absmax, with 1 for all-zero blocks so that 0/0 never happens."""
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = A.numel()
    x = _blocks(A, blocksize)
    absmax = x.abs().amax(dim=1) if n else x.new_zeros(0)
    codes = quantize_to_map(x / block_divisor(absmax)[:, None], code)
    return codes.reshape(-1)[:n].view(A.shape), absmax


def dequantize_blockwise(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, dtype: torch.dtype):
    n = A.numel()
    codes = A.reshape(-1).long()
    pad = (-n) % blocksize
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    values = code.to(device=A.device, dtype=torch.float32)[codes].view(-1, blocksize)
    out = values * absmax.reshape(-1)[: values.shape[0], None]
    return out.reshape(-1)[:n].to(dtype).view(A.shape)


torch.library.impl("bnbfuse::quantize_blockwise", "CompositeExplicitAutograd")(quantize_blockwise)
torch.library.impl("bnbfuse::dequantize_blockwise", "CompositeExplicitAutograd")(dequantize_blockwise)


# ---- optimizer updates ---------------------------------------------------------------------
# (optimizer section)


# ---- quantized embedding lookup ------------------------------------------------------------
# (embedding section)
