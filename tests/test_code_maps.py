"""Code maps: bnbfuse.functional's builders against their definitions and, where installed,
against bitsandbytes 0.50 for every argument combination it accepts."""
import itertools
import warnings

import pytest
import torch

import bnbfuse.functional as F
from bnbfuse import row_quantization as rq


def _bnb_functional():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes.functional")


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # what matters is whether it raised
        return exc


def _same(ours, ref, args):
    if isinstance(ref, Exception):
        assert isinstance(ours, Exception), f"bitsandbytes raises for {args}, bnbfuse does not"
        return False
    assert not isinstance(ours, Exception), f"bnbfuse raises {ours!r} for {args}"
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape, args
    assert torch.equal(ours, ref) and torch.equal(ours.signbit(), ref.signbit()), args
    return True


def test_dynamic_map_matches_bitsandbytes_for_every_combination_it_accepts():
    B = _bnb_functional()
    accepted = 0
    for args in itertools.product((True, False), range(0, 10), range(0, 10)):
        accepted += _same(_outcome(F.create_dynamic_map, *args),
                          _outcome(B.create_dynamic_map, *args), args)
    assert accepted > 60  # the combinations bitsandbytes returns a map for (91 in 0.50.2)


def test_dynamic_map_with_fewer_decades_than_bits_has_no_type_error():
    # 2**(k + shift) < 1 for the first decades: they hold no values (bitsandbytes' int())
    m = F.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=5)
    assert m.shape == (256,) and int((m != 0).sum()) == 2**5 - 1


def test_linear_map_matches_bitsandbytes():
    B = _bnb_functional()
    for args in itertools.product((True, False), range(1, 10), (True, False)):
        assert _same(F.create_linear_map(*args), B.create_linear_map(*args), args)


def test_linear_map_definition():
    m = F.create_linear_map(signed=True, total_bits=8, add_zero=True)
    # 255 values (~0 the middle one: float32 linspace), a zero of padding after the lower half
    assert m.shape == (256,) and float(m[0]) == -1 and float(m[255]) == 1
    assert float(m[127]) == 0 and abs(float(m[128])) < 1e-8 and float(m[126]) < 0
    u = F.create_linear_map(signed=False, total_bits=4)
    assert torch.equal(u[:8], torch.linspace(0, 1, 16)[:8]) and not u[8:248].any()


def test_fp8_map_matches_bitsandbytes():
    B = _bnb_functional()
    accepted = 0
    for args in itertools.product((True, False), range(0, 7), range(0, 7), range(1, 9)):
        accepted += _same(_outcome(F.create_fp8_map, *args), _outcome(B.create_fp8_map, *args),
                          args)
    assert accepted > 30


def test_fp8_map_definition_and_refusals():
    e4m3 = F.create_fp8_map(signed=True, exponent_bits=4, precision_bits=3, total_bits=8)
    assert e4m3.shape == (256,) and float(e4m3.max()) == 1 and float(e4m3.min()) == -1
    assert torch.equal(e4m3, -e4m3.flip(0))  # symmetric
    with pytest.raises(ValueError, match="bits"):
        F.create_fp8_map(signed=True, exponent_bits=4, precision_bits=4, total_bits=8)
    with pytest.raises(ValueError, match="exponent bit"):
        F.create_fp8_map(signed=True, exponent_bits=0, precision_bits=7, total_bits=8)


@pytest.mark.parametrize("args", [(0.9677083, True), (0.9677083, False), (0.99, True)])
def test_normal_map_matches_bitsandbytes(args):
    B = _bnb_functional()
    pytest.importorskip("scipy")  # bitsandbytes' builder needs it; bnbfuse's does not
    assert _same(F.create_normal_map(*args), B.create_normal_map(*args), args)


def test_normal_map_is_the_nf4_table():
    m = F.create_normal_map()
    assert torch.equal(m[m != 0], rq.quant_map("nf4")[rq.quant_map("nf4") != 0])


def test_fp4_map_from_its_definition():
    # s e1 e0 m: e = 0 subnormal m/16, else 2**(4 - e) (1 + m/2); scaled by the largest, 12
    want = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32) / 12
    fp4 = F.get_4bit_type("fp4")
    assert torch.equal(fp4[:8], want) and torch.equal(fp4[8:], -want)
    assert not fp4.signbit()[8]  # the second zero is +0, as in bitsandbytes
    B = _bnb_functional()
    for name in ("fp4", "nf4"):
        ref = B.get_4bit_type(name, device="cpu")
        assert torch.equal(F.get_4bit_type(name), ref)
        assert torch.equal(F.get_4bit_type(name).signbit(), ref.signbit())
    with pytest.raises(NotImplementedError, match="af4"):
        F.get_4bit_type("af4")
