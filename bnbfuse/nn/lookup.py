"""The fused gather + dequantize lookup behind ``FusionEmbedding``, with its autograd rule.

``fusion_embedding_lookup`` wraps the ``bnbfuse::fusion_embedding_lookup`` op (CPU native,
CUDA native, pure-PyTorch reference): ids below ``V`` read the base table (a float table or
int8/NF4 codes, dequantized row by row), the others read the fusion table. The backward is a
scatter-add of the output gradient into the fusion table (and into a float base that
requires grad): base tokens are routed to a spill row that the embedding backward skips, so
nothing synchronises with the host and no data-dependent shape appears (``torch.compile``
traces it without graph breaks).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops  # noqa: F401  (declares the op)
from .. import backends  # noqa: F401  (registers its kernels)

__all__ = ["fusion_embedding_lookup", "as_token_ids"]


def _setup_context(ctx, inputs, output):
    ids, base, _absmax, _qmap, fusion, bits, _blocksize = inputs
    ctx.save_for_backward(ids)
    ctx.vocab_size = base.shape[0]
    ctx.fusion_rows = fusion.shape[0]
    ctx.bits = bits


def _backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    V, F, D = ctx.vocab_size, ctx.fusion_rows, grad.shape[-1]
    g = grad.reshape(-1, D)
    flat = ids.reshape(-1)
    need_base = ctx.bits == 0 and ctx.needs_input_grad[1]
    need_fusion = ctx.needs_input_grad[4]
    grad_base = grad_fusion = None
    # aten's embedding backward (what nn.Embedding uses: sorted segment sums on CUDA, no
    # atomics piling onto one row); its padding_idx skips the tokens routed to the spill row.
    if need_base:
        buf = torch.ops.aten.embedding_dense_backward(g, flat, V + F, -1, False)
        grad_base = buf[:V]
        grad_fusion = buf[V:] if need_fusion else None
    elif need_fusion:
        rows = torch.where(flat >= V, flat - V, F)
        grad_fusion = torch.ops.aten.embedding_dense_backward(g, rows, F + 1, F, False)[:F]
    return None, grad_base, None, None, grad_fusion, None, None


torch.library.register_autograd("bnbfuse::fusion_embedding_lookup", _backward,
                                setup_context=_setup_context)


def as_token_ids(input) -> Tensor:
    """``input`` as an int64 tensor; TypeError for anything that is not integer ids."""
    if not isinstance(input, Tensor):
        raise TypeError(f"token ids must be a tensor of integers, got {type(input).__name__}")
    if input.dtype.is_floating_point or input.dtype.is_complex or input.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor, got {input.dtype}")
    return input if input.dtype == torch.int64 else input.long()


def fusion_embedding_lookup(ids: Tensor, base: Tensor, absmax: Tensor, qmap: Tensor,
                            fusion: Tensor, bits: int, blocksize: int) -> Tensor:
    """Rows of ``base`` (ids < V) or ``fusion`` (ids >= V) for integer ``ids`` of any shape.

    Args:
        ids: integer ids ``(*)`` in ``[0, V + F)``.
        base: ``(V, D)`` float table of ``fusion``'s dtype (``bits=0``), or uint8 codes
            ``(V, D)`` (``bits=8``) / ``(V, ceil(D/2))`` (``bits=4``).
        absmax: float32 ``(V, ceil(D / blocksize))`` block scales (unused for ``bits=0``).
        qmap: float32 value map, 256 (int8) or 16 (NF4) values (unused for ``bits=0``).
        fusion: ``(F, D)`` float table of the new tokens.
        bits: 0, 8 or 4.
        blocksize: elements per scale block inside a row.

    Returns:
        ``(*, D)`` tensor of ``fusion``'s dtype.

    Raises:
        TypeError: ids are not integers. IndexError: an id is outside ``[0, V + F)`` (on CUDA
        this is a device-side assertion, raised without a host sync when the stream syncs).
    """
    ids = as_token_ids(ids)
    if ids.is_cuda:
        total = base.shape[0] + fusion.shape[0]
        torch._assert_async(((ids >= 0) & (ids < total)).all(),
                            f"FusionEmbedding: token id out of range [0, {total})")
    empty = base.new_empty(0, dtype=torch.float32)
    return torch.ops.bnbfuse.fusion_embedding_lookup(
        ids, base, absmax if absmax is not None else empty, qmap if qmap is not None else empty,
        fusion, bits, blocksize)
