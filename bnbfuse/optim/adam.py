"""Adam and AdamW with 8-bit or 32-bit state.

Per element, with g the gradient (non-finite elements are skipped) and t the step:

    Adam  (torch.optim.Adam, coupled L2):  g += wd * p
    AdamW (decoupled decay, first):        p *= 1 - lr * wd
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g²
    p -= lr * update_scale * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

bitsandbytes' ``Adam`` decays decoupled like AdamW; bnbfuse follows ``torch.optim.Adam``.
"""
from __future__ import annotations

import torch

from .compat import require_bits
from .optimizer import Optimizer2State

__all__ = ["Adam", "Adam8bit", "Adam32bit", "AdamW", "AdamW8bit", "AdamW32bit"]


class _AdamBase(Optimizer2State):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        if amsgrad:
            raise ValueError(f"{type(self).__name__} does not support amsgrad=True")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay),
                         optim_bits, args, min_8bit_size, is_paged, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)

    def _validate_hparams(self, group):
        self._check_betas(group)

    def _kernel_hparams(self, cfg, step):
        beta1, beta2 = cfg["betas"]
        return dict(lr=cfg["lr"], beta1=beta1, beta2=beta2, eps=cfg["eps"],
                    weight_decay=cfg["weight_decay"])

    # torch.optim interoperability
    def _torch_group(self, group):
        return dict(lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
                    weight_decay=group["weight_decay"])

    def _from_torch_group(self, tg):
        name = type(self).__name__
        # torch <= 2.6 saved no decoupled_weight_decay: torch.optim.AdamW loads such a dict as
        # decoupled, Adam as coupled, so the class loading it decides, as here.
        decoupled = bool(tg.get("decoupled_weight_decay", self.optimizer_name == "adamw"))
        if tg.get("weight_decay", 0) and decoupled != (self.optimizer_name == "adamw"):
            want = "AdamW" if decoupled else "Adam"
            raise ValueError(f"{name}.load_torch_state_dict: the state comes from a torch "
                             f"optimizer with {'decoupled' if decoupled else 'coupled L2'} "
                             f"weight decay; load it into bnbfuse {want}/{want}8bit")
        return dict(lr=tg["lr"], betas=tuple(tg["betas"]), eps=tg["eps"],
                    weight_decay=tg["weight_decay"])


class Adam(_AdamBase):
    """Adam (``torch.optim.Adam`` semantics, coupled L2 weight decay) with 8- or 32-bit state.

    bitsandbytes 0.50 signature and defaults; the extras are keyword-only.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: (beta1, beta2), the decay rates of the first and second moments.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient (as ``torch.optim.Adam``).
        amsgrad: not supported (True raises).
        optim_bits: 8 or 32, the state precision.
        args: bitsandbytes' argument object (optional).
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        is_paged: paged state on CUDA (see :mod:`bnbfuse.optim.paged`); a no-op on the CPU.
        max_unorm: limit ``||update|| <= max_unorm * ||p||`` (0 = off), also for 8-bit state.
        percentile_clipping: clip gradients at this percentile of the last 100 norms
            (100 = off).

    State per parameter of shape S: ``state1`` (m) and ``state2`` (v) of shape S (uint8 with
    ``absmax1``/``absmax2`` of ceil(numel/256) and ``qmap1``/``qmap2``, or float32).

    Example:
        >>> import torch, bnbfuse as bnb
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = bnb.optim.Adam(model.parameters(), lr=1e-3, optim_bits=8)
        >>> model(torch.randn(4, 128)).sum().backward()
        >>> opt.step()
        >>> opt.state[model.weight]["state1"].dtype, opt.state[model.bias]["state1"].dtype
        (torch.uint8, torch.float32)
    """

    optimizer_name = "adam"
    _torch_counterpart = (torch.optim.Adam, ("exp_avg", "exp_avg_sq"))


class Adam8bit(Adam):
    """:class:`Adam` with 8-bit state. ``optim_bits`` is accepted for bitsandbytes
    compatibility (its default 32 or 8); the state is 8-bit (small parameters excepted).

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.randn(64, 128))
        >>> opt = bnb.optim.Adam8bit([w], lr=1e-3)
        >>> w.grad = torch.randn_like(w); opt.step()
        >>> sorted(opt.state[w])
        ['absmax1', 'absmax2', 'qmap1', 'qmap2', 'state1', 'state2', 'step']
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        require_bits(type(self).__name__, optim_bits, (32, 8), 32)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 8, args, min_8bit_size,
                         is_paged, max_unorm=max_unorm, percentile_clipping=percentile_clipping)


class Adam32bit(Adam):
    """:class:`Adam` with 32-bit state (``optim_bits`` must stay 32)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        require_bits(type(self).__name__, optim_bits, (32,), 32)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 32, args,
                         min_8bit_size, is_paged, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class AdamW(_AdamBase):
    """AdamW (``torch.optim.AdamW``: decoupled weight decay, applied before the step) with 8-
    or 32-bit state. Arguments as :class:`Adam`; ``weight_decay`` defaults to 1e-2.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = bnb.optim.AdamW(model.parameters(), lr=1e-3, optim_bits=8)
        >>> model(torch.randn(4, 128)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    optimizer_name = "adamw"
    _torch_counterpart = (torch.optim.AdamW, ("exp_avg", "exp_avg_sq"))

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, is_paged, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class AdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit state (the memory saver: 2 bytes of state per parameter).

    Example:
        >>> import torch, bnbfuse as bnb
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
        ...                             torch.nn.Linear(256, 10))
        >>> opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
        >>> for _ in range(3):
        ...     loss = model(torch.randn(8, 256)).square().mean()
        ...     loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.state[model[0].weight]["state2"].dtype
        torch.uint8
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        require_bits(type(self).__name__, optim_bits, (32, 8), 32)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 8, args, min_8bit_size,
                         is_paged, max_unorm=max_unorm, percentile_clipping=percentile_clipping)


class AdamW32bit(AdamW):
    """:class:`AdamW` with 32-bit state (``optim_bits`` must stay 32)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        require_bits(type(self).__name__, optim_bits, (32,), 32)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 32, args,
                         min_8bit_size, is_paged, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)
