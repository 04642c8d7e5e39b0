"""optimizer.args (bitsandbytes' argument object) and the constructor arguments that contradict
a class, which raise as in bitsandbytes instead of being ignored."""
import argparse

import pytest
import torch

import bnbfuse as bnb


def _w():
    return torch.nn.Parameter(torch.randn(64, 96))


def test_args_reflects_the_constructor():
    opt = bnb.optim.AdamW8bit([_w()], min_8bit_size=16)
    a = opt.args
    assert (a.optim_bits, a.min_8bit_size, a.max_unorm, a.skip_zeros) == (8, 16, 0.0, False)
    assert a.percentile_clipping == 100 and a.is_paged is False
    assert bnb.optim.Adam([_w()]).args.optim_bits == 32
    assert bnb.optim.LAMB8bit([_w()]).args.max_unorm == 1.0


def test_a_given_args_object_is_kept_and_used():
    ns = argparse.Namespace(optim_bits=8, min_8bit_size=16, max_unorm=0.0, skip_zeros=False,
                            percentile_clipping=100)
    w = _w()
    opt = bnb.optim.Adam([w], args=ns)
    assert opt.args is ns
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["state1"].dtype == torch.uint8  # args.optim_bits won over 32
    d = bnb.optim.Adam([w], args={"optim_bits": 8})
    assert d.args.optim_bits == 8 and d.args.min_8bit_size == 4096


@pytest.mark.parametrize("make, match", [
    (lambda ps: bnb.optim.Adagrad8bit(ps, optim_bits=32), "optim_bits=8"),
    (lambda ps: bnb.optim.Adagrad32bit(ps, optim_bits=8), "optim_bits=32"),
    (lambda ps: bnb.optim.Adam8bit(ps, optim_bits=16), "optim_bits=32"),
    (lambda ps: bnb.optim.AdamW8bit(ps, optim_bits=4), "optim_bits=32"),
    (lambda ps: bnb.optim.PagedAdamW8bit(ps, optim_bits=16), "optim_bits=32"),
    (lambda ps: bnb.optim.PagedAdam8bit(ps, optim_bits=16), "optim_bits=32"),
    (lambda ps: bnb.optim.Adam32bit(ps, optim_bits=8), "optim_bits=32"),
    (lambda ps: bnb.optim.PagedAdamW32bit(ps, optim_bits=8), "optim_bits=32"),
    (lambda ps: bnb.optim.Adam8bit(ps, amsgrad=True), "amsgrad"),
])
def test_contradictory_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make([_w()])


def test_contradictions_that_bitsandbytes_refuses_are_refused_here_too():
    bnb_optim = pytest.importorskip("bitsandbytes.optim")
    for name, kw in (("Adagrad8bit", dict(optim_bits=32)), ("AdamW8bit", dict(optim_bits=16)),
                     ("PagedAdamW8bit", dict(optim_bits=16))):
        with pytest.raises(ValueError):
            getattr(bnb_optim, name)([_w()], **kw)
        with pytest.raises(ValueError):
            getattr(bnb.optim, name)([_w()], **kw)
    # the documented default stays accepted by both
    for name, kw in (("Adagrad8bit", dict(optim_bits=8)), ("AdamW8bit", dict(optim_bits=32))):
        getattr(bnb_optim, name)([_w()], **kw)
        assert getattr(bnb.optim, name)([_w()], **kw).defaults["optim_bits"] == 8
