"""LoRA (Hu et al. 2021; the book's appendix E): train a small low-rank update beside each frozen weight matrix.

    python classify.py --lora_rank=16 --lora_alpha=16      # classification with adapters on attention and MLP

A Linear layer computes W x. LoRA keeps W frozen and learns W x + (alpha / r) * B A x, with A (r, in) and B (out, r)
for a small rank r: r * (in + out) trainable numbers instead of in * out. B starts at zero, so before the first step
the adapted model is exactly the base model; `merge` folds B A into W, after which the model is a plain GPT again.
Try it: python -c "import lora, model, config; print(lora.add_lora(model.GPT(config.PRESETS['tiny']().model), 8, 8))"
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# The matrices that get adapters: attention's input and output projections and the MLP's two layers.
ADAPTED = ("c_attn", "c_proj", "c_fc")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + (alpha / rank) * x A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r): zero, so the update starts at 0
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its own weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale  # (..., out)

    def merged(self) -> nn.Linear:
        """The plain Linear whose weight is W + (alpha / rank) * B A: the same outputs, no adapter."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear.to(self.base.weight.device)


def add_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """Freeze every parameter of `model` and put a LoRALinear on each ADAPTED matrix; return the adapters' size."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in ADAPTED and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by its merged Linear, in place; the result has the base model's parameter names."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model
