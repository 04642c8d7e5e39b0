"""bitsandbytes-style embeddings: ``Embedding`` and ``StableEmbedding``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._override import keep_32bit_state

__all__ = ["Embedding", "StableEmbedding"]


class Embedding(torch.nn.Embedding):
    """``torch.nn.Embedding`` whose weight keeps 32-bit state in bnbfuse 8-bit optimizers.

    Same arguments and behaviour as ``torch.nn.Embedding`` (and bitsandbytes'
    ``Embedding``: Xavier-uniform initialisation, padding row zeroed). Embedding rows see
    rare, sparse gradients, which 8-bit state quantizes badly; this class registers
    ``{"optim_bits": 32}`` for its weight in ``GlobalOptimManager`` at construction.

    Args:
        num_embeddings (int): vocabulary size ``V``.
        embedding_dim (int): embedding dimension ``D``.
        padding_idx (int, optional): row that is zero and receives no gradient.
        max_norm (float, optional): renormalise gathered rows to at most this norm.
        norm_type (float): p of the norm for ``max_norm``.
        scale_grad_by_freq (bool): scale gradients by inverse token frequency in the batch.
        sparse (bool): sparse gradients.
        _weight (Tensor, optional): initial ``(V, D)`` weight (no re-initialisation).
        device, dtype: factory arguments of the weight.
        _freeze (bool): keyword-only (``from_pretrained(freeze=True)``): the weight does not
            require grad. After ``device``/``dtype``, so that bitsandbytes' positional order
            (``..., _weight, device``) holds.

    Shapes:
        input ``(*)`` integer ids in ``[0, V)`` → output ``(*, D)``.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> emb = bnb.nn.Embedding(100, 16, padding_idx=0)
        >>> emb(torch.tensor([[0, 5, 7]])).shape
        torch.Size([1, 3, 16])
        >>> bnb.optim.GlobalOptimManager.get_instance().get_config(emb.weight)
        {'optim_bits': 32}
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight: Optional[Tensor] = None, device=None, dtype=None, *,
                 _freeze: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, sparse, _weight, _freeze, device=device,
                         dtype=dtype)
        keep_32bit_state(self, "weight")

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()


class StableEmbedding(Embedding):
    """Embedding + LayerNorm with 32-bit optimizer state (Dettmers et al., 2022).

    Xavier-uniform initialisation, padding row zeroed, and a LayerNorm (``.norm``) over the
    gathered rows that is computed in float32 and cast back to the weight's dtype, which
    evens out the gradient scale of frequent and rare tokens. Same arguments as
    bitsandbytes' ``StableEmbedding``, with its bugs fixed: ``device=`` leaves the weight
    trainable, ``dtype=`` is honoured (the LayerNorm parameters stay float32 for accuracy),
    and after ``.to(torch.bfloat16)`` the forward still runs on CPU.

    Args:
        num_embeddings (int): vocabulary size ``V``.
        embedding_dim (int): embedding dimension ``D``.
        padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, _weight: as in
            ``torch.nn.Embedding``; ``_freeze`` keyword-only, as in :class:`Embedding`.
        device, dtype: factory arguments of the weight.

    Shapes:
        input ``(*)`` integer ids in ``[0, V)`` → output ``(*, D)`` in the weight's dtype.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> emb = bnb.nn.StableEmbedding(1000, 32, dtype=torch.bfloat16)
        >>> y = emb(torch.tensor([1, 2, 3]))
        >>> y.shape, y.dtype
        (torch.Size([3, 32]), torch.bfloat16)
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight: Optional[Tensor] = None, device=None, dtype=None, *,
                 _freeze: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, sparse, _weight, device=device, _freeze=_freeze,
                         dtype=dtype)
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device, dtype=torch.float32)

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half()/.bfloat16() cast the weight but not the LayerNorm: its
        # parameters follow device moves and stay float32 (a cast would round them).
        if recurse:
            def keep_dtype(t):
                moved = fn(t)
                return moved if moved.dtype == t.dtype else t.to(device=moved.device)
            self.norm._apply(keep_dtype)
        return super()._apply(fn, recurse=False)

    def forward(self, input: Tensor) -> Tensor:
        emb = F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        # The norm runs in float32 whatever dtype the module was cast to (a bfloat16
        # LayerNorm on CPU is both lossy and, with mixed inputs, an error).
        w = self.norm.weight.float() if self.norm.weight is not None else None
        b = self.norm.bias.float() if self.norm.bias is not None else None
        out = F.layer_norm(emb.float(), self.norm.normalized_shape, w, b, self.norm.eps)
        return out.to(self.weight.dtype)
