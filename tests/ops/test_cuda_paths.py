"""CUDA paths the other CUDA tests leave out (all skipped without a GPU): a second GPU while
another is current, non-default streams, LAMB/LARS/max_unorm/percentile clipping end to end
against the CPU kernels, the norms' bits on every grid size, the non-contiguous copy-back,
NaN/Inf output bits, the grid-wide path of huge quantization blocks, NaN maps, CUDA graph
capture, and tensors of more than 2^31 elements.

Bit-exact where the kernels promise it (docs/optimizers.md): updates, norms, quantization and
the NaN bits of tests/ops/nan_cases.py equal the CPU kernels' on any GPU. Percentile clipping
sums the gradient norm with torch ops, whose reduction order differs between devices, so it
is compared within a tolerance.

benchmarks/gpu_check.sh runs `test_every_kernel_family_once` under compute-sanitizer.
"""
import ctypes

import pytest
import torch

import bnbfuse.functional as F
import bnbfuse.optim as O
from bnbfuse import _native
from bnbfuse.nn import FusionEmbedding  # noqa: F401  (registers the lookup autograd)
from bnbfuse.ops.optimizer import KernelHyperparams, norms_scratch_size, optimizer_scalars
from bnbfuse.ops.rules import RULES
from bnbfuse.row_quantization import quant_map, quantize_table
from nan_cases import (BF16_NANS, F16_NANS, F32_NANS, INT, X86_DEFAULT_NAN, bits_of, f32,
                       from_bits, mul_bits, param_with_nans, store_bits)
from optimizer_cases import (DTYPES, bits_equal, clone_all, grads, hparams, make_state, maps,
                             ops, run_update)

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _cuda_library():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not _native.cuda.loaded:
        pytest.skip(f"native CUDA library not loaded: {_native.cuda.error}")


def _to(ts, device):
    return [t if t is None else t.to(device) for t in ts]


def _cpu(ts):
    return [t if t is None else t.cpu() for t in ts]


def _all_bits_equal(a, b):
    return all(bits_equal(x, y) for x, y in zip(a, b))


# ---- a second GPU -------------------------------------------------------------------------
def test_every_op_runs_on_the_tensors_gpu_and_leaves_the_current_device_alone():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", 1)
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    code = F.dynamic_map(True)
    n = 5000
    p = torch.randn(n, generator=torch.Generator().manual_seed(1))
    g = grads(n, torch.float32, seed=2)
    state = make_state("lamb", n, True)
    base, absmax = quantize_table(torch.randn(50, 24), "int8", 8)
    fusion, ids = torch.randn(3, 24), torch.tensor([0, 7, 49, 50, 52])
    with torch.cuda.device(0):
        c, a = ops.quantize_blockwise(x.to(dev), code.to(dev), 256)
        c_ref, a_ref = ops.quantize_blockwise(x, code, 256)
        assert c.device == dev and torch.equal(c.cpu(), c_ref) and bits_equal(a.cpu(), a_ref)
        y = ops.dequantize_blockwise(c, a, code.to(dev), 256, torch.float16)
        assert bits_equal(y.cpu(), ops.dequantize_blockwise(c_ref, a_ref, code, 256,
                                                            torch.float16))
        pd, sd = p.to(dev), _to(state, dev)
        nd = ops.optimizer_norms_8bit_blockwise("lamb", pd, g.to(dev), *sd, *maps(dev),
                                                *hparams(1))
        nc = ops.optimizer_norms_8bit_blockwise("lamb", p, g, *state, *maps(), *hparams(1))
        assert bits_equal(nd.cpu(), nc)
        run_update(ops.optimizer_update_8bit_blockwise, "lamb", pd, g.to(dev), sd, True, 1)
        run_update(ops.optimizer_update_8bit_blockwise, "lamb", p, g, state, True, 1)
        assert bits_equal(pd.cpu(), p) and _all_bits_equal(_cpu(sd), state)
        qmap = quant_map("int8")
        out = ops.fusion_embedding_lookup(ids.to(dev), base.to(dev), absmax.to(dev),
                                          qmap.to(dev), fusion.to(dev), 8, 8)
        want = ops.fusion_embedding_lookup(ids, base, absmax, qmap, fusion, 8, 8)
        assert out.device == dev and bits_equal(out.cpu(), want)
        torch.cuda.synchronize(dev)
        assert torch.cuda.current_device() == 0
    # A CPU tensor among them is refused by name, before the library sees a pointer.
    with pytest.raises(ValueError, match="fusion is on cpu"):
        ops.fusion_embedding_lookup(ids.to(dev), base.to(dev), absmax.to(dev), qmap.to(dev),
                                    fusion, 8, 8)


