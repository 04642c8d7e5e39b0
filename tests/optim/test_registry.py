"""GlobalOptimManager inside the optimizers: overrides by identity, read at state creation,
and the bitsandbytes bugs that must not come back."""
from __future__ import annotations

import pytest
import torch

import bnbfuse.optim as bo


@pytest.fixture(autouse=True)
def mng():
    m = bo.GlobalOptimManager.get_instance()
    m.initialize()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield m
    torch.set_num_threads(n)
    m.initialize()


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 128))


def _step(model, opt):
    opt.zero_grad()
    model(torch.randn(4, model[0].in_features)).square().mean().backward()
    opt.step()


def test_override_optim_bits_for_one_parameter(mng):
    model = _mlp()
    mng.register_parameters(model.parameters())  # accepted, not required
    mng.override_config(model[0].weight, "optim_bits", 32)
    opt = bo.AdamW8bit(model.parameters())
    _step(model, opt)
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32
    # the sibling of the same shape keeps 8-bit state (bitsandbytes: index-keyed leaks)
    assert opt.state[model[2].weight]["state1"].dtype == torch.uint8


def test_overrides_do_not_leak_into_another_model_by_position(mng):
    a, b = _mlp(), _mlp()
    mng.override_config(a[0].weight, key_value_dict={"optim_bits": 32, "lr": 0.0})
    opt_b = bo.AdamW8bit(b.parameters(), lr=1e-2)
    w0 = b[0].weight.detach().clone()
    _step(b, opt_b)
    assert opt_b.state[b[0].weight]["state1"].dtype == torch.uint8
    assert not torch.equal(b[0].weight.detach(), w0)
    opt_a = bo.AdamW8bit(a.parameters(), lr=1e-2)
    wa = a[0].weight.detach().clone()
    _step(a, opt_a)
    assert opt_a.state[a[0].weight]["state1"].dtype == torch.float32
    assert torch.equal(a[0].weight.detach(), wa)  # lr override 0


def test_hyperparameter_overrides_apply_only_to_that_parameter(mng):
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(64, 64))
    w2 = torch.nn.Parameter(w1.detach().clone())
    r1 = torch.nn.Parameter(w1.detach().clone())
    r2 = torch.nn.Parameter(w1.detach().clone())
    mng.override_config(w1, key_value_dict={"lr": 1e-1, "betas": (0.5, 0.9), "eps": 1e-4,
                                            "weight_decay": 0.5})
    ours = bo.AdamW32bit([w1, w2], lr=1e-2)
    ref1 = torch.optim.AdamW([r1], lr=1e-1, betas=(0.5, 0.9), eps=1e-4, weight_decay=0.5)
    ref2 = torch.optim.AdamW([r2], lr=1e-2)
    for _ in range(5):
        g = torch.randn(64, 64)
        for p in (w1, w2, r1, r2):
            p.grad = g.clone()
        ours.step()
        ref1.step()
        ref2.step()
    torch.testing.assert_close(w1.detach(), r1.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w2.detach(), r2.detach(), atol=1e-6, rtol=1e-5)
    assert ours.param_groups[0]["lr"] == 1e-2  # the group itself is untouched


def test_min_8bit_size_and_max_unorm_overrides(mng):
    small = torch.nn.Parameter(torch.randn(100))
    big = torch.nn.Parameter(torch.randn(64, 128))
    mng.override_config(small, "min_8bit_size", 0)
    mng.override_config(big, "max_unorm", 1e-4)
    opt = bo.AdamW8bit([small, big], lr=1.0, weight_decay=0.0)
    before = big.detach().clone()
    small.grad, big.grad = torch.randn_like(small), torch.randn_like(big)
    opt.step()
    assert opt.state[small]["state1"].dtype == torch.uint8
    assert (big.detach() - before).norm() <= 1e-4 * before.norm() * 1.001


