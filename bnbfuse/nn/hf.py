"""Hugging Face seams of a fused token embedding: output heads, the saved-config marker,
exact reload, resizing the new-token table, and PEFT's adapter checkpoints.

``add_fusion_tokens`` records what it built in ``model.config.bnbfuse_fusion`` (a plain dict,
written to ``config.json`` by ``save_pretrained``). A stock ``from_pretrained`` cannot use it:
a quantized base is saved as ``weight_codes``/``weight_absmax``/``weight_qmap``, so the float
``embed_tokens.weight`` it expects is missing (transformers reports it as newly initialized)
instead of being filled with codes. :func:`from_pretrained_fused` reads the marker and
rebuilds the FusionEmbedding from the saved tensors, bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Optional

import torch

from .. import row_quantization as rq
from ._override import keep_32bit_state
from .fusion_embedding import FusionEmbedding

__all__ = ["MARKER", "from_pretrained_fused", "resize_fusion_tokens"]

MARKER = "bnbfuse_fusion"  # the config attribute add_fusion_tokens writes


# ---- configs and heads -------------------------------------------------------------------------
def _configs(model) -> list:
    """The model's config and, for composite models, its text config (deduplicated)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    out = [cfg]
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        text = get_text(decoder=True)
        if text is not None and text is not cfg:
            out.append(text)
    return out


def output_head(model) -> Optional[torch.nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def is_tied(model, embedding: torch.nn.Module) -> bool:
    """Whether the head shares the embedding's table now or ``tie_weights()`` would tie it."""
    head = output_head(model)
    if head is None:
        return False
    flag = any(getattr(c, "tie_word_embeddings", False) for c in _configs(model))
    return flag or getattr(head, "weight", None) is getattr(embedding, "weight", None)


def _untie_config(model) -> None:
    for c in _configs(model):
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False


def _set_vocab_size(model, n: int) -> None:
    for c in _configs(model):
        if hasattr(c, "vocab_size"):
            c.vocab_size = n


def _new_rows(table: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows at the mean of ``table``'s rows plus 1% of their spread (float32)."""
    w = table.detach().float()
    mean = w.mean(0)
    std = w.std(0) if w.shape[0] > 1 else torch.zeros_like(mean)
    return mean + 0.01 * std * torch.randn(n, w.shape[1], device=w.device)


@torch.no_grad()
def _resized_head(head: torch.nn.Module, rows: int) -> torch.nn.Linear:
    """A copy of linear ``head`` with ``rows`` output rows (kept rows copied, new ones drawn)."""
    w = head.weight
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the output head must be an nn.Linear to be resized, got "
                        f"{type(head).__name__}")
    bias = head.bias
    new = torch.nn.Linear(w.shape[1], rows, bias=bias is not None, device=w.device, dtype=w.dtype)
    keep = min(rows, w.shape[0])
    new.weight[:keep] = w[:keep]
    if rows > keep:
        new.weight[keep:] = _new_rows(w, rows - keep).to(w.dtype)
    if bias is not None:
        new.bias[:keep] = bias[:keep]
        new.bias[keep:] = bias.detach().mean()
    return new


def adapt_head(model, old: torch.nn.Module, num_new_tokens: int, *, tied: bool,
               untie_head: bool, extend_head: bool) -> None:
    """The output-head part of ``add_fusion_tokens`` (called before the swap)."""
    if tied and not (untie_head or extend_head):
        raise ValueError(
            "this model ties its output head to the input embedding (tie_word_embeddings="
            "True); a FusionEmbedding cannot share its tables with the head, and the head "
            "would silently keep training the old float table. Pass untie_head=True (the head "
            "keeps its own copy of the table) or extend_head=True (the head also gets rows "
            "for the new tokens); either sets tie_word_embeddings=False")
    if not (tied or extend_head):
        return
    head = output_head(model)
    if head is None or not callable(getattr(model, "set_output_embeddings", None)):
        raise ValueError(f"{type(model).__name__} has no get_output_embeddings/"
                         "set_output_embeddings: extend its head by hand")
    if extend_head:
        model.set_output_embeddings(_resized_head(head, head.weight.shape[0] + num_new_tokens))
        _set_vocab_size(model, head.weight.shape[0] + num_new_tokens)
    elif head.weight is old.weight:
        head.weight = torch.nn.Parameter(old.weight.detach().clone(),
                                         requires_grad=old.weight.requires_grad)
    _untie_config(model)


# ---- the marker ------------------------------------------------------------------------------
def module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("the FusionEmbedding is not a submodule of the model")


def record(model, emb: FusionEmbedding, path: str) -> None:
    """Writes the marker into ``model.config`` (models without a config: nothing)."""
    configs = _configs(model)
    if not configs or not hasattr(configs[0], "to_dict"):
        return
    setattr(configs[0], MARKER, {
        "format": 1, "module": path, "vocab_size": emb.vocab_size,
        "fusion_vocab_size": emb.fusion_vocab_size, "embed_dim": emb.dim,
        "base_quant": emb.base_quant, "blocksize": emb.blocksize,
        "padding_idx": emb.padding_idx})


def _marker(config) -> dict:
    marker = getattr(config, MARKER, None)
    if not isinstance(marker, dict) or marker.get("format") != 1:
        raise ValueError(f"the config has no {MARKER} entry: the checkpoint was not saved "
                         "from a model changed by bnbfuse.nn.add_fusion_tokens")
    return marker


# ---- exact reload ----------------------------------------------------------------------------
def _checkpoint_files(path: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, n) for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path!r}")


