"""fairseq2-style ``StandardEmbedding`` and ``init_scaled_embedding``."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._override import keep_32bit_state


def padding_row(pad_idx: Optional[int], num_rows: int, name: str = "pad_idx") -> Optional[int]:
    """``pad_idx`` as a row in ``[0, num_rows)``: negative values count from the end, as
    ``nn.Embedding``'s ``padding_idx``; out of range raises ``ValueError``."""
    if pad_idx is None:
        return None
    if not -num_rows <= pad_idx < num_rows:
        raise ValueError(f"{name} {pad_idx} is out of range for {num_rows} rows")
    return pad_idx % num_rows

__all__ = ["StandardEmbedding", "init_scaled_embedding"]


class StandardEmbedding(torch.nn.Module):
    """An in-memory embedding table with fairseq2's constructor (``pad_idx``, ``init_fn``).

    ``init_fn(self)`` initialises the table (default ``N(0, 1)``, like ``nn.Embedding``);
    the pad row is zeroed afterwards, and it never receives a gradient, so optimizers
    never move it. The weight keeps 32-bit state in bnbfuse 8-bit optimizers.

    Args:
        num_embeddings (int): table size ``V``.
        embed_dim (int): dimension ``E`` of the returned embeddings.
        pad_idx (int, optional): padding row (zero, no gradient); negative counts from the
            end. Also readable as ``padding_idx``.
        init_fn (callable, optional): ``init_fn(embedding)`` fills ``embedding.weight``.
        device, dtype: factory arguments of the weight.

    Shapes:
        input ``(*)`` integer ids → output ``(*, E)``.

    Example:
        >>> import torch
        >>> from bnbfuse.nn import StandardEmbedding, init_scaled_embedding
        >>> embed = StandardEmbedding(32000, 512, pad_idx=0, init_fn=init_scaled_embedding)
        >>> embed(torch.randint(0, 32000, (4, 6))).shape
        torch.Size([4, 6, 512])
        >>> bool(embed.weight[0].eq(0).all())
        True
    """

    def __init__(self, num_embeddings: int, embed_dim: int, pad_idx: Optional[int] = None, *,
                 init_fn: Optional[Callable[["StandardEmbedding"], None]] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        if num_embeddings < 1 or embed_dim < 1:
            raise ValueError(f"num_embeddings and embed_dim must be positive, got "
                             f"{num_embeddings} and {embed_dim}")
        self.num_embeddings = num_embeddings
        self.embed_dim = embed_dim
        self.pad_idx = padding_row(pad_idx, num_embeddings)
        self.padding_idx = self.pad_idx  # nn.Embedding's name, for code that reads it
        self.init_fn = init_fn
        self.weight = torch.nn.Parameter(
            torch.empty(num_embeddings, embed_dim, device=device, dtype=dtype))
        self.reset_parameters()
        keep_32bit_state(self, "weight")

    def reset_parameters(self) -> None:
        if self.init_fn is not None:
            self.init_fn(self)
        else:
            torch.nn.init.normal_(self.weight)
        if self.pad_idx is not None:
            with torch.no_grad():
                self.weight[self.pad_idx].fill_(0)

    def forward(self, x: Tensor) -> Tensor:
        # padding_idx makes F.embedding's backward skip the pad row.
        return F.embedding(x, self.weight, self.pad_idx)

    def extra_repr(self) -> str:
        s = f"num_embeddings={self.num_embeddings}, embed_dim={self.embed_dim}"
        if self.pad_idx is not None:
            s += f", pad_idx={self.pad_idx}"
        if self.init_fn is not None:
            s += f", init_fn={getattr(self.init_fn, '__name__', self.init_fn)}"
        return s


def init_scaled_embedding(embed: torch.nn.Module) -> None:
    """Initialises ``embed.weight`` from ``N(0, 1/embed_dim)`` and zeroes the pad row.

    Works for :class:`StandardEmbedding` (``pad_idx``) and ``torch.nn.Embedding``
    (``padding_idx``).

    Args:
        embed: module with a 2-D ``weight`` of shape ``(V, E)``.

    Example:
        >>> import torch
        >>> from bnbfuse.nn import StandardEmbedding, init_scaled_embedding
        >>> e = StandardEmbedding(1000, 256, init_fn=init_scaled_embedding)
        >>> round(float(e.weight.detach().std()) * 256 ** 0.5, 1)
        1.0
    """
    weight = embed.weight
    torch.nn.init.normal_(weight, std=weight.shape[1] ** -0.5)
    pad = getattr(embed, "pad_idx", None)
    if pad is None:
        pad = getattr(embed, "padding_idx", None)
    if pad is not None:
        with torch.no_grad():
            weight[pad].fill_(0)
