"""The bnbfuse optimizers against torch.optim (and plain-torch references), bitsandbytes'
test protocol, plus the behaviour torch.optim users rely on."""
from __future__ import annotations

import io
import math

import pytest
import torch

import bnbfuse
import bnbfuse.functional as F
import bnbfuse.optim as bo
from optim_reference import RefAdEMAMix, RefLAMB, RefLARS, RefLion


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tests run many tiny steps; on a shared, loaded machine torch's thread pool spends
    # more time waking threads than computing. Results do not depend on the thread count.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _clean_registry():
    bo.GlobalOptimManager.get_instance().initialize()
    yield
    bo.GlobalOptimManager.get_instance().initialize()


def dequant(st: dict, i: int) -> torch.Tensor:
    """state{i} as float32, dequantized by hand with bnbfuse.functional (blocks of 256)."""
    s = st[f"state{i}"]
    if s.dtype == torch.float32:
        return s
    absmax = st[f"absmax{i}"]
    rows = absmax.reshape(-1, absmax.shape[-1])
    codes = s.reshape(rows.shape[0], -1)
    return torch.stack([F.dequantize_blockwise(c, absmax=a, code=st[f"qmap{i}"], blocksize=256)
                        for c, a in zip(codes, rows)]).reshape(s.shape)


# name: (bnbfuse class, kwargs, torch/reference factory, [(our state index, torch state key)])
CASES = {
    "adam": (bo.Adam8bit, dict(lr=1e-3, weight_decay=1e-2),
             lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-2),
             [(1, "exp_avg"), (2, "exp_avg_sq")]),
    "adamw": (bo.AdamW8bit, dict(lr=1e-3, weight_decay=1e-2),
              lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2),
              [(1, "exp_avg"), (2, "exp_avg_sq")]),
    "lion": (bo.Lion8bit, dict(lr=1e-4, weight_decay=1e-2),
             lambda ps: RefLion(ps, lr=1e-4, weight_decay=1e-2), [(1, "exp_avg")]),
    "sgd": (bo.SGD8bit, dict(lr=1e-2, momentum=0.9, weight_decay=1e-3),
                 lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=1e-3),
                 [(1, "momentum_buffer")]),
    "rmsprop": (bo.RMSprop8bit, dict(lr=1e-3, alpha=0.9),
                lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.9), [(1, "square_avg")]),
    "adagrad": (bo.Adagrad8bit, dict(lr=1e-2),
                lambda ps: torch.optim.Adagrad(ps, lr=1e-2), [(1, "sum")]),
    "ademamix": (bo.AdEMAMix8bit, dict(lr=1e-3, t_alpha=20, t_beta3=20),
                 lambda ps: RefAdEMAMix(ps, lr=1e-3, t_alpha=20, t_beta3=20),
                 [(1, "m1_m2"), (2, "nu")]),
    "lamb": (bo.LAMB8bit, dict(lr=1e-3, weight_decay=1e-2),
             lambda ps: RefLAMB(ps, lr=1e-3, weight_decay=1e-2),
             [(1, "exp_avg"), (2, "exp_avg_sq")]),
    "lars": (bo.LARS8bit, dict(lr=1e-2, momentum=0.9, weight_decay=1e-4),
             lambda ps: RefLARS(ps, lr=1e-2, momentum=0.9, weight_decay=1e-4),
             [(1, "momentum_buffer")]),
}
# class X (optim_bits=32) for the same cases
CLASS_32 = {"adam": bo.Adam32bit, "adamw": bo.AdamW32bit, "lion": bo.Lion32bit,
            "sgd": bo.SGD32bit, "rmsprop": bo.RMSprop32bit, "adagrad": bo.Adagrad32bit,
            "ademamix": bo.AdEMAMix32bit, "lamb": bo.LAMB32bit, "lars": bo.LARS32bit}


def _reload(opt_cls, kwargs, params, opt):
    """A fresh optimizer that loaded opt's state through torch.save/torch.load."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = opt_cls(params, **kwargs)
    fresh.load_state_dict(torch.load(buf))
    return fresh


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (67, 131)),  # a partial last block
                                          (torch.bfloat16, (32, 1024))], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_8bit_matches_torch(name, dtype, shape):
    """bitsandbytes' protocol: 50 steps, resync after each, state_dict round trip every 10."""
    _protocol(name, dtype, shape)


