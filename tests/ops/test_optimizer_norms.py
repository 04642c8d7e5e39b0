"""The norms ops (trust ratios, max_unorm): what they sum, 32-bit and 8-bit."""

import pytest
import torch

import bnbfuse  # noqa: F401  (registers the ops)
from bnbfuse.backends import reference as R
from bnbfuse.ops.rules import RULES
from optimizer_cases import (hparams, maps, make_state, grads, ops)


# ---- norms ---------------------------------------------------------------------------------
def _direction_f64(opt, p, g, s1, s2, step, lr=1e-2, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0,
                   eps=1e-8, wd=0.1, damp=0.1, nesterov=True, gs=0.7):
    """Independent float64 computation of each optimizer's update direction."""
    p, g, s1 = p.double(), g.double() * gs, s1.double()
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    if opt in ("adam", "adamw", "lamb", "ademamix"):
        s2 = s2.double()
        if opt == "adam":
            g = g + wd * p
        m = b1 * s1[: p.numel()] + (1 - b1) * g
        v = b2 * s2 + (1 - b2) * g * g
        denom = v.sqrt() / bc2 ** 0.5 + eps
        if opt == "ademamix":
            m2 = b3 * s1[p.numel():] + (1 - b3) * g
            return (m / bc1 + alpha * m2) / denom
        u = (m / bc1) / denom
        return u + wd * p if opt == "lamb" else u
    if opt == "sgd":
        d = g + wd * p
        buf = d if step == 1 else b1 * s1 + (1 - damp) * d
        return d + b1 * buf if nesterov else buf
    if opt in ("rmsprop", "adagrad"):
        g = g + wd * p
        s = b1 * s1 + (1 - b1) * g * g if opt == "rmsprop" else s1 + g * g
        return g / (s.sqrt() + eps)
    if opt == "lion":
        return torch.sign(b1 * s1 + (1 - b1) * g)
    return b1 * s1 + (g + wd * p)  # lars: the new momentum buffer


@pytest.mark.parametrize("opt", tuple(RULES))
def test_norms_32bit_match_torch_computation(opt):
    size = 1000
    p = torch.randn(size, generator=torch.Generator().manual_seed(1))
    g = grads(size, torch.float32, seed=2)
    s1, s2 = make_state(opt, size, False)
    for step in (1, 3):
        out = ops.optimizer_norms_32bit(opt, p, g, s1, s2, *hparams(step))
        assert out.dtype == torch.float32 and out.shape == (2,)
        ok = torch.isfinite(g)
        d = _direction_f64(opt, p[ok], g[ok], s1.view(-1, size)[:, ok].reshape(-1),
                           None if s2 is None else s2[ok], step)
        expect = torch.stack([(d * d).sum(), (p[ok].double() ** 2).sum()]).float()
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
        ref = R.optimizer_norms_32bit(opt, p, g, s1, s2, *hparams(step))
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("opt", tuple(RULES))
def test_norms_8bit_use_the_dequantized_state(opt):
    size = 3000
    q1, q2 = maps()
    p = torch.randn(size, generator=torch.Generator().manual_seed(1)).bfloat16()
    g = grads(size, torch.bfloat16, seed=2)
    c1, c2, a1, a2 = make_state(opt, size, True)
    two = RULES[opt].states == 2
    out = ops.optimizer_norms_8bit_blockwise(opt, p, g, c1, c2, a1, a2, q1, q2 if two else None,
                                             *hparams(2))
    # the same with the dequantized state through the 32-bit op
    s1 = R.dequantize_state(c1.view(-1)[:size], a1.view(-1)[: a1.numel() // (2 if opt == "ademamix" else 1)], q1)
    if opt == "ademamix":
        s1 = torch.cat([s1, R.dequantize_state(c1.view(-1)[size:], a1.view(-1)[a1.numel() // 2:], q1)])
    s2 = R.dequantize_state(c2, a2, q2) if two else None
    expect = ops.optimizer_norms_32bit(opt, p, g, s1.view(c1.shape), s2, *hparams(2))
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=0)
    assert torch.isfinite(out).all()
