"""Blockwise quantization ops: schemas, fake impls, and the exact-nearest contract.

``quantize_blockwise(A, code, blocksize) -> (codes uint8 of A's shape, absmax float32 of
ceil(n / blocksize))``: each block of the flattened ``A`` is divided by its absolute maximum
and every element gets the index of the ``code`` value nearest it (exact round-to-nearest,
ties to the larger value: :func:`nearest_thresholds`). ``dequantize_blockwise`` is
``code[codes] * absmax[block]`` in ``dtype``.
"""
from __future__ import annotations

import weakref

import torch

from .library import lib

__all__ = ["nearest_thresholds", "check_code", "check_blocksize", "one_block_at_most",
           "check_map_has_no_nan", "nan_free_copy"]

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


def nearest_thresholds(code: torch.Tensor):
    """(thresholds, order) such that nearest-in-map = order[searchsorted(thr, x, right=True)].

    thr[k] is the smallest float32 >= the exact midpoint of the k-th and (k+1)-th sorted map
    values, so ``x >= thr[k]`` is exact for float32 x and ties go to the larger value. The
    definition of rounding shared by every quantizer in bnbfuse (blockwise, optimizer
    state, embedding tables) and mirrored by the native kernels (csrc/cpu/qmap.h).
    """
    values, order = torch.sort(code.to(torch.float32), stable=True)
    mid = (values[:-1].double() + values[1:].double()) / 2
    thr = mid.float()
    up = torch.nextafter(thr, torch.full_like(thr, float("inf")))
    return torch.where(thr.double() < mid, up, thr), order


class _IdentityCache:
    """tensor -> value, by identity (a tensor's == is elementwise) and weakly (a freed tensor
    drops out). A plain dict keyed by id() holds the weak reference beside the value, so a
    lookup is one dict get and one call; torch's WeakIdKeyDictionary builds a weak reference
    per lookup, and the optimizers look their two maps up for every parameter at every step."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, t):
        entry = self._entries.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def __setitem__(self, t, value) -> None:
        entries, key = self._entries, id(t)

        def drop(ref, key=key):
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:  # not a newer tensor with that id
                del entries[key]

        entries[key] = (weakref.ref(t, drop), value)

    def __len__(self) -> int:
        return len(self._entries)


# Maps already found NaN-free: tensor -> (version counter, data pointer) at that check.
_NAN_FREE_MAPS = _IdentityCache()


def check_map_has_no_nan(code: torch.Tensor, name: str = "the quantization map") -> None:
    """ValueError if ``code`` holds a NaN.

    Nearest rounding needs the map's values in order, and NaN has none: the native kernels
    would sort such a map into a table with slots no value lands in. Every op that takes a
    map refuses one with NaN, on every backend. Checking a GPU map synchronises with the
    device, so a map found NaN-free is remembered (until it is written to in place or its
    storage changes) and the optimizers' per-step calls check their maps once. Inside CUDA
    graph capture, where a synchronisation is not allowed, an unchecked map is not checked
    (the kernels stay in bounds for any map; only its codes would be meaningless).
    """
    if code.device.type == "meta" or torch.compiler.is_compiling():
        return  # (traced code: the op's kernel checks the real tensor when it runs)
    key = _map_key(code)
    if _NAN_FREE_MAPS.get(code) == key:
        return
    if code.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    nan = torch.isnan(code.reshape(-1))
    if bool(nan.any()):
        where = int(nan.nonzero()[0, 0])
        raise ValueError(f"{name} holds NaN (at index {where}); a quantization map must be "
                         "NaN-free, since nearest rounding needs its values in order")
    _NAN_FREE_MAPS[code] = key


def _map_key(code: torch.Tensor):
    # Inference tensors have no version counter; they are only writable inside
    # inference_mode, so their storage stands for them.
    version = -1 if code.is_inference() else code._version
    return version, code.data_ptr()


def nan_free_copy(code: torch.Tensor, device, copy: bool = False) -> torch.Tensor:
    """``code.to(device, copy=copy)`` after :func:`check_map_has_no_nan`, the result
    remembered as checked: a fresh copy of a checked map then costs no device sync when an
    op checks it."""
    check_map_has_no_nan(code)
    out = code.to(device, copy=copy)
    if out.device.type != "meta" and not torch.compiler.is_compiling():
        _NAN_FREE_MAPS[out] = _map_key(out)
    return out


def check_code(code: torch.Tensor, device, nan_checked: bool = False) -> torch.Tensor:
    """The 256-value map as a contiguous float32 tensor on ``device`` (ValueError if it has
    another size or holds NaN; ``nan_checked``: the caller has just run
    :func:`check_map_has_no_nan` on it)."""
    if code.numel() != 256:
        raise ValueError(f"the quantization map must have 256 values, got {code.numel()}")
    if not nan_checked:
        check_map_has_no_nan(code)
    if code.dtype == torch.float32 and code.device == device and code.is_contiguous():
        return code  # the common case, per parameter per step: no dispatcher round trip
    return code.to(device=device, dtype=torch.float32).contiguous()


def one_block_at_most(n: int, blocksize: int) -> int:
    """A block longer than the tensor (or the table row) is the tensor: the same blocks,
    without padding a 5-element tensor to a blocksize of 2**63 - 1."""
    return min(blocksize, max(n, 1))


def check_blocksize(blocksize: int) -> None:
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