# ---- non-default streams --------------------------------------------------------------------
_BUSY_CYCLES = int(5e8)  # a few hundred ms of torch.cuda._sleep: long enough to notice


def test_optimizer_step_runs_on_the_current_stream():
    """On a side stream: a long sleep, then an in-place change of the gradient, then the
    step. A step launched on any other stream would run before the change (the sleep holds
    it back) and use the old gradient."""
    n = 70_000
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(3))
    g0 = torch.randn(n, generator=torch.Generator().manual_seed(4)) * 1e-2
    for opt, eight_bit in (("adamw", True), ("lamb", True), ("sgd", False)):
        state = make_state(opt, n, eight_bit)
        pc, sc = p0.clone(), clone_all(state)
        upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
        run_update(upd, opt, pc, g0 * 0.5, sc, eight_bit, 1)
        pd, gd, sd = p0.cuda(), g0.cuda(), _to(state, "cuda")
        warm = [p0.cuda(), _to(state, "cuda")]  # the maps checked, the occupancy cached
        run_update(upd, opt, warm[0], gd.clone(), warm[1], eight_bit, 1)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(_BUSY_CYCLES)
            gd.mul_(0.5)
            run_update(upd, opt, pd, gd, sd, eight_bit, 1)
            assert not side.query()  # everything queued behind the sleep
        side.synchronize()
        assert bits_equal(pd.cpu(), pc), opt
        assert _all_bits_equal(_cpu(sd), sc), opt


def test_embedding_lookup_and_quantize_run_on_the_current_stream():
    base, absmax = quantize_table(torch.randn(100, 40), "nf4", 8)
    qmap = quant_map("nf4")
    fusion = torch.randn(5, 40)
    ids = torch.tensor([[0, 101, 99, 104], [3, 100, 3, 50]])
    want = ops.fusion_embedding_lookup(ids, base, absmax, qmap, fusion * 2, 4, 8)
    x = torch.randn(50_000)
    code = F.dynamic_map(True)
    want_codes = ops.quantize_blockwise(x * 3, code, 512)
    bd, ad, qd, fd, idd = (t.cuda() for t in (base, absmax, qmap, fusion, ids))
    xd, cd = x.cuda(), code.cuda()
    ops.fusion_embedding_lookup(idd, bd, ad, qd, fd, 4, 8)  # warm: maps checked
    ops.quantize_blockwise(xd, cd, 512)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(_BUSY_CYCLES)
        fd.mul_(2)
        xd.mul_(3)
        out = ops.fusion_embedding_lookup(idd, bd, ad, qd, fd, 4, 8)
        codes, amax = ops.quantize_blockwise(xd, cd, 512)
        assert not side.query()
    side.synchronize()
    assert bits_equal(out.cpu(), want)
    assert torch.equal(codes.cpu(), want_codes[0]) and bits_equal(amax.cpu(), want_codes[1])


# ---- norms: the CPU's bits on every grid ------------------------------------------------------
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", tuple(RULES))
def test_norms_equal_the_cpu_bit_for_bit(opt, dtype, eight_bit):
    """Per-block partials in element order, groups of 256 blocks, groups in order
    (csrc/common/norm_order.h), the same on both devices whatever the SM count: the float32
    results and the double sums of the C API are identical."""
    fn = ops.optimizer_norms_8bit_blockwise if eight_bit else ops.optimizer_norms_32bit
    for n in (1, 255, 257, 256 * 256 * 2 + 300, 1_000_003):
        p = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        g = grads(n, dtype, seed=n + 1)
        state = make_state(opt, n, eight_bit)
        two = RULES[opt].states == 2
        if eight_bit:
            c1, c2, a1, a2 = state
            q1, q2 = maps()
            args = [p, g, c1, c2, a1, a2, q1, q2 if two else None]
        else:
            args = [p, g, *state]
        want = fn(opt, *args, *hparams(2))
        got = fn(opt, *_to(args, "cuda"), *hparams(2))
        assert bits_equal(got.cpu(), want), (opt, n)
        assert all(bits_equal(fn(opt, *_to(args, "cuda"), *hparams(2)), got) for _ in range(3))
    # The double sums themselves, through the C API.
    assert _c_norms_double("cuda", opt, eight_bit, dtype) == _c_norms_double("cpu", opt,
                                                                             eight_bit, dtype)


