"""FusionEmbedding: routing, quantized base, fused lookup kernels, autograd, checkpoints."""
import ctypes
import io

import pytest
import torch

import bnbfuse as bnb
from bnbfuse import _native
from bnbfuse import row_quantization as rq
from bnbfuse.backends import reference as R
from bnbfuse.nn import FusionEmbedding, add_fusion_tokens

QUANTS = [None, "int8", "nf4"]
BITS = {None: 0, "int8": 8, "nf4": 4}


def full_table(emb: FusionEmbedding) -> torch.Tensor:
    """The (V + F, D) table the module should gather from, built independently."""
    fusion = emb.fusion_embedding.weight.detach()
    if emb.base_quant is None:
        base = emb.embedding.weight.detach()
    else:
        e = emb.embedding
        base = rq.dequantize_table(e.weight, e.absmax, emb.base_quant, e.blocksize, emb.dim,
                                   fusion.dtype)
    return torch.cat([base, fusion])


def bits_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ---- quantization of the table ---------------------------------------------------------------
@pytest.mark.parametrize("scheme,max_err,max_bytes", [("int8", 0.01, 1.07), ("nf4", 0.12, 0.57)])
def test_quantization_error_and_bytes_per_param(scheme, max_err, max_bytes):
    torch.manual_seed(0)
    w = torch.randn(4096, 512) * 0.02
    emb = FusionEmbedding.from_embedding(torch.nn.Embedding.from_pretrained(w), 4,
                                         base_quant=scheme)
    e = emb.embedding
    deq = e.dequantize()
    rel = float((deq - w).abs().mean() / w.abs().mean())
    assert rel <= max_err
    stored = e.weight.numel() * e.weight.element_size() + e.absmax.numel() * 4
    assert stored / w.numel() <= max_bytes
    assert stored == rq.table_bytes(4096, 512, scheme)
    # codes are exact nearest-in-map of each block-scaled value
    values = rq.quant_map(scheme)[: 255 if scheme == "int8" else 16]
    x = (w[:64].view(64, -1, 64) / e.absmax[:64, :, None]).reshape(-1)
    idx = rq.unpack_codes(e.weight[:64], scheme, 512).reshape(-1)
    chosen = rq.quant_map(scheme)[idx]
    best = (x[:, None] - values[None, :]).abs().min(dim=1).values
    assert torch.equal((x - chosen).abs(), best)


def test_quantize_table_odd_dims_and_zero_rows():
    w = torch.randn(7, 37)
    w[2] = 0
    for scheme in rq.SCHEMES:
        codes, absmax = rq.quantize_table(w, scheme, 16)
        assert codes.shape == rq.code_shape(7, 37, scheme) and absmax.shape == (7, 3)
        d = rq.dequantize_table(codes, absmax, scheme, 16, 37)
        assert torch.equal(d[2], torch.zeros(37)) and not torch.isnan(d).any()
        rel = float((d - w).abs().mean() / w.abs().mean())
        assert rel < (0.01 if scheme == "int8" else 0.12)


def test_bad_scheme():
    with pytest.raises(ValueError, match="base_quant"):
        FusionEmbedding(10, 2, 8, base_quant="int4")


# ---- routing and shapes -------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("shape", [(), (5,), (3, 7), (2, 3, 4)])
def test_routing_equals_reference_gather(quant, shape):
    torch.manual_seed(1)
    emb = FusionEmbedding(50, 6, 40, base_quant=quant)
    ids = torch.randint(0, 56, shape)
    out = emb(ids)
    assert out.shape == (*shape, 40)
    assert torch.equal(out, full_table(emb)[ids])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_id_dtype(dtype):
    emb = FusionEmbedding(50, 6, 8)
    ids = torch.tensor([[0, 49, 50, 55]])
    assert torch.equal(emb(ids.to(dtype)), emb(ids))


@pytest.mark.parametrize("quant", QUANTS)
def test_bad_ids_raise(quant):
    emb = FusionEmbedding(50, 6, 8, base_quant=quant)
    with pytest.raises(IndexError, match=r"token id 56 .*\[0, 56\)"):
        emb(torch.tensor([1, 56]))
    with pytest.raises(IndexError, match="token id -1"):
        emb(torch.tensor([[-1, 3]]))
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True]), [1, 2]):
        with pytest.raises(TypeError, match="integer|tensor"):
            emb(bad)


