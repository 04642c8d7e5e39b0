"""The table of optimizer kinds: the one place their facts live on the Python side.

Every layer reads it: ``bnbfuse/optim`` (which states to create, which keep positive), the
reference kernels (``bnbfuse/backends/reference/optimizer.py``) and the native binding (the
id passed through the C ABI). Its C++ twin is ``kOptimizerKinds`` in
``csrc/common/optim_rule.h``; ``tests/ops/test_rules.py`` checks that both, and the
``enum bnbf_optimizer`` of ``csrc/include/bnbfuse.h``, agree.

Example:
    >>> from bnbfuse.ops.rules import RULES, rule
    >>> rule("adamw").states, rule("adamw").keep_positive
    (2, (False, True))
    >>> sorted(RULES)[:3]
    ['adagrad', 'adam', 'adamw']
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["OPTIMIZER_BLOCKSIZE", "Rule", "RULES", "rule", "optimizer_blocks"]

# 8-bit optimizer state is quantized in blocks of this many elements of the flattened
# tensor (BNBF_OPTIM_BLOCKSIZE in csrc/include/bnbfuse.h).
OPTIMIZER_BLOCKSIZE = 256


class Rule(NamedTuple):
    """One optimizer kind.

    Attributes:
        id: its ``enum bnbf_optimizer`` value in the C ABI.
        states: 1 or 2 state tensors (``state1``, ``state2``).
        stacked_moments: state1 stacks two moments (AdEMAMix: m1 then m2, shape ``(2, *p)``).
        keep_positive: per state, whether 8-bit requantization never rounds a positive value
            to the zero code (the "no blow-ups" policy for second-moment-like states).
    """

    id: int
    states: int
    stacked_moments: bool = False
    keep_positive: tuple[bool, bool] = (False, False)


RULES: dict[str, Rule] = {
    "adam": Rule(0, 2, keep_positive=(False, True)),
    "adamw": Rule(1, 2, keep_positive=(False, True)),
    "ademamix": Rule(2, 2, stacked_moments=True, keep_positive=(False, True)),
    "lamb": Rule(3, 2, keep_positive=(False, True)),
    "sgd": Rule(4, 1),
    "rmsprop": Rule(5, 1, keep_positive=(True, False)),
    "adagrad": Rule(6, 1, keep_positive=(True, False)),
    "lion": Rule(7, 1),
    "lars": Rule(8, 1),
}


def rule(optimizer: str) -> Rule:
    """The :class:`Rule` of ``optimizer``; ValueError naming the known kinds otherwise."""
    try:
        return RULES[optimizer]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of "
                         f"{tuple(RULES)}") from None


def optimizer_blocks(n: int) -> int:
    """Number of 256-element state blocks of a tensor with ``n`` elements."""
    return -(n // -OPTIMIZER_BLOCKSIZE)