def _c_norms_double(device, opt, eight_bit, dtype):
    n = 256 * 256 * 3 + 77
    p = torch.randn(n, generator=torch.Generator().manual_seed(11)).to(dtype).to(device)
    g = grads(n, dtype, seed=12).to(device)
    state = _to(make_state(opt, n, eight_bit), device)
    two = RULES[opt].states == 2
    P, I32, I64 = _native.P, _native.I32, _native.I64
    args_t = ctypes.POINTER(_native.OptimizerArgs)
    a = _native.OptimizerArgs.from_scalars(optimizer_scalars(opt, KernelHyperparams(*hparams(2))))
    out = torch.zeros(2, dtype=torch.float64, device=device)
    cuda = device == "cuda"
    lib = _native.cuda if cuda else _native.cpu
    prefix = "bnbf_cuda_" if cuda else "bnbf_cpu_"
    tail_t = (P, I64, I32, P) if cuda else (I32,)
    if cuda:
        scratch = torch.empty(norms_scratch_size(n), dtype=torch.float64, device=device)
        tail = (scratch.data_ptr(), scratch.numel(), p.device.index,
                torch.cuda.current_stream().cuda_stream)
    else:
        tail = (torch.get_num_threads(),)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    dt = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    if eight_bit:
        q1, q2 = maps(device)
        c1, c2, a1, a2 = state
        fn = lib.function(prefix + "optimizer_norms_8bit_blockwise", I32, P, P, I32, P, P, P, P,
                          P, P, args_t, I64, P, *tail_t)
        rc = fn(RULES[opt].id, ptr(p), ptr(g), dt, ptr(c1), ptr(c2 if two else None), ptr(a1),
                ptr(a2 if two else None), ptr(q1), ptr(q2 if two else None), ctypes.byref(a), n,
                ptr(out), *tail)
    else:
        s1, s2 = state
        fn = lib.function(prefix + "optimizer_norms_32bit", I32, P, P, I32, P, P, args_t, I64, P,
                          *tail_t)
        rc = fn(RULES[opt].id, ptr(p), ptr(g), dt, ptr(s1), ptr(s2), ctypes.byref(a), n,
                ptr(out), *tail)
    assert rc == 0, lib.bnbf_last_error().decode()
    return out.cpu().tolist()


def test_norms_scratch_is_checked():
    n = 70_000
    p, g = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    s1 = torch.zeros(n, device="cuda")
    P, I32, I64 = _native.P, _native.I32, _native.I64
    fn = _native.cuda.function("bnbf_cuda_optimizer_norms_32bit", I32, P, P, I32, P, P,
                               ctypes.POINTER(_native.OptimizerArgs), I64, P, P, I64, I32, P)
    a = _native.OptimizerArgs(step=1)
    out = torch.zeros(2, dtype=torch.float64, device="cuda")
    short = torch.empty(norms_scratch_size(n) - 1, dtype=torch.float64, device="cuda")
    rc = fn(RULES["sgd"].id, p.data_ptr(), g.data_ptr(), 0, s1.data_ptr(), None,
            ctypes.byref(a), n, out.data_ptr(), short.data_ptr(), short.numel(), 0, None)
    assert rc == -1 and "scratch must hold" in _native.cuda.bnbf_last_error().decode()


