"""Native kernels (csrc/) behind the ops, written once for both devices.

The CPU and CUDA entry points of the C ABI have the same arguments except the trailing
ones: the CPU ones take a thread count, the CUDA ones the device index of the call's
tensors and the stream to launch on (and the norms a scratch tensor for their per-block
partial sums, allocated here through torch's allocator). ``NativeBackend`` binds one
library and registers every op for its dispatch key; ``cpu.py`` and ``cuda.py`` just
instantiate it. Argument checks come from the op contracts (``bnbfuse/ops``), so every
backend rejects the same inputs with the same messages; the C API checks again, except
where a buffer lives: the CUDA library trusts the device index, so every tensor handed to
it is checked here to be on that device (:func:`check_one_device`).
"""
from __future__ import annotations

import ctypes
import warnings
from typing import Callable

import torch

from .._native import I32, I64, P, NativeLibrary, OptimizerArgs, dtype_code, ptr
from ..ops.embedding import check_lookup_args
from ..ops.optimizer import (KernelHyperparams, check_optimizer_args, check_state_blocks,
                             norms_scratch_size, optimizer_scalars, two_state_only)
from ..ops.quantize import check_blocksize, check_code
from ..ops.rules import RULES


class contiguous_in_place:
    """Contiguous versions of tensors a kernel writes in place (None stays None); a copy made
    for a non-contiguous tensor is copied back into it when the block succeeds.

    A class rather than a generator context manager: it is entered once per parameter per
    optimizer step, and contextlib's machinery costs a few microseconds there."""

    __slots__ = ("tensors", "work")

    def __init__(self, *tensors):
        self.tensors = tensors

    def __enter__(self):
        self.work = [None if t is None else t.contiguous() for t in self.tensors]
        return self.work

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            for t, w in zip(self.tensors, self.work):
                if t is not None and w is not t and w.data_ptr() != t.data_ptr():
                    t.copy_(w)
        return False


def check_one_device(what: str, device: torch.device, **tensors) -> None:
    """ValueError unless every tensor given (None skipped) is on ``device``.

    The op contracts already move or check what they accept from elsewhere; this is the
    last check before raw pointers go to a kernel, which cannot tell host from device
    memory, or one GPU's memory from another's, without a driver call per pointer.
    """
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device}, but the call runs on {device}; "
                             "all tensors must be on one device")


def _check_8bit(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2) -> int:
    """The op contract of an 8-bit update or norms call; returns the element count."""
    check_optimizer_args(optimizer, p, g, state1, state2, True)
    check_state_blocks(optimizer, p.numel(), absmax1, absmax2, qmap1, qmap2, p.device)
    return p.numel()


def _contiguous_or_none(t):
    return None if t is None else t.contiguous()


_PLAIN_SCALARS = frozenset((int, float, bool))


class OptimizerArgsCache:
    """The ``bnbf_optim_args`` struct of recent (optimizer, hyper-parameters, update_scale).

    The per-step scalars are the same for every parameter of a group in one step, and
    building them (double math, float32 rounding, the ctypes struct) costs more than a small
    tensor's update: keep the last few, keyed by the Python scalars.
    """

    def __init__(self, size: int = 32):
        self.size = size
        self.entries: dict = {}

    def get(self, optimizer: str, hparams: KernelHyperparams, update_scale: float = 1.0):
        key = (optimizer, *hparams, update_scale)
        if not _PLAIN_SCALARS.issuperset(map(type, key[1:])):  # e.g. tensor lr: no key
            return ctypes.byref(self._build(optimizer, hparams, update_scale))
        args = self.entries.get(key)
        if args is None:
            if len(self.entries) >= self.size:
                self.entries.clear()
            args = self.entries[key] = self._build(optimizer, hparams, update_scale)
        return ctypes.byref(args)

    @staticmethod
    def _build(optimizer, hparams, update_scale):
        return OptimizerArgs.from_scalars(optimizer_scalars(optimizer, hparams, update_scale))


def cpu_tail(what: str, t: torch.Tensor, **tensors) -> tuple:
    """The trailing arguments of a CPU entry point: the thread count."""
    return (torch.get_num_threads(),)


