"""What the ops check before a kernel runs, on every backend (runs without a GPU): NaN maps
are refused by every op that takes one (once per map, not once per call), the tensors of a
CUDA call must share its device, the norms' scratch size, and the fixed summation order of
the norms that the CPU and CUDA kernels share."""
import ctypes

import numpy as np
import pytest
import torch

import bnbfuse.functional as F
from bnbfuse import _native
from bnbfuse.backends import reference as R
from bnbfuse.backends.native import check_one_device
from bnbfuse.ops import quantize as Q
from bnbfuse.ops.optimizer import NORM_GROUP_BLOCKS, norms_scratch_size, optimizer_scalars
from bnbfuse.ops.optimizer import KernelHyperparams
from bnbfuse.ops.rules import RULES
from bnbfuse.row_quantization import quant_map, quantize_table
from optimizer_cases import clone_all, grads, hparams, make_state, maps, native, ops

NAN_MSG = "holds NaN"


def _nan_map(signed=True, at=77):
    code = F.dynamic_map(signed).clone()
    code[at] = float("nan")
    return code


# ---- NaN maps ---------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["dispatch", "reference"])
def test_quantize_and_dequantize_refuse_a_nan_map(impl):
    q = ops.quantize_blockwise if impl == "dispatch" else R.quantize_blockwise
    dq = ops.dequantize_blockwise if impl == "dispatch" else R.dequantize_blockwise
    x = torch.randn(1000)
    with pytest.raises(ValueError, match=rf"{NAN_MSG} \(at index 77\)"):
        q(x, _nan_map(), 256)
    codes, absmax = ops.quantize_blockwise(x, F.dynamic_map(True), 256)
    with pytest.raises(ValueError, match=NAN_MSG):
        dq(codes, absmax, _nan_map(at=3), 256, torch.float32)


def test_functional_api_refuses_a_nan_map():
    x = torch.randn(300)
    with pytest.raises(ValueError, match=NAN_MSG):
        F.quantize_blockwise(x, code=_nan_map())
    codes, state = F.quantize_blockwise(x)
    with pytest.raises(ValueError, match=NAN_MSG):
        F.dequantize_blockwise(codes, absmax=state.absmax, code=_nan_map(), blocksize=4096)


@pytest.mark.parametrize("impl", ["dispatch", "reference"])
@pytest.mark.parametrize("which", ["qmap1", "qmap2"])
@pytest.mark.parametrize("norms", [False, True], ids=["update", "norms"])
def test_optimizer_ops_refuse_a_nan_map_and_write_nothing(impl, which, norms):
    n = 1000
    p = torch.randn(n)
    g = grads(n, torch.float32, seed=1)
    state = make_state("adamw", n, True)
    q1, q2 = maps()
    q1, q2 = (_nan_map(True), q2) if which == "qmap1" else (q1, _nan_map(False, at=200))
    before = clone_all([p, *state])
    src = ops if impl == "dispatch" else R
    with pytest.raises(ValueError, match=rf"{which} {NAN_MSG}"):
        if norms:
            src.optimizer_norms_8bit_blockwise("adamw", p, g, *state, q1, q2, *hparams(1))
        else:
            src.optimizer_update_8bit_blockwise("adamw", p, g, *state, q1, q2, *hparams(1), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, [p, *state]))


@pytest.mark.parametrize("impl", ["dispatch", "reference"])
@pytest.mark.parametrize("scheme,bits", [("int8", 8), ("nf4", 4)])
def test_lookup_refuses_a_nan_map(impl, scheme, bits):
    base, absmax = quantize_table(torch.randn(10, 8), scheme, 4)
    qmap = quant_map(scheme).clone()
    qmap[5] = float("nan")
    fn = ops.fusion_embedding_lookup if impl == "dispatch" else R.fusion_embedding_lookup
    with pytest.raises(ValueError, match=f"qmap {NAN_MSG}"):
        fn(torch.tensor([1, 2]), base, absmax, qmap, torch.randn(2, 8), bits, 4)


