"""The block codecs of every CPU instruction set against the reference, bit for bit, where
they are hardest: values within a few ulps of every rounding threshold of both dynamic
maps (either sign), a strided sweep of all floats in [2^-31, 1], blocks whose absmax is not
a power of two (the AVX-512 VBMI path multiplies by 1/absmax and redoes the lanes that land
near a threshold), subnormals, and every code for dequantization. Paths this CPU cannot run
are skipped."""

import pytest
import torch

from bnbfuse.backends import reference as R
from bnbfuse.functional import dynamic_map
from bnbfuse.ops.quantize import nearest_thresholds

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


# ---- the FusionEmbedding lookup (decode_block / decode_nibbles per ISA) ----------------------
from bnbfuse import row_quantization as rq  # noqa: E402
from bnbfuse.nn import FusionEmbedding  # noqa: E402

LOOKUP_MAPS = {  # bits, map: the two table maps (int8's is computed on AVX2), any other map
    "int8": (8, lambda: rq.quant_map("int8")),
    "dynamic": (8, lambda: dynamic_map(True)),
    "nf4": (4, lambda: rq.quant_map("nf4")),
    "fp4": (4, rq.fp4_map),
}


def _same_bits(out, ref):
    """Bit for bit; NaN only as NaN for half types (torch's vectorised bf16 cast makes every
    NaN 0xFFFF, bnbfuse's kernels keep its sign and top bits, as its scalar cast does)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        return torch.equal(out.view(torch.int32), ref.view(torch.int32))
    nan = torch.isnan(ref)
    return torch.equal(torch.isnan(out), nan) and torch.equal(
        out[~nan].view(torch.int16), ref[~nan].view(torch.int16))


def _lookup_case(name, D, blocksize, V=37, F=3, seed=0):
    bits, qmap = LOOKUP_MAPS[name]
    qmap = qmap()
    g = torch.Generator().manual_seed(seed)
    cols = D if bits == 8 else (D + 1) // 2
    # every code somewhere (NaN of a map that has none is not a concern here)
    base = torch.randint(0, 256, (V, cols), generator=g, dtype=torch.uint8)
    nblk = -(-D // blocksize)
    absmax = torch.rand(V, nblk, generator=g) * 3
    # non-finite and extreme scales in some blocks, on the first and last rows too
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e-40, 3e38, -2.5])
    flat = absmax.view(-1)
    picks = torch.randperm(flat.numel(), generator=g)[: min(flat.numel(), 3 * special.numel())]
    flat[picks] = special.repeat(3)[: picks.numel()]
    absmax[0, 0], absmax[V - 1, nblk - 1] = float("nan"), float("inf")
    return base, absmax, qmap, bits, V, F


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(LOOKUP_MAPS))
def test_fusion_lookup_equals_reference(isa, name, dtype):
    """Rows at both vocabulary ends and every fusion row; D a multiple of 64 or not, of the
    blocksize or not (NF4 blocks that start in the middle of a byte); NaN/Inf/zero/subnormal
    /huge/negative block scales."""
    for D, blocksize in [(64, 64), (1024, 64), (1024, 256), (130, 64), (65, 64), (1, 64),
                         (127, 5), (200, 33), (63, 63), (300, 300), (129, 2)]:
        base, absmax, qmap, bits, V, F = _lookup_case(name, D, blocksize, seed=D + blocksize)
        fusion = torch.randn(F, D).to(dtype)
        ids = torch.cat([torch.tensor([0, V - 1, V, V + F - 1, 0]), torch.randperm(V + F),
                         torch.randint(0, V + F, (51,))]).view(3, -1)
        out = torch.ops.bnbfuse.fusion_embedding_lookup(ids, base, absmax, qmap, fusion, bits,
                                                        blocksize)
        ref = R.fusion_embedding_lookup(ids, base, absmax, qmap, fusion, bits, blocksize)
        assert _same_bits(out, ref), (isa, name, dtype, D, blocksize)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_fusion_lookup_padding_empty_and_bad_ids(isa, quant):
    torch.manual_seed(0)
    for pad in (0, 49):  # the padding row at either end of the base vocabulary
        emb = FusionEmbedding(50, 4, 70, base_quant=quant, padding_idx=pad)
        ids = torch.tensor([[pad, 1, 53, pad], [49, 0, 50, pad]])
        out = emb(ids)
        e = emb.embedding
        ref = R.fusion_embedding_lookup(ids, e.weight, e.absmax, e.qmap,
                                        emb.fusion_embedding.weight, e.bits, e.blocksize)
        assert _same_bits(out.detach(), ref) and torch.equal(out[ids == pad],
                                                             torch.zeros(4, 70))
    for shape in [(0,), (2, 0), (0, 5)]:
        assert emb(torch.zeros(shape, dtype=torch.long)).shape == (*shape, 70)
    for bad in (54, -1, 2**40):
        with pytest.raises(IndexError, match=f"token id {bad} "):
            emb(torch.tensor([[3, bad]]))


def test_int8_table_map_dequantizes_bit_exact(isa):
    """dequantize_blockwise with the int8 table map: computed (c - 127) / 127 on AVX2, byte
    planes on VBMI, table loads elsewhere; every code, odd tails."""
    code = rq.quant_map("int8")
    codes = torch.arange(256, dtype=torch.uint8).repeat(9)[torch.randperm(2304)][:2301]
    absmax = torch.tensor([1.0, 0.37, 1e-30, 3e38, float("inf"), float("nan"), 5.0, -2.0, 0.0,
                           1e-40])
    out = torch.ops.bnbfuse.dequantize_blockwise(codes, absmax, code, 256, torch.float32)
    ref = R.dequantize_blockwise(codes, absmax, code, 256, torch.float32)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


_GUARD_SCRIPT = r"""
import ctypes, mmap, sys, torch
from bnbfuse import _native
from bnbfuse import row_quantization as rq
lib = _native.cpu.lib
lib.bnbf_cpu_force_isa.argtypes = [ctypes.c_char_p]
assert lib.bnbf_cpu_force_isa(sys.argv[1].encode()) == 0
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
keep = []

