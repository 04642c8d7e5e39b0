"""Row-aligned quantization of embedding tables (int8 and NF4) for ``FusionEmbedding``.

An embedding table ``(rows, dim)`` is cut into blocks of ``blocksize`` elements *inside each
row* (a row is never split across a block boundary shared with another row), so that any row
can be dequantized alone: the lookup kernel reads only the rows it gathers. Each block is
divided by its absolute maximum and every element is rounded to the nearest value of a small
map (exact round-to-nearest, ties to the larger value, as everywhere in bnbfuse):

- ``"int8"``: the 255-level linear map ``k / 127`` (``k = -127 .. 127``), one byte per value,
  ``absmax`` float32 per block of 64: ``1 + 4/64 = 1.0625`` bytes/param. Measured on
  ``randn(4096, 1024)``: mean |error| / mean |w| = 0.63 % (the dynamic map of the optimizers in
  the same blocks gives 0.94 %, a row-wise linear absmax 0.85 %; see docs/embeddings.md).
- ``"nf4"``: the 16-value NormalFloat map of QLoRA, two values per byte (element ``2k`` in the
  high nibble of byte ``k``, ``2k + 1`` in the low one), ``absmax`` float32 per block of 64:
  ``0.5 + 4/64 = 0.5625`` bytes/param; mean |error| / mean |w| = 9.1 % on the same table.

Example:
    >>> import torch
    >>> from bnbfuse import row_quantization as rq
    >>> w = torch.randn(10, 64)
    >>> codes, absmax = rq.quantize_table(w, "int8")
    >>> codes.shape, absmax.shape
    (torch.Size([10, 64]), torch.Size([10, 1]))
    >>> w2 = rq.dequantize_table(codes, absmax, "int8", 64)
    >>> bool(((w2 - w).abs().mean() / w.abs().mean()) < 0.01)
    True
"""
from __future__ import annotations

import torch

from .ops.quantize import nearest_thresholds, one_block_at_most

__all__ = ["SCHEMES", "quant_map", "fp4_map", "quantize_table", "dequantize_table",
           "code_shape", "bits_of", "table_bytes", "refuse_foreign_codes"]

SCHEMES = ("int8", "nf4", "fp4")
DEFAULT_BLOCKSIZE = 64

# NormalFloat-4 (Dettmers et al., QLoRA): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero. The 16 float32 values below are that definition, rounded to float32.
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]

_MAPS: dict = {}


def fp4_map() -> torch.Tensor:
    """The FP4 map of bitsandbytes (16 float32 values indexed by code, scaled to [-1, 1]).

    Code bits ``s e1 e0 m``: sign ``s``, exponent field ``e = e1 e0``, mantissa ``m``.
    ``e = 0`` is subnormal, ``m * 2**-4``; otherwise ``2**(4 - e) * (1 + m / 2)``; the
    largest magnitude (12) becomes 1. Code 8 is a second zero (+0, as in bitsandbytes).
    """
    values = []
    for code in range(16):
        sign = -1.0 if code & 8 else 1.0
        e, m = (code >> 1) & 3, code & 1
        magnitude = m * 2.0**-4 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2)
        values.append(sign * magnitude / 12.0 if magnitude else 0.0)
    return torch.tensor(values, dtype=torch.float32, device="cpu")


def bits_of(scheme: str) -> int:
    """Bits per stored value: 8 for ``"int8"``, 4 for ``"nf4"`` and ``"fp4"``."""
    _check_scheme(scheme)
    return 8 if scheme == "int8" else 4


def _check_scheme(scheme) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"base_quant must be one of {SCHEMES} or None, got {scheme!r}")


def quant_map(scheme: str, device=None) -> torch.Tensor:
    """The float32 value map of ``scheme``: 256 values for int8 (index = stored byte; index
    255 repeats +1 and is never produced), 16 for NF4 and FP4. Cached; do not modify."""
    _check_scheme(scheme)
    key = (scheme, str(torch.device(device) if device is not None else "cpu"))
    if key not in _MAPS:
        # Built on the CPU explicitly: under `with torch.device("meta")` a factory call
        # without a device would make meta data that cannot be copied anywhere.
        if scheme == "int8":
            # byte b holds k = b - 127 for b in 0..254, i.e. the value (b - 127) / 127.
            values = (torch.arange(256, dtype=torch.float32, device="cpu") - 127).clamp_(
                max=127) / 127
        elif scheme == "nf4":
            values = torch.tensor(_NF4, dtype=torch.float32, device="cpu")
        else:
            values = fp4_map()
        _MAPS[key] = values.to(key[1])
    return _MAPS[key]