def test_8bit_adamw_protocol_large():
    _protocol("adamw", torch.float32, (128, 4096))


def _protocol(name, dtype, shape):
    opt_cls, kwargs, ref_factory, pairs = CASES[name]
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(shape) * 0.1)
    p2 = torch.nn.Parameter(p1.detach().to(dtype).clone())
    p1.data.copy_(p2.data.float())
    ref = ref_factory([p1])
    opt = opt_cls([p2], **kwargs)
    patol, prtol = (6e-5, 6e-4) if dtype == torch.float32 else (1.7e-4, 1.6e-3)
    for i in range(50):
        g = torch.randn(shape, dtype=dtype) * 0.01
        p1.grad = g.float()
        p2.grad = g.clone()
        ref.step()
        opt.step()
        st, rst = opt.state[p2], ref.state[p1]
        assert st["state1"].dtype == torch.uint8
        for idx, key in pairs:
            ours = dequant(st, idx)
            theirs = rst[key]
            bad = (~torch.isclose(ours, theirs, atol=3e-3, rtol=1e-3)).sum().item()
            assert bad < 20, f"step {i}: {bad} elements of state{idx} differ from {key}"
        err = (p1.detach() - p2.detach().float()).abs()
        rel = err / (p1.detach().abs() + 1e-9)
        assert err.mean().item() < patol, f"step {i}: mean param error {err.mean().item()}"
        assert rel.mean().item() < prtol, f"step {i}: mean relative error {rel.mean().item()}"
        # resync, so that the errors of one step are measured, not their sum
        with torch.no_grad():
            p1.copy_(p2.float())
            for idx, key in pairs:
                rst[key].copy_(dequant(st, idx))
        if i % 10 == 9:
            before = {k: v.clone() for k, v in opt.state[p2].items() if torch.is_tensor(v)}
            opt = _reload(opt_cls, kwargs, [p2], opt)
            for k, v in before.items():
                assert torch.equal(opt.state[p2][k], v)


@pytest.mark.parametrize("name", list(CASES))
def test_32bit_matches_torch(name):
    _, kwargs, ref_factory, pairs = CASES[name]
    torch.manual_seed(1)
    p1 = torch.nn.Parameter(torch.randn(64, 96) * 0.1)
    p2 = torch.nn.Parameter(p1.detach().clone())
    ref, opt = ref_factory([p1]), CLASS_32[name]([p2], **kwargs)
    for _ in range(20):
        g = torch.randn(64, 96) * 0.01
        p1.grad, p2.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    torch.testing.assert_close(p2.detach(), p1.detach(), atol=1e-6, rtol=1e-5)
    for idx, key in pairs:
        assert opt.state[p2][f"state{idx}"].dtype == torch.float32
        torch.testing.assert_close(opt.state[p2][f"state{idx}"], ref.state[p1][key],
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_x_with_optim_bits_8_is_x8bit(name):
    cls8, kwargs, _, _ = CASES[name]
    base = cls8.__mro__[1]  # X8bit derives from X
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 96))
    b = torch.nn.Parameter(a.detach().clone())
    o1, o2 = cls8([a], **kwargs), base([b], **kwargs, optim_bits=8)
    for _ in range(3):
        g = torch.randn(64, 96)
        a.grad, b.grad = g, g.clone()
        o1.step()
        o2.step()
    assert torch.equal(a, b)
    assert o2.state[b]["state1"].dtype == torch.uint8


def test_optim_bits_argument_selects_state():
    w = torch.nn.Parameter(torch.randn(64, 128))
    for bits, dtype in ((8, torch.uint8), (32, torch.float32)):
        opt = bo.AdamW([w], optim_bits=bits)
        w.grad = torch.randn_like(w)
        opt.step()
        assert opt.state[w]["state1"].dtype == dtype and opt.state[w]["state2"].dtype == dtype


