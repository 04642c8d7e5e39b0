"""Paged optimizers (bitsandbytes' ``Paged*``): the same optimizers with ``is_paged=True``.

On CUDA, the states of parameters with at least 100,000 elements live in CUDA managed memory
that the driver may evict to host memory under GPU memory pressure; the optimizer prefetches
them to the GPU before each parameter's update (``bnbfuse.paged``). On the CPU paging is a
no-op. Either way a paged optimizer computes exactly what its unpaged twin computes, and the
state dicts of the two load into each other.

Example:
    >>> import torch, bnbfuse as bnb
    >>> w = torch.nn.Parameter(torch.randn(64, 128))
    >>> opt = bnb.optim.PagedAdamW8bit([w], lr=1e-3)
    >>> w.grad = torch.randn_like(w); opt.step()
    >>> opt.is_paged, isinstance(opt, bnb.optim.AdamW8bit)
    (True, True)
"""
from __future__ import annotations

from .adam import Adam, Adam8bit, Adam32bit, AdamW, AdamW8bit, AdamW32bit
from .ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit
from .lion import Lion, Lion8bit, Lion32bit

__all__ = ["PagedAdam", "PagedAdam8bit", "PagedAdam32bit", "PagedAdamW", "PagedAdamW8bit",
           "PagedAdamW32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit",
           "PagedLion", "PagedLion8bit", "PagedLion32bit"]


class PagedAdam(Adam):
    """:class:`~bnbfuse.optim.Adam` with paged state (``is_paged`` is accepted and ignored,
    as in bitsandbytes)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class PagedAdam8bit(Adam8bit):
    """:class:`~bnbfuse.optim.Adam8bit` with paged state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class PagedAdam32bit(Adam32bit):
    """:class:`~bnbfuse.optim.Adam32bit` with paged state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class PagedAdamW(AdamW):
    """:class:`~bnbfuse.optim.AdamW` with paged state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, *, max_unorm=0.0,
                 percentile_clipping=100):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class PagedAdamW8bit(AdamW8bit):
    """:class:`~bnbfuse.optim.AdamW8bit` with paged state (Hugging Face's
    ``paged_adamw_8bit``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, *, max_unorm=0.0,
                 percentile_clipping=100):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class PagedAdamW32bit(AdamW32bit):
    """:class:`~bnbfuse.optim.AdamW32bit` with paged state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, *, max_unorm=0.0,
                 percentile_clipping=100):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class PagedAdEMAMix(AdEMAMix):
    """:class:`~bnbfuse.optim.AdEMAMix` with paged state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                 t_beta3=None, eps=1e-8, weight_decay=1e-2, optim_bits=32, min_8bit_size=4096,
                 *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay,
                         optim_bits, min_8bit_size, True, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class PagedAdEMAMix8bit(AdEMAMix8bit):
    """:class:`~bnbfuse.optim.AdEMAMix8bit` with paged state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                 t_beta3=None, eps=1e-8, weight_decay=1e-2, min_8bit_size=4096, *,
                 max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay,
                         min_8bit_size, True, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class PagedAdEMAMix32bit(AdEMAMix32bit):
    """:class:`~bnbfuse.optim.AdEMAMix32bit` with paged state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                 t_beta3=None, eps=1e-8, weight_decay=1e-2, min_8bit_size=4096, *,
                 max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay,
                         min_8bit_size, True, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class PagedLion(Lion):
    """:class:`~bnbfuse.optim.Lion` with paged state."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32,
                 args=None, min_8bit_size=4096, *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, weight_decay, optim_bits, args, min_8bit_size, True,
                         max_unorm=max_unorm, percentile_clipping=percentile_clipping)


class PagedLion8bit(Lion8bit):
    """:class:`~bnbfuse.optim.Lion8bit` with paged state (Hugging Face's
    ``paged_lion_8bit``)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None,
                 min_8bit_size=4096, *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, weight_decay, args, min_8bit_size, True,
                         max_unorm=max_unorm, percentile_clipping=percentile_clipping)


class PagedLion32bit(Lion32bit):
    """:class:`~bnbfuse.optim.Lion32bit` with paged state."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None,
                 min_8bit_size=4096, *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, weight_decay, args, min_8bit_size, True,
                         max_unorm=max_unorm, percentile_clipping=percentile_clipping)
