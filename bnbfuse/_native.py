"""Loads the native kernel libraries (``bnbfuse/lib``) with ctypes.

The libraries expose a plain C ABI (``csrc/include/bnbfuse.h``), so they do not depend on
the installed torch version. When a library is missing, bnbfuse runs on its pure-PyTorch
reference kernels and warns once.
"""
from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

LIB_DIR = Path(__file__).resolve().parent / "lib"

# enum bnbf_dtype
DTYPE_CODES = {}  # filled lazily with torch dtypes (keeps this module importable cheaply)


class OptimizerArgs(ctypes.Structure):
    """Mirror of ``bnbf_optim_args`` in csrc/include/bnbfuse.h.

    Build it with ``OptimizerArgs.from_scalars(optimizer_scalars(...))`` (see
    bnbfuse/ops/optimizer.py), so the native kernels get exactly the float32 scalars the
    reference uses.
    """

    _fields_ = [
        ("gnorm_scale", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("one_minus_beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float),
        ("beta3", ctypes.c_float),
        ("one_minus_beta3", ctypes.c_float),
        ("alpha", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("dampening_factor", ctypes.c_float),
        ("decay", ctypes.c_float),
        ("inv_bc1", ctypes.c_float),
        ("inv_sqrt_bc2", ctypes.c_float),
        ("step_size", ctypes.c_float),
        ("lr", ctypes.c_float),
        ("update_scale", ctypes.c_float),
        ("step", ctypes.c_int64),
        ("nesterov", ctypes.c_int32),
    ]

    @classmethod
    def from_scalars(cls, scalars: dict) -> "OptimizerArgs":
        return cls(**{name: scalars[name] for name, _ in cls._fields_})


_E_ARG, _E_INDEX, _E_CUDA, _E_UNSUPPORTED = -1, -2, -3, -4


class NativeLibrary:
    def __init__(self, name: str):
        self.name = name
        self.path = LIB_DIR / f"lib{name}.so"
        self.lib = None
        self.error = None
        if os.environ.get("BNBFUSE_DISABLE_NATIVE"):
            self.error = "disabled by BNBFUSE_DISABLE_NATIVE"
            return
        if not self.path.exists():
            self.error = f"{self.path} not found (build with `pip install .`)"
            return
        try:
            self.lib = ctypes.CDLL(str(self.path))
        except OSError as err:
            self.error = str(err)
            return
        for fn in ("bnbf_version", "bnbf_last_error", "bnbf_cpu_isa", "bnbf_cpu_isas_compiled",
                   "bnbf_cuda_archs"):
            if hasattr(self.lib, fn):
                getattr(self.lib, fn).restype = ctypes.c_char_p

    @property
    def loaded(self) -> bool:
        return self.lib is not None

    def __getattr__(self, item):
        lib = self.__dict__.get("lib")
        if lib is None:
            raise RuntimeError(f"native library {self.name} is not loaded: {self.error}")
        return getattr(lib, item)

    def function(self, name: str, *argtypes):
        """The C function `name` with its argument types set (restype int status)."""
        fn = getattr(self, name)
        fn.argtypes = list(argtypes)
        fn.restype = ctypes.c_int
        return fn

    def check(self, rc: int, what: str) -> None:
        """Turns a negative status into a Python exception carrying the kernel's message."""
        if rc == 0:
            return
        msg = f"{what}: {self.lib.bnbf_last_error().decode()}"
        if rc == _E_INDEX:
            raise IndexError(msg)
        if rc == _E_UNSUPPORTED:
            raise NotImplementedError(msg)
        if rc == _E_ARG:
            raise ValueError(msg)
        raise RuntimeError(msg)


cpu = NativeLibrary("bnbfuse_cpu")
cuda = NativeLibrary("bnbfuse_cuda")

_warned = False


def warn_if_missing() -> None:
    global _warned
    if not cpu.loaded and not _warned:
        _warned = True
        warnings.warn(
            f"bnbfuse: native CPU library not loaded ({cpu.error}); using the pure-PyTorch "
            "reference kernels, which are correct but slower. `python -m bnbfuse` shows "
            "which backends load.",
            RuntimeWarning,
            stacklevel=3,
        )


def dtype_code(dtype) -> int:
    import torch

    if not DTYPE_CODES:
        DTYPE_CODES.update({torch.float32: 0, torch.float16: 1, torch.bfloat16: 2})
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"bnbfuse kernels take float32, float16 or bfloat16, got {dtype}") from None


# Argument type shorthands for NativeLibrary.function
P = ctypes.c_void_p
I32 = ctypes.c_int
I64 = ctypes.c_int64


def ptr(t):
    """Raw data pointer of a tensor, or None for None."""
    return None if t is None else t.data_ptr()
