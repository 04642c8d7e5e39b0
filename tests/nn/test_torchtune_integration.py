"""FusionEmbedding inside real decoders (torchtune, HF transformers), torch.compile, and the
8-bit optimizers (32-bit state for the new-token table)."""
import pytest
import torch

import bnbfuse as bnb
from bnbfuse.nn import (FusionEmbedding, add_fusion_tokens, get_fusion_params,
                        set_trainable_params)

QUANTS = [None, "int8", "nf4"]


# ---- torchtune --------------------------------------------------------------------------------
def torchtune_llama(vocab=128, dim=64):
    pytest.importorskip("torchtune", reason="torchtune not installed")
    try:
        from torchtune.models.llama3._component_builders import llama3
    except Exception as err:  # torchtune installed but not importable with this torch/torchao
        pytest.skip(f"torchtune does not import: {err}")
    return llama3(vocab_size=vocab, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=dim,
                  max_seq_len=32, intermediate_dim=128)


@pytest.mark.parametrize("quant", QUANTS)
def test_torchtune_decoder_with_fusion_tok_embeddings(quant):
    torch.manual_seed(0)
    original = torchtune_llama()
    ckpt = original.state_dict()
    model = torchtune_llama()
    model.tok_embeddings = FusionEmbedding(128, 8, 64, base_quant=quant)
    res = model.load_state_dict(ckpt, strict=False)
    assert res.missing_keys == ["tok_embeddings.fusion_embedding.weight"]
    assert res.unexpected_keys == []
    tokens = torch.randint(0, 128, (2, 12))
    ref = original(tokens)
    out = model(tokens)
    if quant is None:
        assert torch.allclose(out, ref, atol=1e-5)
    else:
        rel = float((out.detach() - ref.detach()).abs().mean() / ref.detach().abs().mean())
        assert rel < (0.02 if quant == "int8" else 0.2)
    # new tokens flow through the decoder and only the fusion table trains
    set_trainable_params(model, get_fusion_params(model))
    new_tokens = torch.cat([tokens[:, :6], torch.randint(128, 136, (2, 6))], dim=1)
    model(new_tokens).logsumexp(-1).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"tok_embeddings.fusion_embedding.weight"}


def test_matches_torchtune_fusion_embedding():
    torchtune_llama()  # skips without torchtune
    from torchtune.modules.model_fusion import FusionEmbedding as TTFusionEmbedding

    torch.manual_seed(1)
    tt = TTFusionEmbedding(100, 10, 16)
    ours = FusionEmbedding(100, 10, 16)
    assert ours.load_state_dict(tt.state_dict()).missing_keys == []
    assert sorted(tt.state_dict()) == sorted(ours.state_dict())
    ids = torch.randint(0, 110, (4, 9))
    assert torch.equal(ours(ids), tt(ids))
    tt.load_state_dict(ours.state_dict())