def test_empty_input():
    emb = FusionEmbedding(50, 6, 8, base_quant="nf4")
    assert emb(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant", QUANTS)
def test_half_dtypes(quant, dtype):
    emb = FusionEmbedding(30, 4, 24, base_quant=quant, dtype=dtype)
    ids = torch.arange(34).view(2, 17)
    out = emb(ids)
    assert out.dtype == dtype and torch.equal(out, full_table(emb)[ids])
    emb2 = FusionEmbedding(30, 4, 24, base_quant=quant).to(dtype)
    assert emb2(ids).dtype == dtype
    if quant:  # codes and scales are never cast
        assert emb2.embedding.absmax.dtype == torch.float32
        assert emb2.embedding.weight.dtype == torch.uint8


# ---- kernels: native CPU (every ISA) vs reference, bit for bit ------------------------------------
def isas():
    if not _native.cpu.loaded:
        return []
    return _native.cpu.bnbf_cpu_isas_compiled().decode().split()


@pytest.mark.skipif(not _native.cpu.loaded, reason="native CPU library not built")
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_cpu_bit_exact_with_reference(quant, dtype):
    torch.manual_seed(2)
    lib = _native.cpu.lib
    lib.bnbf_cpu_force_isa.argtypes = [ctypes.c_char_p]
    cases = [(64, 64, False), (70, 64, False), (129, 8, False), (3, 2, False),
             (300, 256, False), (33, 5, False), (70, 64, True), (9, 4, True)]
    for D, blocksize, other_map in cases:
        V, F = 40, 5
        w = torch.randn(V, D)
        if quant:
            base, absmax = rq.quantize_table(w, quant, blocksize)
            qmap = rq.quant_map(quant)
            if other_map:  # any map works (int8 has a computed fast path for its own map)
                qmap = (torch.rand(qmap.numel()) * 2 - 1).sort().values
                base = torch.randint(0, qmap.numel(), (V, D)).to(torch.uint8)
                if quant == "nf4":
                    base = (base[:, : (D + 1) // 2] << 4) | base[:, -((D + 1) // 2):]
        else:
            base, absmax, qmap = w.to(dtype), torch.empty(0), torch.empty(0)
        fusion = torch.randn(F, D).to(dtype)
        ids = torch.randint(0, V + F, (4, 9))
        ref = R.fusion_embedding_lookup(ids, base, absmax, qmap, fusion, BITS[quant], blocksize)
        ran = 0
        for isa in isas():
            if lib.bnbf_cpu_force_isa(isa.encode()) != 0:
                continue  # compiled but not supported by this CPU
            ran += 1
            try:
                out = torch.ops.bnbfuse.fusion_embedding_lookup(ids, base, absmax, qmap, fusion,
                                                                BITS[quant], blocksize)
            finally:
                lib.bnbf_cpu_force_isa(None)
            assert bits_equal(out, ref), (isa, D, blocksize)
        assert ran >= 1


@pytest.mark.skipif(not _native.cpu.loaded, reason="native CPU library not built")
def test_c_api_bounds_checks_without_python():
    """The C entry point rejects bad ids and arguments by itself (BNBF_E_INDEX / E_ARG)."""
    fn = _native.cpu.lib.bnbf_cpu_fusion_embedding_lookup
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [P, I64, P, I32, P, P, I64, P, I64, I64, I64, P, I32, I32]
    base, absmax = rq.quantize_table(torch.randn(10, 8), "int8", 8)
    qmap, fusion = rq.quant_map("int8"), torch.randn(2, 8)
    out = torch.full((3, 8), 7.0)
    for bad in (12, -1, 2**40):
        ids = torch.tensor([0, bad, 1])
        rc = fn(ids.data_ptr(), 3, base.data_ptr(), 8, absmax.data_ptr(), qmap.data_ptr(), 10,
                fusion.data_ptr(), 2, 8, 8, out.data_ptr(), 0, 1)
        assert rc == -2
        assert b"out of range" in _native.cpu.lib.bnbf_last_error()
    assert torch.all(out == 7.0)  # nothing written before validation
    ids = torch.tensor([0, 1, 2])
    assert fn(ids.data_ptr(), 3, base.data_ptr(), 3, absmax.data_ptr(), qmap.data_ptr(), 10,
              fusion.data_ptr(), 2, 8, 8, out.data_ptr(), 0, 1) == -1  # bits
    assert fn(ids.data_ptr(), 3, None, 8, absmax.data_ptr(), qmap.data_ptr(), 10,
              fusion.data_ptr(), 2, 8, 8, out.data_ptr(), 0, 1) == -1  # null base
    # no base rows: base, absmax and qmap may be null and are never read
    ids = torch.tensor([0, 1])
    assert fn(ids.data_ptr(), 2, None, 8, None, None, 0, fusion.data_ptr(), 2, 8, 8,
              out.data_ptr(), 0, 1) == 0
    assert torch.equal(out[:2], fusion)
    # sizes whose sum overflows int64 are refused, not wrapped around
    assert fn(ids.data_ptr(), 2, base.data_ptr(), 8, absmax.data_ptr(), qmap.data_ptr(),
              2**63 - 1, fusion.data_ptr(), 2, 8, 8, out.data_ptr(), 0, 1) == -1
    # a blocksize near INT64_MAX is one block per row (its count must not overflow to 0);
    # here blocksize 8 = D is one block per row too
    ref = torch.ops.bnbfuse.fusion_embedding_lookup(ids, base, absmax, qmap, fusion, 8, 8)
    got = torch.ops.bnbfuse.fusion_embedding_lookup(ids, base, absmax, qmap, fusion, 8,
                                                    2**63 - 1)
    assert torch.equal(got, ref)


def test_op_argument_checks():
    base, absmax = rq.quantize_table(torch.randn(10, 8), "nf4", 8)
    fusion = torch.randn(2, 8)
    op = torch.ops.bnbfuse.fusion_embedding_lookup
    ids = torch.tensor([1])
    with pytest.raises(ValueError, match="absmax"):
        op(ids, base, absmax[:, :0], rq.quant_map("nf4"), fusion, 4, 8)
    with pytest.raises(ValueError, match="qmap"):
        op(ids, base, absmax, rq.quant_map("int8"), fusion, 4, 8)
    with pytest.raises(ValueError, match="code columns"):
        op(ids, base, absmax, rq.quant_map("nf4"), fusion, 8, 8)
    with pytest.raises(TypeError, match="int64"):
        op(ids.int(), base, absmax, rq.quant_map("nf4"), fusion, 4, 8)


# ---- autograd -------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_gradient_only_into_fusion_table_when_quantized(quant):
    torch.manual_seed(3)
    emb = FusionEmbedding(20, 5, 8, base_quant=quant)
    assert [n for n, p in emb.named_parameters()] == ["fusion_embedding.weight"]
    ids = torch.tensor([[1, 20, 22, 20], [3, 24, 1, 5]])
    g = torch.randn(2, 4, 8)
    emb(ids).backward(g)
    expected = torch.zeros(5, 8)
    expected.index_add_(0, torch.tensor([0, 2, 0, 4]), g.reshape(-1, 8)[[1, 2, 3, 5]])
    assert torch.allclose(emb.fusion_embedding.weight.grad, expected)


def test_gradient_into_both_tables_when_plain():
    torch.manual_seed(4)
    emb = FusionEmbedding(20, 5, 8)
    ids = torch.tensor([[1, 20, 22, 20], [3, 24, 1, 5]])
    g = torch.randn(2, 4, 8)
    emb(ids).backward(g)
    full = torch.zeros(25, 8).index_add_(0, ids.reshape(-1), g.reshape(-1, 8))
    assert torch.allclose(emb.embedding.weight.grad, full[:20])
    assert torch.allclose(emb.fusion_embedding.weight.grad, full[20:])
    # a frozen plain base gets no gradient (torchtune usage)
    emb.zero_grad(set_to_none=True)
    emb.embedding.weight.requires_grad_(False)
    emb(ids).backward(g)
    assert emb.embedding.weight.grad is None
    assert torch.allclose(emb.fusion_embedding.weight.grad, full[20:])


@pytest.mark.parametrize("quant", QUANTS)
def test_gradients_match_autograd_of_concatenated_table(quant):
    torch.manual_seed(9)
    emb = FusionEmbedding(12, 4, 6, base_quant=quant)
    ids = torch.randint(0, 16, (5, 7))
    g = torch.randn(5, 7, 6)
    emb(ids).backward(g)
    table = full_table(emb).requires_grad_()
    torch.nn.functional.embedding(ids, table).backward(g)
    assert torch.allclose(emb.fusion_embedding.weight.grad, table.grad[12:], atol=1e-6)
    if quant is None:
        assert torch.allclose(emb.embedding.weight.grad, table.grad[:12], atol=1e-6)


# ---- state_dict ------------------------------------------------------------------------------------
def test_state_dict_keys():
    assert sorted(FusionEmbedding(10, 2, 8).state_dict()) == ["fusion_embedding.weight", "weight"]
    for q in ("int8", "nf4"):
        sd = FusionEmbedding(10, 2, 8, base_quant=q).state_dict()
        # the codes are never "weight": a float model must not take them for its table
        assert sorted(sd) == ["fusion_embedding.weight", "weight_absmax", "weight_codes",
                              "weight_qmap"]
        assert sd["weight_codes"].dtype == torch.uint8 and sd["weight_absmax"].dtype == torch.float32


class TinyLM(torch.nn.Module):
    def __init__(self, tok):
        super().__init__()
        self.tok_embeddings = tok
        self.output = torch.nn.Linear(8, 10)


@pytest.mark.parametrize("quant", QUANTS)
def test_original_checkpoint_loads_with_strict_false(quant):
    torch.manual_seed(5)
    original = TinyLM(torch.nn.Embedding(10, 8))
    ckpt = original.state_dict()
    fused = TinyLM(FusionEmbedding(10, 3, 8, base_quant=quant))
    res = fused.load_state_dict(ckpt, strict=False)
    assert res.missing_keys == ["tok_embeddings.fusion_embedding.weight"]
    assert res.unexpected_keys == []
    ids = torch.arange(10)
    w = original.tok_embeddings.weight.detach()
    got = fused.tok_embeddings(ids)
    if quant is None:
        assert torch.equal(got, w)
    else:  # a float weight is quantized on load
        codes, absmax = rq.quantize_table(w, quant, 64)
        assert torch.equal(fused.tok_embeddings.embedding.weight, codes)
        assert torch.equal(got, rq.dequantize_table(codes, absmax, quant, 64, 8))


@pytest.mark.parametrize("quant", QUANTS)
def test_partial_dict_with_only_fusion_table(quant):
    fused = TinyLM(FusionEmbedding(10, 3, 8, base_quant=quant))
    before = fused.tok_embeddings.embedding.weight.clone()
    new = torch.randn(3, 8)
    res = fused.load_state_dict({"tok_embeddings.fusion_embedding.weight": new}, strict=False)
    assert ("tok_embeddings.weight_codes" if quant else "tok_embeddings.weight") in res.missing_keys
    assert not any("embedding.weight" in k and "fusion" not in k for k in res.missing_keys)
    assert torch.equal(fused.tok_embeddings.fusion_embedding.weight, new)
    assert torch.equal(fused.tok_embeddings.embedding.weight, before)


@pytest.mark.parametrize("quant", QUANTS)
def test_save_load_bit_exact(quant):
    torch.manual_seed(6)
    a = TinyLM(FusionEmbedding(50, 4, 40, base_quant=quant, dtype=torch.bfloat16))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = TinyLM(FusionEmbedding(50, 4, 40, base_quant=quant, dtype=torch.bfloat16))
    assert b.load_state_dict(torch.load(buf)).missing_keys == []
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and bits_equal(va, vb)
    ids = torch.arange(54).view(6, 9)
    assert bits_equal(a.tok_embeddings(ids), b.tok_embeddings(ids))


def test_quantized_checkpoint_into_plain_is_an_error():
    sd = FusionEmbedding(10, 2, 8, base_quant="int8").state_dict()
    with pytest.raises(RuntimeError, match="quantized base"):
        FusionEmbedding(10, 2, 8).load_state_dict(sd)


def test_wrong_shape_float_weight_is_an_error():
    with pytest.raises(RuntimeError, match=r"\(10, 8\)"):
        FusionEmbedding(10, 2, 8, base_quant="nf4").load_state_dict(
            {"weight": torch.randn(11, 8)}, strict=False)


# ---- API --------------------------------------------------------------------------------------------
def test_fusion_params_and_32bit_override():
    mng = bnb.optim.GlobalOptimManager.get_instance()
    for quant in QUANTS:
        emb = FusionEmbedding(10, 2, 8, base_quant=quant)
        assert emb.fusion_params() == ["fusion_embedding.weight"]
        assert mng.get_config(emb.fusion_embedding.weight) == {"optim_bits": 32}
        if quant is None:
            assert mng.get_config(emb.embedding.weight) == {"optim_bits": 32}


@pytest.mark.parametrize("quant", QUANTS)
def test_from_embedding_and_merge(quant):
    torch.manual_seed(7)
    old = torch.nn.Embedding(30, 16)
    emb = FusionEmbedding.from_embedding(old, 4, base_quant=quant)
    assert (emb.vocab_size, emb.fusion_vocab_size, emb.embed_dim) == (30, 4, 16)
    assert (emb.num_embeddings, emb.embedding_dim, emb.dim) == (34, 16, 16)
    if quant is None:
        assert emb.embedding.weight is old.weight
    new_rows = emb.fusion_embedding.weight.detach()
    assert torch.allclose(new_rows.mean(0), old.weight.detach().mean(0), atol=0.05)
    merged = emb.merge()
    assert type(merged) is torch.nn.Embedding and merged.weight.shape == (34, 16)
    ids = torch.randint(0, 34, (5, 6))
    assert torch.equal(merged(ids), emb(ids))


def test_constructor_validation():
    for args in [(0, 1, 4), (10, -1, 4), (10, 1, 0), (10.0, 1, 4)]:
        with pytest.raises(ValueError):
            FusionEmbedding(*args)
    FusionEmbedding(10, 0, 4)(torch.tensor([9]))  # no new tokens is allowed


def test_meta_device_then_to_empty():
    emb = FusionEmbedding(100, 4, 8, base_quant="nf4", device="meta")
    assert emb.embedding.weight.is_meta
    emb.to_empty(device="cpu")
    emb.load_state_dict({"weight": torch.randn(100, 8), "fusion_embedding.weight": torch.randn(4, 8)})
    assert emb(torch.tensor([3, 101])).shape == (2, 8)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_meta_device_then_reset_parameters(quant):
    # FSDP2-style init: to_empty() leaves every buffer garbage, the qmap included, until
    # each module's reset_parameters() runs.
    emb = FusionEmbedding(300, 4, 64, base_quant=quant, device="meta").to_empty(device="cpu")
    emb.embedding.qmap.fill_(float("nan"))
    for module in emb.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    ids = torch.arange(304)
    out = emb(ids)
    assert torch.isfinite(out).all()
    assert torch.equal(out, emb.merge()(ids))


@pytest.mark.parametrize("quant", QUANTS)
def test_padding_idx_carries_over(quant):
    old = torch.nn.Embedding(10, 4, padding_idx=0)
    new = FusionEmbedding.from_embedding(old, 2, base_quant=quant)
    assert new.padding_idx == 0 and new.merge().padding_idx == 0
    ids = torch.tensor([0, 0, 3, 11])
    new(ids).sum().backward()
    if quant is None:  # a trainable base: the padding row gets no gradient, as in nn.Embedding
        assert torch.equal(new.embedding.weight.grad[0], torch.zeros(4))
        assert torch.equal(new.embedding.weight.grad[3], torch.ones(4))
    assert torch.equal(new.fusion_embedding.weight.grad[1], torch.ones(4))
    assert FusionEmbedding(10, 2, 4, padding_idx=-1).padding_idx == 9
    with pytest.raises(ValueError, match="padding_idx"):
        FusionEmbedding(10, 2, 4, padding_idx=10)  # a fusion row cannot be padding


# ---- swapping into a model --------------------------------------------------------------------------
class WithAccessors(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Module()
        self.inner.embed_tokens = torch.nn.Embedding(20, 8)

    def get_input_embeddings(self):
        return self.inner.embed_tokens

    def set_input_embeddings(self, value):
        self.inner.embed_tokens = value


@pytest.mark.parametrize("quant", QUANTS)
def test_add_fusion_tokens(quant):
    model = WithAccessors()
    w = model.inner.embed_tokens.weight.detach().clone()
    emb = add_fusion_tokens(model, 3, base_quant=quant)
    assert model.inner.embed_tokens is emb and emb.fusion_vocab_size == 3
    out = emb(torch.arange(20))
    if quant is None:
        assert torch.equal(out, w)
    else:
        assert float((out.detach() - w).abs().mean() / w.abs().mean()) < (0.01 if quant == "int8" else 0.12)
    model2 = WithAccessors()
    emb2 = add_fusion_tokens(model2, 2, attr="inner.embed_tokens", base_quant=quant)
    assert model2.inner.embed_tokens is emb2
    with pytest.raises(ValueError, match="already"):
        add_fusion_tokens(model2, 2, attr="inner.embed_tokens")
    with pytest.raises(AttributeError, match="nope"):
        add_fusion_tokens(model2, 2, attr="inner.nope")
    with pytest.raises(ValueError, match="attr="):
        add_fusion_tokens(torch.nn.Sequential(torch.nn.Embedding(3, 2)), 1)
    with pytest.raises(TypeError, match="nn.Embedding"):
        add_fusion_tokens(torch.nn.Sequential(torch.nn.Linear(3, 2)), 1, attr="0")


# ---- CUDA -----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_reference(quant, dtype):
    torch.manual_seed(8)
    for D, blocksize in [(64, 64), (70, 64), (129, 8), (4096, 64)]:
        emb = FusionEmbedding(300, 7, D, base_quant=quant, blocksize=blocksize, dtype=dtype)
        ids = torch.randint(0, 307, (3, 50))
        ref = emb(ids)
        cuda = emb.to("cuda")
        out = cuda(ids.cuda())
        assert bits_equal(out.cpu(), ref)
        out.float().sum().backward()
        g = cuda.fusion_embedding.weight.grad.cpu()
        counts = torch.bincount(ids.reshape(-1), minlength=307)[300:].float()
        assert torch.allclose(g.float(), counts[:, None].expand(7, D))


@pytest.mark.cuda
def test_cuda_bad_id_asserts():
    # A device-side assertion poisons the CUDA context, so it runs in its own process.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch, bnbfuse\n"
            "from bnbfuse.nn import FusionEmbedding\n"
            "emb = FusionEmbedding(10, 2, 8, base_quant='int8').cuda()\n"
            "out = emb(torch.tensor([3, 12], device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert proc.returncode != 0
    assert "out of range" in proc.stderr or "assert" in proc.stderr.lower()


@pytest.mark.cuda
def test_cuda_kernel_zero_row_for_bad_id_without_python_checks():
    """The CUDA C entry point never reads out of bounds: a bad id gets a zero row."""
    base, absmax = rq.quantize_table(torch.randn(10, 8), "int8", 8)
    dev = "cuda"
    ids = torch.tensor([1, 12, -5, 11], device=dev)
    out = torch.full((4, 8), 7.0, device=dev)
    fusion = torch.randn(2, 8, device=dev)
    base, absmax, qmap = base.to(dev), absmax.to(dev), rq.quant_map("int8", dev)
    fn = _native.cuda.lib.bnbf_cuda_fusion_embedding_lookup
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [P, I64, P, I32, P, P, I64, P, I64, I64, I64, P, I32, I32, P]
    stream = torch.cuda.current_stream().cuda_stream
    assert fn(ids.data_ptr(), 4, base.data_ptr(), 8, absmax.data_ptr(), qmap.data_ptr(), 10,
              fusion.data_ptr(), 2, 8, 8, out.data_ptr(), 0, ids.device.index, stream) == 0
    torch.cuda.synchronize()
    assert torch.equal(out[1], torch.zeros(8, device=dev))
    assert torch.equal(out[2], torch.zeros(8, device=dev))
    assert torch.equal(out[3], fusion[1])


@pytest.mark.parametrize("quant", [None, "int8", "nf4"])
@pytest.mark.parametrize("ids_device", ["cpu", "meta"])
def test_meta_module_returns_meta_tensor(quant, ids_device):
    # as nn.Embedding on meta: the output stays on meta (no uninitialised CPU memory)
    emb = FusionEmbedding(10, 3, 8, base_quant=quant, padding_idx=0, device="meta")
    ids = torch.tensor([[0, 1, 11]], device=ids_device)
    out = emb(ids)
    assert out.is_meta and out.shape == (1, 3, 8)
    assert torch.nn.Embedding(10, 8, device="meta")(ids).is_meta


@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("key", ["weight_codes", "weight"])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.int64, torch.bool])
def test_codes_of_another_dtype_are_refused(quant, key, dtype):
    # int16 -300..-45 would wrap into uint8 codes: refused, and nothing is loaded
    emb = FusionEmbedding(50, 2, 40, base_quant=quant)
    sd = emb.state_dict()
    sd[key] = torch.linspace(-300, -45, sd.pop("weight_codes").numel()).to(dtype).view(
        emb.embedding.weight.shape)
    fresh = FusionEmbedding(50, 2, 40, base_quant=quant)
    before = fresh.embedding.weight.clone()
    with pytest.raises(RuntimeError, match=f"{key}: quantized codes must be uint8, got {dtype}"):
        fresh.load_state_dict(sd)
    assert torch.equal(fresh.embedding.weight, before)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("blocksize", [2**12, 2**22])
def test_blocksize_is_capped_at_the_row_width(quant, blocksize):
    # a block longer than a row is the row: no (rows, blocksize) padding (2**22 peaked at 4 GB)
    torch.manual_seed(0)
    emb = FusionEmbedding(50, 6, 40, base_quant=quant, blocksize=blocksize)
    assert emb.embedding.blocksize == 40 and emb.blocksize == 40
    assert emb.embedding.absmax.shape == (50, 1)
    w = torch.randn(50, 40)
    emb.embedding.quantize_(w)
    row = FusionEmbedding(50, 6, 40, base_quant=quant, blocksize=40)
    row.embedding.quantize_(w)
    ids = torch.arange(50)
    assert torch.equal(emb(ids), row(ids))
    assert torch.equal(emb.embedding.dequantize(), row.embedding.dequantize())
    q = bnb.nn.Embedding8bit(50, 40, blocksize=blocksize)
    assert q.blocksize == 40 and q.weight_absmax.shape == (50, 1)
    codes, absmax = rq.quantize_table(w, quant, blocksize)
    assert absmax.shape == (50, 1) and torch.equal(codes, row.embedding.weight)
    assert torch.equal(rq.dequantize_table(codes, absmax, quant, blocksize, 40),
                       row.embedding.dequantize())


@pytest.mark.parametrize("quant", [None, "int8", "nf4"])
@pytest.mark.parametrize("pad", [3, -1])
def test_padding_row_starts_at_zero(quant, pad):
    # as nn.Embedding(padding_idx=k): the padding row of a randomly built base is zero,
    # also after the meta-device init (to_empty + each module's reset_parameters)
    torch.manual_seed(0)
    emb = FusionEmbedding(10, 3, 7, base_quant=quant, padding_idx=pad)
    row = pad % 10
    out = emb(torch.arange(13))
    assert torch.equal(out[row], torch.zeros(7))
    assert bool((out[torch.arange(13) != row].abs().sum(1) > 0).all())
    meta = FusionEmbedding(10, 3, 7, base_quant=quant, padding_idx=pad, device="meta")
    meta.to_empty(device="cpu")
    for module in meta.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert torch.equal(meta(torch.tensor([row]))[0], torch.zeros(7))
    assert torch.equal(torch.nn.Embedding(10, 7, padding_idx=pad).weight[row], torch.zeros(7))