def test_state_keys_are_bitsandbytes():
    big = torch.nn.Parameter(torch.randn(64, 128))
    for cls, keys in ((bo.AdamW8bit, {"step", "state1", "state2", "absmax1", "absmax2",
                                      "qmap1", "qmap2"}),
                      (bo.Lion8bit, {"step", "state1", "absmax1", "qmap1"}),
                      (bo.AdamW32bit, {"step", "state1", "state2"}),
                      (bo.SGD32bit, {"step", "state1"})):
        opt = cls([big], lr=1e-3, **({"momentum": 0.9} if cls is bo.SGD32bit else {}))
        big.grad = torch.randn_like(big)
        opt.step()
        assert set(opt.state[big]) == keys, cls.__name__
        assert opt.state[big]["step"] == 1
    opt8 = bo.AdamW8bit([big])
    big.grad = torch.randn_like(big)
    opt8.step()
    assert torch.equal(opt8.state[big]["qmap1"], F.create_dynamic_map(signed=True))
    assert torch.equal(opt8.state[big]["qmap2"], F.create_dynamic_map(signed=False))
    assert opt8.state[big]["absmax1"].shape == (32,)


def test_min_8bit_size_decides_on_numel():
    small = torch.nn.Parameter(torch.randn(4095))
    exact = torch.nn.Parameter(torch.randn(4096))
    opt = bo.AdamW8bit([small, exact])
    small.grad, exact.grad = torch.randn_like(small), torch.randn_like(exact)
    opt.step()
    assert opt.state[small]["state1"].dtype == torch.float32
    assert opt.state[exact]["state1"].dtype == torch.uint8
    opt = bo.AdamW8bit([small], min_8bit_size=0)
    opt.step()
    assert opt.state[small]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_param_dtypes_state_precision_independent(dtype):
    w = torch.nn.Parameter(torch.randn(64, 128, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(10, dtype=dtype))
    opt = bo.AdamW8bit([w, b], lr=1e-2)
    start = w.detach().clone()
    for _ in range(3):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    assert w.dtype == dtype and not torch.equal(w.detach(), start)
    assert opt.state[w]["state1"].dtype == torch.uint8
    assert opt.state[w]["absmax1"].dtype == torch.float32
    assert opt.state[b]["state1"].dtype == torch.float32
    assert torch.isfinite(w.detach().float()).all()


@pytest.mark.parametrize("numel", [0, 1, 3, 255, 257])
@pytest.mark.parametrize("cls", [bo.AdamW8bit, bo.Lion8bit, bo.AdEMAMix8bit, bo.LAMB8bit])
def test_empty_and_tiny_tensors(cls, numel):
    p = torch.nn.Parameter(torch.randn(numel))
    scalar = torch.nn.Parameter(torch.tensor(0.5))
    opt = cls([p, scalar], lr=1e-3, min_8bit_size=0)
    for _ in range(3):
        p.grad, scalar.grad = torch.randn_like(p), torch.tensor(0.3)
        opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    assert opt.state[p]["step"] == 3
    assert torch.isfinite(p.detach()).all() and torch.isfinite(scalar.detach())
    assert scalar.item() != 0.5
    opt2 = cls([p, scalar], lr=1e-3, min_8bit_size=0)
    opt2.load_state_dict(opt.state_dict())


def test_zero_gradient_after_training_keeps_params_stable():
    # with v requantized to zero while m is not, a zero-gradient step would move p by ~lr*m/eps
    torch.manual_seed(0)
    p8 = torch.nn.Parameter(torch.randn(64, 256) * 0.1)
    p32 = torch.nn.Parameter(p8.detach().clone())
    o8, o32 = bo.AdamW8bit([p8], lr=1e-3), torch.optim.AdamW([p32], lr=1e-3)
    for step in range(40):
        g = torch.randn(64, 256) * 0.01
        if step >= 5:  # most elements stop receiving gradient; a few get large ones
            g = torch.zeros_like(g)
            g[:, :2] = torch.randn(64, 2) * 10
        p8.grad, p32.grad = g.clone(), g.clone()
        o8.step()
        o32.step()
    diff = (p8.detach() - p32.detach()).abs()
    assert diff.max().item() < 5e-3, diff.max().item()


def test_sparse_embedding_rows_and_dead_relu_track_fp32_adamw():
    """Rows that get gradient once and then never again (rare tokens), and units that die:
    8-bit AdamW stays within a fraction of lr of fp32 AdamW (no m/eps blow-up)."""
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(512, 64), torch.nn.Linear(64, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, 8))

    m8, m32 = build(), build()
    o8 = bo.AdamW8bit(m8.parameters(), lr=1e-3, min_8bit_size=0)
    o32 = torch.optim.AdamW(m32.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(30):
        if step == 10:  # half the hidden units die: zero gradient from now on, m and v not 0
            with torch.no_grad():
                for m in (m8, m32):
                    m[1].bias[:128] = -100.0
        # a few frequent tokens every step, and step-specific rare ones
        ids = torch.cat([torch.randint(0, 8, (24,), generator=gen),
                         torch.randint(8, 512, (8,), generator=gen)])
        target = torch.randn(32, 8, generator=gen)
        for m, o in ((m8, o8), (m32, o32)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(ids), target).backward()
            o.step()
    # 30 steps of lr 1e-3 move an element by at most ~0.03; a blow-up moves it by far more.
    # (bitsandbytes' CPU AdamW8bit: max 1.2e-2, mean 1.4e-4 here; ours 1.2e-2, 1.3e-4.)
    for (name, a), b in zip(m8.named_parameters(), m32.parameters()):
        diff = (a.detach() - b.detach()).abs()
        assert diff.max().item() < 1.5e-2, f"{name}: max |8-bit - fp32| = {diff.max().item()}"
        assert diff.mean().item() < 2e-4, f"{name}: mean |8-bit - fp32| = {diff.mean().item()}"


@pytest.mark.parametrize("cls", [bo.AdamW8bit, bo.AdamW32bit, bo.Lion8bit, bo.SGD8bit,
                                 bo.LAMB8bit, bo.AdEMAMix8bit])
def test_non_finite_gradient_elements_leave_param_unchanged(cls):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 128))
    kw = {"momentum": 0.9} if cls is bo.SGD8bit else {}
    opt = cls([w], lr=1e-2, **kw)
    w.grad = torch.randn_like(w)
    opt.step()
    before = w.detach().clone()
    g = torch.randn_like(w)
    g[3, 5], g[10, 0], g[63, 127] = float("nan"), float("inf"), float("-inf")
    w.grad = g
    opt.step()
    bad = ~torch.isfinite(g)
    assert torch.equal(w.detach()[bad], before[bad])
    assert not torch.equal(w.detach()[~bad], before[~bad])
    assert torch.isfinite(w.detach()).all()
    for key in ("state1", "state2"):
        if key in opt.state[w] and opt.state[w][key].dtype == torch.float32:
            assert torch.isfinite(opt.state[w][key]).all()


