"""The base class of every bnbfuse optimizer.

An optimizer here is a thin ``torch.optim.Optimizer`` over one fused update op: for each
parameter with a gradient, one call of ``bnbfuse::optimizer_update_8bit_blockwise`` (state in
8-bit blocks of 256) or ``bnbfuse::optimizer_update_32bit`` (float32 state). Which one runs is
decided per parameter when its state is created: ``optim_bits`` (after the
``GlobalOptimManager`` overrides) and the parameter's global size against ``min_8bit_size``.
Subclasses only say how their hyper-parameters map onto the kernel's (``_kernel_hparams``)
and, for LAMB/LARS, how the step is scaled (``_update_scale``).

State keys are bitsandbytes': ``step`` (int), ``state1``, ``state2`` and, for 8-bit state,
``absmax1``, ``absmax2``, ``qmap1``, ``qmap2`` (1-state optimizers: only the ``1`` keys);
``gnorm_vec`` holds the gradient-norm history when ``percentile_clipping < 100``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from copy import deepcopy
from itertools import chain
from typing import Any, Optional

import torch

from .. import functional as F
from ..distributed import (as_param_layout, dtensor_optimizer_state_dict,
                           local_optimizer_state_dict)
from .manager import GlobalOptimManager

__all__ = ["Optimizer8bit", "Optimizer1State", "Optimizer2State"]

BLOCKSIZE = 256  # elements per 8-bit state block
_HISTORY = 100  # gradient norms remembered by percentile clipping
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# bitsandbytes nests its quantization tensors under this key in state_dict() (for FSDP1);
# we accept that layout on load and write the flat one.
_BNB_WRAPPED_KEY = "__bnb_optimizer_quant_state__"
# Per-parameter settings every optimizer has besides its own hyper-parameters.
_COMMON_KEYS = ("optim_bits", "min_8bit_size", "max_unorm", "percentile_clipping")
# torch.optim settings a group may carry (a torch.optim state dict, add_param_group) that
# bnbfuse does not implement; True raises.
_UNSUPPORTED_TORCH_FLAGS = ("amsgrad", "maximize", "differentiable")
# Group keys only torch.optim's own optimizers write: a state dict with them is torch's.
_TORCH_ONLY_GROUP_KEYS = ("foreach", "fused", "capturable", "differentiable")
# State keys a bitsandbytes state dict may carry that this implementation does not need.
_IGNORED_STATE_KEYS = ("unorm_vec", "max1", "max2", "new_max1", "new_max2")

try:  # torch.distributed may be absent from a build
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # pragma: no cover
    _DTensor = None


def _is_dtensor(t) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernel runs on: a DTensor's local shard, else the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _global_sum(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Sums a per-shard partial sum over the mesh dimensions ``p`` is sharded on."""
    if _is_dtensor(p):
        import torch.distributed as dist

        for dim, placement in enumerate(p.placements):
            if placement.is_shard():
                dist.all_reduce(t, group=p.device_mesh.get_group(dim))
    return t


def _zero_code(qmap: torch.Tensor) -> int:
    return int(torch.nonzero(qmap == 0)[0, 0])


def _refuse_torch_flags(where: str, group: dict) -> None:
    """torch.optim settings that would change the update are refused, never ignored."""
    for flag in _UNSUPPORTED_TORCH_FLAGS:
        if group.get(flag, False):
            raise ValueError(f"{where}: {flag}=True is not supported")


def _check_range(name: str, value, low: float, high: float = math.inf, *,
                 high_open: bool = False) -> None:
    v = float(value)
    if not (low <= v and (v < high if high_open else v <= high)) or math.isnan(v):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {bound})")


