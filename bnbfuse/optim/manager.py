"""The override registry: per-parameter optimizer settings (``GlobalOptimManager``).

Same API as bitsandbytes. Overrides are keyed by the parameter object (and, for module
overrides, by the module and attribute name, resolved when the optimizer first creates
the parameter's state), which fixes three bitsandbytes problems:

- overrides registered for one model never reach another optimizer's parameter that
  happens to sit at the same position;
- overriding one parameter never changes its siblings;
- a module override registered when the module is built (embeddings do this) survives
  ``.to()``, ``load_state_dict(assign=True)`` or sharding replacing the Parameter object,
  and ``copy.deepcopy`` of the model (EMA or teacher copies) or pickling it whole carries
  it to the copy.

``register_parameters`` is accepted for compatibility; it is not required.
"""
from __future__ import annotations

import threading
import weakref
from copy import deepcopy
from typing import Any, Iterable, Optional

import torch


class GlobalOptimManager:
    """Process-wide registry of optimizer config overrides.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> emb = torch.nn.Embedding(10, 4)
        >>> mng = bnb.optim.GlobalOptimManager.get_instance()
        >>> mng.override_config(emb.weight, "optim_bits", 32)
        >>> mng.get_config(emb.weight)
        {'optim_bits': 32}
    """

    _instance: Optional["GlobalOptimManager"] = None
    _lock = threading.Lock()

    def __init__(self):
        raise RuntimeError("use GlobalOptimManager.get_instance()")

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        inst = cls._instance
        if inst is not None:  # no lock once created: torch.compile traces this path
            return inst
        with cls._lock:
            if cls._instance is None:
                inst = cls.__new__(cls)
                inst.initialize()
                cls._instance = inst
        return cls._instance

    def initialize(self) -> None:
        """Forgets every override."""
        # id(param) -> (weakref(param), config); the weakref guards against id reuse.
        self._param_configs: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}
        # id(module) -> (weakref(module), its _ModuleOverrides)
        self._module_configs: dict[int, tuple[weakref.ref, _ModuleOverrides]] = {}
        self.uses_config_override = False  # bitsandbytes attribute

    # ---- bitsandbytes API ----
    def register_parameters(self, params) -> None:
        """Accepted for bitsandbytes compatibility; overrides do not need it."""
        for p in _as_param_list(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"register_parameters takes tensors, got {type(p).__name__}")

    def override_config(self, parameters, key: Optional[str] = None, value: Any = None,
                        key_value_dict: Optional[dict[str, Any]] = None) -> None:
        """Sets ``key = value`` (or every item of ``key_value_dict``) for these parameters."""
        updates = dict(key_value_dict or {})
        if key is not None:
            updates[key] = value
        if not updates:
            raise ValueError("override_config needs key/value or key_value_dict")
        for p in _as_param_list(parameters):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"override_config takes tensors, got {type(p).__name__}")
            entry = self._param_configs.get(id(p))
            if entry is None or entry[0]() is not p:
                entry = (weakref.ref(p, self._forget(self._param_configs, id(p))), {})
                self._param_configs[id(p)] = entry
            entry[1].update(updates)
        self.uses_config_override = True

    def register_module_override(self, module: torch.nn.Module, param_name: str,
                                 config: dict[str, Any]) -> None:
        """Applies ``config`` to whatever parameter ``module.<param_name>`` is when an
        optimizer first creates its state."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        self._module_overrides(module).setdefault(param_name, {}).update(config)
        self.uses_config_override = True

    def _module_overrides(self, module: torch.nn.Module) -> "_ModuleOverrides":
        """The module's registered overrides, created (and kept on the module) if new."""
        entry = self._module_configs.get(id(module))
        if entry is None or entry[0]() is not module:
            overrides = _ModuleOverrides(module)
            # In __dict__ directly: nn.Module.__setattr__ is not needed for a plain value,
            # and a module being rebuilt by deepcopy has no _parameters yet.
            module.__dict__[_MODULE_ATTR] = overrides
            entry = (weakref.ref(module, self._forget(self._module_configs, id(module))),
                     overrides)
            self._module_configs[id(module)] = entry
        return entry[1]

    def _is_registered(self, module: torch.nn.Module, overrides: "_ModuleOverrides") -> bool:
        entry = self._module_configs.get(id(module))
        return entry is not None and entry[0]() is module and entry[1] is overrides

    # ---- lookup ----
    def get_config(self, p: torch.Tensor) -> dict[str, Any]:
        """The merged overrides for parameter ``p`` (module overrides first, then direct)."""
        config: dict[str, Any] = {}
        for ref, per_name in list(self._module_configs.values()):
            module = ref()
            if module is None:
                continue
            for name, cfg in per_name.items():
                if _module_param(module, name) is p:
                    config.update(cfg)
        entry = self._param_configs.get(id(p))
        if entry is not None and entry[0]() is p:
            config.update(entry[1])
        return config

    @staticmethod
    def _forget(table: dict, key: int):
        def callback(ref):
            current = table.get(key)
            if current is not None and current[0] is ref:
                del table[key]
        return callback


_MODULE_ATTR = "_bnbfuse_optim_overrides"


class _ModuleOverrides(dict):
    """``{param_name: config}`` registered for one module, also kept on the module itself.

    ``copy.deepcopy(model)`` copies each module's attributes, this one included; deepcopy's
    memo already maps the module to its copy by then, so the copy is registered with the
    same overrides. Pickling (``torch.save(model)``) saves the module with them, and
    unpickling registers the loaded module (pickle rebuilds the module object before its
    attributes). An entry the registry has forgotten (``initialize()``) copies inert.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self._owner = weakref.ref(module)

    def __deepcopy__(self, memo):
        owner = self._owner()
        copy_of_owner = memo.get(id(owner)) if owner is not None else None
        mng = GlobalOptimManager.get_instance()
        if isinstance(copy_of_owner, torch.nn.Module) and mng._is_registered(owner, self):
            result = mng._module_overrides(copy_of_owner)
        else:
            result = {}  # not a module copy, or no longer registered: plain data
        for name, config in self.items():
            result.setdefault(name, {}).update(deepcopy(config, memo))
        return result

    def __reduce__(self):
        owner = self._owner()
        if owner is None or not GlobalOptimManager.get_instance()._is_registered(owner, self):
            return (dict, (dict(self),))
        return (_register_loaded, (owner, dict(self)))


def _register_loaded(module, overrides: dict) -> dict:
    """Unpickling: registers the module being loaded with its saved overrides."""
    if not isinstance(module, torch.nn.Module):
        return overrides
    result = GlobalOptimManager.get_instance()._module_overrides(module)
    for name, config in overrides.items():
        result.setdefault(name, {}).update(config)
    return result


def _module_param(module: torch.nn.Module, name: str):
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _as_param_list(params) -> list:
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, Iterable):
        return list(params)
    return [params]


def keep_32bit_embeddings(model: torch.nn.Module) -> int:
    """Registers 32-bit optimizer state for the weight of every ``nn.Embedding`` in ``model``.

    Returns the number of embeddings registered.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 8))
        >>> bnb.optim.keep_32bit_embeddings(model)
        1
    """
    mng = GlobalOptimManager.get_instance()
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            mng.register_module_override(module, "weight", {"optim_bits": 32})
            count += 1
    return count
