"""Paged memory for optimizer state (bitsandbytes' paged optimizers).

On CUDA, a paged tensor lives in CUDA managed memory (allocated by the native CUDA library,
``bnbf_cuda_paged_alloc``): the driver may evict its pages to host memory when the GPU runs
short and migrates them back on access, so optimizer state no longer has to fit next to the
activations' peak. The optimizer prefetches each parameter's paged state to the GPU on the
current stream before the kernel that reads it, so the step itself does not fault page by
page. Elsewhere (CPU parameters) paging is a no-op: the state is ordinary memory.

:class:`GlobalPageManager` is the one registry of paged tensors (bitsandbytes' name), for
``prefetch_all`` (e.g. ``prefetch_all(to_cpu=True)`` to push all state to host memory before
an evaluation that needs the GPU memory).

Example:
    >>> import torch
    >>> from bnbfuse import paged
    >>> paged.pages(torch.zeros(200_000))   # a CPU tensor is never paged
    False
"""
from __future__ import annotations

import ctypes
import weakref
from math import prod

import torch

from . import _native

__all__ = ["GlobalPageManager", "get_paged", "prefetch_tensor", "is_paged", "pages",
           "PAGED_MIN_NUMEL"]

# As bitsandbytes: states of smaller tensors stay in ordinary device memory (a few hundred
# kB gain nothing from paging and each managed allocation has a fixed cost).
PAGED_MIN_NUMEL = 100_000


class GlobalPageManager:
    """The process-wide registry of paged tensors (bitsandbytes' ``GlobalPageManager``).

    It holds weak references: a tensor freed by its optimizer leaves the registry.
    """

    _instance = None

    def __init__(self):
        raise RuntimeError("use GlobalPageManager.get_instance()")

    @classmethod
    def get_instance(cls) -> "GlobalPageManager":
        inst = cls._instance  # no lock: torch.compile traces this, and a race only
        if inst is None:      # builds a second empty registry before the first is used
            inst = cls.__new__(cls)
            inst.initialize()
            cls._instance = inst
        return inst

    def initialize(self) -> None:
        self._refs: list[weakref.ref] = []

    @property
    def paged_tensors(self) -> list[torch.Tensor]:
        """The live paged tensors, oldest first."""
        live = [t for t in (r() for r in self._refs) if t is not None]
        self._refs = [weakref.ref(t) for t in live]
        return live

    def register(self, tensor: torch.Tensor) -> None:
        self._refs.append(weakref.ref(tensor))

    def prefetch_all(self, to_cpu: bool = False) -> None:
        """Prefetches every paged tensor to its GPU (or to host memory), newest first, so
        that the oldest (used first by the next step) are the last to arrive and the least
        likely to be evicted again."""
        for t in reversed(self.paged_tensors):
            prefetch_tensor(t, to_cpu)


def is_paged(t) -> bool:
    """Whether ``t`` is a paged (managed-memory) tensor made by :func:`get_paged`."""
    return bool(getattr(t, "is_paged", False))


def available() -> bool:
    """Whether paged allocation is possible here: a GPU and the CUDA library, registered
    (its driver/runtime probe passed; otherwise its allocator would fail like its kernels)."""
    return (_native.cuda.loaded and hasattr(_native.cuda.lib, "bnbf_cuda_paged_alloc")
            and torch.cuda.is_available() and _native.cuda_status().registered)


def pages(p: torch.Tensor) -> bool:
    """Whether a paged optimizer keeps the state of ``p`` in paged memory: a CUDA tensor of
    at least :data:`PAGED_MIN_NUMEL` elements, where paging is available."""
    return p.device.type == "cuda" and p.numel() >= PAGED_MIN_NUMEL and available()


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def get_paged(*shape, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A zero-filled tensor of ``shape`` and ``dtype`` in CUDA managed memory on ``device``
    (default: the current CUDA device), registered with :class:`GlobalPageManager`.

    The memory is freed when the tensor is. Raises RuntimeError where paging is not
    available (no GPU, a bnbfuse build without its CUDA library, or one whose CUDA kernels
    are not registered: see ``python -m bnbfuse``).
    """
    if not available():
        raise RuntimeError("paged memory needs a CUDA GPU and bnbfuse's CUDA library "
                           f"({_native.cuda.error or _native.cuda_status().reason})")
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else \
        torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"paged memory lives on a CUDA device, got {device}")
    index = torch.cuda.current_device() if device.index is None else device.index
    nbytes = max(1, prod(shape) * dtype.itemsize)
    lib = _native.cuda
    out = ctypes.c_void_p()
    alloc = lib.function("bnbf_cuda_paged_alloc", _native.I64, _native.I32,
                         ctypes.POINTER(ctypes.c_void_p))
    lib.check(alloc(nbytes, index, ctypes.byref(out)), "paged allocation")
    try:
        raw = torch.utils.dlpack.from_dlpack(_capsule_new(out.value, b"dltensor", None))
    except Exception:
        lib.lib.bnbf_cuda_paged_free(out)
        raise
    t = raw[:prod(shape) * dtype.itemsize].view(dtype).view(shape)
    t.zero_()
    t.is_paged = True
    t.page_deviceid = index
    GlobalPageManager.get_instance().register(t)
    return t


def prefetch_tensor(A: torch.Tensor, to_cpu: bool = False) -> None:
    """Moves the pages of paged tensor ``A`` to its GPU (or to host memory) asynchronously on
    the current CUDA stream (a no-op on GPUs without concurrent managed access)."""
    if not is_paged(A):
        raise ValueError("only paged tensors (bnbfuse.paged.get_paged) can be prefetched")
    lib = _native.cuda
    fn = lib.function("bnbf_cuda_prefetch", _native.P, _native.I64, _native.I32, _native.P)
    stream = torch.cuda.current_stream(A.page_deviceid).cuda_stream
    lib.check(fn(A.data_ptr(), A.numel() * A.element_size(),
                 -1 if to_cpu else A.page_deviceid, stream), "prefetch")


def paged_like(t: torch.Tensor) -> torch.Tensor:
    """A paged copy of CUDA tensor ``t`` (same shape, dtype and values)."""
    out = get_paged(*t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out