def test_sparse_and_complex_gradients_raise():
    emb = torch.nn.Embedding(100, 64, sparse=True)
    opt = bo.AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    c = torch.nn.Parameter(torch.randn(64, 128, dtype=torch.complex64))
    opt = bo.AdamW8bit([c])
    c.grad = torch.randn_like(c)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


def test_params_without_grad_are_skipped_and_zero_grad():
    a = torch.nn.Parameter(torch.randn(64, 128))
    b = torch.nn.Parameter(torch.randn(64, 128))
    opt = bo.AdamW8bit([a, b])
    a.grad = torch.randn_like(a)
    b0 = b.detach().clone()
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), b0)
    opt.zero_grad()
    assert a.grad is None
    a0 = a.detach().clone()
    opt.step()
    assert torch.equal(a.detach(), a0) and opt.state[a]["step"] == 1


def test_param_groups_match_torch():
    torch.manual_seed(0)
    ps1 = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(32))]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    groups = lambda ps: [{"params": [ps[0]], "lr": 1e-2, "weight_decay": 0.1},  # noqa: E731
                         {"params": [ps[1]], "lr": 1e-3, "betas": (0.8, 0.99)}]
    ours = bo.AdamW32bit(groups(ps2), lr=5e-3)
    ref = torch.optim.AdamW(groups(ps1), lr=5e-3)
    for _ in range(10):
        for a, b in zip(ps1, ps2):
            g = torch.randn_like(a)
            a.grad, b.grad = g, g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ps1, ps2):
        torch.testing.assert_close(b.detach(), a.detach(), atol=1e-6, rtol=1e-5)
    assert ours.param_groups[1]["betas"] == (0.8, 0.99)
    frozen = torch.nn.Parameter(torch.randn(64, 64))
    ours.add_param_group({"params": [frozen], "lr": 0.0})
    f0 = frozen.detach().clone()
    frozen.grad = torch.randn_like(frozen)
    ours.step()
    assert torch.equal(frozen.detach(), f0)
    with pytest.raises(ValueError, match="learning rate"):
        ours.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": -1.0})


