"""bitsandbytes drop-in: :func:`install_as_bitsandbytes` and the names bnbfuse leaves out.

bnbfuse covers bitsandbytes' optimizers, embeddings and blockwise quantization. Code written
for those runs with ``import bnbfuse as bnb``. Code that imports ``bitsandbytes`` by name
(Hugging Face ``Trainer(optim="adamw_bnb_8bit")``, say) runs on bnbfuse after the explicit
opt-in :func:`install_as_bitsandbytes`. The other bitsandbytes names (quantized linear
layers, 4-bit and int8 matmul functions) raise an ``AttributeError`` that says what to use.

``python -m bnbfuse --bitsandbytes-names`` prints the table of docs/bitsandbytes.md: every
public name of bitsandbytes 0.50 under ``optim``, ``nn`` and ``functional``, and whether
bnbfuse provides it.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

__all__ = ["install_as_bitsandbytes", "BitsandbytesAlias", "missing_name", "BNB_NAMES",
           "OUT_OF_SCOPE", "markdown_table"]

BNB_VERSION = "0.50.2"  # the bitsandbytes API bnbfuse follows

_SCOPE = ("bnbfuse covers bitsandbytes' optimizers, embeddings and blockwise quantization "
          "(quantize_blockwise/dequantize_blockwise)")
_LINEAR = ("quantized linear layers (LLM.int8(), QLoRA 4-bit) are out of scope: keep "
           "torch.nn.Linear, or use bitsandbytes' own layers (they work beside bnbfuse's "
           "optimizers), or torchao")
_4BIT = ("4-bit weight quantization is out of scope; for 4-bit embedding tables use "
         "bnbfuse.nn.EmbeddingNF4/EmbeddingFP4 or bnbfuse.row_quantization.quantize_table(w, "
         "'nf4'|'fp4'), for 8-bit blockwise tensors bnbfuse.functional.quantize_blockwise")
_INT8 = ("int8 matrix multiplication (LLM.int8()) is out of scope: use bitsandbytes or "
         "torch._int_mm; for int8 embedding tables use bnbfuse.nn.Embedding8bit or "
         "bnbfuse.row_quantization.quantize_table(w, 'int8')")
_OPT_FN = ("bnbfuse's fused updates are the torch ops torch.ops.bnbfuse."
           "optimizer_update_8bit_blockwise / optimizer_update_32bit (their own argument "
           "order, bnbfuse/ops/optimizer.py); most code wants the bnbfuse.optim classes")
_INTERNAL = "a bitsandbytes internal with no bnbfuse counterpart (plain torch ops do its job)"

# name -> what to use instead, per bitsandbytes module ("" is the package itself)
OUT_OF_SCOPE: dict[str, dict[str, str]] = {
    "": {n: _INT8 for n in ("matmul", "MatmulLtState")} | {"matmul_4bit": _4BIT},
    "nn": {n: _LINEAR for n in ("Int8Params", "Linear4bit", "Linear8bitLt", "LinearFP4",
                                "LinearNF4", "OutlierAwareLinear", "Params4bit")},
    "functional": (
        {n: _4BIT for n in ("quantize_4bit", "dequantize_4bit", "quantize_fp4", "quantize_nf4",
                            "dequantize_fp4", "dequantize_nf4", "gemv_4bit",
                            "pack_dict_to_tensor", "unpack_tensor_to_dict")}
        | {n: _INT8 for n in ("batched_igemm", "igemm", "int8_linear_matmul", "int8_mm_dequant",
                              "int8_double_quant", "int8_vectorwise_quant",
                              "int8_vectorwise_dequant", "check_matmul")}
        | {n: _OPT_FN for n in ("optimizer_update_32bit", "optimizer_update_8bit_blockwise")}
        | {n: _INTERNAL for n in ("CUBLAS_Context", "get_ptr", "is_on_gpu", "has_avx512bf16",
                                  "elementwise_func", "fill")}),
    "optim": {},
}

# The public classes and functions of bitsandbytes 0.50.2 under optim, nn and functional
# (generated from the installed package; tests/test_bitsandbytes_compat.py re-derives it).
BNB_NAMES: dict[str, tuple[str, ...]] = {
    "optim": (
        "AdEMAMix", "AdEMAMix32bit", "AdEMAMix8bit", "Adagrad", "Adagrad32bit", "Adagrad8bit",
        "Adam", "Adam32bit", "Adam8bit", "AdamW", "AdamW32bit", "AdamW8bit",
        "GlobalOptimManager", "LAMB", "LAMB32bit", "LAMB8bit", "LARS", "LARS32bit", "LARS8bit",
        "Lion", "Lion32bit", "Lion8bit", "PagedAdEMAMix", "PagedAdEMAMix32bit",
        "PagedAdEMAMix8bit", "PagedAdam", "PagedAdam32bit", "PagedAdam8bit", "PagedAdamW",
        "PagedAdamW32bit", "PagedAdamW8bit", "PagedLion", "PagedLion32bit", "PagedLion8bit",
        "PytorchLARS", "RMSprop", "RMSprop32bit", "RMSprop8bit", "SGD", "SGD32bit", "SGD8bit"),
    "nn": (
        "Embedding", "Embedding4bit", "Embedding8bit", "EmbeddingFP4", "EmbeddingNF4",
        "Int8Params", "Linear4bit", "Linear8bitLt", "LinearFP4", "LinearNF4",
        "OutlierAwareLinear", "Params4bit", "StableEmbedding"),
    "functional": (
        "CUBLAS_Context", "GlobalPageManager", "QuantState", "batched_igemm", "check_matmul",
        "create_dynamic_map", "create_fp8_map", "create_linear_map", "create_normal_map",
        "dequantize_4bit", "dequantize_blockwise", "dequantize_fp4", "dequantize_nf4",
        "elementwise_func", "fill", "gemv_4bit", "get_4bit_type", "get_paged", "get_ptr",
        "has_avx512bf16", "igemm", "int8_double_quant", "int8_linear_matmul",
        "int8_mm_dequant", "int8_vectorwise_dequant", "int8_vectorwise_quant", "is_on_gpu",
        "optimizer_update_32bit", "optimizer_update_8bit_blockwise", "pack_dict_to_tensor",
        "prefetch_tensor", "quantize_4bit", "quantize_blockwise", "quantize_fp4",
        "quantize_nf4", "unpack_tensor_to_dict"),
}


def missing_name(module: str, name: str) -> AttributeError:
    """The AttributeError for ``bnbfuse.<module>.<name>``: an explanation when bitsandbytes
    has that name, Python's usual message otherwise."""
    where = f"bnbfuse.{module}" if module else "bnbfuse"
    advice = OUT_OF_SCOPE.get(module, {}).get(name)
    if advice is None:
        return AttributeError(f"module {where!r} has no attribute {name!r}")
    bnb_name = "bitsandbytes" + (f".{module}" if module else "") + f".{name}"
    return AttributeError(f"{bnb_name} is not provided by bnbfuse: {_SCOPE}. {advice}.")