# ---- Hugging Face transformers --------------------------------------------------------------------
def hf_llama(vocab=128, tie=False):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("quant", QUANTS)
def test_hf_llama_add_fusion_tokens(quant):
    torch.manual_seed(2)
    model = hf_llama()
    tokens = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    emb = add_fusion_tokens(model, 4, base_quant=quant)
    assert model.get_input_embeddings() is emb and model.model.embed_tokens is emb
    with torch.no_grad():
        out = model(input_ids=tokens).logits
    if quant is None:
        assert torch.allclose(out, ref, atol=1e-5)
    else:
        assert float((out - ref).abs().mean() / ref.abs().mean()) < (0.02 if quant == "int8" else 0.2)
    new_tokens = tokens.clone()
    new_tokens[:, 4:7] = torch.tensor([128, 130, 131])  # not last: its output has no label
    set_trainable_params(model, get_fusion_params(model))
    loss = model(input_ids=new_tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    g = emb.fusion_embedding.weight.grad
    assert g[[0, 2, 3]].abs().sum(1).gt(0).all() and g[1].abs().sum() == 0
    # the checkpoint of the original model loads into the fused one with strict=False
    fresh = hf_llama()
    add_fusion_tokens(fresh, 4, base_quant=quant)
    res = fresh.load_state_dict(hf_llama().state_dict(), strict=False)
    assert res.missing_keys == ["model.embed_tokens.fusion_embedding.weight"]


@pytest.mark.parametrize("quant", QUANTS)
def test_hf_llama_tied_head(quant, tmp_path):
    torch.manual_seed(3)
    model = hf_llama(tie=True)
    head = model.lm_head.weight
    # a tied head cannot share a FusionEmbedding's tables: refused, naming the fix
    with pytest.raises(ValueError, match="untie_head=True"):
        add_fusion_tokens(model, 2, base_quant=quant)
    assert model.get_input_embeddings().weight is head  # nothing changed
    emb = add_fusion_tokens(model, 2, base_quant=quant, untie_head=True)
    assert model.lm_head.weight is not head and torch.equal(model.lm_head.weight, head)
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # accelerate's FSDP2 prepare calls it
    assert model.get_input_embeddings() is emb
    logits = model(input_ids=torch.tensor([[1, 128, 129, 5]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)  # HF's own checkpoint path works with the new module


# ---- torch.compile ------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self, quant):
        super().__init__()
        self.tok = FusionEmbedding(64, 8, 32, base_quant=quant)
        self.proj = torch.nn.Linear(32, 72)

    def forward(self, ids):
        return self.proj(torch.relu(self.tok(ids)))


@pytest.mark.parametrize("quant", QUANTS)
def test_torch_compile_forward_backward(quant):
    torch.manual_seed(3)
    model = Tiny(quant)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 72, (3, 5))
    out = compiled(ids)
    out.sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(ids)
    ref.sum().backward()
    assert torch.allclose(out, ref)
    for g, p in zip(compiled_grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_fake_impl_shapes_under_meta():
    from torch._subclasses.fake_tensor import FakeTensorMode

    emb = FusionEmbedding(20, 4, 8, base_quant="nf4")
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = emb(torch.zeros(2, 3, 5, dtype=torch.long))
    assert out.shape == (2, 3, 5, 8) and out.dtype == torch.float32


# ---- 8-bit optimizers -------------------------------------------------------------------------------
def optim_or_skip(name):
    if not hasattr(bnb.optim, name):
        pytest.skip(f"bnbfuse.optim.{name} not available on this branch")
    return getattr(bnb.optim, name)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("opt_name", ["Adam8bit", "AdamW8bit"])
def test_new_token_table_keeps_32bit_state(quant, opt_name):
    opt_cls = optim_or_skip(opt_name)
    torch.manual_seed(4)
    tok = FusionEmbedding(200, 100, 64, base_quant=quant)  # 6400-value fusion table (> 4096)
    head = torch.nn.Linear(64, 100)                          # 6400-value weight: 8-bit state
    model = torch.nn.Sequential(tok, head)
    opt = opt_cls(model.parameters(), lr=1e-2)
    base_before = {k: v.clone() for k, v in tok.embedding.state_dict().items()}
    fusion_before = tok.fusion_embedding.weight.detach().clone()
    ids = torch.randint(0, 300, (4, 16))
    for _ in range(2):
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    st = opt.state[tok.fusion_embedding.weight]
    assert st["state1"].dtype == torch.float32 and st["state2"].dtype == torch.float32
    assert opt.state[head.weight]["state1"].dtype == torch.uint8
    if quant is None:
        assert opt.state[tok.embedding.weight]["state1"].dtype == torch.float32
    else:  # the frozen quantized base is not a parameter and never changes
        assert all(torch.equal(v, base_before[k]) for k, v in tok.embedding.state_dict().items())
    used = torch.unique(ids[ids >= 200]) - 200
    moved = (tok.fusion_embedding.weight.detach() - fusion_before).abs().sum(1) > 0
    assert moved[used].all()


def test_stable_embedding_state_32bit_in_adam8bit():
    opt_cls = optim_or_skip("Adam8bit")
    emb = bnb.nn.StableEmbedding(1000, 16)
    opt = opt_cls(emb.parameters(), lr=1e-3)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["state1"].dtype == torch.float32
