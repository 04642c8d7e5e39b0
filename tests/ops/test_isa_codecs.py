"""The block codecs of every CPU instruction set against the reference, bit for bit, where
they are hardest: values within a few ulps of every rounding threshold of both dynamic
maps (either sign), a strided sweep of all floats in [2^-31, 1], blocks whose absmax is not
a power of two (the AVX-512 VBMI path multiplies by 1/absmax and redoes the lanes that land
near a threshold), subnormals, and every code for dequantization. Paths this CPU cannot run
are skipped."""
import ctypes

import pytest
import torch

from bnbfuse import _native
from bnbfuse.backends import reference as R
from bnbfuse.functional import dynamic_map
from bnbfuse.ops.quantize import nearest_thresholds

ISAS = ["generic", "avx2", "avx512", "avx512vbmi"]


@pytest.fixture(params=ISAS)
def isa(request):
    if not _native.cpu.loaded:
        pytest.skip("native CPU library not built")
    fn = _native.cpu.lib.bnbf_cpu_force_isa
    fn.argtypes = [ctypes.c_char_p]
    if fn(request.param.encode()) != 0:
        fn(None)
        pytest.skip(f"this CPU or build does not run {request.param}")
    yield request.param
    fn(None)


def _hard_values(code: torch.Tensor) -> torch.Tensor:
    """Every threshold and its 48 float neighbours on each side, of both signs."""
    thr, _ = nearest_thresholds(code)
    bits = thr.view(torch.int32)[:, None] + torch.arange(-48, 49, dtype=torch.int32)[None, :]
    v = bits.reshape(-1).view(torch.float32)
    v = v[torch.isfinite(v)]
    return torch.cat([v, -v])


def _sweep() -> torch.Tensor:
    lo, hi = 0x30000000, 0x3F800000  # 2^-31 .. 1
    v = torch.arange(lo, hi + 1, 61, dtype=torch.int32).view(torch.float32)
    sub = torch.arange(0, 1 << 23, 4099, dtype=torch.int32).view(torch.float32)  # subnormals
    return torch.cat([v, -v, sub, -sub])


def _blocks(values: torch.Tensor, absmax: float, blocksize: int) -> torch.Tensor:
    """values * absmax in blocks whose first element is absmax (so each block's absmax is
    exactly absmax and the other elements scale back to about `values`)."""
    per = blocksize - 1
    n = -(-values.numel() // per) * per
    padded = torch.cat([values, values.new_zeros(n - values.numel())]).view(-1, per)
    head = torch.full((padded.shape[0], 1), absmax)
    return torch.cat([head, padded * absmax], dim=1).reshape(-1).contiguous()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("absmax", [1.0, 3.7, 0.0123, 2.0 ** -90])
def test_quantize_equals_reference_near_thresholds(isa, signed, absmax):
    code = dynamic_map(signed)
    x = _blocks(torch.cat([_hard_values(code), _sweep()]), absmax, 4096)
    codes, scales = torch.ops.bnbfuse.quantize_blockwise(x, code, 4096)
    ref_codes, ref_scales = R.quantize_blockwise(x, code, 4096)
    assert torch.equal(scales, ref_scales)
    bad = (codes != ref_codes).nonzero()
    assert bad.numel() == 0, f"{isa}: {bad.numel()} codes differ, first at x={x[bad[0]].item()!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_every_code(isa, dtype):
    code = dynamic_map(True)
    codes = torch.arange(256, dtype=torch.uint8).repeat(40)[torch.randperm(10240)]
    absmax = torch.tensor([1.0, 0.37, 1e-30, 3e38, 5.0] * 8)
    out = torch.ops.bnbfuse.dequantize_blockwise(codes, absmax, code, 256, dtype)
    ref = R.dequantize_blockwise(codes, absmax, code, 256, dtype)
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       ref.view(torch.int16 if dtype != torch.float32 else torch.int32))
