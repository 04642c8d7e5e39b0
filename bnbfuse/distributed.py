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
- ``absmax1``/``absmax2`` depend on how the local shard is cut into blocks, which has no
  global meaning. They become one row per shard: a DTensor of global shape
  ``(shards, L)`` sharded on dim 0 over the mesh dimensions the parameter is sharded on
  (replicated over the others), each rank's row zero-padded to a common length ``L`` (an
  upper bound computed from the global shape, so no communication).
- ``step``, ``qmap1``/``qmap2`` and ``gnorm_vec`` are the same on every rank (percentile
  clipping uses the global gradient norm) and stay plain.

A checkpoint saved this way resumes bit-identically on the same world size and mesh.
Loading it on a different mesh is not supported for 8-bit state (the block maxima belong
to the old shards); convert through ``optimizer.torch_state_dict()`` on the old layout, or
resume with the same number of ranks.

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


def _max_local_numel(p) -> int:
    """An upper bound, equal on every rank, of the local shard's numel of DTensor ``p``.

    Shards follow ``torch.chunk``: the largest piece of a dimension of size S split over m
    ranks is ceil(S / m); nested shards of one dimension divide again. A strided shard
    interleaves ``split_factor`` groups, each chunked, so its largest piece is bounded by
    ``split_factor`` times the largest chunk of one group.
    """
    sizes = list(p.shape)
    mesh = p.device_mesh
    for i, pl in enumerate(p.placements):
        if pl.is_shard():
            m = mesh.size(i)
            d = pl.dim
            sf = getattr(pl, "split_factor", 1) if isinstance(pl, _StridedShard) else 1
            sizes[d] = sf * math.ceil(math.ceil(sizes[d] / sf) / m)
    return math.prod(sizes)


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


def _shard_slots(p) -> tuple[int, list]:
    mesh = p.device_mesh
    slots = 1
    placements = []
    for i, pl in enumerate(p.placements):
        if pl.is_shard():
            slots *= mesh.size(i)
            placements.append(Shard(0))
        else:
            placements.append(Replicate())
    return slots, placements


def _rows_per_state(codes: torch.Tensor, p) -> int:
    """How many absmax rows a state tensor has (AdEMAMix stacks 2 moments in state1)."""
    lead = codes.dim() - p.to_local().dim()
    return math.prod(codes.shape[:lead]) if lead > 0 else 1


def _per_shard_layout(v: torch.Tensor, p, rows: int) -> "DTensor":
    width = rows * math.ceil(_max_local_numel(p) / BLOCKSIZE)
    flat = v.reshape(-1)
    if flat.numel() > width:
        raise ValueError(f"optimizer block maxima of {flat.numel()} elements exceed the bound "
                         f"{width} for a parameter of global shape {tuple(p.shape)}")
    row = flat.new_zeros((1, width))
    row[0, :flat.numel()] = flat
    slots, placements = _shard_slots(p)
    return DTensor.from_local(row, p.device_mesh, placements, run_check=False,
                              shape=torch.Size((slots, width)), stride=(width, 1))


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
    for key, codes_key in PER_SHARD_KEYS.items():
        v = state.get(key)
        if isinstance(v, torch.Tensor) and not is_dtensor(v):
            codes = state.get(codes_key)
            rows = _rows_per_state(to_local(codes), p) if isinstance(codes, torch.Tensor) else 1
            out[key] = _per_shard_layout(v, p, rows)
    return out


def state_to_local(p: torch.Tensor, state: dict) -> dict:
    """Inverse of :func:`state_to_dtensors`: DTensor state back to this rank's tensors."""
    if not isinstance(state, dict) or not any(is_dtensor(v) for v in state.values()):
        return state
    if not is_dtensor(p):
        raise ValueError("optimizer state holds DTensors but its parameter is a plain tensor; "
                         "shard the model the same way as when the checkpoint was saved")
    local_p = p.to_local()
    out = dict(state)
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
                    f"{tuple(p.shape)}, placements {p.placements}); 8-bit state resumes only "
                    "on the mesh it was saved from")
            out[key] = v.to_local()
    blocks = math.ceil(local_p.numel() / BLOCKSIZE)
    for key, codes_key in PER_SHARD_KEYS.items():
        v = state.get(key)
        if is_dtensor(v):
            codes = out.get(codes_key)
            lead = codes.dim() - local_p.dim() if isinstance(codes, torch.Tensor) else 0
            shape = tuple(codes.shape[:lead]) + (blocks,) if lead > 0 else (blocks,)
            row = v.to_local().reshape(-1)
            n = math.prod(shape)
            if row.numel() < n or v.dim() != 2 or v.shape[0] != _shard_slots(p)[0]:
                raise ValueError(f"optimizer {key} of global shape {tuple(v.shape)} does not fit "
                                 f"the parameter's local shard {tuple(local_p.shape)}; resume "
                                 "on the mesh the checkpoint was saved from")
            out[key] = row[:n].reshape(shape).clone()
    for key, v in state.items():
        if is_dtensor(out[key]):  # any other DTensor state: its local part
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
    new_state = {}
    for key, st in state.items():
        p = key_to_param.get(key)
        new_state[key] = state_to_local(p, st) if p is not None else st
    return {**state_dict, "state": new_state}
