"""Blockwise quantization with bitsandbytes' signatures.

Example:
    >>> import torch, bnbfuse.functional as F
    >>> x = torch.randn(1000)
    >>> codes, state = F.quantize_blockwise(x, blocksize=256)
    >>> codes.dtype, state.absmax.shape
    (torch.uint8, torch.Size([4]))
    >>> y = F.dequantize_blockwise(codes, state)
    >>> bool((y - x).abs().max() < 0.03)
    True
"""
from __future__ import annotations

import json
import operator
from typing import Any, Optional

import torch

from . import ops  # noqa: F401  (declares the ops)
from . import backends  # noqa: F401  (registers their kernels)
from .code_maps import create_fp8_map, create_linear_map, create_normal_map, get_4bit_type
from .ops.quantize import nan_free_copy
from .paged import GlobalPageManager, get_paged, prefetch_tensor

__all__ = ["create_dynamic_map", "create_linear_map", "create_fp8_map", "create_normal_map",
           "get_4bit_type", "quantize_blockwise", "dequantize_blockwise", "QuantState",
           "DtypeError", "GlobalPageManager", "get_paged", "prefetch_tensor"]

_MAP_CACHE: dict = {}


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic (tree) quantization map of Dettmers et al., bit-identical to bitsandbytes'.

    Decade k (0 .. max_exponent_bits-1) holds the midpoints of ``linspace(0.1, 1, n+1)``
    (float32) times ``10**(k - max_exponent_bits + 1)``, with ``n = 2**(k + t)`` values per
    sign when ``signed`` (``t = total_bits - 1 - max_exponent_bits``) and ``2**(k + t + 1)``
    when not; then 0 and 1.0 (a signed map has no -1). Returned sorted, float32, padded
    with zeros to 256 entries as bitsandbytes does (``total_bits < 8``).

    Args:
        signed: both signs (optimizer first moments) or non-negative only (second moments).
        max_exponent_bits: number of decades.
        total_bits: bits per code.

    Returns:
        Tensor of shape ``(256,)``, dtype float32.

    Raises:
        ValueError: when the decades do not make ``2**total_bits`` values.

    Example:
        >>> m = create_dynamic_map(signed=False)
        >>> m.shape, float(m[0]), float(m[-1])
        (torch.Size([256]), 0.0, 1.0)
    """
    values: list[float] = []
    value_bits = total_bits - 1
    # Values per sign in decade k: 2**(k + shift) (none where that is below 1), plus, when
    # the exponent bits leave fraction bits unused, 2**(value_bits - max_exponent_bits) - 1
    # more in the last decade.
    shift = value_bits - max_exponent_bits + (0 if signed else 1)
    decades = [(k, int(2 ** (k + shift) + 1) - 1) for k in range(max_exponent_bits)]
    extra = 2 ** (value_bits - max_exponent_bits) - 1
    if extra > 0:
        if max_exponent_bits < 1:
            raise ValueError("max_exponent_bits must be >= 1 when total_bits leaves fraction "
                             "bits over")
        decades.append((max_exponent_bits - 1, int(extra)))
    for k, n in decades:
        # on the CPU explicitly, whatever `with torch.device(...)` surrounds the call
        edges = torch.linspace(0.1, 1, n + 1, dtype=torch.float32, device="cpu")
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        scaled = midpoints * torch.tensor(10.0 ** (k - max_exponent_bits + 1),
                                          dtype=torch.float32, device="cpu")
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(f"{max_exponent_bits} exponent bits make {len(values)} values, not "
                         f"2**{total_bits}{'' if signed else ' (unsigned)'}")
    values += [0.0] * (256 - len(values))  # as bitsandbytes: at least 256 entries
    return torch.tensor(sorted(values), dtype=torch.float32, device="cpu")


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """Cached 8-bit dynamic map on ``device`` (do not modify the result)."""
    key = (signed, str(torch.device(device) if device is not None else "cpu"))
    if key not in _MAP_CACHE:
        _MAP_CACHE[key] = _MAP_CACHE[(bool(signed), "cpu")].to(key[1])
    return _MAP_CACHE[key]


# Built at import, so that an optimizer's first step under torch.compile finds them cached
# (building one calls .tolist(), which Dynamo cannot trace).
for _signed in (True, False):
    _MAP_CACHE[(_signed, "cpu")] = create_dynamic_map(_signed)
_ZERO_CODES = {s: _MAP_CACHE[(s, "cpu")].tolist().index(0.0) for s in (True, False)}


def dynamic_map_zero_code(signed: bool = True) -> int:
    """The code of 0.0 in the 8-bit dynamic map (a Python int: no device sync, and
    ``torch.compile`` traces it as a constant)."""
    return _ZERO_CODES[bool(signed)]


class QuantState:
    """What dequantization needs besides the codes (bitsandbytes' ``QuantState``).

    Same constructor order, attributes, ``==``, list-style indexing and dict form as
    bitsandbytes 0.50, so states pass between the two libraries.

    Attributes:
        absmax: per-block scale, float32 of shape ``(blocks,)`` (codes of it when nested).
        shape: shape of the original tensor.
        code: the 256-value map (the state's own copy).
        blocksize: elements per block.
        quant_type: ``None`` for blockwise 8-bit states, as in bitsandbytes.
        dtype: dtype of the original tensor (and of dequantized output).
        offset: mean subtracted from absmax before nesting (nested only).
        state2: QuantState of the absmax quantization (nested only).
        nested: whether ``state2`` is set.
    """

    def __init__(self, absmax: torch.Tensor, shape: Optional[torch.Size] = None,
                 code: Optional[torch.Tensor] = None, blocksize: Optional[int] = None,
                 quant_type: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 offset: Optional[torch.Tensor] = None, state2: Optional["QuantState"] = None):
        self.absmax = absmax
        self.shape = shape
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __repr__(self) -> str:
        return (f"QuantState(shape={self.shape}, blocksize={self.blocksize}, "
                f"dtype={self.dtype}, nested={self.nested})")

    def __getitem__(self, idx):
        """bitsandbytes' older list layout: ``[absmax, shape, dtype, blocksize, [offset,
        state2] or None, quant_type]``."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return False

        def same(a, b):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.shape == b.shape and torch.allclose(a.float().cpu(), b.float().cpu(),
                                                            atol=1e-6)
            return a is b if a is None or b is None else a == b

        return (same(self.absmax, other.absmax) and self.shape == other.shape
                and same(self.code, other.code) and self.dtype == other.dtype
                and self.blocksize == other.blocksize and self.quant_type == other.quant_type
                and same(self.offset, other.offset) and same(self.state2, other.state2))

    __hash__ = None  # mutable, compared by value

    def to(self, device) -> "QuantState":
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """Tensors and plain values; with ``packed`` the non-tensors go into one uint8 tensor
        under ``quant_state.bitsandbytes__<quant_type>`` (for ``state_dict`` use)."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code,
                "nested_dtype": str(self.state2.dtype).removeprefix("torch."),
                "nested_offset": self.offset.item(),
            })
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        blob = torch.frombuffer(bytearray(json.dumps(plain).encode()), dtype=torch.uint8)
        # bitsandbytes packs only its 4-bit states; a blockwise state packs under "blockwise8"
        tensors[f"quant_state.bitsandbytes__{self.quant_type or 'blockwise8'}"] = blob
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device=None) -> "QuantState":
        """Inverse of :meth:`as_dict` (packed or not)."""
        d = dict(qs_dict)
        packed = [k for k in d if "bitsandbytes__" in k]
        if len(packed) > 1:
            raise ValueError(f"more than one packed quant state in dict: {packed}")
        if packed:
            d.update(json.loads(bytes(d.pop(packed[0]).cpu().numpy()).decode()))
        d = {k.split(".")[-1]: v for k, v in d.items()}
        missing = {"absmax", "blocksize", "quant_map", "dtype"} - d.keys()
        if missing:
            raise KeyError(f"quant state dict lacks {sorted(missing)}")
        device = device if device is not None else d["absmax"].device
        state2 = offset = None
        if "nested_absmax" in d:
            offset = torch.tensor(float(d["nested_offset"]), device=device)
            state2 = cls(absmax=d["nested_absmax"].to(device), blocksize=d["nested_blocksize"],
                         code=d["nested_quant_map"].to(device),
                         dtype=getattr(torch, d["nested_dtype"]))
        shape = torch.Size(d["shape"]) if d.get("shape") is not None else None
        return cls(absmax=d["absmax"].to(device), shape=shape, code=d["quant_map"].to(device),
                   blocksize=int(d["blocksize"]), dtype=getattr(torch, d["dtype"]),
                   quant_type=d.get("quant_type"), offset=offset, state2=state2)


class DtypeError(TypeError, ValueError):
    """A tensor of the wrong dtype. bitsandbytes raises ValueError here and torch TypeError:
    both ``except`` clauses catch it."""


def _blocksize(blocksize) -> int:
    """blocksize as an int (Python, NumPy or 0-d tensor integers, as bitsandbytes takes)."""
    try:
        value = operator.index(blocksize)
    except TypeError:
        value = None
    if value is None or isinstance(blocksize, bool) or value < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    return value


def _check_input(A: torch.Tensor) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(A).__name__}")
    if A.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise DtypeError(f"quantize_blockwise takes float32, float16 or bfloat16, got {A.dtype}")


def _check_buffer(name: str, buf: torch.Tensor, shape: tuple, dtype: torch.dtype,
                  device: torch.device) -> None:
    """An out=/absmax= buffer must be exactly the result's: no silent cast or reshape."""
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(buf).__name__}")
    if buf.dtype != dtype or tuple(buf.shape) != tuple(shape) or buf.device != device:
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {buf.dtype} of shape {tuple(buf.shape)} on {buf.device}")


