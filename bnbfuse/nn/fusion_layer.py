"""``FusionLayer``: fuse a new layer into a pretrained decoder layer without breaking its keys."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["FusionLayer"]

_CACHE_SETUP = ("setup_caches", "setup_cache")


class FusionLayer(torch.nn.Module):
    """Runs ``fusion_layer`` before (or after) ``layer``, keeping ``layer``'s checkpoint keys.

    The torchtune API (Flamingo-style deep fusion). ``state_dict`` holds ``layer``'s entries
    under their original names (no ``layer.`` prefix) and the new layer's under
    ``fusion_layer.``, so the pretrained checkpoint loads with ``strict=False``. Unlike
    torchtune, the renaming is prefix-exact: only keys that start with this module's own
    prefix are touched, and only that prefix is rewritten, so child names containing
    ``"layer."`` survive and keys of sibling modules are never moved.

    Cache methods (``setup_caches``/``setup_cache``, ``reset_cache``, ``caches_are_setup``,
    ``caches_are_enabled``, ``cache_enabled``) reach whichever of the two layers has them.

    Args:
        layer (nn.Module): the original (pretrained) layer.
        fusion_layer (nn.Module): the new layer.
        fusion_first (bool): run ``fusion_layer`` before ``layer`` (Flamingo) or after.

    Shapes:
        ``x`` ``(B, S, D)`` (whatever the layers take) → same as the layers return.

    Example:
        >>> import torch
        >>> from bnbfuse.nn import FusionLayer
        >>> fused = FusionLayer(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        >>> fused(torch.randn(2, 8)).shape
        torch.Size([2, 8])
        >>> sorted(fused.state_dict())
        ['bias', 'fusion_layer.bias', 'fusion_layer.weight', 'weight']
        >>> fused.fusion_params()
        ['fusion_layer.weight', 'fusion_layer.bias']
    """

    def __init__(self, layer: torch.nn.Module, fusion_layer: torch.nn.Module,
                 fusion_first: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.fusion_layer = fusion_layer
        self.fusion_first = fusion_first
        self.register_state_dict_post_hook(FusionLayer._state_dict_hook)
        self.register_load_state_dict_pre_hook(FusionLayer._load_state_dict_hook)

    # ---- checkpoint keys ---------------------------------------------------------------------
    def _state_dict_hook(self, state_dict, prefix, local_metadata) -> None:
        inner = prefix + "layer."
        for key in [k for k in state_dict if k.startswith(inner)]:
            state_dict[prefix + key[len(inner):]] = state_dict.pop(key)

    def _load_state_dict_hook(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        fusion = prefix + "fusion_layer."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(fusion)]:
            state_dict[prefix + "layer." + key[len(prefix):]] = state_dict.pop(key)

    # ---- caches ------------------------------------------------------------------------------
    def _layers(self):
        return (self.layer, self.fusion_layer)

    def setup_caches(self, *args, **kwargs) -> None:
        """Sets up the key-value caches of both layers (same arguments as theirs)."""
        for layer in self._layers():
            for name in _CACHE_SETUP:
                fn = getattr(layer, name, None)
                if callable(fn):
                    fn(*args, **kwargs)
                    break

    setup_cache = setup_caches

    def reset_cache(self) -> None:
        """Resets both layers' key-value caches."""
        for layer in self._layers():
            fn = getattr(layer, "reset_cache", None)
            if callable(fn):
                fn()

    def _all(self, name: str, call: bool) -> Optional[bool]:
        """Whether every layer that has ``name`` answers true; None if none has it."""
        answers = []
        for layer in self._layers():
            if hasattr(layer, name):
                value = getattr(layer, name)
                answers.append(bool(value() if call and callable(value) else value))
        return all(answers) if answers else None

    def caches_are_setup(self) -> bool:
        """True when every layer with caches has them set up."""
        return bool(self._all("caches_are_setup", call=True))

    def caches_are_enabled(self) -> bool:
        """True when every layer with caches has them enabled."""
        return bool(self._all("caches_are_enabled", call=True))

    @property
    def cache_enabled(self) -> bool:
        """True when every layer with a ``cache_enabled`` flag has it set; for layers without
        one (torchtune's current layers), :meth:`caches_are_enabled`."""
        flags = self._all("cache_enabled", call=False)
        return self.caches_are_enabled() if flags is None else flags

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor, **kwargs) -> Tensor:
        """Both layers with the same keyword arguments, ``fusion_layer`` first by default."""
        if self.fusion_first:
            x = self.fusion_layer(x, **kwargs)
            return self.layer(x, **kwargs)
        x = self.layer(x, **kwargs)
        return self.fusion_layer(x, **kwargs)

    def fusion_params(self) -> list[str]:
        """Names of the fusion layer's parameters, as ``named_parameters`` gives them."""
        return [f"fusion_layer.{k}" for k, _ in self.fusion_layer.named_parameters()]
