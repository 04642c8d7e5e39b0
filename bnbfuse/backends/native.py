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
    def register_optimizers(self) -> None:
        """The four optimizer ops (semantics: bnbfuse/backends/reference.py).

        Arguments are validated by the reference's checks (same messages on every backend)
        and again by the C API. Non-contiguous tensors are updated through a contiguous copy
        that is written back, so any layout works (at the cost of the copy).
        """
        import ctypes

        from .._native import OPTIMIZER_IDS, OptimizerArgs
        from . import reference as ref

        class _Contiguous:
            """Contiguous versions of tensors a kernel writes in place (None stays None);
            a copy made for a non-contiguous tensor is copied back into it on exit."""

            def __init__(self, *tensors):
                self.tensors = tensors
                self.work = [None if t is None else t.contiguous() for t in tensors]

            def __enter__(self):
                return self.work

            def __exit__(self, exc_type, exc, tb):
                if exc_type is None:
                    for t, w in zip(self.tensors, self.work):
                        if t is not None and w is not t and w.data_ptr() != t.data_ptr():
                            t.copy_(w)
                return False

        args_p = ctypes.POINTER(OptimizerArgs)
        upd8 = self.function("optimizer_update_8bit_blockwise", I32, P, P, I32, P, P, P, P, P, P,
                             args_p, I64)
        upd32 = self.function("optimizer_update_32bit", I32, P, P, I32, P, P, args_p, I64)
        nrm8 = self.function("optimizer_norms_8bit_blockwise", I32, P, P, I32, P, P, P, P, P, P,
                             args_p, I64, P)
        nrm32 = self.function("optimizer_norms_32bit", I32, P, P, I32, P, P, args_p, I64, P)

        def native_args(optimizer, hp, update_scale=1.0):
            return ctypes.byref(OptimizerArgs.from_scalars(
                ref.optimizer_scalars(optimizer, *hp, update_scale)))

        def two(optimizer, t):
            return t if optimizer in ref.TWO_STATE else None

        def device_checks(p, *tensors):
            for t in tensors:
                if t is not None and t.device != p.device:
                    raise ValueError(f"all tensors must be on {p.device}, got one on {t.device}")

        def maps(optimizer, qmap1, qmap2, device):
            q1 = check_code(qmap1, device)
            q2 = check_code(qmap2, device) if optimizer in ref.TWO_STATE else None
            return q1, q2

        def update_8bit(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, *hp):
            *hp, update_scale = hp
            ref._check_optimizer_args(optimizer, p, g, state1, state2, True)
            n = p.numel()
            ref._check_absmax(optimizer, n, absmax1, absmax2, qmap1, qmap2)
            device_checks(p, absmax1, two(optimizer, absmax2))
            a = native_args(optimizer, hp, update_scale)
            if n == 0:
                return
            q1, q2 = maps(optimizer, qmap1, qmap2, p.device)
            g = g.contiguous()
            with _Contiguous(p, state1, two(optimizer, state2), absmax1,
                             two(optimizer, absmax2)) as (pc, s1, s2, a1, a2):
                self.lib.check(upd8(OPTIMIZER_IDS[optimizer], ptr(pc), ptr(g),
                                    dtype_code(p.dtype), ptr(s1), ptr(s2), ptr(a1), ptr(a2),
                                    ptr(q1), ptr(q2), a, n, self.last_value(p)),
                               "optimizer_update_8bit_blockwise")

        def update_32bit(optimizer, p, g, state1, state2, *hp):
            *hp, update_scale = hp
            ref._check_optimizer_args(optimizer, p, g, state1, state2, False)
            a = native_args(optimizer, hp, update_scale)
            n = p.numel()
            if n == 0:
                return
            g = g.contiguous()
            with _Contiguous(p, state1, two(optimizer, state2)) as (pc, s1, s2):
                self.lib.check(upd32(OPTIMIZER_IDS[optimizer], ptr(pc), ptr(g),
                                     dtype_code(p.dtype), ptr(s1), ptr(s2), a, n,
                                     self.last_value(p)), "optimizer_update_32bit")

        def norms_8bit(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, *hp):
            ref._check_optimizer_args(optimizer, p, g, state1, state2, True)
            n = p.numel()
            ref._check_absmax(optimizer, n, absmax1, absmax2, qmap1, qmap2)
            device_checks(p, absmax1, two(optimizer, absmax2))
            a = native_args(optimizer, hp)
            out = torch.zeros(2, dtype=torch.float64, device=p.device)
            if n:
                q1, q2 = maps(optimizer, qmap1, qmap2, p.device)
                s2, a2 = two(optimizer, state2), two(optimizer, absmax2)
                s2 = None if s2 is None else s2.contiguous()
                a2 = None if a2 is None else a2.contiguous()
                pc, g, s1, a1 = (t.contiguous() for t in (p, g, state1, absmax1))
                self.lib.check(nrm8(OPTIMIZER_IDS[optimizer], ptr(pc), ptr(g),
                                    dtype_code(p.dtype), ptr(s1), ptr(s2), ptr(a1), ptr(a2),
                                    ptr(q1), ptr(q2), a, n, ptr(out), self.last_value(p)),
                               "optimizer_norms_8bit_blockwise")
            return out.to(torch.float32)

        def norms_32bit(optimizer, p, g, state1, state2, *hp):
            ref._check_optimizer_args(optimizer, p, g, state1, state2, False)
            a = native_args(optimizer, hp)
            n = p.numel()
            out = torch.zeros(2, dtype=torch.float64, device=p.device)
            if n:
                s2 = two(optimizer, state2)
                s2 = None if s2 is None else s2.contiguous()
                pc, g, s1 = (t.contiguous() for t in (p, g, state1))
                self.lib.check(nrm32(OPTIMIZER_IDS[optimizer], ptr(pc), ptr(g),
                                     dtype_code(p.dtype), ptr(s1), ptr(s2), a, n, ptr(out),
                                     self.last_value(p)), "optimizer_norms_32bit")
            return out.to(torch.float32)

        self.register("optimizer_update_8bit_blockwise", update_8bit)
        self.register("optimizer_update_32bit", update_32bit)
        self.register("optimizer_norms_8bit_blockwise", norms_8bit)
        self.register("optimizer_norms_32bit", norms_32bit)

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
        self.register_optimizers()
        self.register_embeddings()