class Optimizer8bit(torch.optim.Optimizer):
    """Base of the bnbfuse optimizers (bitsandbytes' ``Optimizer8bit``).

    Subclasses set ``optimizer_name`` (the kernel's update rule) and ``num_states`` (1 or 2),
    and implement ``_kernel_hparams``. Users construct the subclasses (``AdamW8bit``, ...).

    Args:
        params: iterable of parameters or of param-group dicts.
        defaults: the subclass's hyper-parameters (``lr`` and its own names: ``betas``,
            ``momentum``, ``alpha``...).
        optim_bits: 8 or 32, the precision of the state.
        args: bitsandbytes' argument object (or a dict); its ``optim_bits``,
            ``min_8bit_size``, ``percentile_clipping``, ``max_unorm`` replace the arguments.
        min_8bit_size: parameters with fewer elements (global size) keep 32-bit state.
        is_paged: paged optimizers are not implemented yet (raises when True).
        max_unorm: clip the update so that ``||update|| <= max_unorm * ||p||`` (0 = off).
        percentile_clipping: clip each gradient's norm at this percentile of its last 100
            norms (100 = off).
    """

    optimizer_name: str = ""
    num_states: int = 1
    # (torch.optim class, names of state1/state2 there, extra constructor kwargs) for
    # torch_state_dict / load_torch_state_dict; None where torch has no counterpart.
    _torch_counterpart: Optional[tuple] = None
    # How a bitsandbytes state dict's groups map onto this optimizer's settings where they
    # differ (_from_saved_group): what its betas stand for here, and the settings
    # bitsandbytes lacks, with the only values its optimizer supports.
    _bnb_betas: tuple[str, ...] = ()
    _bnb_fixed: dict[str, Any] = {}

    def __init__(self, params, defaults: dict[str, Any], optim_bits: int = 32, args=None,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, max_unorm: float = 0.0,
                 percentile_clipping: int = 100):
        if args is not None:
            get = (args.get if isinstance(args, dict)
                   else lambda k, d=None: getattr(args, k, d))
            if get("skip_zeros", False):
                raise NotImplementedError("skip_zeros=True is not supported by bnbfuse")
            if not get("block_wise", True):
                raise NotImplementedError("bnbfuse 8-bit state is always blockwise "
                                          "(args.block_wise=False is not supported)")
            optim_bits = get("optim_bits", optim_bits)
            min_8bit_size = get("min_8bit_size", min_8bit_size)
            percentile_clipping = get("percentile_clipping", percentile_clipping)
            max_unorm = get("max_unorm", max_unorm)
            is_paged = get("is_paged", is_paged)
        if is_paged:
            raise NotImplementedError(
                f"{type(self).__name__}: paged optimizers (is_paged=True) are not implemented "
                "in bnbfuse yet; use is_paged=False")
        defaults = dict(defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size,
                        max_unorm=max_unorm, percentile_clipping=percentile_clipping)
        self._validate(defaults)
        super().__init__(params, defaults)
        self.is_paged = False
        self._overrides: dict[torch.Tensor, dict[str, Any]] = {}

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group (as ``torch.optim``), validating its settings."""
        super().add_param_group(param_group)
        try:
            self._validate(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_overrides", {})
        self.__dict__.setdefault("is_paged", False)

    # ---- hooks for subclasses -------------------------------------------------------------
    def _kernel_hparams(self, cfg: dict[str, Any], step: int) -> dict[str, Any]:
        """Maps a parameter's settings to the kernel's (lr, beta1, beta2, beta3, alpha, eps,
        weight_decay, dampening, nesterov); missing ones are 0/False."""
        raise NotImplementedError

    def _needs_norms(self, cfg: dict[str, Any]) -> bool:
        """Whether the step needs the norms pass (||update||, ||p||) before the update."""
        return cfg["max_unorm"] > 0

    def _update_scale(self, cfg: dict[str, Any], unorm: float, pnorm: float) -> float:
        """The factor on the step, from ||update|| and ||p||: max_unorm clipping by default."""
        limit = cfg["max_unorm"] * pnorm
        if cfg["max_unorm"] > 0 and unorm > limit:
            return limit / unorm
        return 1.0

    def _state1_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        return tuple(p.shape)

    def _init_state1(self, p: torch.Tensor, cfg: dict[str, Any]) -> Optional[float]:
        """Initial value of state1 (None: zeros). Adagrad's initial_accumulator_value."""
        return None

    def _check_betas(self, group: dict[str, Any], names: str = "beta1, beta2") -> None:
        """Raises ValueError unless ``group["betas"]`` has one value per name in ``names``."""
        if len(group["betas"]) != len(names.split(",")):
            raise ValueError(f"{type(self).__name__} takes betas=({names}), got "
                             f"{group['betas']!r}")

    def _validate_hparams(self, group: dict[str, Any]) -> None:
        """Checks the subclass's own hyper-parameters (raises ValueError)."""

    # ---- validation ---------------------------------------------------------------------
    def _validate(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{name}: a tensor lr must have one element, got shape "
                                 f"{tuple(lr.shape)}")
            if lr.device.type != "meta":
                _check_range("learning rate", lr.item(), 0.0)
        elif lr is not None:
            _check_range("learning rate", lr, 0.0)
        _refuse_torch_flags(name, group)
        if "eps" in group:
            _check_range("epsilon value", group["eps"], 0.0)
        if "weight_decay" in group:
            _check_range("weight_decay value", group["weight_decay"], 0.0)
        if "betas" in group:
            betas = tuple(group["betas"])
            for i, b in enumerate(betas):
                _check_range(f"beta parameter at index {i}", b, 0.0, 1.0, high_open=True)
        if group.get("optim_bits") not in (8, 32):
            raise ValueError(f"{name}: optim_bits must be 8 or 32, got {group.get('optim_bits')!r}")
        mbs = group.get("min_8bit_size")
        if isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 0:
            raise ValueError(f"{name}: min_8bit_size must be an int >= 0, got {mbs!r}")
        _check_range("max_unorm", group.get("max_unorm"), 0.0)
        pc = group.get("percentile_clipping")
        if isinstance(pc, bool) or not isinstance(pc, int) or not 1 <= pc <= 100:
            raise ValueError(f"{name}: percentile_clipping must be an int in [1, 100], got {pc!r}")
        self._validate_hparams(group)

    # ---- per-parameter settings -----------------------------------------------------------
    def _param_config(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """The group's settings with p's registry overrides on top.

        Overrides are read from ``GlobalOptimManager`` once, when p's state is first created
        (or first used after ``load_state_dict``), and kept for the optimizer's life.
        """
        overrides = self._overrides.get(p)
        if overrides is None:
            overrides = GlobalOptimManager.get_instance().get_config(p)
            unknown = sorted(set(overrides) - set(group) - {"params"})
            if unknown:
                known = sorted(k for k in group if k != "params")
                raise ValueError(f"{type(self).__name__}: override keys {unknown} are not "
                                 f"settings of this optimizer (known: {known})")
            if overrides:
                self._validate({**group, **overrides})
            self._overrides[p] = overrides
        cfg = {k: v for k, v in group.items() if k != "params"}
        cfg.update(overrides)
        return cfg

    # ---- state ----------------------------------------------------------------------------
    def _uses_8bit(self, p: torch.Tensor, cfg: dict[str, Any]) -> bool:
        # p.numel() of a DTensor is its global size, so sharding never changes the choice.
        return cfg["optim_bits"] == 8 and p.numel() >= cfg["min_8bit_size"]

    def _init_state(self, p: torch.Tensor, state: dict, cfg: dict[str, Any]) -> None:
        local = _local(p)
        dev = local.device
        shape1 = self._state1_shape(local)
        init1 = self._init_state1(local, cfg)
        state["step"] = 0
        if self._uses_8bit(p, cfg):
            blocks = -(local.numel() // -BLOCKSIZE)
            qmap1 = F.dynamic_map(True, dev).clone()
            state["state1"] = torch.full(shape1, _zero_code(qmap1), dtype=torch.uint8, device=dev)
            # one row of block maxima per stacked moment (AdEMAMix: 2)
            state["absmax1"] = torch.zeros(shape1[:len(shape1) - local.dim()] + (blocks,),
                                           dtype=torch.float32, device=dev)
            state["qmap1"] = qmap1
            if self.num_states == 2:
                qmap2 = F.dynamic_map(False, dev).clone()
                state["state2"] = torch.full(local.shape, _zero_code(qmap2), dtype=torch.uint8,
                                             device=dev)
                state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=dev)
                state["qmap2"] = qmap2
            if init1 is not None:
                self._set_state(state, 1, torch.full(shape1, float(init1), device=dev))
        else:
            state["state1"] = torch.zeros(shape1, dtype=torch.float32, device=dev)
            if init1 is not None:
                state["state1"].fill_(init1)
            if self.num_states == 2:
                state["state2"] = torch.zeros(local.shape, dtype=torch.float32, device=dev)
        if cfg["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros(_HISTORY, dtype=torch.float32, device=dev)

    def _get_state(self, state: dict, i: int) -> torch.Tensor:
        """state{i} as float32 (dequantized when 8-bit)."""
        s = state[f"state{i}"]
        if s.dtype != torch.uint8:
            return s.clone()
        absmax, qmap = state[f"absmax{i}"], state[f"qmap{i}"]
        if s.numel() == 0:
            return torch.zeros(s.shape, dtype=torch.float32, device=s.device)
        # AdEMAMix stacks two moments in state1 with one absmax row each.
        rows = absmax.reshape(-1, absmax.shape[-1]).shape[0]
        parts = [F.dequantize_blockwise(c, absmax=a, code=qmap, blocksize=BLOCKSIZE)
                 for c, a in zip(s.reshape(rows, -1), absmax.reshape(rows, -1))]
        return torch.stack(parts).reshape(s.shape)

    def _set_state(self, state: dict, i: int, value: torch.Tensor) -> None:
        """Stores float ``value`` into state{i}, quantizing when the state is 8-bit.

        Second-moment-like states are quantized with the kernels' no-blow-up rule: a positive
        value whose nearest code is zero gets the smallest positive code instead.
        """
        s = state[f"state{i}"]
        value = value.to(device=s.device, dtype=torch.float32).reshape(s.shape)
        if s.dtype != torch.uint8:
            s.copy_(value)
            return
        if s.numel() == 0:
            return
        absmax, qmap = state[f"absmax{i}"], state[f"qmap{i}"]
        rows = absmax.reshape(-1, absmax.shape[-1]).shape[0]
        keep_positive = i == 2 or self.optimizer_name in ("rmsprop", "adagrad")
        zero = _zero_code(qmap)
        smallest_positive = int(torch.where(qmap > 0, qmap, math.inf).argmin())
        for x, c, a in zip(value.reshape(rows, -1), s.view(rows, -1), absmax.view(rows, -1)):
            codes, qs = F.quantize_blockwise(x.contiguous(), code=qmap, blocksize=BLOCKSIZE)
            if keep_positive:
                codes = torch.where((codes == zero) & (x > 0),
                                    torch.tensor(smallest_positive, dtype=torch.uint8,
                                                 device=codes.device), codes)
            c.copy_(codes)
            a.copy_(qs.absmax)

    # ---- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss
                (run with gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update_param(group, p)
        return loss

    def _update_param(self, group: dict[str, Any], p: torch.Tensor) -> None:
        name = type(self).__name__
        grad = p.grad
        if grad.is_sparse or getattr(grad, "layout", torch.strided) != torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients; use a dense "
                               "embedding (sparse=False) or torch.optim.SparseAdam")
        if p.is_complex() or grad.is_complex():
            raise RuntimeError(f"{name} does not support complex parameters or gradients; "
                               "optimize torch.view_as_real(p) instead")
        if p.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} takes float32/float16/bfloat16 parameters, got {p.dtype}")
        # The config first: an override that fails must not leave an empty state behind.
        cfg = self._param_config(group, p)
        state = self.state[p]
        if not state:
            self._init_state(p, state, cfg)
        if _is_dtensor(grad) and any(pl.is_partial() for pl in grad.placements):
            # Tensor parallelism leaves some gradients as per-rank partial sums (torch.optim's
            # DTensor ops reduce them implicitly): reduce to the parameter's layout first.
            grad = grad.redistribute(grad.device_mesh, p.placements)
        p_local, g_local = _local(p), _local(grad)
        if g_local.shape != p_local.shape:
            raise RuntimeError(f"{name}: gradient shape {tuple(g_local.shape)} does not match "
                               f"parameter shape {tuple(p_local.shape)}")
        if tuple(state["state1"].shape) != self._state1_shape(p_local):
            raise RuntimeError(f"{name}: a parameter of shape {tuple(p_local.shape)} has state "
                               f"of shape {tuple(state['state1'].shape)}: it changed shape "
                               "after its state was created; drop the old state with "
                               "`del optimizer.state[param]` (or build a new optimizer)")
        state["step"] += 1
        step = state["step"]
        if p.numel() == 0:
            return
        if "gnorm_vec" not in state and cfg["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros(_HISTORY, dtype=torch.float32, device=p_local.device)
        hp = self._kernel_hparams(cfg, step)
        hp = (float(hp.get("lr", 0.0)), float(hp.get("beta1", 0.0)), float(hp.get("beta2", 0.0)),
              float(hp.get("beta3", 0.0)), float(hp.get("alpha", 0.0)), float(hp.get("eps", 0.0)),
              float(hp.get("weight_decay", 0.0)), float(hp.get("dampening", 0.0)),
              bool(hp.get("nesterov", False)), step)
        work = p_local if p_local.is_contiguous() else p_local.contiguous()
        g = g_local.to(dtype=p.dtype).contiguous()
        gnorm_scale = self._gradient_scale(p, g, state, cfg, step)
        eightbit = state["state1"].dtype == torch.uint8
        s1, s2 = state["state1"], state.get("state2")
        update_scale = 1.0
        if self._needs_norms(cfg):
            if eightbit:
                norms = torch.ops.bnbfuse.optimizer_norms_8bit_blockwise(
                    self.optimizer_name, work, g, s1, s2, state["absmax1"], state.get("absmax2"),
                    state["qmap1"], state.get("qmap2"), *hp, gnorm_scale)
            else:
                norms = torch.ops.bnbfuse.optimizer_norms_32bit(
                    self.optimizer_name, work, g, s1, s2, *hp, gnorm_scale)
            norms = _global_sum(norms.to(torch.float64), p).sqrt().tolist()
            update_scale = float(self._update_scale(cfg, norms[0], norms[1]))
        if eightbit:
            torch.ops.bnbfuse.optimizer_update_8bit_blockwise(
                self.optimizer_name, work, g, s1, s2, state["absmax1"], state.get("absmax2"),
                state["qmap1"], state.get("qmap2"), *hp, gnorm_scale, update_scale)
        else:
            torch.ops.bnbfuse.optimizer_update_32bit(
                self.optimizer_name, work, g, s1, s2, *hp, gnorm_scale, update_scale)
        if work is not p_local:
            p_local.copy_(work)

    def _gradient_scale(self, p, g, state, cfg, step) -> float:
        """Percentile clipping (Dettmers et al. 2022): the factor that brings this gradient's
        norm down to the ``percentile_clipping``-th percentile of its last 100 norms.

        Non-finite elements are left out of the norm, as the update leaves them out too.
        """
        pc = cfg["percentile_clipping"]
        if pc >= 100:
            return 1.0
        g32 = g.float()
        sq = torch.where(torch.isfinite(g32), g32, 0).square().sum().reshape(1)
        sq = _global_sum(sq, p)
        history = state["gnorm_vec"]
        history[(step - 1) % _HISTORY] = sq[0]
        seen = history[: min(step, _HISTORY)]
        clip_sq = torch.quantile(seen.double(), pc / 100.0, interpolation="lower")
        current, clip_sq = float(sq[0]), float(clip_sq)
        if current > clip_sq and current > 0:
            return math.sqrt(clip_sq / current)
        return 1.0

    # ---- state dicts ----------------------------------------------------------------------
    def _expected_state_keys(self, eightbit: bool) -> set[str]:
        keys = {"step", "state1"}
        if eightbit:
            keys |= {"absmax1", "qmap1"}
        if self.num_states == 2:
            keys.add("state2")
            if eightbit:
                keys |= {"absmax2", "qmap2"}
        return keys

    def _check_param_state(self, index: int, p: torch.Tensor, st: dict) -> dict:
        """Validates one saved parameter state and returns it on p's device (copied)."""
        name = type(self).__name__
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
        expected = self._expected_state_keys(eightbit)
        allowed = expected | {"gnorm_vec"}
        if not expected <= set(st) or not set(st) <= allowed:
            raise ValueError(f"{where} has keys {sorted(st)}, expected {sorted(expected)}"
                             f" ({'8' if eightbit else '32'}-bit state)")
        local = _local(p)
        shape1 = self._state1_shape(local)
        blocks = -(local.numel() // -BLOCKSIZE)
        shapes = {"state1": shape1, "state2": tuple(local.shape), "qmap1": (256,),
                  "qmap2": (256,), "absmax1": shape1[:len(shape1) - local.dim()] + (blocks,),
                  "absmax2": (blocks,), "gnorm_vec": (_HISTORY,)}
        out = {}
        for k, v in st.items():
            if k == "step":
                if isinstance(v, torch.Tensor):
                    v = v.item()
                if float(v) != int(v) or int(v) < 0:
                    raise ValueError(f"{where}: step must be a count >= 0, got {v!r}")
                out[k] = int(v)
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
            out[k] = v.detach().to(device=local.device, copy=True)
        return out

    def state_dict(self) -> dict:
        """``torch.optim``'s state dict with bitsandbytes' state keys. The per-shard state of
        DTensor (FSDP2) parameters comes as DTensors, so ``torch.distributed.checkpoint``
        saves every rank's shard."""
        return dtensor_optimizer_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state from :meth:`state_dict` (or a bitsandbytes optimizer's).

        State tensors keep their dtype (8-bit codes stay codes) and move to each parameter's
        device; they are copied, so the loaded optimizer never aliases ``state_dict``.
        Mismatched groups, keys or shapes raise ``ValueError``; so does a ``torch.optim``
        state dict (:meth:`load_torch_state_dict` converts those). Hooks registered with
        ``register_load_state_dict_pre_hook``/``post_hook`` run as in ``torch.optim``: the
        pre-hooks on (a shallow copy of) the dict as given, the post-hooks once the state is
        loaded.
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError(f"{name}.load_state_dict expects a dict with 'state' and "
                             "'param_groups'")
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = local_optimizer_state_dict(self, state_dict)
        saved_groups = [self._from_saved_group(g, sg)
                        for g, sg in zip(self.param_groups, state_dict["param_groups"])]
        saved_groups += state_dict["param_groups"][len(saved_groups):]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: {len(saved_groups)} parameter groups "
                             f"saved, the optimizer has {len(self.param_groups)}")
        for i, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            torch_keys = sorted(set(sg) & set(_TORCH_ONLY_GROUP_KEYS))
            if torch_keys:
                raise ValueError(f"{name}.load_state_dict: group {i} has torch.optim settings "
                                 f"{torch_keys}: a torch.optim state dict? use "
                                 "load_torch_state_dict")
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"{name}.load_state_dict: group {i} has {len(sg['params'])} "
                                 f"saved parameters, the optimizer has {len(g['params'])}")
            missing = sorted(set(g) - set(sg) - {"params", "param_names", *_COMMON_KEYS})
            if missing:
                raise ValueError(f"{name}.load_state_dict: group {i} lacks settings {missing} "
                                 "(saved by a different optimizer class?)")
            self._validate({**g, **{k: v for k, v in sg.items() if k != "params"}})
        # bitsandbytes keeps optim_bits & co. outside the groups: keep ours where absent
        saved_groups = [{**{k: g[k] for k in _COMMON_KEYS if k not in sg}, **sg}
                        for g, sg in zip(self.param_groups, saved_groups)]
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        index_of = {p: i for i, p in enumerate(chain.from_iterable(
            g["params"] for g in self.param_groups))}
        new_state = {}
        for key, st in state_dict.get("state", {}).items():
            if key not in id_map:
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter id "
                                 f"{key!r}")
            p = id_map[key]
            if isinstance(st, dict) and not st:
                continue  # an entry read but never filled: created at the next step
            new_state[p] = self._check_param_state(index_of[p], p, st)
        # torch.optim's load_state_dict would cast every state tensor to its parameter's
        # dtype (codes and absmax must keep theirs): it only loads the groups here, and the
        # hooks run around this whole method instead of inside it.
        hooks = (self._optimizer_load_state_dict_pre_hooks,
                 self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict({"state": {}, "param_groups": deepcopy(saved_groups)})
        finally:
            (self._optimizer_load_state_dict_pre_hooks,
             self._optimizer_load_state_dict_post_hooks) = hooks
        for p, st in new_state.items():
            self.state[p] = st
        self._overrides.clear()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _from_saved_group(self, group: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
        """A saved param group in this optimizer's layout.

        bitsandbytes saves every optimizer's settings as ``lr, betas, eps, weight_decay``
        (SGD: ``betas=(momentum, dampening)``). Where a saved group lacks this optimizer's
        own keys and has ``betas``, they are mapped by ``_bnb_betas`` and ``_bnb_fixed``.
        """
        own = set(group) - {"params", "param_names", *_COMMON_KEYS}
        if not isinstance(saved, dict) or own <= set(saved) or "betas" not in saved:
            return saved
        settings = dict(self._bnb_fixed)
        settings.update((k, saved[k]) for k in ("lr", "eps", "weight_decay") if k in saved)
        settings.update(zip(self._bnb_betas, tuple(saved["betas"])))
        bnb_keys = {"lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3"}
        kept = {k: v for k, v in saved.items() if k not in bnb_keys}
        return {**kept, **{k: v for k, v in settings.items() if k in own}}

    # ---- torch.optim interoperability -----------------------------------------------------
    def _torch_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """Constructor kwargs of the torch.optim counterpart for this group."""
        raise NotImplementedError

    def _from_torch_group(self, tgroup: dict[str, Any]) -> dict[str, Any]:
        """Settings of ours taken from a torch.optim group (raises for unsupported ones)."""
        raise NotImplementedError

    def _require_torch_counterpart(self):
        if self._torch_counterpart is None:
            raise NotImplementedError(f"{type(self).__name__} has no torch.optim counterpart "
                                      "to convert state with")
        return self._torch_counterpart

    def torch_state_dict(self) -> dict:
        """This optimizer's state as the state dict of its ``torch.optim`` counterpart.

        8-bit state is dequantized to float32 (``state1`` → ``exp_avg``, ``state2`` →
        ``exp_avg_sq`` for Adam/AdamW; ``momentum_buffer`` for SGD, ``square_avg`` for
        RMSprop, ``sum`` for Adagrad). Load it with ``torch.optim.X.load_state_dict`` on the
        same parameters. Settings torch does not have (optim_bits, ...) are dropped.
        """
        torch_cls, names = self._require_torch_counterpart()
        groups, state = [], {}
        index = 0
        for group in self.param_groups:
            dummy = torch.nn.Parameter(torch.zeros(1))
            tgroup = torch_cls([dummy], **self._torch_group(group)).param_groups[0]
            tgroup = {k: v for k, v in tgroup.items() if k not in ("params", "param_names")}
            ids = []
            for p in group["params"]:
                st = self.state.get(p)
                if st and st["step"] > 0:
                    entry = {"step": torch.tensor(float(st["step"]))}
                    for i, key in enumerate(names, start=1):
                        # a DTensor parameter's state in its layout, as torch.optim keeps it
                        entry[key] = as_param_layout(self._get_state(st, i), p)
                    state[index] = entry
                ids.append(index)
                index += 1
            groups.append({**tgroup, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_torch_state_dict(self, state_dict: dict) -> None:
        """Loads the state dict of the ``torch.optim`` counterpart (quantizing into 8-bit
        state where this optimizer keeps 8-bit state), so a run can switch mid-training.

        The torch groups' hyper-parameters (lr, betas, eps, weight_decay, ...) replace ours;
        parameters map by position, as in ``torch.optim``. Unsupported torch settings
        (``amsgrad=True``, ``maximize=True``, ...) raise ``ValueError``.
        """
        name = type(self).__name__
        _, names = self._require_torch_counterpart()
        saved_groups = state_dict.get("param_groups")
        if saved_groups is None or len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_torch_state_dict: the torch state dict has "
                             f"{len(saved_groups or [])} groups, the optimizer has "
                             f"{len(self.param_groups)}")
        updates = []
        for i, (g, tg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(tg["params"]):
                raise ValueError(f"{name}.load_torch_state_dict: group {i} has "
                                 f"{len(tg['params'])} parameters, the optimizer has "
                                 f"{len(g['params'])}")
            _refuse_torch_flags(f"{name}.load_torch_state_dict", tg)
            upd = self._from_torch_group(tg)
            self._validate({**g, **upd})
            updates.append(upd)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        new_state = {}
        for key, tst in state_dict.get("state", {}).items():
            if key not in id_map:
                raise ValueError(f"{name}.load_torch_state_dict: state for unknown parameter "
                                 f"id {key!r}")
            p = id_map[key]
            # torch.optim.SGD keeps no step count; any count > 0 means "buffer exists"
            required = names if self.optimizer_name == "momentum" else ("step", *names)
            missing = [k for k in required if k not in tst]
            if missing:
                raise ValueError(f"{name}.load_torch_state_dict: parameter {key} lacks "
                                 f"{missing} (keys: {sorted(tst)})")
            local = _local(p)
            for k in names:
                v = tst[k]
                if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                    what = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(f"{name}.load_torch_state_dict: {k} of parameter {key} "
                                     f"must be a real floating-point tensor, got {what}")
                # a DTensor state (FSDP2, as torch.optim keeps it) is compared by its shard
                if tuple(_local(v).shape) != tuple(local.shape):
                    raise ValueError(f"{name}.load_torch_state_dict: {k} of parameter {key} "
                                     f"has shape {tuple(_local(v).shape)}, expected "
                                     f"{tuple(local.shape)}")
            new_state[p] = tst
        for g, upd in zip(self.param_groups, updates):
            g.update(upd)
        self._overrides.clear()
        for group in self.param_groups:
            for p in group["params"]:
                if p not in new_state:
                    continue
                tst = new_state[p]
                st: dict = {}
                self._init_state(p, st, self._param_config(group, p))
                step = tst.get("step", 1)
                st["step"] = int(step.item() if isinstance(step, torch.Tensor) else step)
                for i, k in enumerate(names, start=1):
                    self._set_state(st, i, _local(tst[k]))
                self.state[p] = st


class Optimizer2State(Optimizer8bit):
    """Base of the optimizers with two state tensors (Adam, AdamW, AdEMAMix, LAMB)."""

    num_states = 2


class Optimizer1State(Optimizer8bit):
    """Base of the optimizers with one state tensor (SGD, RMSprop, Adagrad, Lion, LARS)."""

    num_states = 1