def code_shape(rows: int, dim: int, scheme: str) -> tuple[int, int]:
    """Shape of the uint8 code tensor of a ``(rows, dim)`` table."""
    return (rows, dim if bits_of(scheme) == 8 else (dim + 1) // 2)


def table_bytes(rows: int, dim: int, scheme: str, blocksize: int = DEFAULT_BLOCKSIZE) -> int:
    """Bytes of codes plus absmax of a quantized ``(rows, dim)`` table (the map not counted)."""
    r, c = code_shape(rows, dim, scheme)
    return r * c + rows * (-(dim // -blocksize)) * 4


def _nearest(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index into the *sorted* ``values`` nearest each float32 of ``x`` (ties to the larger)."""
    thr, _ = nearest_thresholds(values)
    return torch.searchsorted(thr, x.contiguous(), right=True)


def quantize_table(weight: torch.Tensor, scheme: str, blocksize: int = DEFAULT_BLOCKSIZE,
                   rows_per_chunk: int = 8192):
    """Quantizes a 2-D float table row-blockwise.

    Args:
        weight: ``(rows, dim)`` float32/float16/bfloat16 tensor (any device).
        scheme: ``"int8"``, ``"nf4"`` or ``"fp4"``.
        blocksize: elements per block inside a row (>= 2).
        rows_per_chunk: rows processed at once (bounds the temporary memory).

    Returns:
        ``(codes, absmax)``: uint8 ``code_shape(rows, dim, scheme)`` and float32
        ``(rows, ceil(dim / blocksize))``, on ``weight``'s device.
    """
    _check_scheme(scheme)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"quantize_table takes a 2-D tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"quantize_table takes a float tensor, got {weight.dtype}")
    if not isinstance(blocksize, int) or blocksize < 2:
        raise ValueError(f"blocksize must be an int >= 2, got {blocksize!r}")
    rows, dim = weight.shape
    blocksize = one_block_at_most(dim, blocksize)  # a block never pads past its row
    nblk = -(dim // -blocksize)
    values = quant_map(scheme, weight.device)
    # stable, so that equal map values (FP4's two zeros) always resolve to the same code
    sorted_values, order = torch.sort(values[:255] if scheme == "int8" else values, stable=True)
    codes = torch.empty(code_shape(rows, dim, scheme), dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(rows, nblk, dtype=torch.float32, device=weight.device)
    pad = nblk * blocksize - dim
    for r0 in range(0, rows, rows_per_chunk):
        x = weight[r0:r0 + rows_per_chunk].to(torch.float32)
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        xb = x.view(x.shape[0], nblk, blocksize)
        amax = xb.abs().amax(dim=2)
        div = torch.where(amax == 0, torch.ones_like(amax), amax)
        idx = order[_nearest((xb / div[:, :, None]).reshape(-1), sorted_values)]
        idx = idx.view(x.shape[0], -1)[:, :dim].to(torch.uint8)
        if scheme != "int8":
            if dim % 2:
                idx = torch.nn.functional.pad(idx, (0, 1))
            idx = (idx[:, 0::2] << 4) | idx[:, 1::2]
        codes[r0:r0 + rows_per_chunk] = idx
        absmax[r0:r0 + rows_per_chunk] = amax
    return codes, absmax


def refuse_foreign_codes(state_dict: dict, key: str, saved_as: str, current: torch.Tensor,
                         error_msgs: list) -> None:
    """For a ``load_state_dict`` pre-hook: codes under ``key`` that are not uint8 are
    reported in ``error_msgs`` (as ``saved_as``, the checkpoint's name) and not loaded.

    torch's load would cast them into the uint8 buffer, silently wrapping values outside
    0..255 (int16 -300 becomes 212) into wrong codes. Every uint8 byte is a valid code
    (int8: an index into the 256-value map; NF4/FP4: two 4-bit indices).
    """
    value = state_dict.get(key)
    if isinstance(value, torch.Tensor) and value.dtype != torch.uint8:
        error_msgs.append(f"{saved_as}: quantized codes must be uint8, got {value.dtype} "
                          "(a cast would wrap values outside 0..255 into wrong codes)")
        state_dict[key] = current  # the module's own codes: loading them changes nothing


def unpack_codes(codes: torch.Tensor, scheme: str, dim: int) -> torch.Tensor:
    """Map indices (int64) of shape ``(..., dim)`` from stored codes."""
    if bits_of(scheme) == 8:
        return codes.long()
    hi, lo = (codes >> 4).long(), (codes & 15).long()
    return torch.stack([hi, lo], dim=-1).flatten(-2)[..., :dim]


def dequantize_table(codes: torch.Tensor, absmax: torch.Tensor, scheme: str,
                     blocksize: int = DEFAULT_BLOCKSIZE, dim: int | None = None,
                     dtype: torch.dtype = torch.float32, *,
                     qmap: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_table`: ``map[code] * absmax[row, block]`` in ``dtype``.

    ``codes`` may hold any subset of rows (with the matching rows of ``absmax``); ``dim``
    defaults to ``codes.shape[-1]`` (int8) or ``2 * codes.shape[-1]`` (NF4). ``qmap``: the
    value map to use (a table's own buffer), by default the scheme's.
    """
    if dim is None:
        dim = codes.shape[-1] * (1 if bits_of(scheme) == 8 else 2)
    idx = unpack_codes(codes, scheme, dim)
    blocksize = one_block_at_most(dim, blocksize)
    values = (quant_map(scheme, codes.device) if qmap is None else qmap.to(codes.device))[idx]
    scale = absmax.to(torch.float32).repeat_interleave(blocksize, dim=-1)[..., :dim]
    return (values * scale).to(dtype)
