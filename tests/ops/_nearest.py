"""Independent NumPy implementations of the quantization spec (docs/optimizers.md, "8-bit state" and "Numerics choices"), used by
the tests as the oracle. Nothing here calls bnbfuse.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch


def dynamic_map_numpy(signed: bool) -> np.ndarray:
    """The 8-bit dynamic map from its definition, in NumPy float32.

    Decade k = 0..6 holds the midpoints of ``linspace(0.1, 1, n+1)`` times 10**(k-6), with
    n = 2**k per sign (signed) or 2**(k+1) (unsigned); then 0 and 1.0. The definition's
    linspace is torch's float32 ``linspace`` (that is what bitsandbytes uses; its last bit
    differs from a correctly rounded linspace), so only the edges come from torch; the
    midpoints, scaling, signs and order are computed here.
    """
    values = []
    for k in range(7):
        n = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1, n + 1, dtype=torch.float32).numpy()
        mid = (edges[:-1] + edges[1:]) / np.float32(2.0)
        assert mid.dtype == np.float32
        scaled = mid * np.float32(10.0 ** (k - 6))
        values.append(scaled)
        if signed:
            values.append(-scaled)
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    out = np.concatenate(values).astype(np.float32)
    assert out.size == 256, out.size
    return np.sort(out)


def nearest_index(x: np.ndarray, code: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Index of the map value nearest each float32 x: argmin |x - code| in float64, ties
    (and near-ties that float64 cannot order) resolved exactly, towards the larger value.
    NaN inputs are not allowed."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    assert not np.isnan(x).any()
    code32 = np.asarray(code, dtype=np.float32)
    m = code32.astype(np.float64)
    out = np.empty(x.size, dtype=np.int64)
    for s in range(0, x.size, chunk):
        xs = x[s:s + chunk].astype(np.float64)
        d = np.abs(xs[:, None] - m[None, :])
        best = d.min(axis=1)
        # Candidates: every value whose float64 distance is within rounding of the best.
        tol = np.maximum(best, np.abs(xs)) * 2.0**-50
        cand = d <= (best + tol)[:, None]
        # Among candidates take the largest value (ties to the larger value) ...
        pick = np.where(cand, m[None, :], -np.inf).argmax(axis=1)
        # ... unless float64 could not separate them: then compare exactly.
        for r in np.nonzero(cand.sum(axis=1) > 1)[0]:
            xf = Fraction(float(xs[r]))
            idx = np.nonzero(cand[r])[0]
            dist = [abs(xf - Fraction(float(m[i]))) for i in idx]
            dmin = min(dist)
            ties = [i for i, di in zip(idx, dist) if di == dmin]
            pick[r] = max(ties, key=lambda i: m[i])
        out[s:s + chunk] = pick
    return out


def quantize_numpy(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """(codes uint8 of x's shape, absmax float32) by the spec: per block absmax = max |x|,
    q = x / (absmax or 1) in IEEE float32, code = nearest map value."""
    flat = x.detach().reshape(-1).float().cpu().numpy()
    n = flat.size
    nblocks = -(-n // blocksize)
    blocks = np.zeros(nblocks * blocksize, dtype=np.float32)
    blocks[:n] = flat
    blocks = blocks.reshape(nblocks, blocksize)
    absmax = np.abs(blocks).max(axis=1) if n else np.zeros(0, np.float32)
    divisor = np.where(absmax == 0, np.float32(1.0), absmax).astype(np.float32)
    q = (blocks / divisor[:, None]).reshape(-1)[:n]
    assert q.dtype == np.float32
    codes = nearest_index(q, code.cpu().numpy()).astype(np.uint8)
    return codes.reshape(tuple(x.shape)), absmax


def same_bits(a, b) -> bool:
    """Bitwise equality of two float arrays/tensors (NaN == NaN, 0 != -0)."""
    a = a.detach().cpu().float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32)
    b = b.detach().cpu().float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float32)
    return a.shape == b.shape and bool((a.view(np.uint32) == b.view(np.uint32)).all())
