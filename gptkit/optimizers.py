"""The optimizers train.py builds: AdamW for everything (the default), or Muon for the blocks' matrices beside AdamW.

    python train.py --preset=tiny --optimizer=muon --muon_lr=0.02

Muon (Jordan et al. 2024, torch.optim.Muon) replaces a matrix's momentum-averaged gradient by the nearest
orthogonal matrix (a few Newton-Schulz iterations), so every direction of the update moves by the same amount
instead of the few largest ones dominating. It is made for the 2-D hidden matrices (each block's c_attn, c_proj,
c_fc); embeddings, the tied LM head, LayerNorm gains and biases stay with AdamW. docs/optimizer.md
has what it measured here.
"""

from __future__ import annotations

import inspect

import torch

from config import TrainConfig
from model import Block


class MuonWithAdamW:
    """Muon and AdamW stepped as one optimizer, so train_step, the GradScaler and checkpoints see a single object.

    GradScaler needs only `param_groups` (to unscale every gradient) and `step`; a checkpoint needs `state_dict`.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable 2-D weights inside transformer blocks: what Muon is for. The embeddings are 2-D too but are
    lookup tables (and the tied LM head), whose rows are not the directions of a linear map, so AdamW keeps them."""
    return [p for block in model.modules() if isinstance(block, Block)
            for p in block.parameters() if p.requires_grad and p.dim() == 2]


def make_optimizer(model: torch.nn.Module, train: TrainConfig,
                   device_type: str) -> torch.optim.AdamW | MuonWithAdamW:
    """AdamW with weight decay on matrices only (not biases or LayerNorm gains), fused where available; with
    --optimizer=muon, Muon takes the blocks' matrices and AdamW keeps the rest."""
    muon_params = hidden_matrices(model) if train.optimizer == "muon" else []
    taken = {id(p) for p in muon_params}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {}
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu"):
        extra["fused"] = True  # one kernel for all parameters instead of a dozen per tensor
    adamw = torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2), **extra)
    if not muon_params:
        return adamw
    muon = torch.optim.Muon(muon_params, lr=train.muon_lr, weight_decay=train.muon_weight_decay,
                            momentum=train.muon_momentum, adjust_lr_fn=train.muon_adjust_lr,
                            ns_steps=train.muon_ns_steps)
    return MuonWithAdamW(muon, adamw)


def set_learning_rate(optimizer, lr: float, train: TrainConfig) -> None:
    """Give this step's rate to every group: `lr` (the schedule at learning_rate's scale) to AdamW's, and the same
    point of the schedule at muon_lr's scale to Muon's, so one warmup and one decay move both optimizers."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, MuonWithAdamW):
        for group in optimizer.muon.param_groups:
            group["lr"] = lr * train.muon_lr / train.learning_rate


def muon_momentum_at(step: int, train: TrainConfig) -> float:
    """Muon's momentum: from 0.85 up to muon_momentum over the first muon_momentum_warmup steps (modded-nanogpt's
    recipe: early gradients point in changing directions, so a shorter memory follows them better), then flat."""
    if step >= train.muon_momentum_warmup:
        return train.muon_momentum
    start = min(0.85, train.muon_momentum)
    return start + (train.muon_momentum - start) * step / train.muon_momentum_warmup


def set_muon_momentum(optimizer, step: int, train: TrainConfig) -> None:
    if isinstance(optimizer, MuonWithAdamW):
        for group in optimizer.muon.param_groups:
            group["momentum"] = muon_momentum_at(step, train)