def test_percentile_clipping_override_creates_history(mng):
    w = torch.nn.Parameter(torch.randn(64, 64))
    mng.override_config(w, "percentile_clipping", 5)
    opt = bo.Adam8bit([w])
    w.grad = torch.randn_like(w)
    opt.step()
    assert "gnorm_vec" in opt.state[w]


def test_module_override_registered_at_construction_survives(mng):
    class Tagged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(64, 128))
            bo.GlobalOptimManager.get_instance().register_module_override(
                self, "weight", {"optim_bits": 32})

        def forward(self, x):
            return x @ self.weight.t()

    model = Tagged()
    model.to(torch.bfloat16).to(torch.float32)
    # a checkpoint loaded with assign=True replaces the Parameter object
    model.load_state_dict({"weight": torch.randn(64, 128)}, assign=True)
    opt = bo.AdamW8bit(model.parameters())
    model(torch.randn(2, 128)).sum().backward()
    opt.step()
    assert opt.state[model.weight]["state1"].dtype == torch.float32


def test_module_overrides_follow_a_deepcopy_of_the_model(mng):
    import copy

    import bnbfuse.nn as bnn

    model = torch.nn.Sequential(bnn.StableEmbedding(1000, 64), torch.nn.Embedding(500, 64),
                                torch.nn.Linear(64, 64))
    bo.keep_32bit_embeddings(torch.nn.Sequential(model[1]))
    ema = copy.deepcopy(model)  # an EMA/teacher copy: its own Parameters
    opt = bo.AdamW8bit(ema.parameters())
    for p in ema.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[ema[0].weight]["state1"].dtype == torch.float32  # built-in override
    assert opt.state[ema[1].weight]["state1"].dtype == torch.float32  # keep_32bit_embeddings
    assert opt.state[ema[2].weight]["state1"].dtype == torch.uint8
    import io
    buf = io.BytesIO()
    torch.save(model, buf)  # a whole-model pickle: loading registers the loaded modules
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert mng.get_config(loaded[0].weight) == mng.get_config(loaded[1].weight) == {
        "optim_bits": 32}
    assert mng.get_config(loaded[2].weight) == {}
    mng.initialize()  # forgotten overrides are not revived by a later copy
    assert mng.get_config(copy.deepcopy(model)[1].weight) == {}


def test_overrides_are_read_when_state_is_created(mng):
    w = torch.nn.Parameter(torch.randn(64, 128))
    opt = bo.AdamW8bit([w])
    mng.override_config(w, "optim_bits", 32)  # after construction, before the first step
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["state1"].dtype == torch.float32


def test_keep_32bit_embeddings(mng):
    model = torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 128),
                                torch.nn.Embedding(500, 16))
    assert bo.keep_32bit_embeddings(model) == 2
    opt = bo.AdamW8bit(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32
    assert opt.state[model[2].weight]["state1"].dtype == torch.float32
    assert opt.state[model[1].weight]["state1"].dtype == torch.uint8


def test_unknown_or_invalid_override_raises(mng):
    w = torch.nn.Parameter(torch.randn(64, 128))
    mng.override_config(w, "momentum", 0.9)  # not an Adam setting
    opt = bo.AdamW8bit([w])
    w.grad = torch.randn_like(w)
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    mng.initialize()
    mng.override_config(w, "optim_bits", 4)
    opt = bo.AdamW8bit([w])
    with pytest.raises(ValueError, match="optim_bits"):
        opt.step()


def test_overrides_survive_state_dict_round_trip(mng):
    model = _mlp()
    mng.override_config(model[0].weight, key_value_dict={"optim_bits": 32, "lr": 0.0})
    opt = bo.AdamW8bit(model.parameters(), lr=1e-2)
    _step(model, opt)
    fresh = bo.AdamW8bit(model.parameters(), lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    w0 = model[0].weight.detach().clone()
    _step(model, fresh)
    assert torch.equal(model[0].weight.detach(), w0)
    assert fresh.state[model[0].weight]["state1"].dtype == torch.float32
