"""The CPU fast paths of fast.py compute what model.py's plain path computes: loss and every gradient.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_fast.py
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from config import ModelConfig
from gptkit import fast
from gptkit.fast import FastGPT, MatmulCausalSelfAttention, lm_head_cross_entropy, use_fast_kernels
from model import GPT

TINY = ModelConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)
# The fast paths under every model.py switch: the llama form (RoPE, RMSNorm, SwiGLU, GQA, no biases), and untied.
FORMS = {"gpt2": TINY,
         "llama": ModelConfig(**{**TINY.__dict__, "arch": "llama"}).apply_arch(),
         "llama-untied-biases": ModelConfig(**{**TINY.__dict__, "arch": "llama", "bias": True,
                                               "tie_embeddings": False}).apply_arch(keep={"bias"})}


def plain_and_fast(config: ModelConfig = TINY, seed: int = 0) -> tuple[GPT, GPT]:
    torch.manual_seed(seed)
    plain = GPT(config)
    quick = copy.deepcopy(plain)
    assert use_fast_kernels(quick, wanted=True, device_type="cpu", compiled=False).startswith("fast kernels: on")
    return plain, quick


def loss_and_gradients(model: GPT, x, y, dtype=torch.float32, scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(x, y)
    (loss * scale).backward()
    return loss.detach().float(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_switch_keeps_parameters_and_their_names_and_is_off_where_it_does_not_apply():
    plain, quick = plain_and_fast()
    assert type(quick) is FastGPT and all(type(b.attn) is MatmulCausalSelfAttention for b in quick.transformer.h)
    assert list(quick.state_dict()) == list(plain.state_dict())  # checkpoints are interchangeable
    assert quick.lm_head.weight is quick.transformer.wte.weight
    for wanted, device_type, compiled, reason in ((False, "cpu", False, "--fast_kernels=False"),
                                                  (True, "cuda", False, "CPU paths"),
                                                  (True, "cpu", True, "torch.compile")):
        model = GPT(TINY)
        line = use_fast_kernels(model, wanted, device_type, compiled)
        assert type(model) is GPT and reason in line and line.startswith("fast kernels: off")


@pytest.mark.parametrize("config", FORMS.values(), ids=FORMS.keys())
def test_loss_and_every_gradient_match_the_plain_model_tightly_in_float32(config):
    plain, quick = plain_and_fast(config)
    x, y = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    y[0, :3] = -1  # ignored targets, as F.cross_entropy(ignore_index=-1)
    want_loss, want = loss_and_gradients(plain, x, y)
    got_loss, got = loss_and_gradients(quick, x, y)
    assert torch.allclose(got_loss, want_loss, atol=1e-6)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-5), name
    with torch.no_grad():  # evaluation: the chunked loss without gradients
        assert torch.allclose(quick(x, y), plain(x, y), atol=1e-6)


@pytest.mark.parametrize("config", FORMS.values(), ids=FORMS.keys())
def test_loss_and_every_gradient_match_the_plain_model_to_bf16_tolerance_under_autocast(monkeypatch, config):
    plain, quick = plain_and_fast(config)
    x, y = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    want_loss, want = loss_and_gradients(plain, x, y, torch.bfloat16)
    attention_calls = []
    matmul_attention = fast.matmul_causal_attention
    monkeypatch.setattr(fast, "matmul_causal_attention", lambda *a: attention_calls.append(1) or matmul_attention(*a))
    got_loss, got = loss_and_gradients(quick, x, y, torch.bfloat16)
    assert len(attention_calls) == TINY.n_layer  # the matmul attention really ran, once per layer
    assert abs(got_loss.item() - want_loss.item()) < 1e-2
    for name in want:  # bf16 keeps ~3 significant digits: compare against each gradient's own size
        scale = want[name].abs().max().item()
        assert (got[name] - want[name]).abs().max().item() <= 3e-2 * scale + 1e-6, name


@pytest.mark.parametrize("config", FORMS.values(), ids=FORMS.keys())
def test_tied_weight_gradient_of_scaled_micro_steps_accumulates_like_the_plain_ops(config):
    # the loss's backward leaves the head's gradient for the embedding's backward to add its rows into: over two
    # scaled backward passes (gradient accumulation) .grad must still be the sum of both, each counted once
    plain, quick = plain_and_fast(config)
    batches = [(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)), scale) for scale in (0.5, 0.25)]
    for model in (plain, quick):
        model.zero_grad()
        for x, y, scale in batches:
            (model(x, y) * scale).backward()
    for (name, p), q in zip(plain.named_parameters(), quick.parameters()):
        assert torch.allclose(q.grad, p.grad, atol=1e-6, rtol=1e-5), name


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
    compiled = torch.compile(fast.softmax_cross_entropy_chunk, dynamic=True)

    def counted(*args):
        compiled_calls.append(args[0].shape)
        return compiled(*args)
    monkeypatch.setattr(fast.loss_chunk, "compiled", counted)
    monkeypatch.setattr(fast.loss_chunk, "failed", False)
    torch.manual_seed(0)
    vocab = fast.COMPILED_LOSS_MIN_VOCAB  # the smallest vocabulary that takes the compiled path
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
    monkeypatch.setattr(fast.loss_chunk, "compiled", no_compiler)
    monkeypatch.setattr(fast.loss_chunk, "failed", False)
    torch.manual_seed(0)
    vocab = fast.COMPILED_LOSS_MIN_VOCAB
    x, weight = torch.randn(20, 8, requires_grad=True), torch.randn(vocab, 8)
    targets = torch.randint(0, vocab, (20,))
    loss = lm_head_cross_entropy(x, weight, targets)
    assert torch.allclose(loss, F.cross_entropy(x @ weight.t(), targets), atol=1e-5)
    warning = capsys.readouterr().err
    assert warning.startswith("warning: the loss runs uncompiled") and warning.count("\n") == 1
    assert "No working C++ compiler found;" in warning and "more detail" not in warning
    assert fast.loss_chunk.failed  # and later calls go straight to the eager version
    lm_head_cross_entropy(x, weight, targets)
    assert capsys.readouterr().err == ""  # said once


@pytest.mark.parametrize("context", [40, fast.MATMUL_ATTENTION_MAX_CONTEXT])
def test_attention_as_matmuls_in_bf16_matches_the_fused_kernel_and_replaces_it(monkeypatch, context):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, context, 16).bfloat16().requires_grad_() for _ in range(3))
    grad_out = torch.randn(1, 2, context, 16)
    # the float32 fused kernel, taken before the bf16 path below is made to refuse it
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    want_grads = torch.autograd.grad(want, (q32, k32, v32), grad_out)

    def fused_kernel_not_expected(*args, **kwargs):
        raise AssertionError("bf16 on the CPU at this context should run as matmuls")
    monkeypatch.setattr(F, "scaled_dot_product_attention", fused_kernel_not_expected)
    attention = MatmulCausalSelfAttention(ModelConfig(vocab_size=10, n_layer=1, n_head=2, n_embd=32))
    got = attention.attend(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out.bfloat16())
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, atol=3e-2)  # bf16 keeps ~3 significant digits
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g.float(), w, atol=5e-2)


def test_attention_in_float32_or_past_the_context_limit_stays_with_the_fused_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(fast, "matmul_causal_attention", lambda *a: calls.append(1))
    attention = MatmulCausalSelfAttention(ModelConfig(vocab_size=10, n_layer=1, n_head=2, n_embd=32))
    for dtype, context in ((torch.float32, 64), (torch.bfloat16, fast.MATMUL_ATTENTION_MAX_CONTEXT + 1)):
        q = torch.randn(1, 2, context, 16, dtype=dtype)
        want = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert torch.equal(attention.attend(q, q, q), want)
    assert not calls
