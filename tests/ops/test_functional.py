"""bnbfuse.functional: the dynamic map, exact blockwise quantization, QuantState, API edges.

The oracle is tests/_nearest.py (NumPy, independent of bnbfuse). On CPU these tests run the
native kernels when the library is built (and the reference kernels otherwise);
tests/test_backends.py compares the backends with each other.
"""
import numpy as np
import pytest
import torch

import bnbfuse.functional as F
from _nearest import dynamic_map_numpy, nearest_index, quantize_numpy, same_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]


# ---- the map --------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_definition(signed):
    ours = F.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert same_bits(ours, dynamic_map_numpy(signed))
    assert same_bits(F.dynamic_map(signed), ours)
    values = ours.numpy()
    assert np.unique(values).size == 256 and (np.diff(values) > 0).all()
    assert values[-1] == 1.0 and 0.0 in values
    if signed:
        assert values[0] > -1.0  # no -1 in the signed map
        positive = values[(values > 0) & (values < 1)]
        assert np.array_equal(np.sort(-values[values < 0]), positive)  # symmetric but for 1
    else:
        assert values[0] == 0.0


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_edges_are_float32_linspace(signed):
    # The definition's linspace, checked against correctly rounded values (<= 1 ulp apart),
    # so the test above is not merely comparing torch with itself.
    for k in range(7):
        n = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1, n + 1, dtype=torch.float32).numpy()
        exact = np.linspace(0.1, 1, n + 1).astype(np.float32)
        ulps = np.abs(edges.view(np.int32).astype(np.int64) - exact.view(np.int32).astype(np.int64))
        assert ulps.max() <= 1


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    assert same_bits(F.create_dynamic_map(signed=signed), bnbF.create_dynamic_map(signed=signed))


