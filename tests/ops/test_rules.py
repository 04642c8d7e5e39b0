"""The optimizer rule table (bnbfuse/ops/rules.py) against its C++ twin and the C ABI: the
enum ids, the traits table kOptimizerKinds, the block size and the layout of bnbf_optim_args."""
import ctypes
import re
from pathlib import Path

import pytest

import bnbfuse
from bnbfuse import _native
from bnbfuse.ops.optimizer import KernelHyperparams, optimizer_scalars
from bnbfuse.ops.rules import OPTIMIZER_BLOCKSIZE, RULES, optimizer_blocks, rule

HEADER = (Path(__file__).resolve().parents[2] / "csrc" / "include" / "bnbfuse.h").read_text()
native = pytest.mark.skipif(not _native.cpu.loaded, reason="native CPU library not built")


def _enum_ids() -> dict[str, int]:
    body = re.search(r"enum bnbf_optimizer \{(.*?)\};", HEADER, re.S).group(1)
    return {name.lower(): int(v) for name, v in re.findall(r"BNBF_OPT_(\w+)\s*=\s*(\d+)", body)}


def test_header_enum_matches_the_rule_ids():
    assert _enum_ids() == {name: r.id for name, r in RULES.items()}


def test_ids_are_dense_from_zero():
    assert sorted(r.id for r in RULES.values()) == list(range(len(RULES)))


def test_header_block_size_matches():
    size = int(re.search(r"#define BNBF_OPTIM_BLOCKSIZE (\d+)", HEADER).group(1))
    assert size == OPTIMIZER_BLOCKSIZE == 256


def test_optim_args_struct_mirrors_the_header_field_by_field():
    body = re.search(r"typedef struct bnbf_optim_args \{(.*?)\} bnbf_optim_args;", HEADER, re.S)
    fields = re.findall(r"^\s*(float|int32_t|int64_t)\s+(\w+);", body.group(1), re.M)
    c_types = {"float": ctypes.c_float, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64}
    assert [(n, c_types[t]) for t, n in fields] == list(_native.OptimizerArgs._fields_)


def test_scalars_fill_every_field_of_the_struct():
    scalars = optimizer_scalars("adamw", KernelHyperparams(lr=1e-3, beta1=0.9, beta2=0.99,
                                                           step=3))
    assert set(scalars) == {name for name, _ in _native.OptimizerArgs._fields_}


@native
@pytest.mark.parametrize("name", list(RULES))
def test_native_traits_table_matches(name):
    fn = _native.cpu.lib.bnbf_optimizer_traits
    fn.restype = ctypes.c_int
    out_name, states, stacked, mask = ctypes.c_char_p(), ctypes.c_int(), ctypes.c_int(), \
        ctypes.c_int()
    assert fn(RULES[name].id, ctypes.byref(out_name), ctypes.byref(states),
              ctypes.byref(stacked), ctypes.byref(mask)) == 0
    r = RULES[name]
    assert out_name.value.decode() == name
    assert states.value == r.states
    assert bool(stacked.value) == r.stacked_moments
    assert (bool(mask.value & 1), bool(mask.value & 2)) == r.keep_positive


@native
def test_native_traits_table_refuses_unknown_ids():
    fn = _native.cpu.lib.bnbf_optimizer_traits
    fn.restype = ctypes.c_int
    outs = [ctypes.c_char_p(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()]
    assert fn(len(RULES), *map(ctypes.byref, outs)) == -1
    assert b"unknown optimizer id" in _native.cpu.lib.bnbf_last_error()


def test_rule_lookup_names_the_known_kinds():
    assert rule("lion").states == 1
    with pytest.raises(ValueError, match="unknown optimizer 'momentum'.*'sgd'"):
        rule("momentum")


@pytest.mark.parametrize("n,blocks", [(0, 0), (1, 1), (256, 1), (257, 2), (4096, 16)])
def test_optimizer_blocks(n, blocks):
    assert optimizer_blocks(n) == blocks


def test_every_optimizer_class_names_a_rule():
    classes = [getattr(bnbfuse.optim, n) for n in bnbfuse.optim.__all__]
    names = {c.optimizer_name for c in classes if isinstance(c, type) and
             issubclass(c, bnbfuse.optim.Optimizer8bit) and c.optimizer_name}
    assert names == set(RULES)
