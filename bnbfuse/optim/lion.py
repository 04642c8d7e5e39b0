"""Lion (Chen et al. 2023, *Symbolic Discovery of Optimization Algorithms*), 8- or 32-bit state.

    p *= 1 - lr * wd
    p -= lr * sign(b1 m + (1 - b1) g)
    m = b2 m + (1 - b2) g
"""
from __future__ import annotations

from .optimizer import Optimizer1State

__all__ = ["Lion", "Lion8bit", "Lion32bit"]


class Lion(Optimizer1State):
    """Lion with an 8- or 32-bit momentum (bitsandbytes 0.50 signature).

    Args:
        params: parameters or param groups.
        lr: learning rate (Lion wants 3-10x smaller than AdamW).
        betas: (beta1, beta2): interpolation for the sign, and the momentum decay.
        weight_decay: decoupled weight decay.
        optim_bits: 8 or 32.
        args: bitsandbytes' argument object (optional).
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        is_paged: paged state on CUDA (see :mod:`bnbfuse.optim.paged`); a no-op on the CPU.
        max_unorm, percentile_clipping: keyword-only extras, see :class:`bnbfuse.optim.Adam`.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.zeros(64, 128))
        >>> opt = bnb.optim.Lion8bit([w], lr=1e-4)
        >>> w.grad = torch.ones_like(w); opt.step()
        >>> float(w.detach()[0, 0])  # every element moves by exactly lr
        -9.999999747378752e-05
    """

    optimizer_name = "lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32,
                 args=None, min_8bit_size=4096, is_paged=False, *, max_unorm=0.0,
                 percentile_clipping=100):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay),
                         optim_bits, args, min_8bit_size, is_paged, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)

    def _validate_hparams(self, group):
        self._check_betas(group)

    def _kernel_hparams(self, cfg, step):
        beta1, beta2 = cfg["betas"]
        return dict(lr=cfg["lr"], beta1=beta1, beta2=beta2, weight_decay=cfg["weight_decay"])


class Lion8bit(Lion):
    """:class:`Lion` with 8-bit state."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None,
                 min_8bit_size=4096, is_paged=False, *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, weight_decay, 8, args, min_8bit_size, is_paged,
                         max_unorm=max_unorm, percentile_clipping=percentile_clipping)


class Lion32bit(Lion):
    """:class:`Lion` with 32-bit state."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None,
                 min_8bit_size=4096, is_paged=False, *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, weight_decay, 32, args, min_8bit_size, is_paged,
                         max_unorm=max_unorm, percentile_clipping=percentile_clipping)