def test_a_map_is_checked_once_until_it_is_written(monkeypatch):
    code = F.dynamic_map(True).clone()
    x = torch.randn(500)
    calls = []
    real = torch.isnan
    monkeypatch.setattr(Q.torch, "isnan", lambda t: calls.append(1) or real(t))
    for _ in range(3):
        ops.quantize_blockwise(x, code, 128)
    assert len(calls) == 1  # later calls find it checked
    code[9] = float("nan")  # an in-place write bumps the version: checked again, and refused
    with pytest.raises(ValueError, match=rf"{NAN_MSG} \(at index 9\)"):
        ops.quantize_blockwise(x, code, 128)
    code[9] = 0.5
    ops.quantize_blockwise(x, code, 128)  # fixed in place: accepted again
    fresh = code.clone()  # another tensor: its own check
    ops.quantize_blockwise(x, fresh, 128)
    assert len(calls) == 4


def test_functional_copies_of_a_checked_map_are_not_checked_again(monkeypatch):
    code = F.dynamic_map(True).clone()
    x = torch.randn(500)
    F.quantize_blockwise(x, code=code)
    calls = []
    real = torch.isnan
    monkeypatch.setattr(Q.torch, "isnan", lambda t: calls.append(1) or real(t))
    for _ in range(3):
        codes, state = F.quantize_blockwise(x, code=code)  # a fresh copy of the map each time
        F.dequantize_blockwise(codes, state)
    assert calls == []


def test_the_checked_map_cache_goes_by_identity_and_drops_freed_maps():
    import gc

    cache = Q._IdentityCache()
    a, b = torch.zeros(256), torch.zeros(256)  # equal values, different tensors
    cache[a] = "a"
    assert cache.get(a) == "a" and cache.get(b) is None
    cache[a] = "again"  # replacing keeps one entry, and the old reference's death no other
    assert cache.get(a) == "again" and len(cache) == 1
    del a
    gc.collect()
    assert len(cache) == 0
    # the module's cache of NaN-free maps lets a freed map go too
    before = len(Q._NAN_FREE_MAPS)
    code = F.dynamic_map(True).clone()
    Q.check_map_has_no_nan(code)
    assert len(Q._NAN_FREE_MAPS) == before + 1
    del code
    gc.collect()
    assert len(Q._NAN_FREE_MAPS) == before


def test_a_map_is_not_checked_inside_torch_compile_tracing():
    # Tracing sees fake tensors: the op's kernel checks the real map when the graph runs.
    assert Q.check_map_has_no_nan(torch.empty(256, device="meta")) is None


# ---- devices and scratch ----------------------------------------------------------------------
def test_check_one_device_names_the_tensor_on_another_device():
    cpu = torch.device("cpu")
    check_one_device("op", cpu, a=torch.zeros(2), b=None)
    with pytest.raises(ValueError, match="op: absmax is on meta, but the call runs on cpu; "
                                         "all tensors must be on one device"):
        check_one_device("op", cpu, code=torch.zeros(2), absmax=torch.empty(2, device="meta"))


def test_optimizer_contract_names_a_state_on_another_device():
    n = 300
    state = make_state("adamw", n, True)
    # (A meta tensor among the op's arguments dispatches to the fake kernel: the contract
    # itself is what the CPU and CUDA kernels run first.)
    from bnbfuse.ops.optimizer import check_state_blocks
    c1, c2, a1, a2 = state
    with pytest.raises(ValueError, match="absmax1 is on meta, the parameter on cpu"):
        check_state_blocks("adamw", n, a1.to("meta"), a2, *maps(), torch.device("cpu"))
    with pytest.raises(ValueError, match="absmax2 is on meta, the parameter on cpu"):
        check_state_blocks("adamw", n, a1, a2.to("meta"), *maps(), torch.device("cpu"))


