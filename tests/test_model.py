"""The GPT model: shapes, causality, weight tying, GPT-2's parameter count, and that it can learn."""

import math

import torch
import torch.nn.functional as F

from config import PRESETS, ModelConfig
from model import GPT, KVCache, count_parameters, flops_per_token

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
        pieces = [model(x[:, :5], kv_cache=cache)]
        assert cache.position == 5  # moved on once per forward, by the last layer, not once per layer
        pieces.append(model(x[:, 5:9], kv_cache=cache))
        pieces += [model(x[:, t:t + 1], kv_cache=cache) for t in range(9, 16)]
    assert cache.position == 16
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


def test_loss_ignores_targets_of_minus_one_and_equals_cross_entropy_of_the_logits():
    torch.manual_seed(0)
    model = GPT(TINY)
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    y[:, :4] = -1  # not scored
    logits = model(x)
    kept = F.cross_entropy(logits[:, 4:].reshape(-1, 100), y[:, 4:].reshape(-1))
    assert torch.allclose(model(x, y), kept, atol=1e-6)


def test_a_sequence_longer_than_the_context_is_refused():
    model = GPT(TINY)
    try:
        model(torch.zeros(1, 17, dtype=torch.long))
    except ValueError as err:
        assert "exceeds block_size=16" in str(err)
    else:
        raise AssertionError("17 tokens went through a model with block_size 16")
