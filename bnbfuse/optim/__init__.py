"""8-bit and 32-bit optimizers (bitsandbytes names) and the override registry.

Every optimizer exists as ``X`` (``optim_bits=8`` or ``32``), ``X8bit`` and ``X32bit``, with
bitsandbytes 0.50's positional arguments and defaults; bnbfuse extras are keyword-only.
Adam, AdamW, AdEMAMix and Lion also come as ``PagedX`` (``is_paged=True``).
See docs/optimizers.md.
"""
from .manager import GlobalOptimManager, keep_32bit_embeddings
from .optimizer import Optimizer1State, Optimizer2State, Optimizer8bit
from .adam import Adam, Adam8bit, Adam32bit, AdamW, AdamW8bit, AdamW32bit
from .ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit
from .adagrad import Adagrad, Adagrad8bit, Adagrad32bit
from .lamb import LAMB, LAMB8bit, LAMB32bit
from .lars import LARS, LARS8bit, LARS32bit, PytorchLARS
from .lion import Lion, Lion8bit, Lion32bit
from .rmsprop import RMSprop, RMSprop8bit, RMSprop32bit
from .sgd import SGD, SGD8bit, SGD32bit
from .paged import (PagedAdam, PagedAdam8bit, PagedAdam32bit, PagedAdamW, PagedAdamW8bit,
                    PagedAdamW32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit,
                    PagedLion, PagedLion8bit, PagedLion32bit)

__all__ = [
    "GlobalOptimManager", "keep_32bit_embeddings",
    "Optimizer8bit", "Optimizer1State", "Optimizer2State",
    "Adam", "Adam8bit", "Adam32bit", "AdamW", "AdamW8bit", "AdamW32bit",
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit",
    "Adagrad", "Adagrad8bit", "Adagrad32bit",
    "LAMB", "LAMB8bit", "LAMB32bit",
    "LARS", "LARS8bit", "LARS32bit", "PytorchLARS",
    "Lion", "Lion8bit", "Lion32bit",
    "RMSprop", "RMSprop8bit", "RMSprop32bit",
    "SGD", "SGD8bit", "SGD32bit",
    "PagedAdam", "PagedAdam8bit", "PagedAdam32bit", "PagedAdamW", "PagedAdamW8bit",
    "PagedAdamW32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit",
    "PagedLion", "PagedLion8bit", "PagedLion32bit",
]


def __getattr__(name: str):
    # bitsandbytes names bnbfuse leaves out explain themselves (bnbfuse/compat.py)
    from ..compat import missing_name

    raise missing_name("optim", name)
