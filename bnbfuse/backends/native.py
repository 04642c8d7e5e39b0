"""Native kernels (csrc/) behind the ops, written once for both devices.

The CPU and CUDA entry points of the C ABI have the same arguments except the last: the
CPU ones take a thread count, the CUDA ones the stream to launch on. ``NativeBackend``
binds one library and registers every op for its dispatch key; ``cpu.py`` and ``cuda.py``
just instantiate it.
"""
from __future__ import annotations

from typing import Callable

import torch

from .._native import I32, I64, P, NativeLibrary, dtype_code, ptr


def check_code(code: torch.Tensor, device) -> torch.Tensor:
    if code.numel() != 256:
        raise ValueError(f"the quantization map must have 256 values, got {code.numel()}")
    return code.to(device=device, dtype=torch.float32).contiguous()


class NativeBackend:
    """One native library (``lib``) registered for one dispatch key.

    Args:
        lib: the loaded library.
        prefix: ``"bnbf_cpu_"`` or ``"bnbf_cuda_"``.
        dispatch_key: ``"CPU"`` or ``"CUDA"``.
        last_arg: ``(last_arg_type, fn(tensor) -> value)``: thread count or stream.
    """

    def __init__(self, lib: NativeLibrary, prefix: str, dispatch_key: str, last_arg):
        self.lib = lib
        self.prefix = prefix
        self.key = dispatch_key
        self.last_type, self.last_value = last_arg

    def function(self, name: str, *argtypes) -> Callable:
        return self.lib.function(self.prefix + name, *argtypes, self.last_type)

    def register(self, op: str, fn: Callable) -> None:
        torch.library.impl(f"bnbfuse::{op}", self.key)(fn)

    # ---- blockwise quantization ----------------------------------------------------------
    def register_quantization(self) -> None:
        quantize = self.function("quantize_blockwise", P, P, I32, P, P, I64, I64)
        dequantize = self.function("dequantize_blockwise", P, P, P, P, I32, I64, I64)

        def quantize_blockwise(A, code, blocksize):
            if blocksize < 1:
                raise ValueError(f"blocksize must be positive, got {blocksize}")
            code = check_code(code, A.device)
            A = A.contiguous()
            n = A.numel()
            out = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
            absmax = torch.empty(-(n // -blocksize), dtype=torch.float32, device=A.device)
            self.lib.check(quantize(ptr(code), ptr(A), dtype_code(A.dtype), ptr(absmax), ptr(out),
                                    blocksize, n, self.last_value(A)), "quantize_blockwise")
            return out, absmax

        def dequantize_blockwise(A, absmax, code, blocksize, dtype):
            if A.dtype != torch.uint8:
                raise TypeError(f"codes must be uint8, got {A.dtype}")
            if blocksize < 1:
                raise ValueError(f"blocksize must be positive, got {blocksize}")
            code = check_code(code, A.device)
            n = A.numel()
            blocks = -(n // -blocksize)
            if absmax.numel() < blocks:
                raise ValueError(f"absmax has {absmax.numel()} values; {n} codes in blocks of "
                                 f"{blocksize} need {blocks}")
            A = A.contiguous()
            absmax = absmax.to(device=A.device, dtype=torch.float32).contiguous()
            out = torch.empty(A.shape, dtype=dtype, device=A.device)
            self.lib.check(dequantize(ptr(code), ptr(A), ptr(absmax), ptr(out), dtype_code(dtype),
                                      blocksize, n, self.last_value(A)), "dequantize_blockwise")
            return out

        self.register("quantize_blockwise", quantize_blockwise)
        self.register("dequantize_blockwise", dequantize_blockwise)

    # ---- optimizer updates ---------------------------------------------------------------
    # (optimizer section)

    # ---- quantized embedding lookup ------------------------------------------------------
    def register_embeddings(self) -> None:
        from .reference import check_lookup_args

        lookup = self.function("fusion_embedding_lookup", P, I64, P, I32, P, P, I64, P, I64, I64,
                               I64, P, I32)

        def fusion_embedding_lookup(ids, base, absmax, qmap, fusion, bits, blocksize):
            V, F, D = check_lookup_args(ids, base, absmax, qmap, fusion, bits, blocksize)
            for name, t in (("base", base), ("fusion", fusion)):
                if t.device != ids.device:
                    raise ValueError(f"fusion_embedding_lookup: {name} is on {t.device}, ids on "
                                     f"{ids.device}")
            ids_c = ids.contiguous()
            base_c, fusion_c = base.contiguous(), fusion.contiguous()
            absmax_c = absmax.to(ids.device).contiguous() if bits else None
            qmap_c = qmap.to(ids.device).contiguous() if bits else None
            out = torch.empty((*ids.shape, D), dtype=fusion.dtype, device=ids.device)
            self.lib.check(lookup(ptr(ids_c), ids_c.numel(), ptr(base_c) if V else None, bits,
                                  ptr(absmax_c), ptr(qmap_c), V, ptr(fusion_c) if F else None,
                                  F, D, blocksize, ptr(out), dtype_code(fusion.dtype),
                                  self.last_value(ids)), "fusion_embedding_lookup")
            return out

        self.register("fusion_embedding_lookup", fusion_embedding_lookup)

    def register_all(self) -> None:
        self.register_quantization()
        self.register_embeddings()
