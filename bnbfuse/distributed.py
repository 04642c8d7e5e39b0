"""Distributed checkpoints of 8-bit optimizer state for DTensor (FSDP2 / tensor-parallel)
parameters.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor`` and the
optimizer keeps its state for the *local shard*: ``state1``/``state2`` have the local shard's
shape (8-bit codes or float32), ``absmax1``/``absmax2`` hold one float32 per block of 256
elements of the flattened local shard. ``torch.distributed.checkpoint`` (DCP) treats a plain
tensor in a state dict as replicated — only rank 0 writes it and every rank reads rank 0's
copy back — so per-rank tensors must be ``DTensor``\\ s to survive a save/load. This module
converts between the two forms:

- ``state1``/``state2`` become DTensors with the parameter's own layout (same mesh,
  placements shifted past any leading stacked dimension such as AdEMAMix's two moments):
  global shape = leading dims + the parameter's global shape. For float32 (32-bit) state
  this is the usual torch.optim layout; for 8-bit codes it keeps each code where its
  element is.
- ``absmax1``/``absmax2`` (one float32 per 256-element block of the *local* shard) are
  stored where each block starts, in a tensor whose shape depends on the parameter's global
  shape only, so checkpoints of any world size have the same keys and shapes. Call the
  parameter's dims up to the last sharded one its *line* dims and the product ``W`` of the
  others the line width: every local shard holds whole lines, a block starting at column
  ``c`` of a line is stored at ``[*line, c // 256]``, and no two blocks of a shard share a
  slot. The stored tensor has global shape ``(*shape[:line dims], ceil(W / 256))`` (zero
  where no block starts), laid out like the parameter; an FSDP2 weight ``(R, C)`` gives
  ``(R, ceil(C / 256))``, a sharded 1-D parameter one slot per element.
- ``shard_layout`` records the mesh shape and placements the blocks were cut on, a plain
  tuple, so that loading on another layout can find the old blocks.
- ``step``, ``qmap1``/``qmap2`` and ``gnorm_vec`` are the same on every rank (percentile
  clipping uses the global gradient norm) and stay plain.

Loading on the layout the checkpoint was saved from restores every code and block maximum
bit for bit, without communication. On another layout (a different world size, FSDP2's
``Shard(0)`` or any ``Shard``/``Replicate`` placements) the codes arrive in the new layout
(DCP reshards them), every rank gathers the stored block maxima of the parameter once, and
its elements are dequantized with their old block's maximum and requantized in the new
local blocks (the optimizers' exact-nearest rounding and no-blow-up rule): one rounding
step of error per state value, once.

The optimizer base class applies :func:`dtensor_optimizer_state_dict` in ``state_dict()``
and :func:`local_optimizer_state_dict` at the start of ``load_state_dict()``; both return
their input unchanged when no parameter is a DTensor.
"""
from __future__ import annotations

import math
from itertools import chain
from typing import Any

import torch

from .ops.rules import OPTIMIZER_BLOCKSIZE as BLOCKSIZE

__all__ = [
    "dtensor_optimizer_state_dict", "local_optimizer_state_dict", "state_to_dtensors",
    "state_to_local", "is_dtensor", "to_local", "as_param_layout",
]

