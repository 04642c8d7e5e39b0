"""LARS is bitsandbytes' algorithm: a plain momentum buffer and the step clipped by
min(1, max_unorm * ||p|| / ||buf||), side by side with bitsandbytes' LARS32bit and PytorchLARS."""
import warnings

import pytest
import torch

import bnbfuse as bnb


def _run(make, steps=6, seed=0, zero=False):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(64, 128) if zero else torch.randn(64, 128))
    opt = make([w])
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        w.grad = torch.randn(64, 128, generator=g)
        opt.step()
    return w.detach()


KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def test_lars_is_the_pytorch_lars_specification():
    spec = _run(lambda ps: bnb.optim.PytorchLARS(ps, **KW))
    ours = _run(lambda ps: bnb.optim.LARS32bit(ps, **KW))
    assert torch.allclose(ours, spec, rtol=0, atol=1e-6)
    eight = _run(lambda ps: bnb.optim.LARS8bit(ps, **KW))
    start = _run(lambda ps: bnb.optim.LARS32bit(ps, **KW), steps=0)
    assert (eight - spec).norm() < 0.05 * (spec - start).norm()


def test_lars_clips_the_step_to_max_unorm_times_the_weight_norm():
    w = torch.nn.Parameter(torch.randn(64, 128))
    before = w.detach().clone()
    opt = bnb.optim.LARS([w], lr=1.0, momentum=0.9, max_unorm=0.01)
    w.grad = torch.randn_like(w) * 100
    opt.step()
    assert (w.detach() - before).norm().item() == pytest.approx(0.01 * before.norm().item(), rel=1e-4)
    # a zero tensor does not move (min(1, 0) = 0), exactly as in bitsandbytes
    assert torch.equal(_run(lambda ps: bnb.optim.LARS32bit(ps, **KW), zero=True),
                       torch.zeros(64, 128))
    # max_unorm=0: plain momentum SGD, torch.optim.SGD's update
    plain = _run(lambda ps: bnb.optim.LARS32bit(ps, max_unorm=0.0, **KW))
    sgd = _run(lambda ps: torch.optim.SGD(ps, **KW))
    assert torch.allclose(plain, sgd, rtol=0, atol=1e-5)


def test_lars_matches_bitsandbytes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_optim = pytest.importorskip("bitsandbytes.optim")
    for make_ref, make_ours in (
            (lambda ps: bnb_optim.LARS32bit(ps, **KW), lambda ps: bnb.optim.LARS32bit(ps, **KW)),
            (lambda ps: bnb_optim.PytorchLARS(ps, **KW), lambda ps: bnb.optim.PytorchLARS(ps, **KW)),
            (lambda ps: bnb_optim.PytorchLARS(ps, nesterov=True, **KW),
             lambda ps: bnb.optim.PytorchLARS(ps, nesterov=True, **KW))):
        assert torch.allclose(_run(make_ours), _run(make_ref), rtol=0, atol=1e-6)
    assert torch.equal(_run(lambda ps: bnb_optim.PytorchLARS(ps, **KW), zero=True),
                       _run(lambda ps: bnb.optim.LARS32bit(ps, **KW), zero=True))
