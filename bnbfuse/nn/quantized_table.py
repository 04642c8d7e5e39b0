"""A frozen embedding table stored in int8 or NF4 (the base of a quantized FusionEmbedding)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import row_quantization as rq
from ..ops.quantize import one_block_at_most
from .lookup import fusion_embedding_lookup
from .standard_embedding import padding_row

__all__ = ["QuantizedEmbeddingTable"]


class QuantizedEmbeddingTable(torch.nn.Module):
    """A frozen ``(num_embeddings, embedding_dim)`` table kept in 8 or 4 bits.

    Rows are quantized in blocks of ``blocksize`` values (see :mod:`bnbfuse.row_quantization`);
    a lookup dequantizes only the gathered rows. The codes, the float32 block scales and
    the map are buffers (``weight``, ``absmax``, ``qmap``), so the table has no trainable
    parameter and moves with ``.to(device)``; dtype casts (``.half()``, ``.to(bfloat16)``)
    leave them untouched, since they would corrupt codes and scales.

    Args:
        num_embeddings (int): rows ``V``.
        embedding_dim (int): columns ``D``.
        scheme (str): ``"int8"`` or ``"nf4"``.
        blocksize (int): values per scale block inside a row.
        device: where the buffers live. The table starts as ``N(0, 1)`` quantized (nothing
            is drawn on the meta device); fill it with :meth:`quantize_`.
        padding_idx (int, optional): a row that :meth:`reset_parameters` sets to zero, as
            ``nn.Embedding`` does (negative counts from ``V``).

    Shapes:
        input ``(*)`` ids in ``[0, V)`` → output ``(*, D)`` float32.

    Example:
        >>> import torch
        >>> from bnbfuse.nn.quantized_table import QuantizedEmbeddingTable
        >>> w = torch.randn(100, 64)
        >>> table = QuantizedEmbeddingTable.from_float(w, "nf4")
        >>> table.weight.shape, table(torch.tensor([[3, 4]])).shape
        (torch.Size([100, 32]), torch.Size([1, 2, 64]))
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str = "int8",
                 blocksize: int = rq.DEFAULT_BLOCKSIZE, device=None, *,
                 padding_idx: Optional[int] = None) -> None:
        super().__init__()
        self.bits = rq.bits_of(scheme)
        if not isinstance(blocksize, int) or blocksize < 2:
            raise ValueError(f"blocksize must be an int >= 2, got {blocksize!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_row(padding_idx, num_embeddings, "padding_idx")
        # a block longer than a row is the row (the same codes and scales, no padding)
        self.scheme, self.blocksize = scheme, one_block_at_most(embedding_dim, blocksize)
        nblk = -(embedding_dim // -self.blocksize)
        self.register_buffer("weight", torch.zeros(rq.code_shape(num_embeddings, embedding_dim, scheme),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(num_embeddings, nblk, dtype=torch.float32,
                                                   device=device))
        self.register_buffer("qmap", rq.quant_map(scheme).clone().to(self.weight.device))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @classmethod
    def from_float(cls, weight: Tensor, scheme: str = "int8",
                   blocksize: int = rq.DEFAULT_BLOCKSIZE) -> "QuantizedEmbeddingTable":
        """Quantizes a float ``(V, D)`` table (on its device)."""
        table = cls(weight.shape[0], weight.shape[1], scheme, blocksize, device="meta")
        table.to_empty(device=weight.device)
        return table.quantize_(weight)

    def reset_parameters(self, rows_per_chunk: int = 8192) -> None:
        """Fills the table with quantized ``N(0, 1)`` values, chunk by chunk (and the map:
        after ``to_empty()`` every buffer holds garbage); the padding row is zero."""
        with torch.no_grad():
            self.qmap.copy_(rq.quant_map(self.scheme, self.qmap.device))
            for r0 in range(0, self.num_embeddings, rows_per_chunk):
                n = min(rows_per_chunk, self.num_embeddings - r0)
                w = torch.randn(n, self.embedding_dim, device=self.weight.device)
                if self.padding_idx is not None and r0 <= self.padding_idx < r0 + n:
                    w[self.padding_idx - r0] = 0
                codes, absmax = rq.quantize_table(w, self.scheme, self.blocksize)
                self.weight[r0:r0 + n] = codes
                self.absmax[r0:r0 + n] = absmax

    @torch.no_grad()
    def quantize_(self, weight: Tensor) -> "QuantizedEmbeddingTable":
        """Replaces the table by the quantization of the float ``(V, D)`` ``weight``."""
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"expected a ({self.num_embeddings}, {self.embedding_dim}) float "
                             f"table, got {tuple(weight.shape)}")
        codes, absmax = rq.quantize_table(weight.detach().to(self.weight.device), self.scheme,
                                          self.blocksize)
        self.qmap.copy_(rq.quant_map(self.scheme, self.qmap.device))
        self.weight.copy_(codes)
        self.absmax.copy_(absmax)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole table as a float ``(V, D)`` tensor of ``dtype``."""
        return rq.dequantize_table(self.weight, self.absmax, self.scheme, self.blocksize,
                                   self.embedding_dim, dtype, qmap=self.qmap)

    def forward(self, input: Tensor) -> Tensor:
        empty = torch.empty(0, self.embedding_dim, dtype=torch.float32, device=self.weight.device)
        return fusion_embedding_lookup(input, self.weight, self.absmax, self.qmap, empty,
                                       self.bits, self.blocksize)

    def _apply(self, fn, recurse=True):
        # Follow device moves only: fn applied to a float probe tells the target device.
        device = fn(torch.empty(0)).device
        for name, buf in self._buffers.items():
            if buf is not None and buf.device != device:
                self._buffers[name] = (torch.empty_like(buf, device=device) if buf.is_meta
                                       else buf.to(device))
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme!r}, "
                f"blocksize={self.blocksize}")
