"""The GPT model: shapes, causality, weight tying, GPT-2's parameter count, and that it can learn."""

import math

import pytest
import torch
import torch.nn.functional as F

from config import PRESETS, ModelConfig
from model import GPT, KVCache, apply_rope, count_parameters, flops_per_token, mlp_hidden_size, rope_angles

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


# ------------------------------------------------------------------------------------ beyond GPT-2: the switches

FORMS = {  # each switch alone, the llama form, and the llama form with what --arch leaves alone changed too
    "rope": dict(position="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "gqa": dict(n_kv_head=1),
    "untied": dict(tie_embeddings=False),
    "llama": dict(arch="llama"),
    "llama-biases-untied": dict(arch="llama", bias=True, tie_embeddings=False),
}


def form(switches: dict, **sizes) -> ModelConfig:
    """TINY with `switches` as the command line gives them: --arch sets its switches, the ones beside it win."""
    config = ModelConfig(**{**TINY.__dict__, **sizes, **switches})
    if "arch" in switches:
        config.apply_arch(keep=switches)
    config.validate()
    return config


@pytest.mark.parametrize("switches", FORMS.values(), ids=FORMS.keys())
def test_every_form_is_causal_caches_exactly_and_counts_its_parameters(switches):
    config = form(switches)
    torch.manual_seed(0)
    model = GPT(config).eval()
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 100, (2, 16))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 100
    cache = KVCache(config, batch_size=2, max_length=16, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        full = model(x)
        assert torch.allclose(full[:, :8], model(y)[:, :8], atol=1e-6)  # the future does not leak into the past
        pieces = [model(x[:, :5], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(5, 16)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)  # RoPE positions continue after the cache
    assert cache.keys.shape == (2, 2, config.kv_heads, 16, 16)  # grouped-query attention caches nkv heads only


def test_arch_llama_sets_rope_rmsnorm_swiglu_half_the_kv_heads_and_no_biases():
    config = form(FORMS["llama"])
    assert (config.position, config.norm, config.mlp, config.n_kv_head, config.bias) == ("rope", "rmsnorm", "swiglu",
                                                                                        1, False)
    assert config.tie_embeddings  # --arch leaves tying alone: small models gain from it
    names = set(GPT(config).state_dict())
    assert "transformer.wpe.weight" not in names and "transformer.ln_f.bias" not in names  # no table, no bias
    assert GPT(config).transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 16, 32)  # q, then one k and v head
    assert ModelConfig().apply_arch() == ModelConfig()  # gpt2 is the default form: applying it changes nothing


def test_rope_scores_depend_only_on_the_distance_between_query_and_key():
    config = form(FORMS["rope"], n_head=1)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)  # one vector each, placed at varying positions

    def score(query_position: int, key_position: int) -> float:
        cos, sin = rope_angles(config, torch.tensor([query_position, key_position]))
        turned_q, turned_k = apply_rope(q, cos[:1], sin[:1]), apply_rope(k, cos[1:], sin[1:])
        return (turned_q * turned_k).sum().item()
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)  # both 3 apart
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    cos, sin = rope_angles(config, torch.arange(7))
    assert torch.allclose(apply_rope(q.expand(1, 1, 7, 32), cos, sin).norm(dim=-1), q.norm(), atol=1e-5)  # turns only


def test_swiglu_hidden_size_keeps_the_mlp_near_gpt2s_parameter_count():
    for n_embd, hidden in ((384, 1024), (768, 2048), (128, 352)):  # 8C/3, rounded up to a multiple of 32
        config = ModelConfig(n_embd=n_embd, n_head=4, mlp="swiglu")
        assert mlp_hidden_size(config) == hidden
        assert abs(3 * n_embd * hidden / (8 * n_embd ** 2) - 1) < 0.035  # three matrices vs GPT-2's two 4x ones


def test_untied_lm_head_is_a_matrix_of_its_own():
    model = GPT(form(FORMS["untied"]))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert abs(model.lm_head.weight.std().item() - 0.02) < 0.003  # initialised like every other Linear
