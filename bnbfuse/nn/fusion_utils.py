"""Fusion helpers (torchtune API) and the one-call token-embedding swap."""
from __future__ import annotations

import functools
from typing import Iterable, Optional

import torch

from .. import row_quantization as rq
from .fusion_embedding import FusionEmbedding

__all__ = ["register_fusion_module", "get_fusion_params", "set_trainable_params",
           "add_fusion_tokens"]


def _all_param_names(module: torch.nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


def register_fusion_module(module: torch.nn.Module) -> torch.nn.Module:
    """Marks every parameter of ``module`` as a fusion parameter (adds ``fusion_params()``).

    Args:
        module: a new module added to a pretrained model (a projection head, an adapter).

    Returns:
        ``module`` itself.

    Example:
        >>> import torch
        >>> from bnbfuse.nn import register_fusion_module
        >>> head = register_fusion_module(torch.nn.Linear(4, 2))
        >>> head.fusion_params()
        ['weight', 'bias']
    """
    module.fusion_params = functools.partial(_all_param_names, module)
    return module


def get_fusion_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Full names → parameters of every module's ``fusion_params()`` in ``model``.

    Example:
        >>> import torch
        >>> from bnbfuse.nn import FusionEmbedding, get_fusion_params
        >>> model = torch.nn.Sequential(FusionEmbedding(10, 2, 4), torch.nn.Linear(4, 4))
        >>> list(get_fusion_params(model))
        ['0.fusion_embedding.weight']
    """
    result: dict[str, torch.nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        names = getattr(module, "fusion_params", None)
        if not callable(names):
            continue
        wanted = list(names())
        params = dict(module.named_parameters())
        missing = [n for n in wanted if n not in params]
        if missing:
            raise ValueError(f"{mod_name or type(module).__name__}.fusion_params() names "
                             f"parameters it does not have: {missing}")
        for n in wanted:
            result[f"{mod_name}.{n}" if mod_name else n] = params[n]
    return result


def set_trainable_params(model: torch.nn.Module, trainable_param_names: Iterable[str]) -> None:
    """``requires_grad = True`` exactly for the named parameters of ``model``, False otherwise.

    Raises:
        ValueError: a name is not a parameter of ``model`` (a typo would silently freeze all).

    Example:
        >>> import torch
        >>> from bnbfuse.nn import FusionEmbedding, get_fusion_params, set_trainable_params
        >>> model = torch.nn.Sequential(FusionEmbedding(10, 2, 4), torch.nn.Linear(4, 4))
        >>> set_trainable_params(model, get_fusion_params(model))
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['0.fusion_embedding.weight']
    """
    names = set(trainable_param_names)
    params = dict(model.named_parameters())
    unknown = sorted(names - params.keys())
    if unknown:
        raise ValueError(f"not parameters of the model: {unknown}")
    for name, p in params.items():
        p.requires_grad_(name in names)


def _resolve(model: torch.nn.Module, attr: str):
    parent = model
    parts = attr.split(".")
    for part in parts[:-1]:
        if not hasattr(parent, part):
            raise AttributeError(f"{type(model).__name__} has no submodule {attr!r} ({part!r} "
                                 f"not found)")
        parent = getattr(parent, part)
    if not hasattr(parent, parts[-1]):
        raise AttributeError(f"{type(model).__name__} has no attribute {attr!r}")
    return parent, parts[-1]


def add_fusion_tokens(model: torch.nn.Module, num_new_tokens: int, *, attr: Optional[str] = None,
                      base_quant: Optional[str] = None, blocksize: int = rq.DEFAULT_BLOCKSIZE,
                      extend_head: bool = False, untie_head: bool = False) -> FusionEmbedding:
    """Swaps the token embedding of ``model`` for a :class:`FusionEmbedding`, in place.

    Ids ``[0, V)`` keep their pretrained rows; ids ``[V, V + num_new_tokens)`` get new
    trainable rows. The embedding is found with ``model.get_input_embeddings()`` /
    ``set_input_embeddings()`` (Hugging Face transformers models) or, with ``attr``, by a
    dotted attribute path (``"tok_embeddings"``, ``"model.embed_tokens"``).

    The output head (``get_output_embeddings``): by default it is left alone, so new tokens
    can be fed in but not predicted. ``extend_head=True`` replaces it by a copy with
    ``num_new_tokens`` more rows (started at the mean of the old rows plus 1% noise) and sets
    ``config.vocab_size`` to its row count. A head *tied* to the embedding
    (``tie_word_embeddings=True``) cannot share a FusionEmbedding's tables: such a model needs
    ``untie_head=True`` (the head keeps a float copy of the old table) or ``extend_head=True``,
    and both set ``tie_word_embeddings=False``, so ``tie_weights()`` leaves the pair alone.

    A Hugging Face model's config records the embedding in ``config.bnbfuse_fusion``;
    :func:`from_pretrained_fused` rebuilds it from a ``save_pretrained`` directory.

    Args:
        model: the model to modify.
        num_new_tokens: rows of the new-token table.
        attr: dotted path of the embedding module; default: ``get_input_embeddings``.
        base_quant: ``None``, ``"int8"`` or ``"nf4"`` for the frozen base.
        blocksize: values per scale block of a quantized base.
        extend_head: give the output head rows for the new tokens.
        untie_head: allow a tied head by giving it its own copy of the table.

    Returns:
        The new :class:`FusionEmbedding` (already in ``model``).

    Raises:
        ValueError: the head is tied and neither ``untie_head`` nor ``extend_head`` is set.

    Example:
        >>> import torch
        >>> from bnbfuse.nn import add_fusion_tokens
        >>> model = torch.nn.Sequential()
        >>> model.tok_embeddings = torch.nn.Embedding(100, 16)
        >>> emb = add_fusion_tokens(model, 4, attr="tok_embeddings", base_quant="int8")
        >>> model.tok_embeddings is emb, emb(torch.tensor([103])).shape
        (True, torch.Size([1, 16]))
    """
    from . import hf

    if attr is None:
        getter = getattr(model, "get_input_embeddings", None)
        setter = getattr(model, "set_input_embeddings", None)
        if not (callable(getter) and callable(setter)):
            raise ValueError(f"{type(model).__name__} has no get_input_embeddings/"
                             f"set_input_embeddings; pass attr='<path of the embedding>'")
        old = getter()
    else:
        parent, name = _resolve(model, attr)
        old = getattr(parent, name)
    if isinstance(old, FusionEmbedding):
        raise ValueError("the token embedding is already a FusionEmbedding (change its "
                         "number of new tokens with bnbfuse.nn.resize_fusion_tokens)")
    if not isinstance(old, torch.nn.Embedding):
        raise TypeError(f"the token embedding must be an nn.Embedding, got {type(old).__name__}")
    path = hf.module_path(model, old)
    new = FusionEmbedding.from_embedding(old, num_new_tokens, base_quant=base_quant,
                                         blocksize=blocksize)
    hf.adapt_head(model, old, num_new_tokens, tied=hf.is_tied(model, old),
                  untie_head=untie_head, extend_head=extend_head)
    if attr is None:
        setter(new)
    else:
        setattr(parent, name, new)
    hf.record(model, new, path)
    return new
