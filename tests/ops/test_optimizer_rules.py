"""The reference optimizer rules against torch.optim and the algorithms' definitions."""

import pytest
import torch

import bnbfuse  # noqa: F401  (registers the ops)
from optimizer_cases import (ops)


# ---- the reference against torch.optim -----------------------------------------------------
def _torch_vs_ops(torch_opt_fn, opt, steps=20, two=False, lr=1e-2, wd=0.0, beta1=0.9,
                  beta2=0.999, eps=1e-8, dampening=0.0, nesterov=False, lr_fn=None):
    torch.manual_seed(0)
    p = torch.randn(1000)
    tp = p.clone().requires_grad_()
    topt = torch_opt_fn([tp])
    s1, s2 = torch.zeros(1000), (torch.zeros(1000) if two else None)
    for step in range(1, steps + 1):
        g = torch.randn(1000)
        tp.grad = g.clone()
        topt.step()
        lr_t = lr_fn(step) if lr_fn else lr
        ops.optimizer_update_32bit(opt, p, g, s1, s2, lr_t, beta1, beta2, 0.0, 0.0, eps, wd,
                                   dampening, nesterov, step, 1.0, 1.0)
    torch.testing.assert_close(p, tp.detach(), rtol=1e-5, atol=1e-6)


def test_adamw_matches_torch():
    _torch_vs_ops(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), "adamw",
                  two=True, wd=0.1)


def test_adam_weight_decay_is_coupled_l2_like_torch():
    _torch_vs_ops(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1), "adam",
                  two=True, wd=0.1)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_torch(nesterov):
    damp = 0.0 if nesterov else 0.2
    _torch_vs_ops(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=damp,
                                             weight_decay=0.01, nesterov=nesterov),
                  "sgd", wd=0.01, dampening=damp, nesterov=nesterov)


def test_rmsprop_matches_torch():
    _torch_vs_ops(lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.99, eps=1e-8,
                                                 weight_decay=0.01),
                  "rmsprop", lr=1e-3, beta1=0.99, wd=0.01)


def test_adagrad_matches_torch():
    decay = 0.01  # the class passes lr already decayed: lr / (1 + (step - 1) * lr_decay)
    _torch_vs_ops(lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=decay, eps=1e-10,
                                                 weight_decay=0.01),
                  "adagrad", wd=0.01, eps=1e-10, lr_fn=lambda t: 1e-2 / (1 + (t - 1) * decay))


def test_ademamix_matches_its_definition():
    """AdEMAMix as in bitsandbytes' reference: m2 not bias-corrected, decay decoupled."""
    torch.manual_seed(0)
    n, lr, b1, b2, b3, alpha, eps, wd = 500, 1e-2, 0.9, 0.999, 0.9999, 5.0, 1e-8, 0.1
    p, state = torch.randn(n), torch.zeros(2, n)
    nu = torch.zeros(n)
    pe, m1, m2, v = p.double(), torch.zeros(n, dtype=torch.float64), \
        torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t in range(1, 11):
        g = torch.randn(n)
        ops.optimizer_update_32bit("ademamix", p, g, state, nu, lr, b1, b2, b3, alpha, eps, wd,
                                   0.0, False, t, 1.0, 1.0)
        gd = g.double()
        m1 = b1 * m1 + (1 - b1) * gd
        m2 = b3 * m2 + (1 - b3) * gd
        v = b2 * v + (1 - b2) * gd * gd
        denom = v.sqrt() / (1 - b2 ** t) ** 0.5 + eps
        pe = pe - lr * ((m1 / (1 - b1 ** t) + alpha * m2) / denom + wd * pe)
    torch.testing.assert_close(p.double(), pe, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[1].double(), m2, rtol=1e-5, atol=1e-7)


def test_lion_matches_its_definition():
    torch.manual_seed(0)
    n, lr, b1, b2, wd = 500, 1e-3, 0.9, 0.99, 0.1
    p, m = torch.randn(n), torch.zeros(n)
    pe, me = p.double(), torch.zeros(n, dtype=torch.float64)
    for t in range(1, 11):
        g = torch.randn(n)
        ops.optimizer_update_32bit("lion", p, g, m, None, lr, b1, b2, 0.0, 0.0, 0.0, wd, 0.0,
                                   False, t, 1.0, 1.0)
        gd = g.double()
        c = b1 * me + (1 - b1) * gd
        pe = pe * (1 - lr * wd) - lr * torch.sign(c)
        me = b2 * me + (1 - b2) * gd
    torch.testing.assert_close(p.double(), pe, rtol=1e-5, atol=1e-6)


def test_update_scale_scales_the_step():
    p, g = torch.randn(300), torch.randn(300)
    outs = []
    for us in (1.0, 0.5):
        q, s1, s2 = p.clone(), torch.zeros(300), torch.zeros(300)
        ops.optimizer_update_32bit("lamb", q, g, s1, s2, 1e-2, 0.9, 0.999, 0, 0, 1e-8, 0.0, 0,
                                   False, 1, 1.0, us)
        outs.append(q - p)
    torch.testing.assert_close(outs[1], outs[0] * 0.5, rtol=1e-4, atol=1e-6)