# ---- LAMB, LARS, max_unorm, percentile clipping end to end ------------------------------------------
CASES = {
    "LAMB8bit": lambda ps: O.LAMB8bit(ps, lr=1e-2, weight_decay=1e-2),
    "LAMB32bit": lambda ps: O.LAMB32bit(ps, lr=1e-2, weight_decay=1e-2),
    "LARS8bit": lambda ps: O.LARS8bit(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "LARS32bit": lambda ps: O.LARS32bit(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "Adam8bit-max_unorm": lambda ps: O.Adam8bit(ps, lr=1e-2, max_unorm=0.02),
    "AdamW32bit-max_unorm": lambda ps: O.AdamW32bit(ps, lr=1e-2, max_unorm=0.02),
    "AdamW8bit-percentile": lambda ps: O.AdamW8bit(ps, lr=1e-3, percentile_clipping=50),
    "LAMB8bit-percentile": lambda ps: O.LAMB8bit(ps, lr=1e-2, percentile_clipping=50),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_trust_ratios_and_clipping_end_to_end_equal_the_cpu(case, dtype):
    shapes = [(300, 257), (64,), (3, 70_000)]  # 8-bit, small (32-bit state), several groups
    gen = torch.Generator().manual_seed(21)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    pc = [torch.nn.Parameter(w.clone()) for w in init]
    pd = [torch.nn.Parameter(w.cuda()) for w in init]
    oc, od = CASES[case](pc), CASES[case](pd)
    for step in range(6):
        for a, b, s in zip(pc, pd, shapes):
            scale = 10.0 if step == 4 else 1.0  # one outlier step for the clipping
            g = (torch.randn(s, generator=gen) * scale).to(dtype)
            a.grad, b.grad = g.clone(), g.cuda()
        oc.step()
        od.step()
    exact = "percentile" not in case
    for a, b in zip(pc, pd):
        if exact:
            assert bits_equal(b.detach().cpu(), a.detach()), case
        else:
            torch.testing.assert_close(b.detach().cpu().float(), a.detach().float(), rtol=1e-3,
                                       atol=1e-4)
    for a, b in zip(pc, pd):
        for key, va in oc.state[a].items():
            vb = od.state[b][key]
            if not isinstance(va, torch.Tensor):
                assert va == vb
            elif exact:
                assert bits_equal(vb.cpu(), va), (case, key)
            elif key == "gnorm_vec":
                torch.testing.assert_close(vb.cpu(), va, rtol=1e-5, atol=0)


# ---- the non-contiguous copy-back path ----------------------------------------------------------
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("opt", ["adamw", "ademamix", "lion", "lamb"])
def test_non_contiguous_tensors_are_updated_through_copies(opt, eight_bit):
    """A parameter that is a column slice of a larger tensor and states in transposed
    layouts: updated through contiguous copies written back, like the CPU path, and the
    elements outside the slice untouched."""
    rows, cols = 64, 300
    big = torch.randn(rows, cols + 20, generator=torch.Generator().manual_seed(5))
    g = grads((rows, cols), torch.float32, seed=6)
    state = make_state(opt, (rows, cols), eight_bit)

    def layout(t):  # same values, non-contiguous: transposed storage, or every other slot
        if t is None:
            return None
        if t.dim() < 2:
            buf = torch.full((2 * t.numel(),), 7, dtype=t.dtype, device=t.device)
            buf[::2] = t
            return buf[::2]
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    sc = [layout(t) for t in state]
    sd = [None if t is None else layout(t.cuda()) for t in state]
    assert all(t is None or not t.is_contiguous() for t in sc)
    bc, bd = big.clone(), big.cuda()
    upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
    for step in (1, 2):
        run_update(upd, opt, bc[:, 10:10 + cols], g, sc, eight_bit, step)
        run_update(upd, opt, bd[:, 10:10 + cols], g.cuda(), sd, eight_bit, step)
    assert bits_equal(bd.cpu(), bc)
    assert torch.equal(bc[:, :10], big[:, :10]) and torch.equal(bc[:, 10 + cols:],
                                                                big[:, 10 + cols:])
    assert _all_bits_equal(_cpu(sd), sc)


# ---- NaN / Inf bits -------------------------------------------------------------------------------
SCALES = F32_NANS + [0x7F800000, 0xFF800000, 0x3FC00000]


@pytest.mark.parametrize("blocksize", [37, 8192], ids=["blocks", "grid-wide"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_nan_bits_equal_the_cpu(dtype, blocksize):
    code = F.dynamic_map(True)
    n = blocksize * len(SCALES)
    codes = (torch.arange(n) * 37 % 256).to(torch.uint8)
    absmax = f32(SCALES)
    want = ops.dequantize_blockwise(codes, absmax, code, blocksize, dtype)
    got = ops.dequantize_blockwise(codes.cuda(), absmax.cuda(), code.cuda(), blocksize, dtype)
    assert bits_of(got.cpu()) == bits_of(want)
    values = code[codes.long()].tolist()
    model = [store_bits(mul_bits(v, SCALES[i // blocksize]), dtype) for i, v in enumerate(values)]
    assert bits_of(got.cpu()) == model


@pytest.mark.parametrize("scheme,bits", [("int8", 8), ("nf4", 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lookup_nan_bits_equal_the_cpu(scheme, bits, dtype):
    qmap = quant_map(scheme)
    V, D, blocksize = len(SCALES), 21, 7
    cols = D if bits == 8 else (D + 1) // 2
    base = (torch.arange(V * cols) * 29 % 256).to(torch.uint8).view(V, cols)
    absmax = f32(SCALES).view(V, 1).repeat(1, 3)
    fusion = torch.randn(2, D).to(dtype)
    nans = {torch.float32: F32_NANS, torch.float16: F16_NANS, torch.bfloat16: BF16_NANS}[dtype]
    fusion.view(INT[dtype])[0, :len(nans)] = from_bits(nans, dtype).view(INT[dtype])  # copied
    ids = torch.cat([torch.arange(V + 2), torch.tensor([-1, V + 2])])  # out of range: CPU raises
    args = (base, absmax, qmap, fusion, bits, blocksize)
    want = ops.fusion_embedding_lookup(ids[:V + 2], *args)
    got = ops.fusion_embedding_lookup(ids.cuda(), *(t.cuda() if isinstance(t, torch.Tensor)
                                                    else t for t in args))
    assert bits_of(got[:V + 2].cpu()) == bits_of(want)
    assert bits_of(got[V + 2:].cpu()) == [0] * (2 * D)  # zero rows for bad ids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_of_nan_and_inf_inputs_equals_the_cpu(dtype):
    nans = {torch.float32: F32_NANS, torch.float16: F16_NANS, torch.bfloat16: BF16_NANS}[dtype]
    x = torch.randn(64 * 40, generator=torch.Generator().manual_seed(8)).to(dtype)
    x.view(INT[dtype])[torch.arange(len(nans)) * 64 + 5] = from_bits(nans, dtype).view(INT[dtype])
    x[64 * 20 + 1], x[64 * 21 + 2] = float("inf"), float("-inf")
    for blocksize in (64, 8192, x.numel()):
        want_c, want_a = ops.quantize_blockwise(x, F.dynamic_map(True), blocksize)
        got_c, got_a = ops.quantize_blockwise(x.cuda(), F.dynamic_map(True, "cuda"), blocksize)
        assert torch.equal(got_c.cpu(), want_c) and bits_of(got_a.cpu()) == bits_of(want_a)


@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", tuple(RULES))
def test_optimizer_nan_and_inf_parameter_bits_equal_the_cpu(opt, dtype, eight_bit):
    n = 256 * 3 + 13
    p, _ = param_with_nans(n, dtype, seed=9)
    p[[20, 30, 400]] = torch.tensor([float("inf"), float("-inf"), float("inf")]).to(dtype)
    g = grads(n, dtype, seed=10)
    state = make_state(opt, n, eight_bit)
    pd, gd, sd = p.cuda(), g.cuda(), _to(state, "cuda")
    upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
    for step in (1, 2):
        run_update(upd, opt, p, g, state, eight_bit, step)
        run_update(upd, opt, pd, gd, sd, eight_bit, step)
        assert bits_of(pd.cpu()) == bits_of(p), (opt, step)
        assert _all_bits_equal(_cpu(sd), state)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_invalid_operation_nan_equals_the_cpu(dtype):
    """lr * weight_decay = 1: AdamW's decay is 0 and an infinite parameter becomes inf * 0,
    x86's default NaN on the CPU, which the CUDA kernel writes too."""
    n = 300
    p = torch.randn(n, generator=torch.Generator().manual_seed(3))
    p[[5, 64, 299]] = torch.tensor([float("inf"), float("-inf"), float("inf")])
    p = p.to(dtype)
    g = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(dtype) * 1e-3
    state = make_state("adamw", n, True)
    hp = (1.0, 0.9, 0.999, 0.0, 0.0, 1e-8, 1.0, 0.0, False, 1, 1.0, 1.0)
    pd, sd = p.cuda(), _to(state, "cuda")
    ops.optimizer_update_8bit_blockwise("adamw", p, g, *state, *maps(), *hp)
    ops.optimizer_update_8bit_blockwise("adamw", pd, g.cuda(), *sd, *maps("cuda"), *hp)
    got = bits_of(pd.cpu())
    assert got == bits_of(p)
    assert all(got[i] == store_bits(X86_DEFAULT_NAN, dtype) for i in (5, 64, 299))


# ---- huge quantization blocks: the grid-wide path ----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_blocks_equal_the_cpu(dtype):
    n = 6_000_001
    x = (torch.randn(n, generator=torch.Generator().manual_seed(13)) * 3).to(dtype)
    xn = x.clone()
    xn[4_000_000] = float("nan")
    code = F.dynamic_map(True)
    for A, blocksize in ((x, n), (x, 2**62), (x, 1_000_000), (xn, 1_000_000), (x, 5000)):
        want_c, want_a = ops.quantize_blockwise(A, code, blocksize)
        got_c, got_a = ops.quantize_blockwise(A.cuda(), code.cuda(), blocksize)
        assert bits_of(got_a.cpu()) == bits_of(want_a), blocksize
        assert torch.equal(got_c.cpu(), want_c), blocksize
        for out in (torch.float32, dtype):
            want = ops.dequantize_blockwise(want_c, want_a, code, blocksize, out)
            got = ops.dequantize_blockwise(got_c, got_a, code.cuda(), blocksize, out)
            assert bits_of(got.cpu()) == bits_of(want), (blocksize, out)


# ---- NaN maps -----------------------------------------------------------------------------------------
def test_nan_maps_are_refused_and_the_kernels_stay_in_bounds_anyway():
    x = torch.randn(10_000, device="cuda")
    bad = F.dynamic_map(True).clone()
    bad[[0, 100, 255]] = float("nan")
    with pytest.raises(ValueError, match="holds NaN"):
        ops.quantize_blockwise(x, bad.cuda(), 256)
    # Straight into the C API (no Python checks): the map's every slot is defined in shared
    # memory, codes stay in range, nothing faults (compute-sanitizer checks the same calls).
    _nan_map_through_the_c_api(bad.cuda(), x)


def _nan_map_through_the_c_api(bad, x):
    P, I32, I64 = _native.P, _native.I32, _native.I64
    dev, stream = x.device.index, torch.cuda.current_stream().cuda_stream
    n = x.numel()
    q = _native.cuda.function("bnbf_cuda_quantize_blockwise", P, P, I32, P, P, I64, I64, I32, P)
    for blocksize in (256, n):  # the block and the grid-wide paths
        codes = torch.empty(n, dtype=torch.uint8, device="cuda")
        absmax = torch.empty(-(n // -blocksize), device="cuda")
        assert q(bad.data_ptr(), x.data_ptr(), 0, absmax.data_ptr(), codes.data_ptr(),
                 blocksize, n, dev, stream) == 0
    upd = _native.cuda.function("bnbf_cuda_optimizer_update_8bit_blockwise", I32, P, P, I32, P,
                                P, P, P, P, P, ctypes.POINTER(_native.OptimizerArgs), I64, I32, P)
    c1, c2, a1, a2 = _to(make_state("adamw", n, True), "cuda")
    p, g = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    a = _native.OptimizerArgs.from_scalars(
        optimizer_scalars("adamw", KernelHyperparams(*hparams(1))))
    assert upd(RULES["adamw"].id, p.data_ptr(), g.data_ptr(), 0, c1.data_ptr(), c2.data_ptr(),
               a1.data_ptr(), a2.data_ptr(), bad.data_ptr(), bad.data_ptr(), ctypes.byref(a), n,
               dev, stream) == 0
    torch.cuda.synchronize()


# ---- CUDA graphs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
def test_optimizer_step_and_norms_capture_in_a_cuda_graph(eight_bit):
    """An update and a norms call captured once and replayed equal the same calls run
    eagerly, replay after replay: no host sync, allocation outside torch's pool or pointer
    query inside the ops (the norms' scratch comes from torch, the map checks are cached)."""
    n = 300_000
    opt = "lamb"
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(14)).cuda()
    g = torch.randn(n, generator=torch.Generator().manual_seed(15)).cuda() * 1e-2
    state0 = _to(make_state(opt, n, eight_bit), "cuda")
    upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
    nrm = ops.optimizer_norms_8bit_blockwise if eight_bit else ops.optimizer_norms_32bit
    q1, q2 = maps("cuda")
    extra = (q1, q2) if eight_bit else ()

    def step(p, st):
        upd(opt, p, g, *st, *extra, *hparams(3), 0.75)
        return nrm(opt, p, g, *st, *extra, *hparams(3))

    pe, se = p0.clone(), clone_all(state0)  # eager
    pg, sg = p0.clone(), clone_all(state0)  # graph
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on copies, as torch's graph docs ask
        step(p0.clone(), clone_all(state0))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g = step(pg, sg)
    for _ in range(3):
        graph.replay()
        out_e = step(pe, se)
        torch.cuda.synchronize()
        assert bits_equal(pg, pe) and _all_bits_equal(sg, se)
        assert bits_equal(out_g, out_e)
    assert not torch.equal(pg, p0)


# ---- more than 2^31 elements --------------------------------------------------------------------------
@pytest.mark.slow
def test_tensors_of_more_than_2_to_the_31_elements():
    n = 2**31 + 4097
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * n + (2 << 30):
        pytest.skip(f"needs about {8 * n / 2**30:.0f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(16)
    x = torch.randn(n, dtype=torch.float16, device="cuda", generator=gen)
    code = F.dynamic_map(True)
    codes, absmax = ops.quantize_blockwise(x, code.cuda(), 4096)
    nb = absmax.numel()
    for b0 in (2**31 // 4096 - 1, nb - 2):  # the block across 2^31 and the last two
        xs = x[b0 * 4096:].cpu() if b0 == nb - 2 else x[b0 * 4096:(b0 + 2) * 4096].cpu()
        want_c, want_a = ops.quantize_blockwise(xs, code, 4096)
        assert torch.equal(codes[b0 * 4096:b0 * 4096 + xs.numel()].cpu(), want_c)
        assert bits_equal(absmax[b0:b0 + want_a.numel()].cpu(), want_a)
    start = (nb - 2) * 4096  # the last two blocks (the last holds one element)
    y = ops.dequantize_blockwise(codes[start:], absmax[nb - 2:], code.cuda(), 4096, torch.float16)
    assert bits_equal(y.cpu(), ops.dequantize_blockwise(codes[start:].cpu(),
                                                        absmax[nb - 2:].cpu(), code, 4096,
                                                        torch.float16))
    del codes, absmax, y
    # LAMB 8-bit: the norms over the whole tensor and the update of its last blocks.
    p, g = x, torch.randn(n, dtype=torch.float16, device="cuda", generator=gen).mul_(1e-2)
    z1, z2 = F.dynamic_map_zero_code(True), F.dynamic_map_zero_code(False)
    c1 = torch.full((n,), z1, dtype=torch.uint8, device="cuda")
    c2 = torch.full((n,), z2, dtype=torch.uint8, device="cuda")
    nblk = -(n // -256)
    a1, a2 = torch.zeros(nblk, device="cuda"), torch.zeros(nblk, device="cuda")
    q1, q2 = maps("cuda")
    hp = hparams(1)
    got = ops.optimizer_norms_8bit_blockwise("lamb", p, g, c1, c2, a1, a2, q1, q2, *hp)
    tail = (nblk - 3) * 256
    cpu_tail = [t[tail:].cpu() for t in (p, g, c1, c2)] + [a1[nblk - 3:].cpu(),
                                                           a2[nblk - 3:].cpu()]
    cpu_all = [t.cpu() for t in (p, g, c1, c2, a1, a2)]
    want = ops.optimizer_norms_8bit_blockwise("lamb", *cpu_all, *maps(), *hp)
    assert bits_equal(got.cpu(), want)
    del cpu_all
    ops.optimizer_update_8bit_blockwise("lamb", p, g, c1, c2, a1, a2, q1, q2, *hp, 0.5)
    pt, gt, c1t, c2t, a1t, a2t = cpu_tail
    ops.optimizer_update_8bit_blockwise("lamb", pt, gt, c1t, c2t, a1t, a2t, *maps(), *hp, 0.5)
    assert bits_equal(p[tail:].cpu(), pt) and torch.equal(c1[tail:].cpu(), c1t)
    assert torch.equal(c2[tail:].cpu(), c2t) and bits_equal(a1[nblk - 3:].cpu(), a1t)
    assert bits_equal(a2[nblk - 3:].cpu(), a2t)


# ---- the compute-sanitizer subset (benchmarks/gpu_check.sh) -------------------------------------------
def test_every_kernel_family_once():
    """Each kernel family once, on small sizes with partial blocks, compared with the CPU:
    what gpu_check.sh runs under compute-sanitizer's memcheck and initcheck."""
    code = F.dynamic_map(True)
    x = torch.randn(5000 + 37, generator=torch.Generator().manual_seed(17)).to(torch.float16)
    for blocksize in (64, 4096 * 3, x.numel()):  # the block path; the grid-wide one twice
        want = ops.quantize_blockwise(x, code, blocksize)
        got = ops.quantize_blockwise(x.cuda(), code.cuda(), blocksize)
        assert torch.equal(got[0].cpu(), want[0]) and bits_equal(got[1].cpu(), want[1])
        y = ops.dequantize_blockwise(got[0], got[1], code.cuda(), blocksize, torch.bfloat16)
        assert bits_equal(y.cpu(), ops.dequantize_blockwise(*want, code, blocksize,
                                                            torch.bfloat16))
    n = 256 * 2 + 19
    for opt, eight_bit, dtype in (("adamw", True, torch.float16), ("ademamix", True,
                                  torch.bfloat16), ("lion", True, torch.float32),
                                  ("lars", False, torch.float16), ("lamb", False, torch.float32)):
        p = torch.randn(n, generator=torch.Generator().manual_seed(18)).to(dtype)
        g = grads(n, dtype, seed=19)
        state = make_state(opt, n, eight_bit)
        pd, sd = p.cuda(), _to(state, "cuda")
        upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
        run_update(upd, opt, p, g, state, eight_bit, 2)
        run_update(upd, opt, pd, g.cuda(), sd, eight_bit, 2)
        assert bits_equal(pd.cpu(), p) and _all_bits_equal(_cpu(sd), state), opt
        nrm = ops.optimizer_norms_8bit_blockwise if eight_bit else ops.optimizer_norms_32bit
        two = RULES[opt].states == 2
        extra = (maps()[0], maps()[1] if two else None) if eight_bit else ()
        extra_d = (maps("cuda")[0], maps("cuda")[1] if two else None) if eight_bit else ()
        want = nrm(opt, p, g, *state, *extra, *hparams(2))
        assert bits_equal(nrm(opt, pd, g.cuda(), *sd, *extra_d, *hparams(2)).cpu(), want)
    for scheme, bits in (("int8", 8), ("nf4", 4)):
        base, absmax = quantize_table(torch.randn(30, 19), scheme, 8)
        qmap = quant_map(scheme)
        fusion, ids = torch.randn(4, 19), torch.tensor([[0, 29, 30], [33, 5, 31]])
        want = ops.fusion_embedding_lookup(ids, base, absmax, qmap, fusion, bits, 8)
        got = ops.fusion_embedding_lookup(ids.cuda(), base.cuda(), absmax.cuda(), qmap.cuda(),
                                          fusion.cuda(), bits, 8)
        assert bits_equal(got.cpu(), want)
    bad = code.clone()
    bad[[3, 200]] = float("nan")
    _nan_map_through_the_c_api(bad.cuda(), torch.randn(3000, device="cuda"))
