"""Paged optimizers: on the CPU a no-op (bit-identical to the unpaged twin, state dicts
interchangeable); the CUDA plumbing (which states are paged, prefetch before each update,
paging again after a load) with a stand-in allocator; the real managed memory on a GPU."""
import pytest
import torch

import bnbfuse as bnb
from bnbfuse import paged
from bnbfuse.optim import compat

PAIRS = [
    ("PagedAdam", "Adam", dict(optim_bits=8)), ("PagedAdam8bit", "Adam8bit", {}),
    ("PagedAdam32bit", "Adam32bit", {}), ("PagedAdamW", "AdamW", dict(optim_bits=8)),
    ("PagedAdamW8bit", "AdamW8bit", {}), ("PagedAdamW32bit", "AdamW32bit", {}),
    ("PagedAdEMAMix", "AdEMAMix", dict(optim_bits=8, t_alpha=5, t_beta3=5)),
    ("PagedAdEMAMix8bit", "AdEMAMix8bit", {}), ("PagedAdEMAMix32bit", "AdEMAMix32bit", {}),
    ("PagedLion", "Lion", {}), ("PagedLion8bit", "Lion8bit", {}),
    ("PagedLion32bit", "Lion32bit", {}),
]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 96, generator=g)),
            torch.nn.Parameter(torch.randn(96, generator=g))]


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(t, params)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("paged_name, twin_name, kw", PAIRS)
def test_paged_is_bit_identical_to_its_twin_on_cpu(paged_name, twin_name, kw):
    a, b = _params(), _params()
    opt_a = getattr(bnb.optim, paged_name)(a, lr=1e-3, **kw)
    opt_b = getattr(bnb.optim, twin_name)(b, lr=1e-3, **kw)
    assert opt_a.is_paged and not opt_b.is_paged and isinstance(opt_a, type(opt_b))
    _run(opt_a, a, 4)
    _run(opt_b, b, 4)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        for key, value in opt_b.state[pb].items():
            other = opt_a.state[pa][key]
            assert torch.equal(other, value) if torch.is_tensor(value) else other == value
            assert not paged.is_paged(other)  # CPU state is ordinary memory


@pytest.mark.parametrize("paged_name, twin_name, kw", PAIRS[:6] + PAIRS[9:])
def test_paged_and_unpaged_state_dicts_load_into_each_other(paged_name, twin_name, kw):
    for src_name, dst_name in ((paged_name, twin_name), (twin_name, paged_name)):
        ref, src, dst = _params(), _params(), _params()
        opt_ref = getattr(bnb.optim, src_name)(ref, lr=1e-3, **kw)
        _run(opt_ref, ref, 5)
        opt_src = getattr(bnb.optim, src_name)(src, lr=1e-3, **kw)
        _run(opt_src, src, 3)
        for p, q in zip(src, dst):
            q.data.copy_(p.data)
        opt_dst = getattr(bnb.optim, dst_name)(dst, lr=1e-3, **kw)
        opt_dst.load_state_dict(opt_src.state_dict())
        _run(opt_dst, dst, 2, start=3)
        for p, q in zip(ref, dst):
            assert torch.equal(p, q), (src_name, dst_name)


def test_is_paged_on_the_base_classes_and_in_args():
    w = torch.nn.Parameter(torch.randn(8, 8))
    for make in (lambda: bnb.optim.Adam([w], is_paged=True),
                 lambda: bnb.optim.AdamW8bit([w], is_paged=True),
                 lambda: bnb.optim.Lion([w], is_paged=True),
                 lambda: bnb.optim.AdEMAMix8bit([w], is_paged=True),
                 lambda: bnb.optim.AdamW([w], args={"is_paged": True, "optim_bits": 8})):
        opt = make()
        assert opt.is_paged and opt.args.is_paged
        assert opt.page_mng is paged.GlobalPageManager.get_instance()
    assert not bnb.optim.AdamW([w]).is_paged