def _check_code(code: torch.Tensor) -> None:
    # Checked here, not only in the native backends: the reference kernels would otherwise
    # index out of range or return codes of a wrong map silently.
    if not isinstance(code, torch.Tensor) or code.numel() != 256:
        raise ValueError(f"the quantization map must have 256 values, got "
                         f"{code.numel() if isinstance(code, torch.Tensor) else type(code).__name__}")


def quantize_blockwise(A: torch.Tensor, code: Optional[torch.Tensor] = None,
                       absmax: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                       blocksize: int = 4096, nested: bool = False):
    """Quantizes ``A`` in blocks of ``blocksize`` elements to 8-bit codes of ``code``.

    Each block is divided by its absolute maximum and every element is rounded to the
    nearest map value (exactly; ties to the larger value). Any shape, contiguous or not;
    float32, float16 or bfloat16.

    Args:
        A: tensor to quantize.
        code: 256-value map; default the signed dynamic map.
        absmax: optional float32 output buffer for the block maxima.
        out: optional uint8 output buffer of A's shape.
        blocksize: elements per block (64 .. 4096 typical).
        nested: also quantize the absmax values (in blocks of ``blocksize``, as bitsandbytes)
            after removing their mean.

    Returns:
        ``(codes, QuantState)``: codes is uint8 of A's shape.

    Raises:
        ValueError: ``code`` does not hold 256 values, or holds a NaN (nearest rounding
            needs the map's values in order).
    """
    _check_input(A)
    blocksize = _blocksize(blocksize)
    if code is None:
        code = dynamic_map(True, A.device)
    _check_code(code)
    # The state's own map, never the shared default (checked for NaN here, once per map).
    code = nan_free_copy(code, A.device, copy=True)
    nblocks = -(A.numel() // -blocksize)
    if out is not None:
        _check_buffer("out", out, A.shape, torch.uint8, A.device)
    if absmax is not None:
        _check_buffer("absmax", absmax, (nblocks,), torch.float32, A.device)
    codes, amax = torch.ops.bnbfuse.quantize_blockwise(A, code, blocksize)
    if out is not None:
        codes = out.copy_(codes.view(out.shape))
    if absmax is not None:
        amax = absmax.copy_(amax.view(absmax.shape))
    offset = state2 = None
    if nested:
        offset = amax.mean()
        amax, state2 = quantize_blockwise(amax - offset, blocksize=blocksize)
    return codes, QuantState(absmax=amax, shape=A.shape, code=code, blocksize=blocksize,
                             dtype=A.dtype, offset=offset, state2=state2)


def dequantize_blockwise(A: torch.Tensor, quant_state: Optional[QuantState] = None,
                         absmax: Optional[torch.Tensor] = None, code: Optional[torch.Tensor] = None,
                         out: Optional[torch.Tensor] = None, blocksize: int = 4096,
                         nested: bool = False) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[A] * absmax[block]`` in the original dtype.

    Pass either ``quant_state`` or ``absmax`` (plus ``code``/``blocksize`` when not default).
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"dequantize_blockwise takes uint8 codes, got {type(A).__name__}")
    if A.dtype != torch.uint8:
        raise DtypeError(f"dequantize_blockwise takes uint8 codes, got {A.dtype}")
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize,
                                 dtype=out.dtype if out is not None else torch.float32)
    amax = quant_state.absmax
    if quant_state.nested:
        amax = dequantize_blockwise(amax, quant_state.state2) + quant_state.offset
    qcode = quant_state.code if quant_state.code is not None else dynamic_map(True, A.device)
    _check_code(qcode)
    bs = _blocksize(quant_state.blocksize)
    if amax.numel() < -(A.numel() // -bs):
        raise ValueError(f"absmax has {amax.numel()} values; {A.numel()} codes in blocks of "
                         f"{bs} need {-(A.numel() // -bs)}")
    dtype = quant_state.dtype if quant_state.dtype is not None else torch.float32
    if out is not None:
        _check_buffer("out", out, A.shape, dtype, A.device)
    result = torch.ops.bnbfuse.dequantize_blockwise(A, amax.to(torch.float32),
                                                    nan_free_copy(qcode, A.device), bs, dtype)
    if out is not None:
        return out.copy_(result.view(out.shape))
    return result


# ---- embedding tables (bnbfuse/row_quantization.py): row-blockwise int8 / NF4 ----------------------
from .row_quantization import dequantize_table, quantize_table  # noqa: E402,F401

__all__ += ["quantize_table", "dequantize_table"]


def __getattr__(name: str):
    # bitsandbytes names bnbfuse leaves out explain themselves (bnbfuse/compat.py)
    from .compat import missing_name

    raise missing_name("functional", name)