def test_closure_and_scheduler_like_torch():
    torch.manual_seed(0)
    x, y = torch.randn(16, 32), torch.randn(16, 4)

    def run(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Linear(32, 4)
        opt = make_opt(model.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        losses = []
        for _ in range(8):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure).item())
            sched.step()
        return model, losses, opt

    m1, l1, o1 = run(lambda ps: bo.Adam32bit(ps, lr=1e-2))
    m2, l2, _ = run(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert o1.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 2)
    torch.testing.assert_close(m1.weight.detach(), m2.weight.detach(), atol=1e-6, rtol=1e-5)
    _, l3, _ = run(lambda ps: bo.Adam8bit(ps, lr=1e-2, min_8bit_size=0))
    assert l3[-1] < l3[0]


def test_max_unorm_bounds_8bit_and_32bit_steps():
    for cls in (bo.AdamW8bit, bo.AdamW32bit):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(64, 128))
        opt = cls([w], lr=1.0, weight_decay=0.0, max_unorm=1e-3)
        for _ in range(3):
            before = w.detach().clone()
            w.grad = torch.randn_like(w)
            opt.step()
            moved = (w.detach() - before).norm().item()
            assert moved <= 1e-3 * before.norm().item() * 1.001, (cls.__name__, moved)
        free = torch.nn.Parameter(before.clone())
        opt = cls([free], lr=1.0, weight_decay=0.0)
        free.grad = torch.randn_like(free)
        opt.step()
        assert (free.detach() - before).norm().item() > 10 * 1e-3 * before.norm().item()


def test_lamb_and_lars_use_the_trust_ratio_in_8bit():
    torch.manual_seed(0)
    for cls8, ref_f in ((lambda ps: bo.LAMB8bit(ps, lr=1e-2, weight_decay=1e-2, max_unorm=0),
                         lambda ps: RefLAMB(ps, lr=1e-2, weight_decay=1e-2, max_unorm=0)),
                        (lambda ps: bo.LARS8bit(ps, lr=1e-1, momentum=0.9, max_unorm=0.5),
                         lambda ps: RefLARS(ps, lr=1e-1, momentum=0.9, max_unorm=0.5))):
        p1 = torch.nn.Parameter(torch.randn(64, 128) * 2)
        p2 = torch.nn.Parameter(p1.detach().clone())
        ref, opt = ref_f([p1]), cls8([p2])
        start = p1.detach().clone()
        for _ in range(5):
            g = torch.randn(64, 128) * 0.01
            p1.grad, p2.grad = g.clone(), g.clone()
            ref.step()
            opt.step()
        ref_move = (p1.detach() - start).norm().item()
        our_move = (p2.detach() - start).norm().item()
        assert our_move == pytest.approx(ref_move, rel=2e-2)


def test_percentile_clipping_clips_a_spike_like_manual_clipping():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(64, 64))
    w2 = torch.nn.Parameter(w1.detach().clone())
    ours = bo.SGD32bit([w1], lr=0.1, momentum=0.9, percentile_clipping=50)
    ref = torch.optim.SGD([w2], lr=0.1, momentum=0.9)
    norms = []
    for step in range(12):
        g = torch.randn(64, 64)
        if step == 10:
            g = g * 100  # the spike
        norms.append(g.norm().item())
        w1.grad = g.clone()
        # percentile 50 of the norms seen so far ("lower" interpolation)
        seen = torch.tensor(norms[-100:], dtype=torch.float64) ** 2
        clip = math.sqrt(torch.quantile(seen, 0.5, interpolation="lower").item())
        w2.grad = g * min(1.0, clip / norms[-1])
        ours.step()
        ref.step()
        torch.testing.assert_close(w1.detach(), w2.detach(), atol=1e-5, rtol=1e-5)
    assert ours.state[w1]["gnorm_vec"].shape == (100,)


@pytest.mark.parametrize("make", [
    lambda ps: bo.Adam(ps, amsgrad=True),
    lambda ps: bo.AdamW8bit(ps, amsgrad=True),
    lambda ps: bo.Adam(ps, lr=-1.0),
    lambda ps: bo.Adam(ps, betas=(1.0, 0.999)),
    lambda ps: bo.Adam(ps, betas=(0.9, 0.999, 0.9)),
    lambda ps: bo.Adam(ps, eps=-1e-8),
    lambda ps: bo.Adam(ps, weight_decay=-0.1),
    lambda ps: bo.Adam(ps, optim_bits=16),
    lambda ps: bo.Adam(ps, min_8bit_size=-1),
    lambda ps: bo.Adam(ps, percentile_clipping=0),
    lambda ps: bo.Adam32bit(ps, optim_bits=8),
    lambda ps: bo.RMSprop(ps, alpha=1.5),
    lambda ps: bo.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5, nesterov=True),
    lambda ps: bo.LAMB(ps, amsgrad=True),
    lambda ps: bo.LARS(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: bo.LARS(ps, lr=0.1, momentum=0.9, dampening=0.1),
    lambda ps: bo.AdEMAMix(ps, betas=(0.9, 0.999)),
    lambda ps: bo.AdEMAMix(ps, t_alpha=0),
])
def test_invalid_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make([torch.nn.Parameter(torch.randn(4))])


