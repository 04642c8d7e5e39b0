"""The NaN bits the native CPU kernels write, on every instruction set (vector bodies and
scalar tails alike), against the x86 model of tests/ops/nan_cases.py: the contract the CUDA
kernels reproduce (docs/optimizers.md, "NaN bits"; tests/ops/test_cuda_paths.py compares the
two devices). The reference kernels are not held to it."""

import pytest
import torch

from bnbfuse.functional import dynamic_map
from bnbfuse.nn import FusionEmbedding  # noqa: F401  (registers the lookup autograd)
from bnbfuse.ops.rules import RULES
from bnbfuse.row_quantization import quant_map
from nan_cases import (F32_NANS, X86_DEFAULT_NAN, bits_of, f32, from_bits, mul_bits,
                       param_with_nans, quiet, store_bits)
from optimizer_cases import DTYPES, make_state, ops, run_update

# Scales of the dequantization tests: NaNs of every kind, infinities, and a finite value.
SCALES = F32_NANS + [0x7F800000, 0xFF800000, 0x3FC00000]


def _scaled_codes(code: torch.Tensor, blocksize: int):
    """Codes cycling through every map index (the zero code included), one block per scale."""
    n = blocksize * len(SCALES)
    codes = (torch.arange(n) * 37 % code.numel()).to(torch.uint8)
    return codes, f32(SCALES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_nan_bits(isa, dtype):
    code = dynamic_map(True)
    blocksize = 37  # 4 vector lanes of 8 and a scalar tail of 5 per block
    codes, absmax = _scaled_codes(code, blocksize)
    out = ops.dequantize_blockwise(codes, absmax, code, blocksize, dtype)
    values = code[codes.long()].tolist()
    scales = [SCALES[i // blocksize] for i in range(codes.numel())]
    want = [store_bits(mul_bits(v, s), dtype) for v, s in zip(values, scales)]
    assert bits_of(out) == want


@pytest.mark.parametrize("scheme,bits", [("int8", 8), ("nf4", 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lookup_nan_bits(isa, scheme, bits, dtype):
    qmap = quant_map(scheme)
    V, D, blocksize = len(SCALES), 21, 7  # 3 blocks per row, tails in each
    cols = D if bits == 8 else (D + 1) // 2
    base = (torch.arange(V * cols) * 29 % 256).to(torch.uint8).view(V, cols)
    absmax = f32(SCALES).view(V, 1).repeat(1, 3)
    fusion = torch.randn(2, D).to(dtype)
    ids = torch.arange(V)
    out = ops.fusion_embedding_lookup(ids, base, absmax, qmap, fusion, bits, blocksize)
    for r in range(V):
        if bits == 8:
            idx = base[r].long()
        else:
            b = base[r].long()
            idx = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:D]
        want = [store_bits(mul_bits(v, SCALES[r]), dtype) for v in qmap[idx].tolist()]
        assert bits_of(out[r]) == want, (scheme, r)


@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", tuple(RULES))
def test_optimizer_nan_parameters_come_back_quieted(isa, opt, dtype, eight_bit):
    """A NaN parameter that the rule updates (AdamW's p * decay - step propagates p's NaN)
    comes back as its own NaN made quiet. One the rule skips (a NaN gradient; the rules that
    fold p into the gradient make the state NaN and skip too) is written back as loaded:
    float32 bits unchanged, fp16/bf16 through the conversions, which make it quiet."""
    n = 256 * 2 + 13
    p, where = param_with_nans(n, dtype, seed=1)
    g = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype)
    g[17] = float("nan")  # one NaN parameter whose gradient is NaN too
    state = make_state(opt, n, eight_bit)
    run_update(ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit,
               opt, p, g, state, eight_bit, 3)
    got = bits_of(p)
    updates_nan_p = opt in ("adamw", "ademamix", "lion", "lamb")
    for i, b in where.items():
        skipped = i == 17 or not updates_nan_p
        want = b if skipped and dtype == torch.float32 else quiet(b, dtype)
        assert got[i] == want, (i, hex(b), hex(got[i]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_invalid_operation_gives_the_x86_default_nan(isa, dtype):
    """AdamW with lr * weight_decay = 1 decays p by 0: an infinite parameter becomes
    inf * 0, x86's default NaN (negative), on every lane."""
    n = 300
    p = torch.randn(n, generator=torch.Generator().manual_seed(3))
    p[[5, 64, 299]] = torch.tensor([float("inf"), float("-inf"), float("inf")])
    p = p.to(dtype)
    g = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(dtype) * 1e-3
    c1, c2, a1, a2 = make_state("adamw", n, True)
    q1, q2 = dynamic_map(True), dynamic_map(False)
    #      lr   beta1 beta2  beta3 alpha eps  wd   damp nesterov step gnorm_scale, update_scale
    hp = (1.0, 0.9, 0.999, 0.0, 0.0, 1e-8, 1.0, 0.0, False, 1, 1.0, 1.0)
    ops.optimizer_update_8bit_blockwise("adamw", p, g, c1, c2, a1, a2, q1, q2, *hp)
    got = bits_of(p)
    for i in (5, 64, 299):
        assert got[i] == store_bits(X86_DEFAULT_NAN, dtype), (i, hex(got[i]))
    assert not torch.isnan(p[[0, 6, 100]]).any()


def test_model_of_the_conversions():
    """The model's fp16 conversion is vcvtps2ph's (sign, quiet bit, top 10 payload bits)."""
    assert store_bits(0x7FC00000, torch.float16) == 0x7E00
    assert store_bits(0xFFC00000, torch.float16) == 0xFE00
    assert store_bits(0x7FC02000, torch.float16) == 0x7E01
    assert store_bits(0x7F800001, torch.float16) == 0x7E00
    assert store_bits(0x7FC00000, torch.bfloat16) == 0x7FC0
    assert store_bits(0x7F800001, torch.bfloat16) == 0x7FC0
    assert bits_of(from_bits([0x7C01], torch.float16)) == [0x7C01]