# ---- exact round-to-nearest -----------------------------------------------------------------
def make_input(kind: str, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "student_t":
        x = rng.standard_t(1.5, n)
    elif kind == "cauchy":
        x = rng.standard_cauchy(n)
    elif kind == "tiny":
        x = rng.standard_normal(n) * 1e-30
    elif kind == "subnormal":
        x = rng.standard_normal(n) * 1e-41  # below float32's smallest normal (1.2e-38)
    elif kind == "zeros":
        x = np.zeros(n)
    elif kind == "mixed":  # blocks of very different scale, some all zero
        x = rng.standard_normal(n) * 10.0 ** rng.integers(-20, 4, n)
        x[: n // 3] = 0
    else:
        raise ValueError(kind)
    # fp16 overflows above 65504; heavy tails are clipped so every dtype stays finite.
    return torch.from_numpy(np.clip(x, -6e4, 6e4).astype(np.float32))


def check_exact(x: torch.Tensor, blocksize: int, signed: bool):
    code = F.dynamic_map(signed)
    codes, state = F.quantize_blockwise(x, code=code, blocksize=blocksize)
    want_codes, want_absmax = quantize_numpy(x, code, blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert same_bits(state.absmax, want_absmax)
    mismatch = np.nonzero(codes.numpy().reshape(-1) != want_codes.reshape(-1))[0]
    assert mismatch.size == 0, f"{mismatch.size} codes differ, first at {mismatch[:5]}"
    return codes, state


KINDS = ["normal", "student_t", "cauchy", "tiny", "subnormal", "zeros", "mixed"]


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_codes_exact_fp32_signed(blocksize, kind):
    x = make_input(kind, 3 * blocksize + 37, seed=blocksize)  # partial last block too
    check_exact(x, blocksize, signed=True)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("kind", ["normal", "cauchy", "subnormal", "mixed"])
def test_codes_exact_unsigned(blocksize, kind):
    x = make_input(kind, 2 * blocksize + 5, seed=7 + blocksize).abs()
    check_exact(x, blocksize, signed=False)
    # Negative inputs in the unsigned map go to its nearest value, 0.
    check_exact(-x[:blocksize], blocksize, signed=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("kind", ["normal", "cauchy", "tiny", "mixed"])
@pytest.mark.parametrize("signed", [True, False])
def test_codes_exact_half_inputs(dtype, blocksize, kind, signed):
    x = make_input(kind, 2 * blocksize + 99, seed=blocksize + 1).to(dtype)
    if not signed:
        x = x.abs()
    codes, state = check_exact(x, blocksize, signed)
    y = F.dequantize_blockwise(codes, state)
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("blocksize", [1, 3, 100, 1000, 5000, 10000])
def test_codes_exact_odd_blocksizes(blocksize):
    x = make_input("normal", 2 * blocksize + 11, seed=3)
    check_exact(x, blocksize, signed=True)
    check_exact(x.to(torch.bfloat16), blocksize, signed=True)  # tiled path above 4096


def test_exact_midpoints_round_to_larger():
    code = F.dynamic_map(True)
    values = code.double().numpy()
    mids = (values[:-1] + values[1:]) / 2
    # Float32 values at and around every midpoint, in a block whose absmax is exactly 1.
    at = mids.astype(np.float32)
    probes = np.concatenate([at, np.nextafter(at, np.float32(-2)), np.nextafter(at, np.float32(2)),
                             np.array([1.0], np.float32)])
    x = torch.from_numpy(probes.astype(np.float32))
    codes, state = F.quantize_blockwise(x, blocksize=x.numel())
    assert state.absmax.item() == 1.0
    assert np.array_equal(codes.numpy(), nearest_index(probes, code.numpy()))
    # Exact float midpoints (representable ones) go to the larger neighbour.
    exact = at.astype(np.float64) == mids
    assert exact.any()
    got = code.numpy()[codes.numpy()[: mids.size][exact]]
    assert np.array_equal(got, values[1:][exact].astype(np.float32))


def test_custom_unsorted_map():
    rng = np.random.default_rng(0)
    values = np.unique(rng.standard_normal(400).astype(np.float32))[:256]
    values /= np.abs(values).max()
    code = torch.from_numpy(rng.permutation(values))
    x = make_input("normal", 5000, seed=5)
    codes, state = F.quantize_blockwise(x, code=code, blocksize=512)
    want, want_absmax = quantize_numpy(x, code, 512)
    assert same_bits(state.absmax, want_absmax)
    assert np.array_equal(codes.numpy(), want)
    y = F.dequantize_blockwise(codes, state)
    blocks = torch.repeat_interleave(state.absmax, 512)[: x.numel()]
    assert torch.equal(y, code[codes.long()] * blocks)



def test_signed_zero_at_a_threshold():
    # A map symmetric about 0 without 0 itself has its middle threshold at exactly 0:
    # -0.0 and +0.0 are both that tie and go to the larger neighbour; tiny values of either
    # sign go to their own side. The native table has a shortcut for maps without a
    # threshold at 0 that must not apply here.
    code = torch.linspace(-1, 1, 256)
    x = torch.zeros(512)
    x[0], x[1] = 1.0, -1.0  # absmax 1 in both blocks
    x[256], x[257] = 0.5, -0.5
    x[2:100] = -0.0
    x[100:110] = torch.tensor([1e-30, -1e-30, 1e-45, -1e-45, 3e-3, -3e-3, 0.0, -0.0, 1e-8, -1e-8])
    x[300:400] = -0.0
    codes, state = F.quantize_blockwise(x, code=code, blocksize=256)
    want, want_absmax = quantize_numpy(x, code, 256)
    assert same_bits(state.absmax, want_absmax)
    assert np.array_equal(codes.numpy(), want)
    assert codes[2] == codes[106] == 128  # -0.0 and +0.0: the tie goes to the larger value

# ---- round trip ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [4096, 256, 64])
@pytest.mark.parametrize("nested", [False, True])
def test_round_trip_error(dtype, blocksize, nested):
    # bitsandbytes' protocol (tests/test_functional.py, test_dynamic_blockwise_quantization):
    # relative error is |x - y| / |x + 1e-8| averaged over all elements.
    torch.manual_seed(0)
    abs_errs, rel_errs = [], []
    for _ in range(3):
        x = torch.randn(1024, 1024, dtype=dtype)
        codes, state = F.quantize_blockwise(x, blocksize=blocksize, nested=nested)
        y = F.dequantize_blockwise(codes, state)
        assert y.dtype == dtype
        diff = (x - y).abs().float()
        abs_errs.append(diff.mean().item())
        rel_errs.append((diff / (x.float() + 1e-8).abs()).mean().item())
    assert np.mean(abs_errs) < 0.011
    assert np.mean(rel_errs) < 0.018


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_uniform(signed):
    torch.manual_seed(1)
    x = torch.rand(1024, 1024)
    codes, state = F.quantize_blockwise(x, code=F.create_dynamic_map(signed), blocksize=256)
    y = F.dequantize_blockwise(codes, state)
    assert (x - y).abs().mean() < (0.0036 if signed else 0.0023)
    assert (x - y).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_code_times_absmax(dtype):
    x = make_input("mixed", 9000, seed=2).to(dtype)
    codes, state = F.quantize_blockwise(x, blocksize=1000)
    y = F.dequantize_blockwise(codes, state)
    scale = torch.repeat_interleave(state.absmax, 1000)[: x.numel()]
    assert torch.equal(y, (state.code[codes.long()] * scale).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_blocks_give_zeros(dtype):
    x = torch.zeros(5000, dtype=dtype)
    x[4096 + 10] = 3.0
    codes, state = F.quantize_blockwise(x, blocksize=4096)
    assert state.absmax.tolist() == [0.0, 3.0]
    y = F.dequantize_blockwise(codes, state)
    assert not torch.isnan(y).any()
    assert torch.equal(y[:4096], torch.zeros(4096, dtype=dtype))
    assert y[4096 + 10] == 3.0 and (y[4096:] != 0).sum() == 1


def test_nan_block_absmax_is_nan_and_codes_stay_in_range():
    x = torch.randn(3 * 256)
    x[300] = float("nan")
    codes, state = F.quantize_blockwise(x, blocksize=256)
    assert torch.isnan(state.absmax[1]) and not torch.isnan(state.absmax[[0, 2]]).any()
    good, _ = F.quantize_blockwise(x[:256], blocksize=256)
    assert torch.equal(codes[:256], good)  # other blocks are unaffected
    assert torch.isnan(F.dequantize_blockwise(codes, state)[256:512]).all()
    # A NaN block's codes are those of NaN (the smallest value's index), the same in the
    # native kernels and the pure-PyTorch reference.
    from bnbfuse.backends import reference as R
    want, want_absmax = R.quantize_blockwise(x, F.dynamic_map(True), 256)
    assert torch.equal(codes, want) and codes[256:512].eq(0).all()


# ---- shapes, layouts, dtypes ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_shape_and_non_contiguous(dtype):
    base = torch.randn(64, 96, dtype=dtype)
    for x in (base.t(), base[:, ::3], base.view(8, 8, 96)[:, 2:5].transpose(0, 2), base[5]):
        assert x.dtype == dtype
        codes, state = F.quantize_blockwise(x, blocksize=128)
        ref_codes, ref_state = F.quantize_blockwise(x.contiguous(), blocksize=128)
        assert codes.shape == x.shape
        assert torch.equal(codes, ref_codes) and torch.equal(state.absmax, ref_state.absmax)
        want, _ = quantize_numpy(x, F.dynamic_map(True), 128)
        assert np.array_equal(codes.numpy(), want)
        y = F.dequantize_blockwise(codes, state)
        assert y.shape == x.shape and y.dtype == dtype
        if codes.dim() == 2:  # non-contiguous codes dequantize like their contiguous copy
            strided = codes.t().contiguous().t()
            assert not strided.is_contiguous()
            assert torch.equal(F.dequantize_blockwise(strided, state), y)


def test_scalar_and_empty():
    codes, state = F.quantize_blockwise(torch.tensor(-2.5), blocksize=64)
    assert codes.shape == () and state.absmax.tolist() == [2.5]
    assert F.dequantize_blockwise(codes, state) == F.dynamic_map(True)[codes.long()] * 2.5
    for shape in [(0,), (0, 5), (3, 0, 2)]:
        x = torch.empty(shape)
        codes, state = F.quantize_blockwise(x, blocksize=256)
        assert codes.shape == shape and codes.dtype == torch.uint8
        assert state.absmax.shape == (0,)
        y = F.dequantize_blockwise(codes, state)
        assert y.shape == shape and y.dtype == torch.float32


def test_out_and_absmax_buffers():
    x = torch.randn(10, 1000)
    out = torch.empty(10, 1000, dtype=torch.uint8)
    absmax = torch.empty(40)
    codes, state = F.quantize_blockwise(x, absmax=absmax, out=out, blocksize=256)
    assert codes.data_ptr() == out.data_ptr() and state.absmax.data_ptr() == absmax.data_ptr()
    ref_codes, ref_state = F.quantize_blockwise(x, blocksize=256)
    assert torch.equal(out, ref_codes) and torch.equal(absmax, ref_state.absmax)
    y = torch.empty(10, 1000)
    r = F.dequantize_blockwise(codes, state, out=y)
    assert r.data_ptr() == y.data_ptr()
    assert torch.equal(y, F.dequantize_blockwise(ref_codes, ref_state))
    # absmax + blocksize instead of a QuantState (bitsandbytes' other calling convention)
    y2 = F.dequantize_blockwise(codes, absmax=absmax, blocksize=256)
    assert torch.equal(y2, y)
    y16 = torch.empty(10, 1000, dtype=torch.float16)
    F.dequantize_blockwise(codes, absmax=absmax, blocksize=256, out=y16)
    assert torch.equal(y16, y.half())


# ---- QuantState -------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_state_round_trip(packed, nested, dtype):
    x = torch.randn(33, 517, dtype=dtype)
    codes, state = F.quantize_blockwise(x, blocksize=512, nested=nested)
    d = state.as_dict(packed=packed)
    if packed:
        assert all(isinstance(v, torch.Tensor) for v in d.values())
        assert "quant_state.bitsandbytes__blockwise8" in d
    # What a state_dict would do: prefix keys, save and load.
    prefixed = {f"weight.{k}": v for k, v in d.items()}
    restored = F.QuantState.from_dict(prefixed, device="cpu")
    assert restored.blocksize == 512 and restored.dtype == dtype and restored.shape == x.shape
    assert restored.nested == nested
    assert torch.equal(restored.absmax, state.absmax) and torch.equal(restored.code, state.code)
    if nested:
        assert restored.offset.item() == pytest.approx(state.offset.item(), rel=0, abs=0)
        assert torch.equal(restored.state2.absmax, state.state2.absmax)
        assert restored.state2.blocksize == state.state2.blocksize
    y = F.dequantize_blockwise(codes, restored)
    assert torch.equal(y, F.dequantize_blockwise(codes, state))
    assert (y.float() - x.float()).abs().mean() < 0.011


def test_quant_state_is_bitsandbytes_shaped():
    # bitsandbytes' positional order: absmax, shape, code, blocksize, quant_type, dtype, ...
    s = F.QuantState(torch.ones(3), None, None, 64, None, torch.float16)
    assert s.blocksize == 64 and s.quant_type is None and s.dtype == torch.float16
    x = torch.randn(3000)
    _, a = F.quantize_blockwise(x, blocksize=256, nested=True)
    _, b = F.quantize_blockwise(x, blocksize=256, nested=True)
    assert a == b and a != F.quantize_blockwise(x * 2, blocksize=256)[1]
    assert a.nested and a.state2.blocksize == 256  # the caller's blocksize, as bitsandbytes
    assert a[0] is a.absmax and a[3] == 256 and a[4][1] is a.state2 and a[5] is None


def test_quant_state_owns_its_map():
    x = torch.randn(3000)
    _, s = F.quantize_blockwise(x, blocksize=256, nested=True)
    s.code.mul_(2)  # must not reach the next call's default map
    assert float(F.quantize_blockwise(x, blocksize=256)[1].code.max()) == 1.0
    # no two tensors of as_dict() share memory (safetensors refuses that)
    ptrs = [v.untyped_storage().data_ptr() for v in s.as_dict().values()
            if isinstance(v, torch.Tensor)]
    assert len(ptrs) == len(set(ptrs))


def test_quant_state_interoperates_with_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(5000)
    for nested in (False, True):
        codes, ours = F.quantize_blockwise(x, blocksize=256, nested=nested)
        theirs = bnbF.QuantState.from_dict(ours.as_dict(), device="cpu")
        assert torch.equal(F.dequantize_blockwise(codes, theirs),
                           F.dequantize_blockwise(codes, ours))
        back = F.QuantState.from_dict(bnbF.quantize_blockwise(x, blocksize=256,
                                                              nested=nested)[1].as_dict())
        assert back.nested == nested and back.blocksize == 256 and back.quant_type is None


def test_quant_state_errors():
    with pytest.raises(KeyError, match="absmax"):
        F.QuantState.from_dict({"blocksize": 4, "quant_map": torch.zeros(256), "dtype": "float32"})


# ---- bad input ------------------------------------------------------------------------------
def test_bad_inputs_raise_clearly():
    x = torch.randn(1000)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        F.quantize_blockwise(torch.arange(10))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        F.quantize_blockwise(x.double())
    with pytest.raises(ValueError, match="blocksize"):
        F.quantize_blockwise(x, blocksize=0)
    with pytest.raises(ValueError, match="blocksize"):
        F.quantize_blockwise(x, blocksize=-4)
    with pytest.raises(ValueError, match="256"):
        F.quantize_blockwise(x, code=torch.linspace(-1, 1, 255))
    codes, state = F.quantize_blockwise(x, blocksize=256)
    with pytest.raises(TypeError, match="uint8"):
        F.dequantize_blockwise(codes.float(), state)
    with pytest.raises(ValueError, match="absmax"):
        F.dequantize_blockwise(codes, absmax=state.absmax[:3], blocksize=256)
    with pytest.raises(ValueError, match="256"):
        F.dequantize_blockwise(codes, absmax=state.absmax, code=torch.zeros(10), blocksize=256)
    with pytest.raises(ValueError, match="blocksize"):
        F.dequantize_blockwise(codes, absmax=state.absmax, blocksize=0)
    with pytest.raises(ValueError, match="quant_state or absmax"):
        F.dequantize_blockwise(codes)
    # out=/absmax= buffers are the result's own: wrong dtype or shape raises, never casts
    with pytest.raises(ValueError, match="out must be a torch.uint8 tensor of shape"):
        F.quantize_blockwise(x, out=torch.empty(10, 100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="absmax must be a torch.float32"):
        F.quantize_blockwise(x, absmax=torch.empty(2, 2), blocksize=256)
    with pytest.raises(ValueError, match="out must be a torch.float32"):
        F.dequantize_blockwise(codes, state, out=torch.empty(1000, dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        F.dequantize_blockwise(codes, state, out=torch.empty(10, 100))


def test_dtype_errors_are_both_type_and_value_errors():
    # bitsandbytes raises ValueError for a wrong dtype, torch TypeError: both clauses catch.
    for call in (lambda: F.quantize_blockwise(torch.arange(10)),
                 lambda: F.dequantize_blockwise(torch.randn(10), absmax=torch.ones(1))):
        with pytest.raises(ValueError):
            call()
        with pytest.raises(TypeError):
            call()


def test_blocksize_larger_than_the_tensor_is_one_block():
    # The block count must not overflow (n + blocksize - 1) for a blocksize near INT64_MAX.
    x = torch.randn(5)
    codes, state = F.quantize_blockwise(x, blocksize=2**63 - 1)
    ref_codes, ref = F.quantize_blockwise(x, blocksize=8)
    assert torch.equal(codes, ref_codes) and torch.equal(state.absmax, ref.absmax)
    assert torch.equal(F.dequantize_blockwise(codes, state), F.dequantize_blockwise(codes, ref))


def test_blocksize_takes_numpy_and_tensor_integers():
    x = torch.randn(1000)
    ref_codes, ref = F.quantize_blockwise(x, blocksize=256)
    for bs in (np.int64(256), torch.tensor(256)):
        codes, state = F.quantize_blockwise(x, blocksize=bs)
        assert torch.equal(codes, ref_codes) and state.blocksize == 256
        assert torch.equal(F.dequantize_blockwise(codes, absmax=state.absmax, blocksize=bs),
                           F.dequantize_blockwise(ref_codes, ref))
    with pytest.raises(ValueError, match="blocksize"):
        F.quantize_blockwise(x, blocksize=2.5)


def test_small_dynamic_maps_like_bitsandbytes():
    m = F.create_dynamic_map(True, 3, 4)  # 16 values, padded with zeros to 256
    assert m.shape == (256,) and int((m != 0).sum()) == 15
    with pytest.raises(ValueError, match="2\\*\\*8"):
        F.create_dynamic_map(False, 4, 8)
    bnbF = pytest.importorskip("bitsandbytes.functional")
    for args in [(True, 3, 4), (False, 3, 4), (True, 5, 8)]:
        assert torch.equal(F.create_dynamic_map(*args), bnbF.create_dynamic_map(*args))


# ---- torch.compile ----------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    def roundtrip(x, code):
        codes, state = F.quantize_blockwise(x, code=code, blocksize=256)
        return F.dequantize_blockwise(codes, state) * 2

    code = F.dynamic_map(True)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 300)
    assert torch.equal(compiled(x, code), roundtrip(x, code))
