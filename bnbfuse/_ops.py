"""The custom ops of bnbfuse, declared once with ``torch.library``.

Each op has a schema and a fake (meta) implementation here, so ``torch.compile`` can trace
through it. Kernels are registered per device in ``bnbfuse/backends``: ``cpu`` and ``cuda``
call the native library; ``reference`` (pure PyTorch) is registered for every device as
``CompositeExplicitAutograd`` and serves wherever no native kernel is registered.
"""
from __future__ import annotations

import torch

lib = torch.library.Library("bnbfuse", "DEF")

# ---- blockwise quantization ----------------------------------------------------------------
lib.define("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)")
lib.define(
    "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype)"
    " -> Tensor"
)


@torch.library.register_fake("bnbfuse::quantize_blockwise")
def _(A, code, blocksize):
    torch._check(A.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"quantize_blockwise takes float32/float16/bfloat16, got {A.dtype}")
    n = A.numel()
    blocks = -(n // -blocksize)
    return (torch.empty(A.shape, dtype=torch.uint8, device=A.device),
            torch.empty(blocks, dtype=torch.float32, device=A.device))


@torch.library.register_fake("bnbfuse::dequantize_blockwise")
def _(A, absmax, code, blocksize, dtype):
    torch._check(A.dtype == torch.uint8, lambda: f"codes must be uint8, got {A.dtype}")
    return torch.empty(A.shape, dtype=dtype, device=A.device)


# ---- optimizer updates (bnbfuse/optim) -----------------------------------------------------
# Defined in the optimizer section below this line.


# ---- quantized embedding lookup (bnbfuse/nn) -----------------------------------------------
# Defined in the embedding section below this line.
