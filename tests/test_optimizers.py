"""Muon beside AdamW, the wsd schedule, Muon's momentum warmup, and --optimizer=adamw being exactly the old AdamW."""

import inspect

import numpy as np
import pytest
import torch

from config import ModelConfig, TrainConfig
from data import Batches
from gptkit.optimizers import MuonWithAdamW, hidden_matrices, make_optimizer, muon_momentum_at
from gptkit.runtime import Runtime
from model import GPT
from train import learning_rate_at, train_step

CONFIG = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16)
TOKENS = np.array([(i * 7 + i // 13) % 50 for i in range(5000)], dtype=np.uint16)


def cpu_runtime(dtype=torch.float32) -> Runtime:
    return Runtime(device=torch.device("cpu"), dtype=dtype, reason="test")


def adamw_before_muon(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """train.make_optimizer as it was before --optimizer existed (commit bec69f2), kept here as the reference."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if "fused" in inspect.signature(torch.optim.AdamW).parameters else {}
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2), **extra)


def losses_of(make, steps: int = 12, train: TrainConfig | None = None) -> list[float]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    train = train or TrainConfig(batch_size=4)
    optimizer = make(model, train)
    batches = Batches(TOKENS, train, CONFIG.block_size, seed=0)
    runtime = cpu_runtime()
    return [train_step(model, optimizer, runtime.grad_scaler(), batches, runtime, train,
                       lr=learning_rate_at(s, 3e-3, 3e-4, 3, steps)).item() for s in range(steps)]


def test_adamw_option_is_bitwise_the_optimizer_of_before():
    model = GPT(CONFIG)
    train = TrainConfig(batch_size=4)
    new, old = make_optimizer(model, train, "cpu"), adamw_before_muon(model, train)
    assert type(new) is torch.optim.AdamW
    assert [[id(p) for p in g["params"]] for g in new.param_groups] == \
        [[id(p) for p in g["params"]] for g in old.param_groups]
    assert [{k: v for k, v in g.items() if k != "params"} for g in new.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in old.param_groups]
    assert losses_of(lambda m, t: make_optimizer(m, t, "cpu")) == losses_of(adamw_before_muon)  # exact floats


def test_muon_takes_exactly_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(CONFIG)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in optimizer.muon.param_groups for p in g["params"])
    adamw = sorted(names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"])
    kinds = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    assert muon == sorted(f"transformer.h.{i}.{k}" for i in range(CONFIG.n_layer) for k in kinds)
    assert "transformer.wte.weight" in adamw and "transformer.wpe.weight" in adamw  # wte is the tied LM head too
    assert not set(muon) & set(adamw) and len(muon) + len(adamw) == len(names)
    assert [p.dim() for p in hidden_matrices(model)] == [2] * len(muon)


def test_muon_learns_and_each_optimizer_follows_its_own_scaled_schedule():
    train = TrainConfig(batch_size=4, optimizer="muon", learning_rate=3e-3, muon_lr=0.05)
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = make_optimizer(model, train, "cpu")
    batches = Batches(TOKENS, train, CONFIG.block_size, seed=0)
    runtime = cpu_runtime()
    losses = [train_step(model, optimizer, runtime.grad_scaler(), batches, runtime, train, lr=1.5e-3).item()
              for _ in range(30)]
    assert losses[-1] < losses[0] - 0.5  # 3.91 -> 3.11 measured
    assert {g["lr"] for g in optimizer.adamw.param_groups} == {1.5e-3}  # half of learning_rate ...
    assert [g["lr"] for g in optimizer.muon.param_groups] == [pytest.approx(0.025)]  # ... and half of muon_lr


def test_muon_ns_steps_reaches_torchs_muon_and_changes_the_update():
    def one_step(ns_steps: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = GPT(CONFIG)
        train = TrainConfig(batch_size=4, optimizer="muon", muon_ns_steps=ns_steps)
        optimizer = make_optimizer(model, train, "cpu")
        assert [g["ns_steps"] for g in optimizer.muon.param_groups] == [ns_steps]
        runtime = cpu_runtime()
        train_step(model, optimizer, runtime.grad_scaler(), Batches(TOKENS, train, CONFIG.block_size, seed=0),
                   runtime, train, lr=1e-3)
        return [p.detach().clone() for p in hidden_matrices(model)]

    five, two = one_step(5), one_step(2)
    assert all(not torch.equal(a, b) for a, b in zip(five, two))  # every matrix moved differently


def test_muon_with_a_grad_scaler_skips_an_overflowing_step_and_otherwise_steps_like_no_scaler():
    """The fp16 path: GradScaler unscales both optimizers' gradients through the wrapper's param_groups."""
    train = TrainConfig(batch_size=4, optimizer="muon")
    results = {}
    # 2^127 times a loss of 3.9 is past float32's largest number, so every gradient is inf
    for name, scale in (("plain", None), ("scaled", 2.0 ** 10), ("overflow", 2.0 ** 127)):
        torch.manual_seed(0)
        model = GPT(CONFIG)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = make_optimizer(model, train, "cpu")
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        train_step(model, optimizer, scaler, Batches(TOKENS, train, 16, seed=0), cpu_runtime(), train, lr=1e-3)
        results[name] = (before, model.state_dict(), scaler)
    before, overflowed, scaler = results["overflow"]
    assert all(torch.equal(before[k], overflowed[k]) for k in before)  # inf gradients: no step at all
    assert scaler.get_scale() < 2.0 ** 127  # and the scale came down
    plain, scaled = results["plain"][1], results["scaled"][1]
    weight = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(results["plain"][0][weight], plain[weight])  # Muon did step it
    assert max((plain[k] - scaled[k]).abs().max().item() for k in plain) < 1e-6


def test_wsd_warms_up_holds_then_cools_down_as_one_minus_sqrt_to_min_lr():
    lr = lambda s: learning_rate_at(s, 1.0, 0.1, warmup_iters=10, decay_iters=100,  # noqa: E731
                                    schedule="wsd", cooldown_frac=0.2)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)  # the same warmup as cosine
    assert all(lr(s) == 1.0 for s in range(10, 81))  # flat until the last 20 steps
    assert lr(90) == pytest.approx(0.1 + (1 - 0.5 ** 0.5) * 0.9)  # halfway through the cooldown
    assert lr(100) == pytest.approx(0.1) and lr(400) == pytest.approx(0.1)
    assert all(lr(s) > lr(s + 1) for s in range(80, 100))
    # the cosine schedule is unchanged when no schedule is named
    assert learning_rate_at(60, 1.0, 0.1, 10, 110) == learning_rate_at(60, 1.0, 0.1, 10, 110, "cosine", 0.5)


def test_muon_momentum_warms_up_from_085_and_is_set_on_every_step():
    train = TrainConfig(optimizer="muon", muon_momentum=0.95, muon_momentum_warmup=100)
    assert muon_momentum_at(0, train) == pytest.approx(0.85)
    assert muon_momentum_at(50, train) == pytest.approx(0.90)
    assert muon_momentum_at(100, train) == muon_momentum_at(5000, train) == 0.95
    assert muon_momentum_at(0, TrainConfig(muon_momentum=0.95)) == 0.95  # no warmup by default


def test_muon_state_round_trips_through_state_dict():
    train = TrainConfig(batch_size=4, optimizer="muon")
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = make_optimizer(model, train, "cpu")
    batches = Batches(TOKENS, train, 16, seed=0)
    train_step(model, optimizer, cpu_runtime().grad_scaler(), batches, cpu_runtime(), train, lr=1e-3)
    saved = optimizer.state_dict()
    fresh = make_optimizer(model, train, "cpu")
    fresh.load_state_dict(saved)
    buffers = [fresh.muon.state[p]["momentum_buffer"] for p in hidden_matrices(model)]
    assert len(buffers) == 4 * CONFIG.n_layer and all(b.abs().sum() > 0 for b in buffers)
    assert all(torch.equal(fresh.muon.state[p]["momentum_buffer"], optimizer.muon.state[p]["momentum_buffer"])
               for p in hidden_matrices(model))


def test_zero_init_proj_makes_every_block_the_identity_at_the_start():
    from train import zero_output_projections
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    zero_output_projections(model)
    x = torch.randint(0, CONFIG.vocab_size, (2, 16))
    embedded = model.transformer.wte(x) + model.transformer.wpe(torch.arange(16))
    expected = model.lm_head(model.transformer.ln_f(embedded))  # no block changed the residual stream
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert model.transformer.h[0].mlp.c_fc.weight.abs().sum() > 0  # only the output projections are zero
