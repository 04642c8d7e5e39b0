"""bitsandbytes' frozen quantized embeddings: ``Embedding8bit``, ``Embedding4bit``,
``EmbeddingNF4`` and ``EmbeddingFP4``.

Same constructors and semantics as bitsandbytes 0.50: an ``nn.Embedding`` whose table is
frozen and stored quantized, filled by loading a float checkpoint (``load_state_dict`` of an
``nn.Embedding``'s state quantizes it). The table lives in the row-aligned layout of
:mod:`bnbfuse.row_quantization` and a lookup runs the fused gather + dequantize kernel of
``FusionEmbedding`` (``fusion_embedding_lookup`` with no fusion rows), which reads only the
gathered rows.

Differences from bitsandbytes:

- The table is quantized at construction and on load, not on the first ``.to(device)``: the
  module works on the CPU as built. Float weights (the ``N(0, 1)`` init) are never kept.
- ``state_dict()`` saves the codes (``weight_codes``, uint8), the scales (``weight_absmax``)
  and the map (``weight_qmap``), and loading them back is exact; bitsandbytes' modules raise on
  save. There is no ``weight`` key, so a float ``nn.Embedding`` cannot take the codes for
  weights (a strict load reports the keys). The module's ``weight`` is the codes.
- ``Embedding8bit`` has one float32 scale per row, as bitsandbytes' (LLM.int8() row-wise
  absmax), but rounds a float32 table to nearest (bitsandbytes goes through float16 first);
  4-bit tables have a scale per 64 values of each row (bitsandbytes' blocks of 64 run across
  rows when ``embedding_dim`` is not a multiple of 64). ``blocksize`` is a keyword extra.
- ``quant_storage`` other than ``torch.uint8`` is refused.

Example:
    >>> import torch, bnbfuse as bnb
    >>> fp = torch.nn.Embedding(100, 64)
    >>> emb = bnb.nn.EmbeddingNF4(100, 64)
    >>> emb.load_state_dict(fp.state_dict())
    <All keys matched successfully>
    >>> emb(torch.tensor([[1, 2, 3]])).shape, emb.weight.dtype, emb.weight.requires_grad
    (torch.Size([1, 3, 64]), torch.uint8, False)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import row_quantization as rq
from ..ops.quantize import one_block_at_most
from .lookup import fusion_embedding_lookup

__all__ = ["Embedding8bit", "Embedding4bit", "EmbeddingNF4", "EmbeddingFP4"]

_LOOKUP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _QuantizedEmbedding(torch.nn.Embedding):
    """An ``nn.Embedding`` whose frozen table is stored in ``scheme`` (int8, nf4 or fp4)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str,
                 blocksize: Optional[int], device, dtype) -> None:
        torch.nn.Module.__init__(self)  # nn.Embedding's own init would allocate a float table
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if blocksize is not None and (isinstance(blocksize, bool) or not isinstance(blocksize, int)
                                      or blocksize < 1):
            raise ValueError(f"blocksize must be None or an int >= 1, got {blocksize!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # nn.Embedding's attributes (what its extra_repr and user code read)
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.scheme = scheme
        self.blocksize = max(2, one_block_at_most(embedding_dim, blocksize or embedding_dim))
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()  # the output's
        codes = torch.zeros(rq.code_shape(num_embeddings, embedding_dim, scheme),
                            dtype=torch.uint8, device=device)
        self.weight = torch.nn.Parameter(codes, requires_grad=False)
        nblk = -(embedding_dim // -self.blocksize)
        self.register_buffer("weight_absmax", torch.zeros(num_embeddings, nblk,
                                                          dtype=torch.float32, device=device))
        self.register_buffer("weight_qmap", rq.quant_map(scheme).clone().to(codes.device))
        self.register_load_state_dict_pre_hook(_QuantizedEmbedding._quantize_float_weight)
        self.register_state_dict_post_hook(_QuantizedEmbedding._name_codes)
        if codes.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self, rows_per_chunk: int = 8192) -> None:
        """Fills the table with quantized ``N(0, 1)`` values (``nn.Embedding``'s init)."""
        with torch.no_grad():
            self.weight_qmap.copy_(rq.quant_map(self.scheme, self.weight_qmap.device))
            for r0 in range(0, self.num_embeddings, rows_per_chunk):
                n = min(rows_per_chunk, self.num_embeddings - r0)
                w = torch.randn(n, self.embedding_dim, device=self.weight.device)
                codes, absmax = rq.quantize_table(w, self.scheme, self.blocksize)
                self.weight[r0:r0 + n] = codes
                self.weight_absmax[r0:r0 + n] = absmax

    @torch.no_grad()
    def quantize_(self, weight: Tensor) -> "_QuantizedEmbedding":
        """Replaces the table by the quantization of the float ``(num_embeddings,
        embedding_dim)`` ``weight``."""
        codes, absmax = self._quantized(weight)
        self.weight.copy_(codes)
        self.weight_absmax.copy_(absmax)
        self.weight_qmap.copy_(rq.quant_map(self.scheme, self.weight_qmap.device))
        return self

    def _quantized(self, weight: Tensor):
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"expected a ({self.num_embeddings}, {self.embedding_dim}) float "
                             f"table, got {tuple(weight.shape)}")
        device = self.weight.device if self.weight.device.type != "meta" else weight.device
        return rq.quantize_table(weight.detach().to(device), self.scheme, self.blocksize)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The whole table as a float tensor (default: the module's dtype)."""
        return rq.dequantize_table(self.weight, self.weight_absmax, self.scheme, self.blocksize,
                                   self.embedding_dim, dtype or self.dtype, qmap=self.weight_qmap)

    def forward(self, input: Tensor) -> Tensor:
        out_dtype = self.dtype if self.dtype in _LOOKUP_DTYPES else torch.float32
        empty = torch.empty(0, self.embedding_dim, dtype=out_dtype, device=self.weight.device)
        out = fusion_embedding_lookup(input, self.weight, self.weight_absmax, self.weight_qmap,
                                      empty, rq.bits_of(self.scheme), self.blocksize)
        return out if out_dtype == self.dtype else out.to(self.dtype)

    def _name_codes(self, state_dict, prefix, local_metadata) -> None:
        # saved as weight_codes, the name a quantized FusionEmbedding base uses too
        if prefix + "weight" in state_dict:
            state_dict[prefix + "weight_codes"] = state_dict.pop(prefix + "weight")

    def _quantize_float_weight(self, state_dict, prefix, local_metadata, strict, missing_keys,
                               unexpected_keys, error_msgs) -> None:
        saved_as = prefix + "weight"
        if prefix + "weight_codes" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "weight_codes")
            saved_as = prefix + "weight_codes"
        value = state_dict.get(prefix + "weight")
        if saved_as != prefix + "weight" or not isinstance(value, Tensor) or (
                not value.is_floating_point()):
            rq.refuse_foreign_codes(state_dict, prefix + "weight", saved_as, self.weight,
                                    error_msgs)
            return
        # A float table (an nn.Embedding's checkpoint) is quantized on load, as bitsandbytes
        # quantizes the float weights it was loaded with.
        try:
            codes, absmax = self._quantized(value)
        except ValueError as err:
            error_msgs.append(f"{prefix}weight: {err}")
            return
        state_dict[prefix + "weight"] = codes
        state_dict[prefix + "weight_absmax"] = absmax
        state_dict[prefix + "weight_qmap"] = rq.quant_map(self.scheme, codes.device).clone()

    def _apply(self, fn, recurse=True):
        # Device moves move the table; dtype casts (.half(), .to(bfloat16)) change only the
        # output dtype: casting codes or scales would corrupt them.
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        for table, name in ((self._parameters, "weight"), (self._buffers, "weight_absmax"),
                            (self._buffers, "weight_qmap")):
            t = table[name]
            if t.device == probe.device:
                continue
            moved = torch.empty_like(t, device=probe.device) if t.is_meta else t.to(probe.device)
            table[name] = (torch.nn.Parameter(moved, requires_grad=False) if table is
                           self._parameters else moved)
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme!r}, "
                f"blocksize={self.blocksize}, dtype={self.dtype}")