def cuda_tail(what: str, t: torch.Tensor, **tensors) -> tuple:
    """The trailing arguments of a CUDA entry point: ``t``'s device index and torch's current
    stream on that device, after checking that the other tensors are on it too."""
    check_one_device(what, t.device, **tensors)
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


class NativeBackend:
    """One native library (``lib``) registered for one dispatch key.

    Args:
        lib: the loaded library.
        prefix: ``"bnbf_cpu_"`` or ``"bnbf_cuda_"``.
        dispatch_key: ``"CPU"`` or ``"CUDA"``.
        tail: ``(argument types, fn(what, tensor, **other_tensors) -> values)``: the
            trailing arguments of every entry point (:func:`cpu_tail`, :func:`cuda_tail`).
        norms_scratch: whether the norms entry points take a scratch buffer (CUDA).
    """

    def __init__(self, lib: NativeLibrary, prefix: str, dispatch_key: str, tail,
                 norms_scratch: bool = False):
        self.lib = lib
        self.prefix = prefix
        self.key = dispatch_key
        self.tail_types, self.tail = tail
        self.norms_scratch = norms_scratch
        self.args_cache = OptimizerArgsCache()

    def function(self, name: str, *argtypes) -> Callable:
        return self.lib.function(self.prefix + name, *argtypes, *self.tail_types)

    def _scratch_args(self, n: int, device) -> tuple:
        """The norms' (scratch pointer, length) arguments, and the tensor to keep alive."""
        if not self.norms_scratch:
            return (), None
        size = norms_scratch_size(n)
        scratch = torch.empty(size, dtype=torch.float64, device=device)
        return (ptr(scratch), size), scratch

    def register(self, op: str, fn: Callable) -> None:
        torch.library.impl(f"bnbfuse::{op}", self.key)(fn)

    # ---- blockwise quantization ----------------------------------------------------------
    def register_quantization(self) -> None:
        self._quantize = self.function("quantize_blockwise", P, P, I32, P, P, I64, I64)
        self._dequantize = self.function("dequantize_blockwise", P, P, P, P, I32, I64, I64)
        self.register("quantize_blockwise", self.quantize_blockwise)
        self.register("dequantize_blockwise", self.dequantize_blockwise)

    def quantize_blockwise(self, A, code, blocksize):
        check_blocksize(blocksize)
        code = check_code(code, A.device)
        A = A.contiguous()
        n = A.numel()
        out = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
        absmax = torch.empty(-(n // -blocksize), dtype=torch.float32, device=A.device)
        tail = self.tail("quantize_blockwise", A, code=code, absmax=absmax, out=out)
        self.lib.check(self._quantize(ptr(code), ptr(A), dtype_code(A.dtype), ptr(absmax),
                                      ptr(out), blocksize, n, *tail), "quantize_blockwise")
        return out, absmax

    def dequantize_blockwise(self, A, absmax, code, blocksize, dtype):
        if A.dtype != torch.uint8:
            raise TypeError(f"codes must be uint8, got {A.dtype}")
        check_blocksize(blocksize)
        code = check_code(code, A.device)
        n = A.numel()
        blocks = -(n // -blocksize)
        if absmax.numel() < blocks:
            raise ValueError(f"absmax has {absmax.numel()} values; {n} codes in blocks of "
                             f"{blocksize} need {blocks}")
        A = A.contiguous()
        absmax = absmax.to(device=A.device, dtype=torch.float32).contiguous()
        out = torch.empty(A.shape, dtype=dtype, device=A.device)
        tail = self.tail("dequantize_blockwise", A, code=code, absmax=absmax, out=out)
        self.lib.check(self._dequantize(ptr(code), ptr(A), ptr(absmax), ptr(out),
                                        dtype_code(dtype), blocksize, n, *tail),
                       "dequantize_blockwise")
        return out

    # ---- optimizer updates ---------------------------------------------------------------
    def register_optimizers(self) -> None:
        """The four optimizer ops (semantics: bnbfuse/backends/reference/optimizer.py).

        Non-contiguous tensors are updated through a contiguous copy that is written back,
        so any layout works (at the cost of the copy).
        """
        args_p = ctypes.POINTER(OptimizerArgs)
        self._update_8bit = self.function("optimizer_update_8bit_blockwise", I32, P, P, I32, P,
                                          P, P, P, P, P, args_p, I64)
        self._update_32bit = self.function("optimizer_update_32bit", I32, P, P, I32, P, P,
                                           args_p, I64)
        scratch = (P, I64) if self.norms_scratch else ()
        self._norms_8bit = self.function("optimizer_norms_8bit_blockwise", I32, P, P, I32, P, P,
                                         P, P, P, P, args_p, I64, P, *scratch)
        self._norms_32bit = self.function("optimizer_norms_32bit", I32, P, P, I32, P, P, args_p,
                                          I64, P, *scratch)
        self.register("optimizer_update_8bit_blockwise", self.optimizer_update_8bit_blockwise)
        self.register("optimizer_update_32bit", self.optimizer_update_32bit)
        self.register("optimizer_norms_8bit_blockwise", self.optimizer_norms_8bit_blockwise)
        self.register("optimizer_norms_32bit", self.optimizer_norms_32bit)

    def _maps(self, optimizer, qmap1, qmap2, device):
        # after _check_8bit, which checked the maps for NaN (check_state_blocks)
        q2 = two_state_only(optimizer, qmap2)
        return (check_code(qmap1, device, nan_checked=True),
                None if q2 is None else check_code(q2, device, nan_checked=True))

    def optimizer_update_8bit_blockwise(self, optimizer, p, g, state1, state2, absmax1, absmax2,
                                        qmap1, qmap2, *hparams_and_scale):
        *hparams, update_scale = hparams_and_scale
        n = _check_8bit(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2)
        args = self.args_cache.get(optimizer, KernelHyperparams(*hparams), update_scale)
        if n == 0:
            return
        q1, q2 = self._maps(optimizer, qmap1, qmap2, p.device)
        g = g.contiguous()
        with contiguous_in_place(p, state1, two_state_only(optimizer, state2), absmax1,
                                 two_state_only(optimizer, absmax2)) as (pc, s1, s2, a1, a2):
            what = "optimizer_update_8bit_blockwise"
            tail = self.tail(what, pc, g=g, state1=s1, state2=s2, absmax1=a1, absmax2=a2,
                             qmap1=q1, qmap2=q2)
            self.lib.check(self._update_8bit(
                RULES[optimizer].id, ptr(pc), ptr(g), dtype_code(p.dtype), ptr(s1), ptr(s2),
                ptr(a1), ptr(a2), ptr(q1), ptr(q2), args, n, *tail), what)

    def optimizer_update_32bit(self, optimizer, p, g, state1, state2, *hparams_and_scale):
        *hparams, update_scale = hparams_and_scale
        hparams = KernelHyperparams(*hparams)
        check_optimizer_args(optimizer, p, g, state1, state2, False)
        args = self.args_cache.get(optimizer, hparams, update_scale)
        n = p.numel()
        if n == 0:
            return
        g = g.contiguous()
        with contiguous_in_place(p, state1, two_state_only(optimizer, state2)) as (pc, s1, s2):
            what = "optimizer_update_32bit"
            tail = self.tail(what, pc, g=g, state1=s1, state2=s2)
            self.lib.check(self._update_32bit(
                RULES[optimizer].id, ptr(pc), ptr(g), dtype_code(p.dtype), ptr(s1), ptr(s2),
                args, n, *tail), what)

    def optimizer_norms_8bit_blockwise(self, optimizer, p, g, state1, state2, absmax1, absmax2,
                                       qmap1, qmap2, *hparams):
        n = _check_8bit(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2)
        args = self.args_cache.get(optimizer, KernelHyperparams(*hparams))
        out = torch.zeros(2, dtype=torch.float64, device=p.device)
        if n:
            q1, q2 = self._maps(optimizer, qmap1, qmap2, p.device)
            s2 = _contiguous_or_none(two_state_only(optimizer, state2))
            a2 = _contiguous_or_none(two_state_only(optimizer, absmax2))
            pc, g, s1, a1 = (t.contiguous() for t in (p, g, state1, absmax1))
            what = "optimizer_norms_8bit_blockwise"
            scratch, keep = self._scratch_args(n, p.device)
            tail = self.tail(what, pc, g=g, state1=s1, state2=s2, absmax1=a1, absmax2=a2,
                             qmap1=q1, qmap2=q2, out=out, scratch=keep)
            self.lib.check(self._norms_8bit(
                RULES[optimizer].id, ptr(pc), ptr(g), dtype_code(p.dtype), ptr(s1), ptr(s2),
                ptr(a1), ptr(a2), ptr(q1), ptr(q2), args, n, ptr(out), *scratch, *tail), what)
        return out.to(torch.float32)

    def optimizer_norms_32bit(self, optimizer, p, g, state1, state2, *hparams):
        hparams = KernelHyperparams(*hparams)
        check_optimizer_args(optimizer, p, g, state1, state2, False)
        args = self.args_cache.get(optimizer, hparams)
        n = p.numel()
        out = torch.zeros(2, dtype=torch.float64, device=p.device)
        if n:
            s2 = _contiguous_or_none(two_state_only(optimizer, state2))
            pc, g, s1 = (t.contiguous() for t in (p, g, state1))
            what = "optimizer_norms_32bit"
            scratch, keep = self._scratch_args(n, p.device)
            tail = self.tail(what, pc, g=g, state1=s1, state2=s2, out=out, scratch=keep)
            self.lib.check(self._norms_32bit(
                RULES[optimizer].id, ptr(pc), ptr(g), dtype_code(p.dtype), ptr(s1), ptr(s2),
                args, n, ptr(out), *scratch, *tail), what)
        return out.to(torch.float32)

    # ---- quantized embedding lookup ------------------------------------------------------
    def register_embeddings(self) -> None:
        self._lookup = self.function("fusion_embedding_lookup", P, I64, P, I32, P, P, I64, P,
                                     I64, I64, I64, P, I32)
        self.register("fusion_embedding_lookup", self.fusion_embedding_lookup)

    def fusion_embedding_lookup(self, ids, base, absmax, qmap, fusion, bits, blocksize):
        V, F, D = check_lookup_args(ids, base, absmax, qmap, fusion, bits, blocksize)
        ids_c = ids.contiguous()
        base_c, fusion_c = base.contiguous(), fusion.contiguous()
        absmax_c = absmax.to(ids.device).contiguous() if bits else None
        qmap_c = qmap.to(ids.device).contiguous() if bits else None
        out = torch.empty((*ids.shape, D), dtype=fusion.dtype, device=ids.device)
        tail = self.tail("fusion_embedding_lookup", ids_c, base=base_c if V else None,
                         absmax=absmax_c, qmap=qmap_c, fusion=fusion_c if F else None, out=out)
        self.lib.check(self._lookup(ptr(ids_c), ids_c.numel(), ptr(base_c) if V else None, bits,
                                    ptr(absmax_c), ptr(qmap_c), V, ptr(fusion_c) if F else None,
                                    F, D, blocksize, ptr(out), dtype_code(fusion.dtype), *tail),
                       "fusion_embedding_lookup")
        return out

    def register_all(self) -> list[str]:
        """Registers every topic whose entry points the library has; returns the missing.

        A library built from older sources lacks some entry points: those ops keep the
        reference kernels (with a warning naming them) instead of breaking ``import bnbfuse``.
        """
        missing = []
        for topic in (self.register_quantization, self.register_optimizers,
                      self.register_embeddings):
            try:
                topic()
            except AttributeError as err:  # ctypes: undefined symbol
                missing.append(f"{topic.__name__.removeprefix('register_')} ({err})")
        if missing:
            warnings.warn(f"bnbfuse: {self.lib.path.name} is incomplete (rebuild with "
                          f"`pip install -e .`); reference kernels serve: {'; '.join(missing)}",
                          RuntimeWarning, stacklevel=2)
        return missing
