"""The GPT model: shapes, causality, weight tying, GPT-2's parameter count, and that it can learn."""

import math

import torch
import torch.nn.functional as F

import model as model_module
from config import PRESETS, ModelConfig
from model import GPT, KVCache, count_parameters, flops_per_token, lm_head_cross_entropy

TINY = ModelConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


def test_logits_shape_and_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(TINY)
    x = torch.randint(0, 100, (3, 16))
    assert model(x).shape == (3, 16, 100)
    targets = torch.randint(0, 100, (3, 16))
    loss = model(x, targets)
    assert loss.shape == ()
    # small initial weights give near-uniform predictions: loss close to ln(vocab)
    assert abs(loss.item() - math.log(100)) < 0.3


def test_changing_future_tokens_leaves_past_logits():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 100, (1, 16))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 100
    assert torch.allclose(model(x)[:, :8], model(y)[:, :8], atol=1e-6)
    assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:], atol=1e-3)


def test_lm_head_is_tied_to_token_embedding():
    model = GPT(TINY)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        model.transformer.wte.weight[5].fill_(1.0)
    assert torch.all(model.lm_head.weight[5] == 1.0)


def test_gpt2_preset_has_exactly_gpt2_small_parameter_count():
    config = PRESETS["gpt2"]().model
    model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert count_parameters(config) == 124_439_808


def test_count_parameters_matches_the_model_without_bias_too():
    config = ModelConfig(vocab_size=77, n_layer=3, n_head=4, n_embd=48, block_size=20, bias=False)
    assert count_parameters(config) == sum(p.numel() for p in GPT(config).parameters())


def test_flops_per_token_follows_6n_plus_attention():
    config = PRESETS["gpt2"]().model
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(config) == 6 * n + 12 * 12 * 768 * 1024


def test_residual_projections_are_scaled_down_with_depth():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=100, n_layer=8, n_head=4, n_embd=256, block_size=16))
    c_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    c_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(c_fc - 0.02) < 0.002
    assert abs(c_proj - 0.02 / math.sqrt(16)) < 0.001


def test_parameter_names_follow_gpt2_checkpoint():
    names = set(GPT(TINY).state_dict())
    for expected in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                     "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                     "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.bias"):
        assert expected in names


def test_kv_cache_gives_the_same_logits_as_the_full_forward():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 100, (2, 16))
    cache = KVCache(TINY, batch_size=2, max_length=16, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        full = model(x)
        pieces = [model(x[:, :5], kv_cache=cache), model(x[:, 5:9], kv_cache=cache)]
        pieces += [model(x[:, t:t + 1], kv_cache=cache) for t in range(9, 16)]
    assert cache.length == 16
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 100, (4, 16))
    y = torch.roll(x, -1, dims=1)
    for _ in range(150):
        loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_chunked_lm_head_loss_and_gradients_equal_the_plain_cross_entropy():
    torch.manual_seed(0)
    x = torch.randn(37, 32, requires_grad=True)  # 37 rows: the last chunk is partial
    weight = torch.randn(100, 32, requires_grad=True)
    targets = torch.randint(0, 100, (37,))
    targets[5] = -1  # ignore_index, as F.cross_entropy(ignore_index=-1)
    plain = F.cross_entropy(x @ weight.t(), targets, ignore_index=-1)
    plain_grads = torch.autograd.grad(plain * 3.0, (x, weight))  # a scaled loss, as accumulation/GradScaler do
    # groups of 16 rows in chunks of 8: 37 rows end in a partial group (5 rows) holding a partial chunk
    chunked = lm_head_cross_entropy(x, weight, targets, chunk_rows=8, group_rows=16)
    chunked_grads = torch.autograd.grad(chunked * 3.0, (x, weight))
    assert torch.allclose(chunked, plain, atol=1e-6, rtol=1e-6)
    for got, want in zip(chunked_grads, plain_grads):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(lm_head_cross_entropy(x, weight, targets, chunk_rows=8), plain, atol=1e-6)


