"""The quantized embedding lookup op: schema, fake impl and argument checks.

``fusion_embedding_lookup``: out[i] = base row ids[i] (dequantized) if ids[i] < V, else
fusion row ids[i] - V, for int64 ids of any shape; out has shape (*ids.shape, D) and fusion's
dtype.

- bits = 0: base is a float (V, D) table of fusion's dtype (absmax, qmap unused, may be empty)
- bits = 8: base is uint8 (V, D), value = qmap[code] * absmax[row, col // blocksize]
- bits = 4: base is uint8 (V, ceil(D/2)), element 2k in the high nibble of byte k

absmax is float32 (V, ceil(D / blocksize)); qmap float32 (256 for bits 8, 16 for bits 4).
Ids outside [0, V + F) raise IndexError (CPU, reference); CUDA kernels write zero rows for
them and the module asserts asynchronously. Autograd (registered in bnbfuse/nn/lookup.py):
gradient into fusion, and into base when bits == 0.
"""
from __future__ import annotations

import torch

from .library import lib
from .quantize import check_map_has_no_nan

__all__ = ["check_lookup_args", "check_ids_in_range"]

lib.define(
    "fusion_embedding_lookup(Tensor ids, Tensor base, Tensor absmax, Tensor qmap, Tensor fusion, "
    "int bits, int blocksize) -> Tensor"
)


@torch.library.register_fake("bnbfuse::fusion_embedding_lookup")
def _(ids, base, absmax, qmap, fusion, bits, blocksize):
    torch._check(ids.dtype == torch.int64, lambda: f"ids must be int64, got {ids.dtype}")
    torch._check(bits in (0, 4, 8), lambda: f"bits must be 0, 4 or 8, got {bits}")
    torch._check(fusion.dim() == 2, lambda: "fusion table must be 2-D")
    # Meta tables (a module built on device="meta") give a meta output whatever device the
    # ids are on, as nn.Embedding does; otherwise every tensor is on the ids' device.
    meta = any(t.is_meta for t in (ids, base, fusion))
    return torch.empty((*ids.shape, fusion.shape[1]), dtype=fusion.dtype,
                       device="meta" if meta else ids.device)


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
        check_map_has_no_nan(qmap, "fusion_embedding_lookup: qmap")
    for name, t in (("base", base), ("fusion", fusion)):
        if t.device != ids.device:
            raise ValueError(f"fusion_embedding_lookup: {name} is on {t.device}, ids on "
                             f"{ids.device}")
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