class _FakePages:
    """Stands in for CUDA managed memory: every state of >= PAGED_MIN_NUMEL elements is
    'paged' (a CPU copy carrying is_paged) and prefetches are recorded."""

    def __init__(self, monkeypatch):
        self.prefetched = []
        monkeypatch.setattr(paged, "pages", lambda t: t.numel() >= paged.PAGED_MIN_NUMEL)
        monkeypatch.setattr(paged, "paged_like", self.paged_like)
        monkeypatch.setattr(paged, "prefetch_tensor", lambda t, to_cpu=False:
                            self.prefetched.append(t))

    @staticmethod
    def paged_like(t):
        out = t.clone()
        out.is_paged = True
        return out


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "PagedAdamW32bit", "PagedLion8bit"])
def test_large_states_are_paged_and_prefetched_before_each_update(monkeypatch, name):
    fake = _FakePages(monkeypatch)
    big = torch.nn.Parameter(torch.randn(400, 300))    # 120,000 elements: paged
    small = torch.nn.Parameter(torch.randn(64, 64))    # stays in ordinary memory
    opt = getattr(bnb.optim, name)([big, small], lr=1e-3)
    for _ in range(2):
        big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
        opt.step()
    keys = [k for k in ("state1", "state2") if k in opt.state[big]]
    assert all(paged.is_paged(opt.state[big][k]) for k in keys)
    assert not any(paged.is_paged(v) for v in opt.state[small].values())
    assert len(fake.prefetched) == 2 * len(keys)
    assert all(t is opt.state[big][k] for t, k in zip(fake.prefetched, keys * 2))
    # a load puts state in ordinary memory; the paged optimizer pages it again
    opt2 = getattr(bnb.optim, name)([big, small], lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    assert all(paged.is_paged(opt2.state[big][k]) for k in keys)
    assert torch.equal(opt2.state[big]["state1"], opt.state[big]["state1"])


def test_page_manager_tracks_live_tensors_only():
    mng = paged.GlobalPageManager.get_instance()
    before = len(mng.paged_tensors)
    t = torch.zeros(4)
    mng.register(t)
    assert len(mng.paged_tensors) == before + 1
    del t
    assert len(mng.paged_tensors) == before
    with pytest.raises(RuntimeError, match="get_instance"):
        paged.GlobalPageManager()
    with pytest.raises(ValueError, match="paged"):
        paged.prefetch_tensor(torch.zeros(4))


def test_paging_needs_a_gpu():
    if paged.available():
        pytest.skip("a GPU is present")
    assert not paged.pages(torch.zeros(paged.PAGED_MIN_NUMEL))
    with pytest.raises(RuntimeError, match="CUDA"):
        paged.get_paged(4, 4)


@pytest.mark.cuda
def test_cuda_paged_tensor_is_managed_memory_freed_with_the_tensor():
    import gc
    t = paged.get_paged(1000, 300, dtype=torch.float32, device="cuda")
    assert t.is_cuda and t.shape == (1000, 300) and paged.is_paged(t) and int(t.abs().sum()) == 0
    t.fill_(2.0)
    paged.prefetch_tensor(t, to_cpu=True)
    paged.prefetch_tensor(t)
    torch.cuda.synchronize()
    assert float(t.sum()) == 2.0 * t.numel()
    free_before = torch.cuda.mem_get_info()[0]
    big = paged.get_paged(64 << 20, dtype=torch.uint8)
    paged.prefetch_tensor(big)
    torch.cuda.synchronize()
    del big
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] >= free_before - (8 << 20)  # the 64 MiB came back


@pytest.mark.cuda
@pytest.mark.parametrize("paged_name, twin_name, kw", [PAIRS[4], PAIRS[5], PAIRS[10]])
def test_cuda_paged_optimizer_matches_its_twin(paged_name, twin_name, kw):
    shape = (400, 300)
    torch.manual_seed(0)
    start = torch.randn(shape, device="cuda")
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_a = getattr(bnb.optim, paged_name)([a], lr=1e-3, **kw)
    opt_b = getattr(bnb.optim, twin_name)([b], lr=1e-3, **kw)
    for _ in range(3):
        g = torch.randn(shape, device="cuda")
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.cuda.synchronize()
    assert paged.is_paged(opt_a.state[a]["state1"]) and torch.equal(a, b)
    assert torch.equal(opt_a.state[a]["state1"], opt_b.state[b]["state1"])
    opt_b.load_state_dict(opt_a.state_dict())  # paged state loads into the twin too
    assert torch.equal(opt_b.state[b]["state1"], opt_a.state[a]["state1"])
