"""Checkpoints of bnbfuse optimizers: state-dict validation, the bitsandbytes layout, and
conversion to and from the ``torch.optim`` counterpart.

The optimizer classes call these functions from ``load_state_dict``, ``torch_state_dict``
and ``load_torch_state_dict``; ``opt`` is the optimizer (``Optimizer8bit``).
"""
from __future__ import annotations

from collections import OrderedDict
from copy import deepcopy
from itertools import chain
from typing import Any

import torch

from ..distributed import as_param_layout, local_optimizer_state_dict, to_local
from . import state8bit

__all__ = ["check_param_state", "load_state_dict", "from_saved_group", "torch_state_dict",
           "load_torch_state_dict", "refuse_torch_flags", "COMMON_KEYS"]


# bitsandbytes nests its quantization tensors under this key in state_dict() (for FSDP1);


# we accept that layout on load and write the flat one.
_BNB_WRAPPED_KEY = "__bnb_optimizer_quant_state__"


# Per-parameter settings every optimizer has besides its own hyper-parameters.
COMMON_KEYS = ("optim_bits", "min_8bit_size", "max_unorm", "percentile_clipping")


# torch.optim settings a group may carry (a torch.optim state dict, add_param_group) that


# bnbfuse does not implement; True raises.
_UNSUPPORTED_TORCH_FLAGS = ("amsgrad", "maximize", "differentiable")


# Group keys only torch.optim's own optimizers write: a state dict with them is torch's.
_TORCH_ONLY_GROUP_KEYS = ("foreach", "fused", "capturable", "differentiable")


# State keys a bitsandbytes state dict may carry that this implementation does not need.
_IGNORED_STATE_KEYS = ("unorm_vec", "max1", "max2", "new_max1", "new_max2")


def refuse_torch_flags(where: str, group: dict) -> None:
    """torch.optim settings that would change the update are refused, never ignored."""
    for flag in _UNSUPPORTED_TORCH_FLAGS:
        if group.get(flag, False):
            raise ValueError(f"{where}: {flag}=True is not supported")


def check_param_state(opt, index: int, p: torch.Tensor, st: dict) -> dict:
    """Validates one saved parameter state and returns it on p's device (copied)."""
    name = type(opt).__name__
    where = f"{name}.load_state_dict: state of parameter {index}"
    if not isinstance(st, dict):
        raise ValueError(f"{where} is a {type(st).__name__}, expected a dict")
    st = dict(st)
    if isinstance(st.get(_BNB_WRAPPED_KEY), dict):
        st.update(st.pop(_BNB_WRAPPED_KEY))
    for k in _IGNORED_STATE_KEYS:
        st.pop(k, None)
    if "state1" not in st:
        hint = (" (a torch.optim state dict? use load_torch_state_dict)"
                if any(k in st for k in ("exp_avg", "momentum_buffer", "square_avg", "sum"))
                else "")
        raise ValueError(f"{where} has no 'state1'{hint}; keys: {sorted(st)}")
    s1 = st["state1"]
    if not isinstance(s1, torch.Tensor) or s1.dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"{where}: state1 must be a uint8 or float32 tensor")
    eightbit = s1.dtype == torch.uint8
    expected = state8bit.expected_keys(opt.optimizer_name, eightbit)
    allowed = expected | {"gnorm_vec"}
    if not expected <= set(st) or not set(st) <= allowed:
        raise ValueError(f"{where} has keys {sorted(st)}, expected {sorted(expected)}"
                         f" ({'8' if eightbit else '32'}-bit state)")
    local = to_local(p)
    shapes = state8bit.state_shapes(opt.optimizer_name, local)
    out = {}
    for k, v in st.items():
        if k == "step":
            out[k] = state8bit.step_count(v, where)
            continue
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{where}: {k} must be a tensor, got {type(v).__name__}")
        if tuple(v.shape) != tuple(shapes[k]):
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, expected "
                             f"{tuple(shapes[k])} for a parameter of shape "
                             f"{tuple(local.shape)}")
        want = torch.uint8 if (k in ("state1", "state2") and eightbit) else torch.float32
        if v.dtype != want:
            raise ValueError(f"{where}: {k} has dtype {v.dtype}, expected {want}")
        _check_values(where, k, v)
        out[k] = v.detach().to(device=local.device, copy=True)
    return out


def _check_values(where: str, key: str, v: torch.Tensor) -> None:
    """Values of 8-bit bookkeeping tensors that a step would turn into NaN parameters.

    absmax and gnorm_vec are finite and >= 0; a qmap is finite, in [-1, 1] and ascending, as
    every map bitsandbytes and bnbfuse save is (the dynamic maps come sorted).
    """
    if key not in ("absmax1", "absmax2", "qmap1", "qmap2", "gnorm_vec"):
        return
    what = where.replace("state of parameter", f"{key} of parameter")
    bad = int((~torch.isfinite(v)).sum())
    if bad:
        raise ValueError(f"{what} has {bad} NaN/Inf value(s)")
    if key.startswith("qmap"):
        if v.numel() and float(v.abs().max()) > 1:
            raise ValueError(f"{what} has values outside [-1, 1] (a map is normalised)")
        if not bool((v[1:] >= v[:-1]).all()):
            raise ValueError(f"{what} is not sorted ascending (saved maps are)")
    elif bool((v < 0).any()):
        raise ValueError(f"{what} has negative values (a scale or norm is >= 0)")


