"""NaN and Inf inputs whose output bits the native kernels define (docs/optimizers.md, "NaN
bits"), and the x86 model of those bits. The CPU kernels are checked against the model on
every instruction set (tests/ops/test_nan_bits.py), the CUDA kernels against the CPU ones
(tests/ops/test_cuda_paths.py)."""

import torch

X86_DEFAULT_NAN = 0xFFC00000  # what x86 returns for 0 * inf, inf - inf

# float32 bit patterns: quiet and signalling NaNs of either sign, with payload bits in the
# parts that fp16 (top 10) and bf16 (top 7) keep and in the part they drop.
F32_NANS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FC02000, 0xFFE01000,
            0x7FA00000, 0x7FFFFFFF, 0xFF8FE000]
# fp16 / bf16 NaN patterns (quiet, signalling, payloads, both signs)
F16_NANS = [0x7E00, 0xFE00, 0x7C01, 0xFD01, 0x7FFF, 0x7D00]
BF16_NANS = [0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FFF, 0x7FA0]

INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def f32(bits) -> torch.Tensor:
    """float32 tensor of the given bit patterns."""
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits],
                        dtype=torch.int32).view(torch.float32)


def u16(bits) -> torch.Tensor:
    return torch.tensor([b - (1 << 16) if b >= 1 << 15 else b for b in bits], dtype=torch.int16)


def bits_of(t: torch.Tensor) -> list:
    """Unsigned bit patterns of a float tensor, flattened."""
    width = 32 if t.dtype == torch.float32 else 16
    return [v & ((1 << width) - 1) for v in t.contiguous().view(INT[t.dtype]).reshape(-1).tolist()]


def from_bits(bits, dtype) -> torch.Tensor:
    return f32(bits) if dtype == torch.float32 else u16(bits).view(dtype)


def quiet(bits: int, dtype) -> int:
    """A NaN made quiet in its own format."""
    return bits | {torch.float32: 0x00400000, torch.float16: 0x0200, torch.bfloat16: 0x0040}[dtype]


def store_bits(b32: int, dtype) -> int:
    """The x86 conversion of float32 bits to dtype (vcvtps2ph for fp16; bf16 in integers)."""
    if (b32 & 0x7FFFFFFF) > 0x7F800000:
        if dtype == torch.float32:
            return b32
        if dtype == torch.float16:
            return ((b32 >> 16) & 0x8000) | 0x7E00 | ((b32 >> 13) & 0x3FF)
        return (b32 >> 16) | 0x40
    return bits_of(f32([b32]).to(dtype))[0]


def mul_bits(a: float, b32: int) -> int:
    """float32 bits of a * b on x86 for a non-NaN a (a dequantized map value times a scale)."""
    if (b32 & 0x7FFFFFFF) > 0x7F800000:
        return b32 | 0x00400000  # the NaN operand, quieted
    if a == 0 and (b32 & 0x7FFFFFFF) == 0x7F800000:
        return X86_DEFAULT_NAN   # 0 * inf
    return bits_of(torch.tensor([a], dtype=torch.float32) * f32([b32]))[0]


def param_with_nans(n: int, dtype, seed: int = 0):
    """A parameter of n values with NaN patterns of dtype placed in the vector body and the
    scalar tail of the CPU kernels' blocks; returns (p, {index: bits})."""
    p = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    nans = {torch.float32: F32_NANS, torch.float16: F16_NANS, torch.bfloat16: BF16_NANS}[dtype]
    where = {}
    positions = [3, 17, 100, 255, 256 + 40, n - 1, n - 2, n - 3, n - 5]
    for k, i in enumerate(positions):
        where[i] = nans[k % len(nans)]
    raw = p.view(INT[dtype])
    for i, b in where.items():
        raw[i] = from_bits([b], dtype).view(INT[dtype])[0]
    return p, where
