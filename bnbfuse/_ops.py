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
# One fused pass per parameter: read p, g and the state; write p and the state. `optimizer`
# is one of "adam", "adamw", "ademamix", "lamb", "momentum", "rmsprop", "adagrad", "lion",
# "lars"; hyper-parameters an optimizer does not use are ignored. `step` is the 1-based step
# count after this update. The 8-bit variant keeps state in blocks of 256 (signed map for
# state1, unsigned for state2). The *_norms ops compute [sum(update**2), sum(p**2)] (float32
# tensor of 2) without writing anything, for trust ratios and max_unorm.
_HPARAMS = ("float lr, float beta1, float beta2, float beta3, float alpha, float eps, "
            "float weight_decay, float dampening, bool nesterov, int step, float gnorm_scale")
lib.define(
    "optimizer_update_8bit_blockwise(str optimizer, Tensor(a!) p, Tensor g, Tensor(b!) state1, "
    "Tensor(c!)? state2, Tensor(d!) absmax1, Tensor(e!)? absmax2, Tensor qmap1, Tensor? qmap2, "
    f"{_HPARAMS}, float update_scale) -> ()"
)
lib.define(
    "optimizer_update_32bit(str optimizer, Tensor(a!) p, Tensor g, Tensor(b!) state1, "
    f"Tensor(c!)? state2, {_HPARAMS}, float update_scale) -> ()"
)
lib.define(
    "optimizer_norms_8bit_blockwise(str optimizer, Tensor p, Tensor g, Tensor state1, "
    "Tensor? state2, Tensor absmax1, Tensor? absmax2, Tensor qmap1, Tensor? qmap2, "
    f"{_HPARAMS}) -> Tensor"
)
lib.define(
    f"optimizer_norms_32bit(str optimizer, Tensor p, Tensor g, Tensor state1, Tensor? state2, "
    f"{_HPARAMS}) -> Tensor"
)


@torch.library.register_fake("bnbfuse::optimizer_update_8bit_blockwise")
def _(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, beta3,
      alpha, eps, weight_decay, dampening, nesterov, step, gnorm_scale, update_scale):
    torch._check(state1.dtype == torch.uint8, lambda: f"state1 must be uint8, got {state1.dtype}")
    return None


@torch.library.register_fake("bnbfuse::optimizer_update_32bit")
def _(optimizer, p, g, state1, state2, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
      dampening, nesterov, step, gnorm_scale, update_scale):
    torch._check(state1.dtype == torch.float32,
                 lambda: f"state1 must be float32, got {state1.dtype}")
    return None


@torch.library.register_fake("bnbfuse::optimizer_norms_8bit_blockwise")
def _(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, beta3,
      alpha, eps, weight_decay, dampening, nesterov, step, gnorm_scale):
    return torch.empty(2, dtype=torch.float32, device=p.device)


@torch.library.register_fake("bnbfuse::optimizer_norms_32bit")
def _(optimizer, p, g, state1, state2, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
      dampening, nesterov, step, gnorm_scale):
    return torch.empty(2, dtype=torch.float32, device=p.device)


# ---- quantized embedding lookup (bnbfuse/nn) -----------------------------------------------
# fusion_embedding_lookup: out[i] = base row ids[i] (dequantized) if ids[i] < V, else fusion
# row ids[i] - V, for int64 ids of any shape; out has shape (*ids.shape, D) and fusion's dtype.
#   bits = 0: base is a float (V, D) table of fusion's dtype (absmax, qmap unused, may be empty)
#   bits = 8: base is uint8 (V, D), value = qmap[code] * absmax[row, col // blocksize]
#   bits = 4: base is uint8 (V, ceil(D/2)), element 2k in the high nibble of byte k
# absmax is float32 (V, ceil(D / blocksize)); qmap float32 (256 for bits 8, 16 for bits 4).
# Ids outside [0, V + F) raise IndexError (CPU, reference); CUDA kernels write zero rows for
# them and the module asserts asynchronously. Autograd (registered in bnbfuse/nn): gradient
# into fusion, and into base when bits == 0.
lib.define(
    "fusion_embedding_lookup(Tensor ids, Tensor base, Tensor absmax, Tensor qmap, Tensor fusion, "
    "int bits, int blocksize) -> Tensor"
)


@torch.library.register_fake("bnbfuse::fusion_embedding_lookup")
def _(ids, base, absmax, qmap, fusion, bits, blocksize):
    torch._check(ids.dtype == torch.int64, lambda: f"ids must be int64, got {ids.dtype}")
    torch._check(bits in (0, 4, 8), lambda: f"bits must be 0, 4 or 8, got {bits}")
    torch._check(fusion.dim() == 2, lambda: "fusion table must be 2-D")
    return torch.empty((*ids.shape, fusion.shape[1]), dtype=fusion.dtype, device=ids.device)