@pytest.mark.parametrize("n,blocks", [(0, 0), (1, 1), (256, 1), (257, 2), (256 * 256, 256),
                                      (256 * 256 + 1, 257), (10**9, 3906250)])
def test_norms_scratch_size(n, blocks):
    assert norms_scratch_size(n) == 2 * (blocks + -(blocks // -NORM_GROUP_BLOCKS))


def test_norm_group_size_matches_the_c_header():
    from pathlib import Path
    header = (Path(__file__).resolve().parents[2] / "csrc/include/bnbfuse.h").read_text()
    assert f"#define BNBF_NORM_GROUP_BLOCKS {NORM_GROUP_BLOCKS}\n" in header


# ---- the norms' summation order -------------------------------------------------------------------
def _fixed_order_sums(d: np.ndarray, p: np.ndarray) -> list:
    """csrc/common/norm_order.h in numpy: np.cumsum adds strictly in order, so its last
    element is the sequential sum."""
    out = []
    for x in (d, p):
        terms = x.astype(np.float64) ** 2  # exact: a float32 squared fits a double
        nb = -(-terms.size // 256)
        terms = np.concatenate([terms, np.zeros(nb * 256 - terms.size)]).reshape(nb, 256)
        blocks = np.cumsum(terms, axis=1)[:, -1]
        ng = -(-nb // NORM_GROUP_BLOCKS)
        padded = np.concatenate([blocks, np.zeros(ng * NORM_GROUP_BLOCKS - nb)])
        groups = np.cumsum(padded.reshape(ng, NORM_GROUP_BLOCKS), axis=1)[:, -1]
        out.append(float(np.cumsum(groups)[-1]))
    return out


@native
@pytest.mark.parametrize("opt", ["lamb", "lars", "adamw"])
def test_cpu_norms_follow_the_fixed_order(opt):
    """The CPU kernel's double sums equal the fixed order bit for bit (the CUDA kernels sum
    the same way: tests/ops/test_cuda_paths.py compares the devices). 300 groups of blocks
    and a partial last block; the direction of SGD-like rules at step 1 is known exactly."""
    n = 256 * NORM_GROUP_BLOCKS * 3 + 1000
    p = torch.randn(n, generator=torch.Generator().manual_seed(5))
    g = torch.randn(n, generator=torch.Generator().manual_seed(6))
    g[7] = float("nan")
    s1, s2 = make_state(opt, n, False)
    hp = hparams(1)
    fn = _native.cpu.function("bnbf_cpu_optimizer_norms_32bit", _native.I32, _native.P,
                              _native.P, _native.I32, _native.P, _native.P,
                              ctypes.POINTER(_native.OptimizerArgs), _native.I64, _native.P,
                              _native.I32)
    args = _native.OptimizerArgs.from_scalars(optimizer_scalars(opt, KernelHyperparams(*hp)))
    out = torch.zeros(2, dtype=torch.float64)
    for threads in (1, 2):
        out.zero_()
        assert fn(RULES[opt].id, p.data_ptr(), g.data_ptr(), 0, s1.data_ptr(),
                  None if s2 is None else s2.data_ptr(), ctypes.byref(args), n, out.data_ptr(),
                  threads) == 0
        # The direction each element contributes, from the reference rule (bit-exact with
        # the kernels; tests/ops/test_optimizer_native.py), 0 where the gradient is not finite.
        d, ok = _reference_direction(opt, p, g, s1, s2, hp)
        want = _fixed_order_sums(torch.where(ok, d, 0).numpy(), torch.where(ok, p, 0).numpy())
        assert out.tolist() == want, threads


def _reference_direction(opt, p, g, s1, s2, hp):
    from bnbfuse.backends.reference import optimizer as RO
    sc = RO._scalars(opt, hp)
    st1, m2, st2 = RO._states_32(opt, p, s1, s2)
    *_, d, ok = RO._run_rule(opt, p.reshape(-1), g.reshape(-1), st1, m2, st2, sc)
    return d, ok