PARAM_LAYOUT_KEYS = ("state1", "state2")
PER_SHARD_KEYS = {"absmax1": "state1", "absmax2": "state2"}  # absmax -> its codes
LAYOUT_KEY = "shard_layout"
_SLAB_ELEMENTS = 1 << 22  # elements requantized at a time when 8-bit state is resharded

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
except Exception:  # pragma: no cover - torch built without distributed
    DTensor = None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def to_local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what kernels run on); any other tensor unchanged."""
    return t.to_local() if is_dtensor(t) else t


# ---- layouts -------------------------------------------------------------------------------
def _shift(placement, lead: int):
    """``placement`` for a state tensor with ``lead`` extra leading dimensions."""
    if lead == 0 or isinstance(placement, Replicate):
        return placement
    if isinstance(placement, _StridedShard):
        return _StridedShard(placement.dim + lead, split_factor=placement.split_factor)
    if type(placement) is Shard:
        return Shard(placement.dim + lead)
    raise NotImplementedError(
        f"bnbfuse optimizer state of a DTensor parameter with placement {placement} cannot "
        "be checkpointed (supported: Shard, Replicate, and FSDP2's strided shards)")


def _check_placements(p) -> None:
    for pl in p.placements:
        if pl.is_partial():
            raise NotImplementedError(
                f"a parameter with a Partial placement ({p.placements}) has no well-defined "
                "optimizer state; redistribute it to Shard/Replicate first")


def _param_layout(v: torch.Tensor, p) -> "DTensor":
    local = p.to_local()
    lead = v.dim() - local.dim()
    if lead < 0 or tuple(v.shape[lead:]) != tuple(local.shape):
        raise ValueError(f"optimizer state of shape {tuple(v.shape)} does not match the local "
                         f"shard {tuple(local.shape)} of its parameter")
    shape = torch.Size(tuple(v.shape[:lead]) + tuple(p.shape))
    stride = tuple(_contiguous_strides(shape))
    return DTensor.from_local(v.contiguous(), p.device_mesh,
                              [_shift(pl, lead) for pl in p.placements],
                              run_check=False, shape=shape, stride=stride)


def as_param_layout(v: torch.Tensor, p) -> torch.Tensor:
    """``v``, a tensor of DTensor parameter ``p``'s local shape, as a DTensor laid out like
    ``p`` (a plain ``p``: ``v`` unchanged). What ``torch_state_dict`` gives torch.optim."""
    return _param_layout(v, p) if is_dtensor(p) else v


def _contiguous_strides(shape) -> list[int]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return list(reversed(strides))


def _placement_code(pl) -> tuple:
    if isinstance(pl, _StridedShard):
        return ("strided", pl.dim, pl.split_factor)
    return ("shard", pl.dim) if pl.is_shard() else ("replicate",)


def _layout(p) -> tuple:
    """What the cut of DTensor ``p`` into local shards, and so its blocks, depends on."""
    return (tuple(p.device_mesh.shape), tuple(_placement_code(pl) for pl in p.placements))


def _line_dims(codes: tuple) -> int:
    """Dims up to and including the last sharded one: every shard holds whole lines."""
    return 1 + max((c[1] for c in codes if c[0] != "replicate"), default=-1)


def _slots(shape, k: int) -> tuple[int, int]:
    """(line width, block-start slots per line) of a parameter of global ``shape``."""
    width = math.prod(shape[k:])
    return width, max(-(-width // BLOCKSIZE), 1)


def _block_starts(blocks: int, width: int, slots: int, device) -> torch.Tensor:
    """Where each block of a local shard starts, as ``line * slots + slot`` of the shard."""
    start = torch.arange(blocks, dtype=torch.int64, device=device) * BLOCKSIZE
    return (start // width) * slots + (start % width) // BLOCKSIZE


def _stored_block_maxima(v: torch.Tensor, p) -> "DTensor":
    local = p.to_local()
    k = _line_dims(_layout(p)[1])
    width, slots = _slots(p.shape, k)
    lead = tuple(v.shape[:-1])  # AdEMAMix: one row per stacked moment
    blocks = math.ceil(local.numel() / BLOCKSIZE)
    if v.shape[-1] != blocks:
        raise ValueError(f"optimizer block maxima of shape {tuple(v.shape)} do not fit the local "
                         f"shard {tuple(local.shape)} ({blocks} blocks of {BLOCKSIZE})")
    rows = v.reshape(-1, blocks)
    store = rows.new_zeros(rows.shape[0], math.prod(local.shape[:k]) * slots)
    store[:, _block_starts(blocks, width, slots, v.device)] = rows
    shape = torch.Size(lead + tuple(p.shape[:k]) + (slots,))
    return DTensor.from_local(store.reshape(lead + tuple(local.shape[:k]) + (slots,)),
                              p.device_mesh, [_shift(pl, len(lead)) for pl in p.placements],
                              run_check=False, shape=shape,
                              stride=tuple(_contiguous_strides(shape)))


def _own_block_maxima(store: torch.Tensor, p, lead: tuple) -> torch.Tensor:
    """This rank's block maxima from its part of the stored tensor (same layout: exact)."""
    local = p.to_local()
    k = _line_dims(_layout(p)[1])
    width, slots = _slots(p.shape, k)
    blocks = math.ceil(local.numel() / BLOCKSIZE)
    flat = store.reshape(math.prod(lead), -1)
    return flat[:, _block_starts(blocks, width, slots, store.device)].reshape(
        lead + (blocks,)).clone()