# ---- install_as_bitsandbytes --------------------------------------------------------------
class BitsandbytesAlias:
    """What :func:`install_as_bitsandbytes` installed; ``uninstall()`` (or leaving a ``with``
    block) puts back the ``sys.modules`` entries it replaced."""

    def __init__(self, modules: dict[str, types.ModuleType], saved: dict):
        self.modules, self._saved = modules, saved
        self.installed = True

    @property
    def module(self) -> types.ModuleType:
        return self.modules["bitsandbytes"]

    def uninstall(self) -> None:
        if not self.installed:
            return
        for name in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
            del sys.modules[name]
        sys.modules.update(self._saved)
        self.installed = False

    def __enter__(self) -> "BitsandbytesAlias":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def _module(name: str, doc: str, package: bool = False) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    # a spec, so that importlib.util.find_spec(name) (transformers' availability check) works
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []  # submodules that are not aliased are not found (no real import)
    return mod


def _optim_alias() -> tuple[types.ModuleType, types.ModuleType]:
    """``bitsandbytes.optim``: bnbfuse's optimizers as subclasses whose module is named
    ``bitsandbytes.optim``, because Hugging Face's Trainer registers its 32-bit embedding
    overrides only for optimizer classes whose name mentions bitsandbytes."""
    from . import optim
    from .optim.optimizer import Optimizer8bit

    mod = _module("bitsandbytes.optim", "bnbfuse.optim under bitsandbytes' name", package=True)
    for name in optim.__all__:
        obj = getattr(optim, name)
        if isinstance(obj, type) and issubclass(obj, Optimizer8bit) and obj is not Optimizer8bit:
            obj = type(name, (obj,), {"__module__": mod.__name__, "__qualname__": name,
                                      "__doc__": obj.__doc__})
        setattr(mod, name, obj)
    mod.__getattr__ = lambda name: optim.__getattr__(name)
    base = _module("bitsandbytes.optim.optimizer", "bnbfuse's optimizer base classes")
    for name in ("Optimizer8bit", "Optimizer1State", "Optimizer2State", "GlobalOptimManager"):
        setattr(base, name, getattr(optim, name))
    base.MockArgs = optim.compat.OptimizerArgs
    mod.optimizer = base
    return mod, base


