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


def check_lookup_args(ids, base, absmax, qmap, fusion, bits, blocksize):
    """Shape/dtype checks shared by every backend of fusion_embedding_lookup; returns (V, F, D)."""
    if ids.dtype != torch.int64:
        raise TypeError(f"fusion_embedding_lookup: ids must be int64, got {ids.dtype}")
    if bits not in (0, 4, 8):
        raise ValueError(f"fusion_embedding_lookup: bits must be 0, 4 or 8, got {bits}")
    if fusion.dim() != 2 or base.dim() != 2:
        raise ValueError("fusion_embedding_lookup: base and fusion tables must be 2-D")
    V, (F, D) = base.shape[0], fusion.shape
    if fusion.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fusion_embedding_lookup: tables must be float32/float16/bfloat16, "
                        f"got {fusion.dtype}")
    if bits == 0:
        if base.dtype != fusion.dtype or base.shape[1] != D:
            raise ValueError(f"fusion_embedding_lookup: base {tuple(base.shape)} {base.dtype} does "
                             f"not match fusion {tuple(fusion.shape)} {fusion.dtype}")
    else:
        if base.dtype != torch.uint8:
            raise TypeError(f"fusion_embedding_lookup: quantized base must be uint8, got {base.dtype}")
        cols = D if bits == 8 else (D + 1) // 2
        nblk = -(D // -blocksize) if blocksize > 0 else -1
        if blocksize < 1 or base.shape[1] != cols:
            raise ValueError(f"fusion_embedding_lookup: {bits}-bit base of {D} columns must have "
                             f"{cols} code columns and blocksize >= 1, got {tuple(base.shape)}, "
                             f"blocksize {blocksize}")
        if tuple(absmax.shape) != (V, nblk) or absmax.dtype != torch.float32:
            raise ValueError(f"fusion_embedding_lookup: absmax must be float32 {(V, nblk)}, got "
                             f"{absmax.dtype} {tuple(absmax.shape)}")
        if qmap.numel() != (256 if bits == 8 else 16) or qmap.dtype != torch.float32:
            raise ValueError(f"fusion_embedding_lookup: qmap must hold {256 if bits == 8 else 16} "
                             f"float32 values, got {qmap.numel()} {qmap.dtype}")
    return V, F, D


def check_ids_in_range(flat: torch.Tensor, total: int) -> None:
    """IndexError naming the first id outside [0, total) (synchronizes: reference/CPU only)."""
    if flat.numel() == 0:
        return
    bad = (flat < 0) | (flat >= total)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(f"token id {int(flat[pos])} at flat position {pos} is out of range "
                         f"[0, {total}) (vocab_size + fusion_vocab_size)")


def fusion_embedding_lookup(ids, base, absmax, qmap, fusion, bits, blocksize):
    V, F, D = check_lookup_args(ids, base, absmax, qmap, fusion, bits, blocksize)
    flat = ids.reshape(-1)
    check_ids_in_range(flat, V + F)
    is_new = flat >= V
    # Both gathers read a valid row for every token; torch.where then picks one (no
    # data-dependent shapes, so this also runs without a host sync on any device).
    base_rows = base[torch.where(is_new, 0, flat)] if V else None
    if bits == 0:
        rows = base_rows
    elif V:
        if bits == 8:
            idx = base_rows.long()
        else:
            idx = torch.stack([(base_rows >> 4).long(), (base_rows & 15).long()], -1).flatten(-2)[:, :D]
        scale = absmax[torch.where(is_new, 0, flat)].repeat_interleave(blocksize, dim=1)[:, :D]
        rows = (qmap.to(torch.float32)[idx] * scale).to(fusion.dtype)
    if F == 0:
        out = rows
    else:
        new_rows = fusion[torch.where(is_new, flat - V, 0)]
        out = new_rows if V == 0 else torch.where(is_new[:, None], new_rows, rows)
    return out.reshape(*ids.shape, D).clone()


torch.library.impl("bnbfuse::fusion_embedding_lookup", "CompositeExplicitAutograd")(
    fusion_embedding_lookup)