def _check_storage(quant_storage) -> None:
    if quant_storage != torch.uint8:
        raise NotImplementedError(f"bnbfuse stores 4-bit tables in torch.uint8 only, got "
                                  f"quant_storage={quant_storage}")


class Embedding8bit(_QuantizedEmbedding):
    """A frozen embedding table in int8 with one float32 scale per row (bitsandbytes'
    ``Embedding8bit``, LLM.int8() row-wise quantization): 1 byte per value + 4 per row.

    Args:
        num_embeddings, embedding_dim: the table's shape.
        device: where the table lives.
        dtype: the output dtype (default: torch's default dtype).
        blocksize: keyword-only bnbfuse extra: values per scale inside a row (default: the
            whole row, as bitsandbytes).

    Example:
        >>> import torch, bnbfuse as bnb
        >>> fp = torch.nn.Embedding(10, 32)
        >>> q = bnb.nn.Embedding8bit(10, 32)
        >>> _ = q.load_state_dict(fp.state_dict())
        >>> bool((q(torch.arange(10)) - fp.weight).abs().max() < 0.05)
        True
    """

    def __init__(self, num_embeddings, embedding_dim, device=None, dtype=None, *,
                 blocksize: Optional[int] = None):
        super().__init__(num_embeddings, embedding_dim, "int8", blocksize, device, dtype)


class Embedding4bit(_QuantizedEmbedding):
    """A frozen embedding table in 4 bits (bitsandbytes' ``Embedding4bit``): ``quant_type``
    ``"fp4"`` (default) or ``"nf4"``, a float32 scale per 64 values of each row (0.5625
    bytes per value).

    Args:
        num_embeddings, embedding_dim: the table's shape.
        dtype: the output dtype.
        quant_type: ``"fp4"`` or ``"nf4"``.
        quant_storage: must be ``torch.uint8``.
        device: where the table lives.
        blocksize: keyword-only bnbfuse extra (default 64, as bitsandbytes).
    """

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_type="fp4",
                 quant_storage=torch.uint8, device=None, *, blocksize: int = 64):
        if quant_type not in ("fp4", "nf4"):
            raise ValueError(f"quant_type must be 'fp4' or 'nf4', got {quant_type!r}")
        _check_storage(quant_storage)
        super().__init__(num_embeddings, embedding_dim, quant_type, blocksize, device, dtype)
        self.quant_type, self.quant_storage = quant_type, quant_storage


class EmbeddingFP4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="fp4"``."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8,
                 device=None, *, blocksize: int = 64):
        super().__init__(num_embeddings, embedding_dim, dtype, "fp4", quant_storage, device,
                         blocksize=blocksize)


class EmbeddingNF4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="nf4"`` (NormalFloat, the better choice for
    normally distributed weights)."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8,
                 device=None, *, blocksize: int = 64):
        super().__init__(num_embeddings, embedding_dim, dtype, "nf4", quant_storage, device,
                         blocksize=blocksize)