@pytest.mark.parametrize("cls", [bo.AdamW8bit, bo.Lion8bit, bo.LAMB8bit, bo.AdEMAMix8bit])
@pytest.mark.parametrize("group", [
    {"maximize": True}, {"differentiable": True}, {"lr": torch.tensor(-1e-3)},
    {"lr": torch.tensor([1e-3, 1e-3])},
], ids=["maximize", "differentiable", "negative tensor lr", "two-element lr"])
def test_group_settings_that_would_be_ignored_raise(cls, group):
    opt = cls([torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4))], **group})
    assert len(opt.param_groups) == 1


def test_a_parameter_that_changed_shape_names_the_fix():
    e = torch.nn.Embedding(100, 64)
    opt = bo.AdamW8bit(e.parameters())
    e.weight.grad = torch.randn_like(e.weight)
    opt.step()
    e.weight.data = torch.randn(110, 64)  # tokens added in place
    e.weight.grad = torch.randn_like(e.weight)
    with pytest.raises(RuntimeError, match="changed shape"):
        opt.step()
    del opt.state[e.weight]
    opt.step()
    assert opt.state[e.weight]["state1"].shape == (110, 64)


def test_a_failing_first_step_leaves_no_empty_state():
    w = torch.nn.Parameter(torch.randn(64, 64))
    bo.GlobalOptimManager.get_instance().override_config(w, "no_such_setting", 1)
    opt = bo.AdamW8bit([w])
    w.grad = torch.randn_like(w)
    try:
        with pytest.raises(ValueError, match="no_such_setting"):
            opt.step()
        assert w not in opt.state
    finally:
        bo.GlobalOptimManager.get_instance().initialize()


@pytest.mark.parametrize("make, match", [
    (lambda ps: bo.Adam(ps, args={"skip_zeros": True}), "skip_zeros"),
    (lambda ps: bo.RMSprop(ps, momentum=0.9), "momentum"),
    (lambda ps: bo.RMSprop8bit(ps, centered=True), "centered"),
    (lambda ps: bo.SGD(ps, lr=0.1), "momentum"),
    (lambda ps: bo.LARS(ps, lr=0.1), "momentum"),
    (lambda ps: bo.LAMB(ps, bias_correction=False), "bias_correction"),
    (lambda ps: bo.LAMB(ps, adam_w_mode=False), "adam_w_mode"),
])
def test_unsupported_features_raise_not_implemented(make, match):
    with pytest.raises(NotImplementedError, match=match):
        make([torch.nn.Parameter(torch.randn(4))])


def test_signatures_follow_bitsandbytes_positional_order():
    w = torch.nn.Parameter(torch.randn(64, 128))
    opt = bo.Adam([w], 1e-2, (0.8, 0.9), 1e-6, 0.1, False, 8)
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["optim_bits"] == 8
    opt = bo.Lion8bit([w], 1e-3, (0.9, 0.98), 0.1, None, 16)
    assert opt.defaults["min_8bit_size"] == 16 and opt.defaults["optim_bits"] == 8
    opt = bo.LAMB([w], 1e-3, True, (0.9, 0.99), 1e-6, 0.0, False, True, 8, None, 4096, 0.5)
    assert opt.defaults["max_unorm"] == 0.5
    opt = bo.Adagrad([w], 1e-2, 0.1, 0.0, 0.5, 1e-10, 8)
    assert opt.defaults["lr_decay"] == 0.1 and opt.defaults["initial_accumulator_value"] == 0.5
    opt = bo.AdEMAMix([w], 1e-3, (0.9, 0.99, 0.999), 4.0, 100, 200, 1e-8, 0.0, 8)
    assert opt.defaults["t_beta3"] == 200 and opt.defaults["optim_bits"] == 8
    with pytest.raises(TypeError):
        bo.Adam([w], 1e-3, (0.9, 0.99), 1e-8, 0, False, 32, None, 4096, False, 0.5)


