"""Reference quantized embedding lookup: the specification of
``bnbfuse::fusion_embedding_lookup`` (schema and argument checks in bnbfuse/ops/embedding.py)."""
from __future__ import annotations

import torch

from ...ops.embedding import check_ids_in_range, check_lookup_args
from .quantize import one_block_at_most


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
        scale = absmax[torch.where(is_new, 0, flat)].repeat_interleave(
            one_block_at_most(D, blocksize), dim=1)[:, :D]
        rows = (qmap.to(torch.float32)[idx] * scale).to(fusion.dtype)
    if F == 0:
        out = rows
    else:
        new_rows = fusion[torch.where(is_new, flat - V, 0)]
        out = new_rows if V == 0 else torch.where(is_new[:, None], new_rows, rows)
    return out.reshape(*ids.shape, D).clone()


torch.library.impl("bnbfuse::fusion_embedding_lookup", "CompositeExplicitAutograd")(
    fusion_embedding_lookup)
