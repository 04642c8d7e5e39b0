"""LARS (You et al. 2017, *Large Batch Training of Convolutional Networks*) as bitsandbytes
computes it, with an 8- or 32-bit momentum buffer. Per parameter tensor:

    d = g + wd * p
    buf = momentum * buf + d
    scale = min(1, max_unorm * ||p|| / ||buf||)   (1 when max_unorm is 0 or buf is 0)
    p -= lr * scale * buf

``max_unorm`` (default 0.02) bounds the step relative to the weight: ``||lr * step|| <=
lr * max_unorm * ||p||``. A tensor whose norm is 0 (a zero-initialised bias) therefore does not
move while ``max_unorm > 0``, exactly as in bitsandbytes. The norms come from a read-only pass
of the kernel over this step's new buffer, before the update. :class:`PytorchLARS` is the
same algorithm in plain PyTorch (bitsandbytes' reference class), with Nesterov momentum and
dampening too.
"""
from __future__ import annotations

import torch

from .optimizer import Optimizer1State

__all__ = ["LARS", "LARS8bit", "LARS32bit", "PytorchLARS"]


class LARS(Optimizer1State):
    """LARS with an 8- or 32-bit momentum buffer (bitsandbytes 0.50 signature and algorithm;
    the update clipping works for 8-bit state too).

    Args:
        params: parameters or param groups.
        lr: learning rate (required).
        momentum: momentum factor (must be > 0).
        dampening: not supported (nonzero raises).
        weight_decay: L2 penalty added to the gradient.
        nesterov: not supported (True raises).
        optim_bits: 8 or 32.
        args: bitsandbytes' argument object (optional).
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        max_unorm: the step is clipped to ``max_unorm * ||p||`` (0 turns the clipping off).
        percentile_clipping: keyword-only, see :class:`bnbfuse.optim.Adam`.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.randn(64, 128))
        >>> opt = bnb.optim.LARS8bit([w], lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> w.grad = torch.randn_like(w); opt.step()
        >>> opt.state[w]["state1"].dtype
        torch.uint8
    """

    optimizer_name = "lars"
    _bnb_betas = ("momentum", "dampening")
    _bnb_fixed = {"nesterov": False}

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 optim_bits=32, args=None, min_8bit_size=4096, max_unorm=0.02, *,
                 percentile_clipping=100):
        if momentum == 0:
            raise NotImplementedError(f"{type(self).__name__} without momentum is not supported")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov),
                         optim_bits, args, min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)

    def _validate_hparams(self, group):
        name = type(self).__name__
        if not 0 < float(group["momentum"]) <= 1:
            raise ValueError(f"{name}: invalid momentum value {group['momentum']!r}")
        if group["dampening"] != 0:
            raise ValueError(f"{name}: dampening is not supported (got {group['dampening']!r})")
        if group["nesterov"]:
            raise ValueError(f"{name}: nesterov=True is not supported")

    def _kernel_hparams(self, cfg, step):
        return dict(lr=cfg["lr"], beta1=cfg["momentum"], weight_decay=cfg["weight_decay"])

    # _needs_norms/_update_scale: the base class's max_unorm clipping is bitsandbytes' LARS.


class LARS8bit(LARS):
    """:class:`LARS` with an 8-bit momentum buffer."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 args=None, min_8bit_size=4096, max_unorm=0.02, *, percentile_clipping=100):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 8, args,
                         min_8bit_size, max_unorm, percentile_clipping=percentile_clipping)


class LARS32bit(LARS):
    """:class:`LARS` with a 32-bit momentum buffer."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 args=None, min_8bit_size=4096, max_unorm=0.02, *, percentile_clipping=100):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 32, args,
                         min_8bit_size, max_unorm, percentile_clipping=percentile_clipping)


class PytorchLARS(torch.optim.Optimizer):
    """LARS in plain PyTorch with a float momentum buffer (bitsandbytes' ``PytorchLARS``):
    the specification :class:`LARS` implements, plus dampening and Nesterov momentum.

    Per parameter: ``d = g + wd * p``; ``buf = d`` on the first step, then ``buf = momentum *
    buf + (1 - dampening) * d``; the update is ``d + momentum * buf`` (Nesterov) or ``buf``
    (``d`` without momentum); it is scaled by ``max_unorm * ||p|| / ||update||`` when larger
    than that; ``p -= lr * scale * update``. State: ``momentum_buffer``.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.ones(4, 4))
        >>> opt = bnb.optim.PytorchLARS([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones_like(w); opt.step()
        >>> round(float(w.detach()[0, 0]), 6)  # clipped to 0.02 * ||p||: a step of 0.1 * 0.02
        0.998
    """

    def __init__(self, params, lr=0.01, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, max_unorm=0.02):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      max_unorm=max_unorm))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    @torch.no_grad()
    def step(self, closure=None):
        """One step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, max_unorm = group["momentum"], group["max_unorm"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                update = d
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(momentum).add_(d, alpha=1 - group["dampening"])
                    update = d + buf * momentum if group["nesterov"] else buf
                scale = 1.0
                if max_unorm > 0.0:
                    pnorm, unorm = torch.norm(p.float()), torch.norm(update.float())
                    if unorm > max_unorm * pnorm:
                        scale = float(max_unorm * pnorm / unorm)
                p.add_(update, alpha=-group["lr"] * scale)
        return loss