def test_the_compiled_loss_chunk_used_for_large_vocabularies_equals_the_plain_cross_entropy(monkeypatch):
    compiled_calls = []
    compiled = torch.compile(model_module.softmax_cross_entropy_chunk, dynamic=True)

    def counted(*args):
        compiled_calls.append(args[0].shape)
        return compiled(*args)
    monkeypatch.setattr(model_module, "_compiled_chunk", counted)
    monkeypatch.setattr(model_module, "_compiled_chunk_failed", False)
    torch.manual_seed(0)
    vocab = model_module.COMPILED_LOSS_MIN_VOCAB  # the smallest vocabulary that takes the compiled path
    x = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(vocab, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (40,))
    targets[3] = -1
    plain = F.cross_entropy(x @ weight.t(), targets, ignore_index=-1)
    plain_grads = torch.autograd.grad(plain, (x, weight))
    chunked = lm_head_cross_entropy(x, weight, targets, chunk_rows=16, group_rows=32)
    assert compiled_calls == [(16, vocab), (16, vocab), (8, vocab)]  # 40 rows: groups of 32 and 8
    chunked_grads = torch.autograd.grad(chunked, (x, weight))
    assert torch.allclose(chunked, plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(chunked_grads, plain_grads):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)


def test_a_machine_that_cannot_compile_gets_the_same_loss_uncompiled_with_a_warning(monkeypatch, capsys):
    def no_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
    monkeypatch.setattr(model_module, "_compiled_chunk", no_compiler)
    monkeypatch.setattr(model_module, "_compiled_chunk_failed", False)
    torch.manual_seed(0)
    vocab = model_module.COMPILED_LOSS_MIN_VOCAB
    x, weight = torch.randn(20, 8, requires_grad=True), torch.randn(vocab, 8)
    targets = torch.randint(0, vocab, (20,))
    loss = lm_head_cross_entropy(x, weight, targets)
    assert torch.allclose(loss, F.cross_entropy(x @ weight.t(), targets), atol=1e-5)
    warning = capsys.readouterr().err
    assert warning.startswith("warning: the loss runs uncompiled") and warning.count("\n") == 1
    assert "No working C++ compiler found;" in warning and "more detail" not in warning
    assert model_module._compiled_chunk_failed  # and later calls go straight to the eager version
    lm_head_cross_entropy(x, weight, targets)
    assert capsys.readouterr().err == ""  # said once


def test_model_loss_equals_cross_entropy_of_its_logits_with_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(TINY)
    x, y = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    model(x, y).backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(x).view(-1, 100), y.view(-1))
    plain.backward()
    assert torch.allclose(model(x, y), plain, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(chunked[name], p.grad, atol=1e-6, rtol=1e-5), name


def test_tied_weight_gradient_of_scaled_micro_steps_accumulates_like_the_plain_ops():
    # the loss's backward leaves the head's gradient for the embedding's backward to add its rows into: over two
    # scaled backward passes (gradient accumulation) .grad must still be the sum of both, each counted once
    torch.manual_seed(0)
    model = GPT(TINY)
    batches = [(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)), scale) for scale in (0.5, 0.25)]
    for x, y, scale in batches:
        (model(x, y) * scale).backward()
    tied = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for x, y, scale in batches:
        (F.cross_entropy(model(x).view(-1, 100), y.view(-1)) * scale).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(tied[name], p.grad, atol=1e-6, rtol=1e-5), name


def test_attention_as_matmuls_on_the_cpu_in_bf16_matches_the_fused_kernel(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16).bfloat16().requires_grad_() for _ in range(3))
    grad_out = torch.randn(2, 3, 40, 16)
    # the float32 fused kernel, taken before the bf16 path below is made to refuse it
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    want_grads = torch.autograd.grad(want, (q32, k32, v32), grad_out)

    def fused_kernel_not_expected(*args, **kwargs):
        raise AssertionError("bf16 on the CPU at this context should run as matmuls")
    monkeypatch.setattr(F, "scaled_dot_product_attention", fused_kernel_not_expected)
    got = model_module.causal_attention(q, k, v, dropout=0.0)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out.bfloat16())
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, atol=3e-2)  # bf16 keeps ~3 significant digits
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g.float(), w, atol=5e-2)