def _chunk_walk(g: torch.Tensor, size: int, splits: list[int]):
    """Global indices ``g`` along a dim of ``size`` chunked (``torch.chunk``, as DTensor
    does) over each of ``splits`` in turn: index inside, and size of, each one's piece."""
    idx, cur = g.clone(), torch.full_like(g, size)
    for m in splits:
        c = (cur + m - 1) // m
        coord = idx // c
        idx, cur = idx - coord * c, torch.minimum(c, cur - coord * c)
    return idx, cur


def _my_range(size: int, splits: list[tuple[int, int]]) -> tuple[int, int]:
    off, cur = 0, size
    for m, coord in splits:
        c = -(-cur // m)
        start = min(coord * c, cur)
        off, cur = off + start, max(min(c, cur - start), 0)
    return off, cur


def _old_block_index(p, old: tuple, slots: int, r0: int, r1: int) -> torch.Tensor:
    """For every element of rows ``r0:r1`` (dim 0) of this rank's shard, row-major, where the
    old layout ``old`` stored the maximum of its block: an index into the flattened stored
    tensor."""
    mesh_shape, codes = old
    new_codes = _layout(p)[1]
    if any(c[0] == "strided" for c in codes + new_codes):
        raise NotImplementedError("8-bit optimizer state sharded with strided placements "
                                  "(FSDP2 over tensor parallelism) resumes only on the layout "
                                  "it was saved from")
    k = _line_dims(codes)
    if k != _line_dims(new_codes):
        raise ValueError("8-bit optimizer state was saved with its parameter sharded on other "
                         "dims; it reshards across world sizes, not across sharded dims")
    shape, local = tuple(p.shape), p.to_local()
    coord = p.device_mesh.get_coordinate()
    width = math.prod(shape[k:])
    dev = local.device
    index = torch.zeros([1] * (k + 1), dtype=torch.int64, device=dev)
    f = torch.zeros([1] * (k + 1), dtype=torch.int64, device=dev)
    sizes, offsets = [], []
    for d in range(k):
        mine = [(p.device_mesh.size(i), coord[i]) for i, c in enumerate(new_codes)
                if c == ("shard", d)]
        off, n = _my_range(shape[d], mine)
        if n != local.shape[d]:
            raise NotImplementedError(f"cannot place this rank's shard of a {shape} parameter "
                                      f"with placements {p.placements}")
        lo, hi = (off + r0, off + r1) if d == 0 else (off, off + n)
        g = torch.arange(lo, hi, dtype=torch.int64, device=dev)
        li, sz = _chunk_walk(g, shape[d], [mesh_shape[i] for i, c in enumerate(codes)
                                           if c == ("shard", d)])
        view = [1] * (k + 1)
        view[d] = hi - lo
        sizes.append(sz.view(view))
        offsets.append((g - li).view(view))
        f = f * sizes[-1] + li.view(view)
    f = f * width + torch.arange(width, dtype=torch.int64, device=dev).view([1] * k + [width])
    start = f - f % BLOCKSIZE  # the element's old block starts here, in its old shard
    line, col = start // width, start % width
    where = [None] * k  # the block start's global index along each line dim
    for d in reversed(range(k)):  # unravel the old local line, then make it global
        where[d] = offsets[d] + line % sizes[d]
        line = line // sizes[d]
    for d in range(k):
        index = index * shape[d] + where[d]
    return (index * slots + col // BLOCKSIZE).reshape(-1)


def _requantized(p, store, old, codes, qmap, optimizer: str, i: int):
    """Codes and block maxima of this rank's new shard, from the old layout's blocks."""
    from .optim import state8bit  # the optimizer package imports this module

    lead = tuple(codes.shape[:codes.dim() - p.dim()])
    rows = math.prod(lead)
    full = store.full_tensor().reshape(rows, -1)  # collective over the mesh
    local = p.to_local()
    n0 = local.shape[0]
    flat = codes.reshape(rows, n0, -1)
    values = torch.empty(flat.shape, dtype=torch.float32, device=codes.device)
    # a slab of dim 0 at a time bounds the int64 index temporaries
    step = max(1, _SLAB_ELEMENTS // max(flat.shape[2], 1))
    for r0 in range(0, n0, step):
        r1 = min(n0, r0 + step)
        absmax = full[:, _old_block_index(p, old, store.shape[-1], r0, r1)]
        values[:, r0:r1] = (qmap[flat[:, r0:r1].reshape(rows, -1).long()] * absmax).view(
            rows, r1 - r0, -1)
    blocks = math.ceil(local.numel() / BLOCKSIZE)
    st = {f"state{i}": codes.clone(), f"qmap{i}": qmap,
          f"absmax{i}": torch.zeros(lead + (blocks,), dtype=torch.float32, device=codes.device)}
    state8bit.set_state(st, optimizer, i, values.view(codes.shape))
    return st[f"state{i}"], st[f"absmax{i}"]


# ---- per-parameter conversions ---------------------------------------------------------------
def state_to_dtensors(p: torch.Tensor, state: dict) -> dict:
    """One parameter's optimizer state with its per-rank tensors as DTensors (see module
    doc). ``state`` itself is not modified; the codes' DTensors share memory with it."""
    if not is_dtensor(p) or not isinstance(state, dict):
        return state
    _check_placements(p)
    out = dict(state)
    for key in PARAM_LAYOUT_KEYS:
        v = state.get(key)
        if isinstance(v, torch.Tensor) and not is_dtensor(v):
            out[key] = _param_layout(v, p)
    for key in PER_SHARD_KEYS:
        v = state.get(key)
        if isinstance(v, torch.Tensor) and not is_dtensor(v):
            out[key] = _stored_block_maxima(v, p)
            out[LAYOUT_KEY] = _layout(p)
    return out


def state_to_local(p: torch.Tensor, state: dict, optimizer: str | None = None) -> dict:
    """Inverse of :func:`state_to_dtensors`: DTensor state back to this rank's tensors.

    Saved on another layout, 8-bit state is requantized in this rank's blocks; that needs
    ``optimizer`` (the rule name, e.g. ``"adamw"``, for the no-blow-up rounding) and every
    rank of the parameter's mesh calling this for the same parameters in the same order.
    """
    if not isinstance(state, dict) or not any(is_dtensor(v) for v in state.values()):
        return state
    if not is_dtensor(p):
        raise ValueError("optimizer state holds DTensors but its parameter is a plain tensor; "
                         "shard the model the same way as when the checkpoint was saved")
    out = dict(state)
    old = out.pop(LAYOUT_KEY, None)
    if old is not None:  # as saved; tuples may come back as lists
        old = (tuple(old[0]), tuple(tuple(c) for c in old[1]))
    # with nothing sharded the blocks are the whole tensor's on any mesh
    same = old is None or old == _layout(p) or _line_dims(_layout(p)[1]) == _line_dims(old[1]) == 0
    for key in PARAM_LAYOUT_KEYS:
        v = state.get(key)
        if is_dtensor(v):
            lead = v.dim() - p.dim()
            expected = (lead >= 0 and tuple(v.shape[lead:]) == tuple(p.shape)
                        and v.device_mesh == p.device_mesh
                        and tuple(v.placements) == tuple(_shift(pl, lead) for pl in p.placements))
            if not expected:
                raise ValueError(
                    f"optimizer {key} is a DTensor of shape {tuple(v.shape)} with placements "
                    f"{v.placements}, which does not match its parameter (shape "
                    f"{tuple(p.shape)}, placements {p.placements})")
            out[key] = v.to_local()
    for key, codes_key in PER_SHARD_KEYS.items():
        v = state.get(key)
        if not is_dtensor(v):
            continue
        codes = out.get(codes_key)
        k = _line_dims(_layout(p)[1])
        lead = tuple(codes.shape[:codes.dim() - p.dim()]) if isinstance(codes, torch.Tensor) else ()
        want = lead + tuple(p.shape[:k]) + (_slots(p.shape, k)[1],)
        if tuple(v.shape) != want or not isinstance(codes, torch.Tensor):
            raise ValueError(f"optimizer {key} of global shape {tuple(v.shape)} is not the "
                             f"stored block maxima of this parameter (expected {want}); was it "
                             "saved by an older bnbfuse, or with the parameter sharded on "
                             "other dims?")
        if same:
            out[key] = _own_block_maxima(v.to_local(), p, lead)
            continue
        if optimizer is None:
            raise ValueError("8-bit optimizer state saved on another mesh or world size needs "
                             "the optimizer's rule name to be requantized")
        i = int(key[-1])
        out[codes_key], out[key] = _requantized(p, v, old, codes, out[f"qmap{i}"], optimizer, i)
    for key, v in state.items():
        if key in out and is_dtensor(out[key]):  # any other DTensor state: its local part
            out[key] = v.to_local()
    return out

# ---- whole state dicts -----------------------------------------------------------------------
def _params(optimizer) -> list:
    return list(chain.from_iterable(g["params"] for g in optimizer.param_groups))


def dtensor_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """``optimizer.state_dict()`` output made ready for ``torch.distributed.checkpoint``.

    ``state_dict["state"]`` is keyed by position (as ``torch.optim`` writes it); the state of
    every DTensor parameter is converted with :func:`state_to_dtensors`. Returns a new dict
    (shallow); nothing changes when no parameter is a DTensor.
    """
    params = _params(optimizer)
    if not any(is_dtensor(p) for p in params):
        return state_dict
    index_to_param = dict(zip(
        chain.from_iterable(g["params"] for g in state_dict["param_groups"]), params))
    state = {}
    for key, st in state_dict.get("state", {}).items():
        p = index_to_param.get(key)
        state[key] = state_to_dtensors(p, st) if p is not None else st
    return {**state_dict, "state": state}


def local_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Inverse of :func:`dtensor_optimizer_state_dict`, for ``load_state_dict``.

    Parameters are matched the way ``load_state_dict`` matches them: the saved groups'
    ``params`` lists (positions, or the FQNs ``torch.distributed.checkpoint.state_dict``
    writes) against this optimizer's groups, in order.
    """
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
        return state_dict
    state = state_dict.get("state", {})
    if not any(isinstance(st, dict) and any(is_dtensor(v) for v in st.values())
               for st in state.values()):
        return state_dict
    key_to_param = dict(zip(
        chain.from_iterable(g["params"] for g in state_dict["param_groups"]), _params(optimizer)))
    name = getattr(optimizer, "optimizer_name", None)
    new_state = {}
    for key, st in state.items():
        p = key_to_param.get(key)
        new_state[key] = state_to_local(p, st, name) if p is not None else st
    return {**state_dict, "state": new_state}
