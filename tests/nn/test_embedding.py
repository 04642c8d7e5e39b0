"""bitsandbytes-style Embedding/StableEmbedding and fairseq2-style StandardEmbedding."""
import math

import pytest
import torch

import bnbfuse as bnb
from bnbfuse.nn import Embedding, StableEmbedding, StandardEmbedding, init_scaled_embedding


def config(p):
    return bnb.optim.GlobalOptimManager.get_instance().get_config(p)


# ---- Embedding ---------------------------------------------------------------------------------
def test_embedding_is_nn_embedding_with_32bit_override():
    emb = Embedding(50, 8, padding_idx=3)
    assert isinstance(emb, torch.nn.Embedding)
    assert config(emb.weight) == {"optim_bits": 32}
    assert torch.count_nonzero(emb.weight[3]) == 0
    x = torch.tensor([[1, 3, 7]])
    assert torch.equal(emb(x), torch.nn.functional.embedding(x, emb.weight, padding_idx=3))


def test_embedding_bitsandbytes_positional_order():
    w = torch.randn(10, 4)
    emb = Embedding(10, 4, None, None, 2.0, False, False, w)
    assert torch.equal(emb.weight, w) and emb.weight.requires_grad
    # bitsandbytes' order goes on with device (and dtype for StableEmbedding)
    emb = Embedding(10, 4, None, None, 2.0, False, False, None, torch.device("cpu"))
    assert emb.weight.requires_grad and emb.weight.device.type == "cpu"
    st = StableEmbedding(10, 4, None, None, 2.0, False, False, None, "cpu", torch.bfloat16)
    assert st.weight.requires_grad and st.weight.dtype == torch.bfloat16


def test_embedding_override_survives_parameter_replacement():
    emb = Embedding(10, 4)
    emb.load_state_dict({"weight": torch.zeros(10, 4)}, assign=True)
    assert config(emb.weight) == {"optim_bits": 32}


# ---- StableEmbedding ---------------------------------------------------------------------------
def test_stable_embedding_init_norm_and_override():
    emb = StableEmbedding(1000, 64, padding_idx=0)
    assert torch.count_nonzero(emb.weight[0]) == 0
    bound = math.sqrt(6 / (1000 + 64))  # Xavier uniform
    assert float(emb.weight.detach().abs().max()) <= bound
    assert float(emb.weight.detach().abs().max()) > 0.9 * bound
    assert config(emb.weight) == {"optim_bits": 32}
    y = emb(torch.tensor([1, 2, 3]))
    assert torch.allclose(y.mean(-1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(-1, unbiased=False), torch.ones(3), atol=1e-2)


def test_stable_embedding_device_keeps_weight_trainable():
    emb = StableEmbedding(10, 8, device="cpu")
    assert emb.weight.requires_grad
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad is not None and emb.norm.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stable_embedding_dtype(dtype):
    emb = StableEmbedding(10, 8, dtype=dtype)
    assert emb.weight.dtype == dtype and emb.norm.weight.dtype == torch.float32
    y = emb(torch.tensor([1, 2]))
    assert y.dtype == dtype
    ref = torch.nn.functional.layer_norm(emb.weight[[1, 2]].float(), (8,))
    assert torch.equal(y, ref.to(dtype))


def test_stable_embedding_to_bfloat16_forward_on_cpu():
    emb = StableEmbedding(10, 8).to(torch.bfloat16)
    y = emb(torch.tensor([[1, 2], [3, 4]]))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 2, 8)
    y.float().sum().backward()
    assert emb.weight.grad is not None


# ---- StandardEmbedding -------------------------------------------------------------------------
def test_standard_embedding_shapes_and_default_init():
    torch.manual_seed(0)
    emb = StandardEmbedding(2000, 64)
    assert abs(float(emb.weight.detach().std()) - 1.0) < 0.02
    assert emb(torch.randint(0, 2000, (2, 3, 4))).shape == (2, 3, 4, 64)
    assert emb(torch.tensor(5)).shape == (64,)


def test_standard_embedding_init_fn_then_pad_zeroed():
    calls = []

    def init(e):
        calls.append(e)
        torch.nn.init.constant_(e.weight, 0.5)

    emb = StandardEmbedding(10, 4, pad_idx=2, init_fn=init)
    assert calls == [emb]
    assert torch.count_nonzero(emb.weight[2]) == 0
    assert torch.all(emb.weight[[0, 1, 3]] == 0.5)


def test_standard_embedding_pad_row_never_gets_gradient():
    emb = StandardEmbedding(10, 4, pad_idx=0)
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        emb(torch.tensor([[0, 1, 0, 2]])).pow(2).sum().backward()
        assert torch.count_nonzero(emb.weight.grad[0]) == 0
        assert torch.count_nonzero(emb.weight.grad[1]) > 0
        opt.step()
        opt.zero_grad()
    assert torch.count_nonzero(emb.weight[0]) == 0


@pytest.mark.parametrize("cls", [Embedding, StableEmbedding])
@pytest.mark.parametrize("freeze", [True, False])
def test_from_pretrained(cls, freeze):
    w = torch.randn(5, 4)
    emb = cls.from_pretrained(w, freeze=freeze, padding_idx=1)
    assert torch.equal(emb.weight, w) and emb.weight.requires_grad is not freeze
    assert emb.padding_idx == 1
    assert bnb.optim.GlobalOptimManager.get_instance().get_config(emb.weight) == {"optim_bits": 32}


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                  lambda m: m.to(dtype=torch.float16)])
def test_stable_embedding_norm_stays_float32_under_casts(cast):
    emb = cast(StableEmbedding(10, 8))
    assert emb.weight.dtype != torch.float32
    assert emb.norm.weight.dtype == emb.norm.bias.dtype == torch.float32
    assert emb(torch.tensor([1, 2])).dtype == emb.weight.dtype
    moved = StableEmbedding(10, 8, device="meta").to_empty(device="cpu")  # moves still apply
    assert moved.norm.weight.device.type == "cpu"


def test_standard_embedding_negative_pad_idx_counts_from_the_end():
    embed = StandardEmbedding(10, 4, pad_idx=-1)
    assert embed.pad_idx == embed.padding_idx == 9
    assert torch.equal(embed(torch.tensor([9])), torch.zeros(1, 4))


def test_standard_embedding_bad_args():
    with pytest.raises(ValueError, match="pad_idx"):
        StandardEmbedding(10, 4, pad_idx=10)
    with pytest.raises(ValueError):
        StandardEmbedding(0, 4)


def test_init_scaled_embedding():
    torch.manual_seed(0)
    emb = StandardEmbedding(4000, 256, pad_idx=1, init_fn=init_scaled_embedding)
    w = emb.weight.detach()
    assert torch.count_nonzero(w[1]) == 0
    assert abs(float(w.std()) - 1 / math.sqrt(256)) < 0.002
    assert abs(float(w.mean())) < 1e-3
    plain = torch.nn.Embedding(100, 16, padding_idx=5)
    init_scaled_embedding(plain)
    assert torch.count_nonzero(plain.weight[5]) == 0
