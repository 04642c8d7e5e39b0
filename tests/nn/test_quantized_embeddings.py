"""bnb.nn.Embedding8bit / Embedding4bit / EmbeddingNF4 / EmbeddingFP4: bitsandbytes'
constructors and semantics (frozen, quantized on load of float weights), on the fused
quantized-table lookup; state dicts save and reload exactly; side by side with bitsandbytes."""
import io
import warnings

import pytest
import torch

import bnbfuse as bnb
from bnbfuse import row_quantization as rq

CLASSES = [bnb.nn.Embedding8bit, bnb.nn.Embedding4bit, bnb.nn.EmbeddingNF4, bnb.nn.EmbeddingFP4]


def _fp(rows=50, dim=64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Embedding(rows, dim)


@pytest.mark.parametrize("cls", CLASSES)
def test_loading_float_weights_quantizes_and_the_module_is_frozen(cls):
    fp = _fp()
    q = cls(50, 64)
    assert isinstance(q, torch.nn.Embedding)
    assert q.load_state_dict(fp.state_dict()).missing_keys == []
    assert q.weight.dtype == torch.uint8 and not q.weight.requires_grad
    assert [n for n, p in q.named_parameters() if p.requires_grad] == []
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    out = q(ids)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float32
    w = fp.weight.detach()
    tol = {bnb.nn.Embedding8bit: 0.02}.get(cls, 0.25)
    assert (out - w[ids]).abs().mean() < tol * w.abs().mean()
    assert torch.equal(out, q.dequantize()[ids])


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_saves_and_reloads_exactly(cls):
    q = cls(40, 96, dtype=torch.bfloat16)
    q.load_state_dict(_fp(40, 96).state_dict())
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert sorted(sd) == ["weight_absmax", "weight_codes", "weight_qmap"]
    assert sd["weight_codes"].dtype == torch.uint8
    fresh = cls(40, 96, dtype=torch.bfloat16)
    fresh.load_state_dict(sd)
    ids = torch.arange(40)
    assert torch.equal(fresh(ids), q(ids)) and fresh(ids).dtype == torch.bfloat16
    for key, value in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


@pytest.mark.parametrize("cls", CLASSES)
def test_device_moves_and_dtype_casts_keep_the_codes(cls):
    q = cls(20, 64)
    codes, absmax = q.weight.clone(), q.weight_absmax.clone()
    q = q.half()
    assert q(torch.tensor([1])).dtype == torch.float16
    assert torch.equal(q.weight, codes) and torch.equal(q.weight_absmax, absmax)
    assert q.weight_absmax.dtype == torch.float32 and isinstance(q.weight, torch.nn.Parameter)
    q.to(torch.float64)
    assert q(torch.tensor([1])).dtype == torch.float64
    meta = cls(20, 64, device="meta")
    meta.to_empty(device="cpu")
    meta.load_state_dict(_fp(20, 64).state_dict())
    assert meta.weight.device.type == "cpu"


def test_constructor_follows_bitsandbytes_positional_order():
    assert bnb.nn.Embedding8bit(10, 8, "cpu", torch.float16).dtype == torch.float16
    e = bnb.nn.Embedding4bit(10, 8, torch.bfloat16, "nf4", torch.uint8, "cpu")
    assert (e.dtype, e.quant_type, e.scheme) == (torch.bfloat16, "nf4", "nf4")
    assert bnb.nn.EmbeddingFP4(10, 8, None, torch.uint8, "cpu").quant_type == "fp4"
    assert bnb.nn.Embedding4bit(10, 8).quant_type == "fp4"  # bitsandbytes' default
    with pytest.raises(ValueError, match="quant_type"):
        bnb.nn.Embedding4bit(10, 8, quant_type="int4")
    with pytest.raises(NotImplementedError, match="uint8"):
        bnb.nn.EmbeddingNF4(10, 8, quant_storage=torch.float16)
    with pytest.raises(ValueError, match="embedding_dim"):
        bnb.nn.Embedding8bit(10, 0)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_float_embedding_cannot_take_the_codes(cls):
    sd = cls(10, 64).state_dict()
    with pytest.raises(RuntimeError, match="weight"):
        torch.nn.Embedding(10, 64).load_state_dict(sd)


def test_wrong_shape_on_load_is_an_error_naming_the_key():
    with pytest.raises(RuntimeError, match="weight"):
        bnb.nn.EmbeddingNF4(10, 64).load_state_dict(_fp(11, 64).state_dict())


def test_8bit_has_one_scale_per_row_and_4bit_per_64_values():
    assert bnb.nn.Embedding8bit(10, 300).weight_absmax.shape == (10, 1)
    assert bnb.nn.Embedding8bit(10, 300, blocksize=64).weight_absmax.shape == (10, 5)
    assert bnb.nn.EmbeddingNF4(10, 300).weight_absmax.shape == (10, 5)
    assert bnb.nn.EmbeddingFP4(10, 300).weight.shape == (10, 150)


def test_fp4_table_uses_the_fp4_map():
    q = bnb.nn.EmbeddingFP4(4, 64)
    assert torch.equal(q.weight_qmap, bnb.functional.get_4bit_type("fp4"))
    w = torch.tensor([0.0, 0.0625, 8, 12, 4, 6, 2, 3] * 8).repeat(4, 1) / 12
    q.load_state_dict({"weight": w})
    assert torch.equal(q(torch.arange(4)), w)  # every FP4 value is represented exactly


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("name", ["EmbeddingNF4", "EmbeddingFP4"])
def test_4bit_lookups_equal_bitsandbytes_when_rows_are_whole_blocks(name):
    B = _bnb()
    fp = _fp(50, 128)
    ref = getattr(B.nn, name)(50, 128)
    ref.load_state_dict(fp.state_dict())
    ref = ref.to("cpu")  # bitsandbytes quantizes here
    ours = getattr(bnb.nn, name)(50, 128)
    ours.load_state_dict(fp.state_dict())
    ids = torch.tensor([[0, 5, 49, 5]])
    assert torch.equal(ours(ids), ref(ids))


def test_8bit_lookup_is_within_one_code_of_bitsandbytes():
    B = _bnb()
    fp = _fp(50, 64)
    ref = B.nn.Embedding8bit(50, 64)
    ref.load_state_dict(fp.state_dict())
    ref = ref.to("cpu")
    ours = bnb.nn.Embedding8bit(50, 64)
    ours.load_state_dict(fp.state_dict())
    ids = torch.arange(50)
    step = fp.weight.detach().abs().amax(1, keepdim=True) / 127  # one int8 code of a row
    assert ((ours(ids) - ref(ids)).abs() <= step * 1.01).all()
    w = fp.weight.detach()
    assert (ours(ids) - w).abs().mean() <= (ref(ids) - w).abs().mean() * 1.05
    assert rq.SCHEMES[0] == "int8"


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("key", ["weight_codes", "weight"])
def test_codes_of_another_dtype_are_refused(cls, key):
    q = cls(20, 64)
    sd = q.state_dict()
    sd[key] = (sd.pop("weight_codes").to(torch.int16) - 300)  # would wrap into uint8
    fresh = cls(20, 64)
    before = fresh.weight.clone()
    with pytest.raises(RuntimeError, match=f"{key}: quantized codes must be uint8, got "
                                           "torch.int16"):
        fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight, before)