def _root_getattr(name: str):
    raise missing_name("", name)


def install_as_bitsandbytes() -> BitsandbytesAlias:
    """Makes ``import bitsandbytes`` (and ``bitsandbytes.optim``, ``.nn``, ``.functional``)
    give bnbfuse in this process, for code that imports bitsandbytes by name.

    An explicit opt-in: nothing changes until it is called. Any bitsandbytes modules already
    imported are set aside (restored by ``uninstall()``). ``bitsandbytes.__version__`` is the
    bitsandbytes API bnbfuse follows (0.50.2). With Hugging Face ``Trainer``,
    ``optim="adamw_bnb_8bit"``, ``"paged_adamw_8bit"``, ``"lion_8bit"``, ... then build
    bnbfuse optimizers, and the Trainer's 32-bit state for embeddings applies to them.

    Returns:
        :class:`BitsandbytesAlias` (also a context manager that uninstalls on exit).

    Example:
        >>> import bnbfuse
        >>> with bnbfuse.install_as_bitsandbytes():
        ...     import bitsandbytes as bnb
        ...     opt_cls = bnb.optim.AdamW8bit
        >>> issubclass(opt_cls, bnbfuse.optim.AdamW8bit), opt_cls.__module__
        (True, 'bitsandbytes.optim')
    """
    from . import functional, nn

    root = _module("bitsandbytes", "bnbfuse, installed under bitsandbytes' name "
                   "(bnbfuse.install_as_bitsandbytes)", package=True)
    optim_mod, base = _optim_alias()
    root.__version__ = BNB_VERSION
    root.bnbfuse = True
    root.features = set()
    root.optim, root.nn, root.functional = optim_mod, nn, functional
    root.__getattr__ = _root_getattr
    modules = {"bitsandbytes": root, "bitsandbytes.optim": optim_mod,
               "bitsandbytes.optim.optimizer": base, "bitsandbytes.nn": nn,
               "bitsandbytes.functional": functional}
    saved = {n: m for n, m in sys.modules.items()
             if n == "bitsandbytes" or n.startswith("bitsandbytes.")}
    for name in saved:
        del sys.modules[name]
    sys.modules.update(modules)
    importlib.invalidate_caches()
    return BitsandbytesAlias(modules, saved)


# ---- the docs table -----------------------------------------------------------------------
def _provided(module: str, name: str) -> bool:
    mod = importlib.import_module(f"bnbfuse.{module}")
    try:
        getattr(mod, name)
    except AttributeError:
        return False
    return True


def markdown_table() -> str:
    """The table of docs/bitsandbytes.md: each bitsandbytes 0.50 name under optim, nn and
    functional and what bnbfuse offers for it."""
    lines = []
    for module, names in BNB_NAMES.items():
        provided = sum(_provided(module, n) for n in names)
        lines += [f"### bitsandbytes.{module} ({provided} of {len(names)} provided)", "",
                  "| name | bnbfuse |", "|---|---|"]
        for name in names:
            status = (f"`bnbfuse.{module}.{name}`" if _provided(module, name)
                      else "not provided: " + OUT_OF_SCOPE[module][name])
            lines.append(f"| `{name}` | {status} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
