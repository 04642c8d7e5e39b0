"""The override registry: per-parameter optimizer settings (``GlobalOptimManager``).

Same API as bitsandbytes. Overrides are keyed by the parameter object (and, for module
overrides, by the module and attribute name, resolved when the optimizer first creates
the parameter's state), which fixes three bitsandbytes problems:

- overrides registered for one model never reach another optimizer's parameter that
  happens to sit at the same position;
- overriding one parameter never changes its siblings;
- a module override registered when the module is built (embeddings do this) survives
  ``.to()``, ``load_state_dict(assign=True)`` or sharding replacing the Parameter object.

``register_parameters`` is accepted for compatibility; it is not required.
"""
from __future__ import annotations

import threading
import weakref
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
        # id(module) -> (weakref(module), {param_name: config})
        self._module_configs: dict[int, tuple[weakref.ref, dict[str, dict[str, Any]]]] = {}
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
        entry = self._module_configs.get(id(module))
        if entry is None or entry[0]() is not module:
            entry = (weakref.ref(module, self._forget(self._module_configs, id(module))), {})
            self._module_configs[id(module)] = entry
        entry[1].setdefault(param_name, {}).update(config)
        self.uses_config_override = True

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
