"""``FusionEmbedding``: a frozen (optionally 8/4-bit) base vocabulary plus new trainable tokens."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import row_quantization as rq
from ._override import keep_32bit_state
from .lookup import fusion_embedding_lookup
from .quantized_table import QuantizedEmbeddingTable
from .standard_embedding import padding_row

__all__ = ["FusionEmbedding"]

# state_dict name of each buffer of a quantized base (module name -> checkpoint name). The
# codes are never called "weight": a float model (nn.Embedding, a stock Hugging Face model,
# torchtune's FusionEmbedding) would cast them into its float table without a word.
_QUANT_KEYS = {"embedding.weight": "weight_codes", "embedding.absmax": "weight_absmax",
               "embedding.qmap": "weight_qmap"}
_PLAIN_KEYS = {"embedding.weight": "weight"}
_NO_WEIGHT = ("FusionEmbedding has no single .weight: the base table is .embedding (frozen, "
              "int8/NF4 when quantized) and the new tokens are .fusion_embedding. To add or "
              "remove new tokens use bnbfuse.nn.resize_fusion_tokens(model, n) (not "
              "resize_token_embeddings); a tied output head needs add_fusion_tokens(..., "
              "untie_head=True or extend_head=True); merge() gives one plain nn.Embedding")


def _check_size(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class FusionEmbedding(torch.nn.Module):
    """Base vocabulary + a small table of new tokens, with the base optionally int8/NF4.

    The torchtune ``FusionEmbedding`` API: ids in ``[0, vocab_size)`` read the base table
    ``.embedding``, ids in ``[vocab_size, vocab_size + fusion_vocab_size)`` read the
    new-token table ``.fusion_embedding``. Use it as a drop-in ``nn.Embedding`` replacement
    when adding tokens (image markers, tool tokens) to a pretrained model.

    With ``base_quant="int8"`` (1.0625 bytes/param) or ``"nf4"`` (0.5625 bytes/param) the
    base is frozen and stored quantized in blocks of ``blocksize`` values per row; one fused
    kernel gathers, dequantizes and routes the rows (no ``masked_select``, no host sync on
    CUDA). Only the new-token table then receives gradients. With ``base_quant=None`` the
    base is a plain ``nn.Embedding`` and both tables receive gradients (freeze the base
    with :func:`set_trainable_params` and :meth:`fusion_params`, as in torchtune). Every
    float table registered here keeps 32-bit state in bnbfuse 8-bit optimizers.

    ``state_dict`` keys: ``fusion_embedding.weight`` and the base: ``weight`` (float) for a
    plain base; ``weight_codes`` (uint8), ``weight_absmax`` (float32 ``(V,
    ceil(D/blocksize))`` scales) and ``weight_qmap`` (the value map) for a quantized one, so
    that no float model loads the codes as its table. The original model's
    ``nn.Embedding`` checkpoint (a float ``weight``) loads with ``strict=False`` and is
    quantized on load, a dict with only the fusion table loads too, and save/load of a
    quantized base is bit-exact. ``torch.distributed.checkpoint.state_dict`` finds the
    tensors behind these keys (``_fqn_modifiers`` and the ``weight_*`` properties).

    Args:
        vocab_size (int): rows ``V`` of the base table.
        fusion_vocab_size (int): rows ``F`` of the new-token table.
        embed_dim (int): embedding dimension ``D``.
        base_quant (str, optional): ``None``, ``"int8"`` or ``"nf4"``.
        blocksize (int): values per scale block of a quantized base (default 64; a larger
            one than ``embed_dim`` is capped at it: one block per row).
        padding_idx (int, optional): a base row that starts at zero (in a randomly built
            base) and receives no gradient, as in ``nn.Embedding`` (a bnbfuse extra; :meth:`from_embedding` copies it and
            :meth:`merge` keeps it). Negative values count from ``V``.
        device, dtype: factory arguments; ``dtype`` is the dtype of the float tables and of
            the output.

    Shapes:
        input ``(*)`` integer ids in ``[0, V + F)`` → output ``(*, D)``.

    Raises:
        TypeError for non-integer ids; IndexError for ids outside ``[0, V + F)``.

    Example:
        >>> import torch
        >>> from bnbfuse.nn import FusionEmbedding
        >>> emb = FusionEmbedding(vocab_size=100, fusion_vocab_size=10, embed_dim=64,
        ...                       base_quant="nf4")
        >>> emb(torch.tensor([[1, 99, 100, 109]])).shape
        torch.Size([1, 4, 64])
        >>> emb.fusion_params()
        ['fusion_embedding.weight']
        >>> sorted(emb.state_dict())
        ['fusion_embedding.weight', 'weight_absmax', 'weight_codes', 'weight_qmap']
    """

    def __init__(self, vocab_size: int, fusion_vocab_size: int, embed_dim: int, *,
                 base_quant: Optional[str] = None, blocksize: int = rq.DEFAULT_BLOCKSIZE,
                 padding_idx: Optional[int] = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_size("vocab_size", vocab_size, 1)
        _check_size("fusion_vocab_size", fusion_vocab_size, 0)
        _check_size("embed_dim", embed_dim, 1)
        self.padding_idx = padding_row(padding_idx, vocab_size, "padding_idx")  # a base row
        if base_quant is not None:
            rq.bits_of(base_quant)  # validates the name
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"FusionEmbedding tables are float32, float16 or bfloat16, got "
                            f"{dtype} (the lookup kernels have no other path)")
        self.vocab_size, self.fusion_vocab_size, self.dim = vocab_size, fusion_vocab_size, embed_dim
        self.base_quant, self.blocksize = base_quant, blocksize
        # A randomly built base starts with its padding row at zero, as nn.Embedding's
        # (its reset_parameters zeroes it again after a meta-device init).
        if base_quant is None:
            self.embedding = torch.nn.Embedding(vocab_size, embed_dim, self.padding_idx,
                                                device=device, dtype=dtype)
            keep_32bit_state(self.embedding, "weight")
        else:
            self.embedding = QuantizedEmbeddingTable(vocab_size, embed_dim, base_quant, blocksize,
                                                     device=device, padding_idx=self.padding_idx)
            self.blocksize = self.embedding.blocksize  # capped at the row width
        self.fusion_embedding = torch.nn.Embedding(fusion_vocab_size, embed_dim, device=device,
                                                   dtype=dtype)
        keep_32bit_state(self.fusion_embedding, "weight")
        self._load_prefix: Optional[str] = None
        self.register_state_dict_post_hook(FusionEmbedding._state_dict_hook)
        self.register_load_state_dict_pre_hook(FusionEmbedding._load_state_dict_pre_hook)
        self.register_load_state_dict_post_hook(FusionEmbedding._load_state_dict_post_hook)

    # ---- properties ----------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.dim

    @property
    def embedding_dim(self) -> int:
        """``nn.Embedding``'s name for ``embed_dim``."""
        return self.dim

    @property
    def num_embeddings(self) -> int:
        """Ids this module accepts: ``vocab_size + fusion_vocab_size`` (as in torchtune)."""
        return self.vocab_size + self.fusion_vocab_size

    @property
    def quantized(self) -> bool:
        return self.base_quant is not None

    # ---- forward -------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        """Embeddings of ``input`` ids ``(*)`` → ``(*, D)`` in the fusion table's dtype."""
        fusion = self.fusion_embedding.weight
        if self.quantized:
            e = self.embedding
            return fusion_embedding_lookup(input, e.weight, e.absmax, e.qmap, fusion, e.bits,
                                           e.blocksize)
        base = self.embedding.weight
        out = fusion_embedding_lookup(input, base, None, None, fusion, 0, 1)
        if self.padding_idx is not None and base.requires_grad and torch.is_grad_enabled():
            # nn.Embedding's padding_idx: the padding row's lookups carry no gradient.
            pad = (input == self.padding_idx).unsqueeze(-1).to(out.device)  # meta module
            out = torch.where(pad, out.detach(), out)
        return out

    def fusion_params(self) -> list[str]:
        """Names of the new-token parameters (torchtune API)."""
        return ["fusion_embedding.weight"]

    # ---- construction and conversion -------------------------------------------------------
    @classmethod
    def from_embedding(cls, embedding: torch.nn.Embedding, fusion_vocab_size: int, *,
                       base_quant: Optional[str] = None,
                       blocksize: int = rq.DEFAULT_BLOCKSIZE) -> "FusionEmbedding":
        """Wraps an existing ``nn.Embedding`` (its rows become the base vocabulary).

        A plain base shares ``embedding.weight`` (no copy, tied output heads stay tied); a
        quantized base is quantized from it. New rows start at the mean of the base rows
        plus ``N(0, (0.01 * std)^2)`` noise per dimension, so the new tokens begin inside
        the distribution the model knows.

        Example:
            >>> import torch
            >>> from bnbfuse.nn import FusionEmbedding
            >>> old = torch.nn.Embedding(50, 16)
            >>> new = FusionEmbedding.from_embedding(old, 3, base_quant="int8")
            >>> new(torch.tensor([52])).shape
            torch.Size([1, 16])
        """
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"from_embedding needs a module with a 2-D float .weight, got "
                            f"{type(embedding).__name__}")
        V, D = weight.shape
        out = cls(V, fusion_vocab_size, D, base_quant=base_quant, blocksize=blocksize,
                  padding_idx=getattr(embedding, "padding_idx", None), device="meta",
                  dtype=weight.dtype)
        out.to_empty(device=weight.device)
        with torch.no_grad():
            if base_quant is None:
                out.embedding.weight = weight
            else:
                out.embedding.quantize_(weight)
            w = weight.detach().float()
            mean, std = w.mean(0), w.std(0) if V > 1 else torch.zeros_like(w[0])
            noise = torch.randn(fusion_vocab_size, D, device=weight.device)
            out.fusion_embedding.weight.copy_(mean + 0.01 * std * noise)
        return out

    @torch.no_grad()
    def merge(self) -> torch.nn.Embedding:
        """One plain ``nn.Embedding`` of ``vocab_size + fusion_vocab_size`` rows (the base
        dequantized), in the fusion table's dtype and device."""
        fusion = self.fusion_embedding.weight
        base = (self.embedding.dequantize(fusion.dtype) if self.quantized
                else self.embedding.weight.to(fusion.dtype))
        merged = torch.nn.Embedding(self.vocab_size + self.fusion_vocab_size, self.dim,
                                    padding_idx=self.padding_idx, device=fusion.device,
                                    dtype=fusion.dtype)
        merged.weight.copy_(torch.cat([base, fusion]))
        return merged

    def extra_repr(self) -> str:
        s = f"vocab_size={self.vocab_size}, fusion_vocab_size={self.fusion_vocab_size}, embed_dim={self.dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.quantized:
            s += f", base_quant={self.base_quant!r}, blocksize={self.blocksize}"
        return s

    # ---- checkpoint keys ---------------------------------------------------------------------
    def _key_map(self) -> dict[str, str]:
        return dict(_QUANT_KEYS) if self.quantized else dict(_PLAIN_KEYS)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "weight":  # what HF's tie_weights / resize_token_embeddings reach for
                raise AttributeError(_NO_WEIGHT) from None
            raise

    def _quantized_buffer(self, name: str) -> Tensor:
        if not self.quantized:
            raise AttributeError(f"a plain FusionEmbedding has no {name} (its base is .weight "
                                 "in the state dict, .embedding.weight here)")
        return getattr(self.embedding, name)

    # The tensors behind the checkpoint names, for torch.distributed.checkpoint.state_dict,
    # which looks every state_dict key up as an attribute path.
    weight_codes = property(lambda self: self._quantized_buffer("weight"))
    weight_absmax = property(lambda self: self._quantized_buffer("absmax"))
    weight_qmap = property(lambda self: self._quantized_buffer("qmap"))

    @property
    def _base_module(self) -> torch.nn.Module:
        return self.embedding

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint's hook for state_dict keys that skip a child: a plain
        # base's "weight" is found in .embedding. The alias (not the child's own name) keeps
        # DCP from also dropping "embedding." from named_parameters, so the optimizer state
        # keeps the parameter's FQN whether it is saved or loaded.
        return {} if self.quantized else {"weight": "_base_module"}

    def _state_dict_hook(self, state_dict, prefix, local_metadata) -> None:
        for inner, outer in self._key_map().items():
            if prefix + inner in state_dict:
                state_dict[prefix + outer] = state_dict.pop(prefix + inner)
        from .hf import warn_if_dropped_by_peft
        warn_if_dropped_by_peft(self, prefix)

    def _load_state_dict_pre_hook(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs) -> None:
        self._load_prefix = prefix
        key = prefix + "weight"
        value = state_dict.get(key)
        saved_quantized = (prefix + "weight_codes" in state_dict
                           or (isinstance(value, Tensor) and not value.is_floating_point()))
        if not self.quantized:
            if saved_quantized:
                error_msgs.append(
                    f"{prefix}: the checkpoint holds a quantized base (uint8 codes); build "
                    f"FusionEmbedding with the base_quant it was saved with")
                return
            if key in state_dict:
                state_dict[prefix + "embedding.weight"] = state_dict.pop(key)
            return
        if isinstance(value, Tensor) and value.is_floating_point():
            self._quantize_float_base(state_dict, prefix, value, error_msgs)
            return
        saved_as = prefix + "weight_codes"
        if value is not None and saved_as not in state_dict:
            # the layout before the codes got their own name: uint8 codes under "weight"
            state_dict[saved_as] = state_dict.pop(key)
            saved_as = key
        for inner, outer in _QUANT_KEYS.items():
            if prefix + outer in state_dict:
                state_dict[prefix + inner] = state_dict.pop(prefix + outer)
        rq.refuse_foreign_codes(state_dict, prefix + "embedding.weight", saved_as,
                                self.embedding.weight, error_msgs)

    def _quantize_float_base(self, state_dict, prefix, value, error_msgs) -> None:
        """A float table (the original model's nn.Embedding) loaded into a quantized base."""
        key = prefix + "weight"
        if tuple(value.shape) != (self.vocab_size, self.dim):
            error_msgs.append(f"{key}: expected a ({self.vocab_size}, {self.dim}) table, "
                              f"got {tuple(value.shape)}")
            return
        device = self.embedding.weight.device
        if device.type == "meta":
            device = value.device
        codes, absmax = rq.quantize_table(value.detach().to(device), self.base_quant,
                                          self.blocksize)
        state_dict.pop(key)
        state_dict[prefix + "embedding.weight"] = codes
        state_dict[prefix + "embedding.absmax"] = absmax
        state_dict[prefix + "embedding.qmap"] = rq.quant_map(self.base_quant, device).clone()
        for extra in ("weight_codes", "weight_absmax", "weight_qmap"):
            state_dict.pop(prefix + extra, None)

    def _load_state_dict_post_hook(self, incompatible_keys) -> None:
        # Report missing keys under their checkpoint names ("weight", not "embedding.weight").
        prefix = self._load_prefix
        if prefix is None:
            return
        names = {prefix + inner: prefix + outer for inner, outer in self._key_map().items()}
        keys = incompatible_keys.missing_keys
        keys[:] = [names.get(k, k) for k in keys]
        self._load_prefix = None