def test_adagrad_lr_decay_and_initial_accumulator_match_torch():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(64, 64))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = bo.Adagrad32bit([p2], lr=0.1, lr_decay=0.05, initial_accumulator_value=0.3,
                           weight_decay=0.01)
    ref = torch.optim.Adagrad([p1], lr=0.1, lr_decay=0.05, initial_accumulator_value=0.3,
                              weight_decay=0.01)
    for _ in range(10):
        g = torch.randn(64, 64)
        p1.grad, p2.grad = g, g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p2.detach(), p1.detach(), atol=1e-6, rtol=1e-5)
    q = torch.nn.Parameter(torch.randn(64, 64))
    o8 = bo.Adagrad8bit([q], initial_accumulator_value=0.3)
    q.grad = torch.zeros_like(q)
    o8.step()
    torch.testing.assert_close(dequant(o8.state[q], 1), torch.full((64, 64), 0.3))


def test_nesterov_sgd_matches_torch():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(64, 64))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = bo.SGD32bit([p2], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ref = torch.optim.SGD([p1], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for _ in range(10):
        g = torch.randn(64, 64)
        p1.grad, p2.grad = g, g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p2.detach(), p1.detach(), atol=1e-6, rtol=1e-5)


def test_non_contiguous_parameter():
    base = torch.randn(128, 64)
    w = torch.nn.Parameter(base.t())  # a transposed (non-contiguous) parameter
    assert not w.is_contiguous()
    ref_w = torch.nn.Parameter(base.t().contiguous())
    o1, o2 = bo.AdamW32bit([w], lr=1e-2), torch.optim.AdamW([ref_w], lr=1e-2)
    for _ in range(3):
        g = torch.randn(64, 128)
        w.grad, ref_w.grad = g, g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(w.detach(), ref_w.detach(), atol=1e-6, rtol=1e-5)


def test_bitsandbytes_cpu_adamw8bit_agrees_loosely():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(64, 256) * 0.1)
    p2 = torch.nn.Parameter(p1.detach().clone())
    p3 = torch.nn.Parameter(p1.detach().clone())
    ours, theirs = bo.AdamW8bit([p1], lr=1e-3), bnb.optim.AdamW8bit([p2], lr=1e-3)
    fp32 = torch.optim.AdamW([p3], lr=1e-3)
    for _ in range(20):
        g = torch.randn(64, 256) * 0.01
        p1.grad, p2.grad, p3.grad = g.clone(), g.clone(), g.clone()
        ours.step()
        theirs.step()
        fp32.step()
    ours_err = (p1.detach() - p3.detach()).abs().mean().item()
    theirs_err = (p2.detach() - p3.detach()).abs().mean().item()
    assert (p1.detach() - p2.detach()).abs().max().item() < 1e-3
    assert ours_err <= 2 * theirs_err + 1e-6


def test_python_m_bnbfuse_lists_optimizers_importable_as_bnb():
    import bnbfuse as bnb

    for name in ("Adam", "AdamW", "Lion", "SGD", "RMSprop", "Adagrad", "AdEMAMix", "LAMB",
                 "LARS"):
        for suffix in ("", "8bit", "32bit"):
            assert issubclass(getattr(bnb.optim, name + suffix), torch.optim.Optimizer)
    assert bnbfuse.optim.GlobalOptimManager is bo.GlobalOptimManager


def test_percentile_clipping_does_not_depend_on_the_thread_count():
    # The gradient norm is a fixed blocked float64 sum: the same bits with 1 or 2 threads
    # (a float32 torch.sum splits differently per thread count).
    def run(threads):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(0)
            w = torch.nn.Parameter(torch.randn(300_000, generator=gen))
            opt = bo.Adam8bit([w], lr=1e-3, percentile_clipping=5)
            for _ in range(50):
                w.grad = torch.randn(300_000, generator=gen) * (1 + 1e3 * torch.rand(1, generator=gen))
                opt.step()
            return w.detach().clone(), opt.state[w]["gnorm_vec"].clone()
        finally:
            torch.set_num_threads(saved)

    (w1, h1), (w2, h2) = run(1), run(2)
    assert torch.equal(h1, h2)
    assert torch.equal(w1, w2)