def _read_prefixed(path: str, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` in the checkpoint files of directory ``path``, prefix
    removed."""
    out: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    if k.startswith(prefix):
                        out[k[len(prefix):]] = f.get_tensor(k)
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
            out.update({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return out


@contextlib.contextmanager
def _transformers_quiet():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def from_pretrained_fused(model_cls, path: str, **kwargs):
    """``model_cls.from_pretrained(path, **kwargs)`` for a checkpoint saved after
    :func:`add_fusion_tokens`: the FusionEmbedding is rebuilt from the saved tensors (codes,
    scales, map and new-token table bit for bit), everything else loads as usual.

    ``path`` is a directory written by ``save_pretrained`` (safetensors or ``.bin``, sharded
    or not). transformers first builds and initializes a float embedding, which is then
    replaced; keys other than the embedding's that it reports missing or unexpected are
    warned about here.

    Example:
        >>> import tempfile, torch, bnbfuse as bnb
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=False)
        >>> model = LlamaForCausalLM(cfg)
        >>> emb = bnb.nn.add_fusion_tokens(model, 4, base_quant="int8", extend_head=True)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     model.save_pretrained(d)
        ...     again = bnb.nn.from_pretrained_fused(LlamaForCausalLM, d)
        >>> torch.equal(again.model.embed_tokens.embedding.weight, emb.embedding.weight)
        True
    """
    config = kwargs.pop("config", None)
    if config is None:
        config = model_cls.config_class.from_pretrained(path)
    marker = _marker(config)
    prefix = marker["module"] + "." if marker["module"] else ""
    # With the head extended, config.vocab_size counts the new tokens and a plain base's
    # saved "weight" has fewer rows than the embedding transformers builds: let it pass
    # (that embedding is replaced) and report other mismatches below.
    kwargs.setdefault("ignore_mismatched_sizes", True)
    with _transformers_quiet():
        model, info = model_cls.from_pretrained(path, config=config, output_loading_info=True,
                                                **kwargs)
    parent, name = _parent(model, marker["module"])
    old = getattr(parent, name)
    dtype = old.weight.dtype if isinstance(getattr(old, "weight", None), torch.Tensor) else None
    emb = FusionEmbedding(marker["vocab_size"], marker["fusion_vocab_size"], marker["embed_dim"],
                          base_quant=marker["base_quant"], blocksize=marker["blocksize"],
                          padding_idx=marker["padding_idx"], device="meta", dtype=dtype)
    emb.to_empty(device=old.weight.device if dtype is not None else "cpu")
    saved = _read_prefixed(path, prefix)
    emb.load_state_dict(saved, strict=True)
    setattr(parent, name, emb)
    ours = {prefix + k for k in saved} | {prefix + "weight"}
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m
                  for m in info.get("mismatched_keys") or []]
    other = sorted((set(info["missing_keys"]) | set(info["unexpected_keys"])
                    | set(mismatched)) - ours)
    if other:
        warnings.warn(f"from_pretrained_fused: keys missing, unexpected or of another shape "
                      f"outside the fused embedding: {other}", stacklevel=2)
    return model


def _parent(model, path: str):
    parts = path.split(".")
    parent = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
    return parent, parts[-1]


# ---- resizing the new-token table ------------------------------------------------------------
@torch.no_grad()
def _base_rows_stats(emb: FusionEmbedding, n: int) -> torch.Tensor:
    """``n`` new rows drawn like ``from_embedding`` does, from the base table (read in chunks
    when it is quantized, so the float table never exists whole)."""
    if not emb.quantized:
        return _new_rows(emb.embedding.weight, n)
    e, total, sq = emb.embedding, 0.0, 0.0
    for r0 in range(0, emb.vocab_size, 8192):
        w = rq.dequantize_table(e.weight[r0:r0 + 8192], e.absmax[r0:r0 + 8192], e.scheme,
                                e.blocksize, e.embedding_dim, torch.float32, qmap=e.qmap)
        total, sq = total + w.sum(0), sq + (w * w).sum(0)
    v = emb.vocab_size
    mean = total / v
    std = ((sq - v * mean * mean) / max(v - 1, 1)).clamp_min(0).sqrt()
    return mean + 0.01 * std * torch.randn(n, emb.dim, device=mean.device)


@torch.no_grad()
def resize_fusion_tokens(model, num_new_tokens: int, *, attr: Optional[str] = None
                         ) -> FusionEmbedding:
    """Changes the number of new tokens of the model's FusionEmbedding to ``num_new_tokens``
    (bnbfuse's ``resize_token_embeddings``): kept rows are copied, added ones start like
    ``add_fusion_tokens``'s. An output head extended for the new tokens (``V + F`` rows) is
    resized with them and ``config.vocab_size`` follows. Build the optimizer afterwards: the
    new-token table is a new Parameter.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> model = torch.nn.Sequential()
        >>> model.tok = torch.nn.Embedding(10, 4)
        >>> emb = bnb.nn.add_fusion_tokens(model, 2, attr="tok")
        >>> bnb.nn.resize_fusion_tokens(model, 5, attr="tok").num_embeddings
        15
    """
    if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int) or num_new_tokens < 0:
        raise ValueError(f"num_new_tokens must be an int >= 0, got {num_new_tokens!r}")
    if attr is None:
        emb = model.get_input_embeddings()
    else:
        emb = model.get_submodule(attr)
    if not isinstance(emb, FusionEmbedding):
        raise TypeError(f"the token embedding is a {type(emb).__name__}, not a FusionEmbedding "
                        "(use add_fusion_tokens first)")
    old = emb.fusion_embedding.weight
    keep = min(num_new_tokens, old.shape[0])
    table = torch.nn.Embedding(num_new_tokens, emb.dim, device=old.device, dtype=old.dtype)
    table.weight[:keep] = old[:keep]
    if num_new_tokens > keep:
        table.weight[keep:] = _base_rows_stats(emb, num_new_tokens - keep).to(old.dtype)
    table.weight.requires_grad_(old.requires_grad)
    keep_32bit_state(table, "weight")
    head = output_head(model)
    if head is not None and head.weight.shape[0] == emb.vocab_size + emb.fusion_vocab_size:
        model.set_output_embeddings(_resized_head(head, emb.vocab_size + num_new_tokens))
        _set_vocab_size(model, emb.vocab_size + num_new_tokens)
    emb.fusion_embedding = table
    emb.fusion_vocab_size = num_new_tokens
    marker = getattr(getattr(model, "config", None), MARKER, None)
    if isinstance(marker, dict):
        marker["fusion_vocab_size"] = num_new_tokens
    return emb


# ---- PEFT --------------------------------------------------------------------------------------
def warn_if_dropped_by_peft(emb: FusionEmbedding, prefix: str) -> None:
    """Warns (once per module) when a PEFT model's state dict is taken while the new-token
    table is not in ``modules_to_save``: PEFT's adapter checkpoint would leave it out."""
    # A PeftModel names its wrapped model base_model.model; a ModulesToSaveWrapper has
    # modules_to_save.
    if not prefix.startswith("base_model.model.") or emb.fusion_vocab_size == 0:
        return
    if hasattr(emb.fusion_embedding, "modules_to_save") or emb.__dict__.get("_peft_warned"):
        return
    emb.__dict__["_peft_warned"] = True
    trained = emb.fusion_embedding.weight.requires_grad
    warnings.warn(
        f"{prefix}fusion_embedding (the {emb.fusion_vocab_size} new-token rows) is "
        f"{'trainable' if trained else 'frozen'} but not in the PEFT config's modules_to_save, "
        "so PeftModel.save_pretrained leaves it out of the adapter and a reload gets other "
        "rows. Pass modules_to_save=['fusion_embedding'] to LoraConfig (see "
        "docs/guide-add-tokens.md)", UserWarning, stacklevel=4)
