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
from typing import Any, Optional

import torch

from .. import paged
from ..distributed import dtensor_optimizer_state_dict, is_dtensor, to_local
from ..ops.optimizer import KernelHyperparams
from ..ops.rules import rule
from . import checkpoint, compat, state8bit
from .manager import GlobalOptimManager

__all__ = ["Optimizer8bit", "Optimizer1State", "Optimizer2State"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _global_sum(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Sums a per-shard partial sum over the mesh dimensions ``p`` is sharded on."""
    if is_dtensor(p):
        import torch.distributed as dist

        for dim, placement in enumerate(p.placements):
            if placement.is_shard():
                dist.all_reduce(t, group=p.device_mesh.get_group(dim))
    return t


_SUM_BLOCK = 4096       # elements per partial sum of _finite_square_sum
_SUM_CHUNK = 256 * _SUM_BLOCK  # elements converted to float64 at once (bounds the memory)


def _finite_square_sum(g: torch.Tensor) -> torch.Tensor:
    """sum(g**2) over the finite elements of ``g``, in float64, as a 1-element tensor.

    The same bits whatever ``torch.get_num_threads()`` is: squares go into fixed blocks of
    ``_SUM_BLOCK``, each summed by one thread (a row reduction), and the block sums are
    reduced the same way until one block is left, which is summed serially (below torch's
    parallel grain). A plain ``torch.sum`` splits the work by thread count.
    """
    def rows(x: torch.Tensor) -> torch.Tensor:
        pad = -x.numel() % _SUM_BLOCK
        return torch.nn.functional.pad(x, (0, pad)).view(-1, _SUM_BLOCK).sum(1)

    flat = g.reshape(-1)
    parts = [rows(torch.where(torch.isfinite(c), c, 0).double().square_())
             for c in flat.split(_SUM_CHUNK)] or [flat.new_zeros(1, dtype=torch.float64)]
    total = torch.cat(parts)
    while total.numel() > _SUM_BLOCK:
        total = rows(total)
    return total.sum().reshape(1)


def _check_range(name: str, value, low: float, high: float = math.inf, *,
                 high_open: bool = False) -> None:
    v = float(value)
    if not (low <= v and (v < high if high_open else v <= high)) or math.isnan(v):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {bound})")


class Optimizer8bit(torch.optim.Optimizer):
    """Base of the bnbfuse optimizers (bitsandbytes' ``Optimizer8bit``).

    Subclasses set ``optimizer_name`` (the kernel's update rule, a key of
    ``bnbfuse.ops.rules.RULES``, which also fixes the number of states) and implement
    ``_kernel_hparams``. Users construct the subclasses (``AdamW8bit``, ...).

    Args:
        params: iterable of parameters or of param-group dicts.
        defaults: the subclass's hyper-parameters (``lr`` and its own names: ``betas``,
            ``momentum``, ``alpha``...).
        optim_bits: 8 or 32, the precision of the state.
        args: bitsandbytes' argument object (or a dict); its ``optim_bits``,
            ``min_8bit_size``, ``percentile_clipping``, ``max_unorm`` replace the arguments.
        min_8bit_size: parameters with fewer elements (global size) keep 32-bit state.
        is_paged: keep large states (>= 100,000 elements) of CUDA parameters in CUDA managed
            memory, prefetched before each step (bnbfuse.paged); a no-op on the CPU.
        max_unorm: clip the update so that ``||update|| <= max_unorm * ||p||`` (0 = off).
        percentile_clipping: clip each gradient's norm at this percentile of its last 100
            norms (100 = off).
    """

    optimizer_name: str = ""
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
            is_paged = is_paged or bool(get("is_paged", False))
        defaults = dict(defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size,
                        max_unorm=max_unorm, percentile_clipping=percentile_clipping)
        self._validate(defaults)
        super().__init__(params, defaults)
        # bitsandbytes' attributes: the argument object its code reads, the paging switch
        # and the page manager. Paging moves state to CUDA managed memory; on the CPU it is
        # a no-op, so a paged optimizer computes exactly what its unpaged twin computes.
        self.args = compat.optimizer_args(args, optim_bits=optim_bits,
                                          min_8bit_size=min_8bit_size, max_unorm=max_unorm,
                                          percentile_clipping=percentile_clipping,
                                          is_paged=bool(is_paged))
        self.is_paged = bool(is_paged)
        self.page_mng = paged.GlobalPageManager.get_instance()
        # Created here, outside any compiled step (first use takes a lock Dynamo cannot trace)
        self.mng = GlobalOptimManager.get_instance()
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
        self.__dict__.setdefault("page_mng", paged.GlobalPageManager.get_instance())

    # ---- hooks for subclasses -------------------------------------------------------------
    @property
    def num_states(self) -> int:
        """1 or 2: how many state tensors the rule keeps (``bnbfuse.ops.rules``)."""
        return rule(self.optimizer_name).states

    def _kernel_hparams(self, cfg: dict[str, Any], step: int) -> dict[str, Any]:
        """Maps a parameter's settings to the kernel's (the fields of
        ``bnbfuse.ops.optimizer.KernelHyperparams`` but ``step`` and ``gnorm_scale``);
        missing ones are 0/False."""
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
        checkpoint.refuse_torch_flags(name, group)
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
        local = to_local(p)
        state8bit.init_state(state, self.optimizer_name, local, eight_bit=self._uses_8bit(p, cfg),
                             init1=self._init_state1(local, cfg),
                             percentile_clipping=cfg["percentile_clipping"])
        if self.is_paged:
            compat.page_state(state)

    # ---- the step -------------------------------------------------------------------------
    # Opaque to torch.compile: each parameter's update is already one fused native kernel, so
    # a traced step has nothing to fuse, and it would recompile at every step (the step count
    # is a Python int, bitsandbytes' state format). Measured: no faster even with its guards
    # held (docs/optimizers.md, "torch.compile"). A compiled training step calls it as one
    # eager call (a single graph break) instead of tracing it.
    @torch.compiler.disable
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
        if is_dtensor(grad) and any(pl.is_partial() for pl in grad.placements):
            # Tensor parallelism leaves some gradients as per-rank partial sums (torch.optim's
            # DTensor ops reduce them implicitly): reduce to the parameter's layout first.
            grad = grad.redistribute(grad.device_mesh, p.placements)
        p_local, g_local = to_local(p), to_local(grad)
        if g_local.shape != p_local.shape:
            raise RuntimeError(f"{name}: gradient shape {tuple(g_local.shape)} does not match "
                               f"parameter shape {tuple(p_local.shape)}")
        if tuple(state["state1"].shape) != state8bit.state1_shape(self.optimizer_name, p_local):
            raise RuntimeError(f"{name}: a parameter of shape {tuple(p_local.shape)} has state "
                               f"of shape {tuple(state['state1'].shape)}: it changed shape "
                               "after its state was created; drop the old state with "
                               "`del optimizer.state[param]` (or build a new optimizer)")
        step = state["step"]
        if type(step) is not int or not 0 <= step < 2**63 - 1:  # (an int: no message to build)
            step = state8bit.step_count(
                step, f"{name}: state of a parameter of shape {tuple(p_local.shape)}")
        step = state["step"] = step + 1
        if p.numel() == 0:
            return
        if "gnorm_vec" not in state and cfg["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros(state8bit.GRADIENT_NORM_HISTORY,
                                             dtype=torch.float32, device=p_local.device)
        work = p_local if p_local.is_contiguous() else p_local.contiguous()
        g = g_local.to(dtype=p.dtype).contiguous()
        hparams = KernelHyperparams(
            **{k: (bool(v) if k == "nesterov" else float(v))
               for k, v in self._kernel_hparams(cfg, step).items()},
            step=step, gnorm_scale=self._gradient_scale(p, g, state, cfg, step))
        eightbit = state["state1"].dtype == torch.uint8
        s1, s2 = state["state1"], state.get("state2")
        if self.is_paged:
            compat.prefetch_state(state)
        update_scale = 1.0
        if self._needs_norms(cfg):
            if eightbit:
                norms = torch.ops.bnbfuse.optimizer_norms_8bit_blockwise(
                    self.optimizer_name, work, g, s1, s2, state["absmax1"], state.get("absmax2"),
                    state["qmap1"], state.get("qmap2"), *hparams)
            else:
                norms = torch.ops.bnbfuse.optimizer_norms_32bit(
                    self.optimizer_name, work, g, s1, s2, *hparams)
            norms = _global_sum(norms.to(torch.float64), p).sqrt().tolist()
            update_scale = float(self._update_scale(cfg, norms[0], norms[1]))
        if eightbit:
            torch.ops.bnbfuse.optimizer_update_8bit_blockwise(
                self.optimizer_name, work, g, s1, s2, state["absmax1"], state.get("absmax2"),
                state["qmap1"], state.get("qmap2"), *hparams, update_scale)
        else:
            torch.ops.bnbfuse.optimizer_update_32bit(
                self.optimizer_name, work, g, s1, s2, *hparams, update_scale)
        if work is not p_local:
            p_local.copy_(work)

    def _gradient_scale(self, p, g, state, cfg, step) -> float:
        """Percentile clipping (Dettmers et al. 2022): the factor that brings this gradient's
        norm down to the ``percentile_clipping``-th percentile of its last 100 norms.

        Non-finite elements are left out of the norm, as the update leaves them out too. The
        norm is a fixed blocked float64 sum (``_finite_square_sum``): the same whatever the
        thread count, as the ``max_unorm``/LAMB/LARS norms are.
        """
        pc = cfg["percentile_clipping"]
        if pc >= 100:
            return 1.0
        sq = _global_sum(_finite_square_sum(g), p)
        history = state["gnorm_vec"]
        slot = (step - 1) % len(history)
        history[slot] = sq[0]
        seen = history[: min(step, len(history))]
        clip_sq = torch.quantile(seen.double(), pc / 100.0, interpolation="lower")
        current, clip_sq = float(history[slot]), float(clip_sq)  # both float32-rounded
        if current > clip_sq and current > 0:
            return math.sqrt(clip_sq / current)
        return 1.0

    # ---- state dicts (bnbfuse/optim/checkpoint.py) ---------------------------------------
    def state_dict(self) -> dict:
        """``torch.optim``'s state dict with bitsandbytes' state keys. The per-shard state of
        DTensor (FSDP2) parameters comes as DTensors, so ``torch.distributed.checkpoint``
        saves every rank's shard."""
        return dtensor_optimizer_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state from :meth:`state_dict` (or a bitsandbytes optimizer's).

        State tensors keep their dtype (8-bit codes stay codes) and move to each parameter's
        device; they are copied, so the loaded optimizer never aliases ``state_dict``.
        Mismatched groups, keys or shapes raise ``ValueError``, and so do values a step would
        turn into NaN parameters (NaN/Inf or negative ``absmax``; a ``qmap`` that is not
        finite, within [-1, 1] and ascending) and a dict without ``"state"``; so does a
        ``torch.optim`` state dict (:meth:`load_torch_state_dict` converts those). Hooks registered with
        ``register_load_state_dict_pre_hook``/``post_hook`` run as in ``torch.optim``: the
        pre-hooks on (a shallow copy of) the dict as given, the post-hooks once the state is
        loaded.
        """
        checkpoint.load_state_dict(self, state_dict)
        self._page_all()

    def _load_groups(self, groups: list) -> None:
        """torch.optim's own load of the param groups alone (checkpoint.load_state_dict)."""
        super().load_state_dict({"state": {}, "param_groups": groups})

    # ---- torch.optim interoperability -----------------------------------------------------
    def _torch_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """Constructor kwargs of the torch.optim counterpart for this group."""
        raise NotImplementedError

    def _from_torch_group(self, tgroup: dict[str, Any]) -> dict[str, Any]:
        """Settings of ours taken from a torch.optim group (raises for unsupported ones)."""
        raise NotImplementedError

    def torch_state_dict(self) -> dict:
        """This optimizer's state as the state dict of its ``torch.optim`` counterpart.

        8-bit state is dequantized to float32 (``state1`` → ``exp_avg``, ``state2`` →
        ``exp_avg_sq`` for Adam/AdamW; ``momentum_buffer`` for SGD, ``square_avg`` for
        RMSprop, ``sum`` for Adagrad). Load it with ``torch.optim.X.load_state_dict`` on the
        same parameters. Settings torch does not have (optim_bits, ...) are dropped.
        """
        return checkpoint.torch_state_dict(self)

    def load_torch_state_dict(self, state_dict: dict) -> None:
        """Loads the state dict of the ``torch.optim`` counterpart (quantizing into 8-bit
        state where this optimizer keeps 8-bit state), so a run can switch mid-training.

        The torch groups' hyper-parameters (lr, betas, eps, weight_decay, ...) replace ours;
        parameters map by position, as in ``torch.optim``. Unsupported torch settings
        (``amsgrad=True``, ``maximize=True``, ...) raise ``ValueError``, and so does a NaN/Inf
        moment of a parameter with 8-bit state (one would corrupt its whole 256-element
        block); 32-bit state takes it, as ``torch.optim`` does.
        """
        checkpoint.load_torch_state_dict(self, state_dict)
        self._page_all()

    def _page_all(self) -> None:
        """Loaded state arrives in ordinary memory: a paged optimizer pages it again."""
        if self.is_paged:
            for state in self.state.values():
                compat.page_state(state)


class Optimizer2State(Optimizer8bit):
    """Base of the optimizers with two state tensors (Adam, AdamW, AdEMAMix, LAMB); the
    count itself comes from the rule table."""


class Optimizer1State(Optimizer8bit):
    """Base of the optimizers with one state tensor (SGD, RMSprop, Adagrad, Lion, LARS); the
    count itself comes from the rule table."""