def at_page_end(t):
    # t's bytes placed to end exactly where a PROT_NONE page begins
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // PAGE) + 1
    m = mmap.mmap(-1, pages * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(addr + (pages - 1) * PAGE, PAGE, 0) == 0
    start = addr + (pages - 1) * PAGE - nbytes
    ctypes.memmove(start, t.data_ptr(), nbytes)
    keep.append(m)
    return start

fn = lib.bnbf_cpu_fusion_embedding_lookup
P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
fn.argtypes = [P, I64, P, I32, P, P, I64, P, I64, I64, I64, P, I32, I32]
for quant, bits in (("int8", 8), ("nf4", 4)):
    for D, bs in ((70, 64), (1, 64), (127, 5), (65, 65), (129, 2)):
        for dt, code in ((torch.float32, 0), (torch.bfloat16, 2), (torch.float16, 1)):
            V = 9
            codes, absmax = rq.quantize_table(torch.randn(V, D), quant, bs)
            qmap = rq.quant_map(quant)
            fusion = torch.randn(2, D).to(dt)
            ids = torch.tensor([V - 1, V + 1, V - 1, 0])  # the last rows of both tables
            out = torch.empty(4, D, dtype=dt)
            o = at_page_end(out)
            rc = fn(ids.data_ptr(), 4, at_page_end(codes), bits, at_page_end(absmax),
                    at_page_end(qmap), V, at_page_end(fusion), 2, D, bs, o, code, 2)
            assert rc == 0
            ctypes.memmove(out.data_ptr(), o, out.numel() * out.element_size())
            ref = torch.ops.bnbfuse.fusion_embedding_lookup(ids, codes, absmax, qmap, fusion,
                                                            bits, bs)
            assert torch.equal(out, ref), (quant, D, bs, dt)
print("ok")
"""


def test_fusion_lookup_reads_and_writes_nothing_past_the_tables(isa):
    """Every table and the output end where an inaccessible page begins: a read or write of
    one byte too many is a segfault (of the child process)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT, isa], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