def load_state_dict(opt, state_dict: dict) -> None:
    """``opt.load_state_dict``: validates everything before changing anything."""
    name = type(opt).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{name}.load_state_dict expects a dict with 'state' and "
                         "'param_groups' (as torch.optim does: without 'state' every moment "
                         "would be dropped)")
    state_dict = state_dict.copy()
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    state_dict = local_optimizer_state_dict(opt, state_dict)
    saved_groups = [from_saved_group(opt, g, sg)
                    for g, sg in zip(opt.param_groups, state_dict["param_groups"])]
    saved_groups += state_dict["param_groups"][len(saved_groups):]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"{name}.load_state_dict: {len(saved_groups)} parameter groups "
                         f"saved, the optimizer has {len(opt.param_groups)}")
    for i, (g, sg) in enumerate(zip(opt.param_groups, saved_groups)):
        torch_keys = sorted(set(sg) & set(_TORCH_ONLY_GROUP_KEYS))
        if torch_keys:
            raise ValueError(f"{name}.load_state_dict: group {i} has torch.optim settings "
                             f"{torch_keys}: a torch.optim state dict? use "
                             "load_torch_state_dict")
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(f"{name}.load_state_dict: group {i} has {len(sg['params'])} "
                             f"saved parameters, the optimizer has {len(g['params'])}")
        missing = sorted(set(g) - set(sg) - {"params", "param_names", *COMMON_KEYS})
        if missing:
            raise ValueError(f"{name}.load_state_dict: group {i} lacks settings {missing} "
                             "(saved by a different optimizer class?)")
        opt._validate({**g, **{k: v for k, v in sg.items() if k != "params"}})
    # bitsandbytes keeps optim_bits & co. outside the groups: keep ours where absent
    saved_groups = [{**{k: g[k] for k in COMMON_KEYS if k not in sg}, **sg}
                    for g, sg in zip(opt.param_groups, saved_groups)]
    id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                      chain.from_iterable(g["params"] for g in opt.param_groups)))
    index_of = {p: i for i, p in enumerate(chain.from_iterable(
        g["params"] for g in opt.param_groups))}
    new_state = {}
    for key, st in state_dict["state"].items():
        if key not in id_map:
            raise ValueError(f"{name}.load_state_dict: state for unknown parameter id "
                             f"{key!r}")
        p = id_map[key]
        if isinstance(st, dict) and not st:
            continue  # an entry read but never filled: created at the next step
        new_state[p] = check_param_state(opt, index_of[p], p, st)
    # torch.optim's load_state_dict would cast every state tensor to its parameter's
    # dtype (codes and absmax must keep theirs): it only loads the groups here, and the
    # hooks run around this whole method instead of inside it.
    hooks = (opt._optimizer_load_state_dict_pre_hooks,
             opt._optimizer_load_state_dict_post_hooks)
    opt._optimizer_load_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_load_state_dict_post_hooks = OrderedDict()
    try:
        opt._load_groups(deepcopy(saved_groups))
    finally:
        (opt._optimizer_load_state_dict_pre_hooks,
         opt._optimizer_load_state_dict_post_hooks) = hooks
    for p, st in new_state.items():
        opt.state[p] = st
    opt._overrides.clear()
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def from_saved_group(opt, group: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """A saved param group in this optimizer's layout.

    bitsandbytes saves every optimizer's settings as ``lr, betas, eps, weight_decay``
    (SGD: ``betas=(momentum, dampening)``). Where a saved group lacks this optimizer's
    own keys and has ``betas``, they are mapped by ``_bnb_betas`` and ``_bnb_fixed``.
    """
    own = set(group) - {"params", "param_names", *COMMON_KEYS}
    if not isinstance(saved, dict) or own <= set(saved) or "betas" not in saved:
        return saved
    settings = dict(opt._bnb_fixed)
    settings.update((k, saved[k]) for k in ("lr", "eps", "weight_decay") if k in saved)
    settings.update(zip(opt._bnb_betas, tuple(saved["betas"])))
    bnb_keys = {"lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3"}
    kept = {k: v for k, v in saved.items() if k not in bnb_keys}
    return {**kept, **{k: v for k, v in settings.items() if k in own}}


def torch_state_dict(opt) -> dict:
    """``opt.torch_state_dict`` (see the method's documentation)."""
    torch_cls, names = _torch_counterpart(opt)
    groups, state = [], {}
    index = 0
    for group in opt.param_groups:
        dummy = torch.nn.Parameter(torch.zeros(1))
        tgroup = torch_cls([dummy], **opt._torch_group(group)).param_groups[0]
        tgroup = {k: v for k, v in tgroup.items() if k not in ("params", "param_names")}
        ids = []
        for p in group["params"]:
            st = opt.state.get(p)
            if st and st["step"] > 0:
                entry = {"step": torch.tensor(float(st["step"]))}
                for i, key in enumerate(names, start=1):
                    # a DTensor parameter's state in its layout, as torch.optim keeps it
                    entry[key] = as_param_layout(state8bit.get_state(st, i), p)
                state[index] = entry
            ids.append(index)
            index += 1
        groups.append({**tgroup, "params": ids})
    return {"state": state, "param_groups": groups}


def load_torch_state_dict(opt, state_dict: dict) -> None:
    """``opt.load_torch_state_dict`` (see the method's documentation)."""
    name = type(opt).__name__
    _, names = _torch_counterpart(opt)
    if not isinstance(state_dict, dict) or "state" not in state_dict:
        raise ValueError(f"{name}.load_torch_state_dict expects a torch.optim state dict "
                         "with 'state' and 'param_groups'")
    saved_groups = state_dict.get("param_groups")
    if saved_groups is None or len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"{name}.load_torch_state_dict: the torch state dict has "
                         f"{len(saved_groups or [])} groups, the optimizer has "
                         f"{len(opt.param_groups)}")
    updates = []
    for i, (g, tg) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(g["params"]) != len(tg["params"]):
            raise ValueError(f"{name}.load_torch_state_dict: group {i} has "
                             f"{len(tg['params'])} parameters, the optimizer has "
                             f"{len(g['params'])}")
        refuse_torch_flags(f"{name}.load_torch_state_dict", tg)
        upd = opt._from_torch_group(tg)
        opt._validate({**g, **upd})
        updates.append(upd)
    merged = {p: {**g, **upd} for g, upd in zip(opt.param_groups, updates) for p in g["params"]}
    id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                      chain.from_iterable(g["params"] for g in opt.param_groups)))
    new_state = {}
    for key, tst in state_dict["state"].items():
        if key not in id_map:
            raise ValueError(f"{name}.load_torch_state_dict: state for unknown parameter "
                             f"id {key!r}")
        p = id_map[key]
        # torch.optim.SGD keeps no step count; any count > 0 means "buffer exists"
        required = names if opt.optimizer_name == "sgd" else ("step", *names)
        missing = [k for k in required if k not in tst]
        if missing:
            raise ValueError(f"{name}.load_torch_state_dict: parameter {key} lacks "
                             f"{missing} (keys: {sorted(tst)})")
        if "step" in tst:
            state8bit.step_count(tst["step"], f"{name}.load_torch_state_dict: parameter {key}")
        local = to_local(p)
        for k in names:
            v = tst[k]
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                what = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{name}.load_torch_state_dict: {k} of parameter {key} "
                                 f"must be a real floating-point tensor, got {what}")
            # a DTensor state (FSDP2, as torch.optim keeps it) is compared by its shard
            if tuple(to_local(v).shape) != tuple(local.shape):
                raise ValueError(f"{name}.load_torch_state_dict: {k} of parameter {key} "
                                 f"has shape {tuple(to_local(v).shape)}, expected "
                                 f"{tuple(local.shape)}")
        # 8-bit blocks cannot hold NaN/Inf: one would make its block's absmax NaN and
        # corrupt its 255 neighbours. Refused (32-bit state takes them, as torch.optim does).
        if opt._uses_8bit(p, opt._param_config(merged[p], p)):
            for k in names:
                bad = int((~torch.isfinite(to_local(tst[k]))).sum())
                if bad:
                    raise ValueError(f"{name}.load_torch_state_dict: {k} of parameter {key} "
                                     f"has {bad} NaN/Inf value(s), which 8-bit state cannot "
                                     "hold; replace them (torch.nan_to_num) or load into "
                                     "32-bit state")
        new_state[p] = tst
    for g, upd in zip(opt.param_groups, updates):
        g.update(upd)
    opt._overrides.clear()
    for group in opt.param_groups:
        for p in group["params"]:
            if p not in new_state:
                continue
            tst = new_state[p]
            st: dict = {}
            opt._init_state(p, st, opt._param_config(group, p))
            st["step"] = state8bit.step_count(tst.get("step", 1), name)
            for i, k in enumerate(names, start=1):
                state8bit.set_state(st, opt.optimizer_name, i, to_local(tst[k]))
            opt.state[p] = st


def _torch_counterpart(opt):
    if opt._torch_counterpart is None:
        raise NotImplementedError(f"{type(opt).__name__} has no torch.optim counterpart "
                                  "to convert state with")
    return opt._torch_counterpart
