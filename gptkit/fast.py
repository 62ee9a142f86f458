"""The CPU fast paths: the same model as model.py, computed faster where that was measured to pay.

    python train.py --preset=tiny                       # on a CPU the fast paths are on; the start-up print says so
    python train.py --preset=tiny --fast_kernels=False  # model.py's plain path instead

What each path replaces, when it applies, and where its measurement lives (`make bench`, and docs/performance.md,
which quotes it):
- Matmul attention: F.scaled_dot_product_attention(is_causal=True) in training, as two batched matmuls and a
  softmax, in bf16 up to a context of 512, where the fused kernel is slower on a CPU (bench.py's attention line).
- One tied-weight gradient: the LM head and the token embedding share one weight; instead of two full (V, C)
  gradients that autograd adds, the loss leaves its gradient for the embedding's backward to add its rows into
  (an untied model, tie_embeddings=False, keeps its two gradients).
- Chunked LM-head loss: F.cross_entropy(lm_head(x)) without ever holding the (B * T, V) logits, a chunk of rows
  at a time, each chunk's softmax compiled into one loop for large vocabularies; the gradients are formed in forward.
- Column-major decode weights (generate.py): each Linear weight stored (in, out) in memory for decoding, which
  reads the whole model per token (bench.py's decode line).
Every form of model.py (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied heads) runs through them unchanged:
attention is replaced after q, k and v are formed (and grouped keys repeated), the loss after the final norm.
They apply to training on the CPU without torch.compile (which fuses the plain ops itself); elsewhere, and with
--fast_kernels=False, model.py's plain path runs. Tests (tests/test_fast.py) hold the two equal: loss and every
parameter's gradient, tightly in float32 and to bf16's tolerance in bf16.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import error_summary
from model import GPT, CausalSelfAttention, KVCache

# Up to this context the matmul form beat the fused kernel in bf16 on the CPU (bench.py's attention line).
MATMUL_ATTENTION_MAX_CONTEXT = 512
# Rows of logits made at once: 128 rows of GPT-2's vocabulary are 26 MB in float32 (64 and 256 measured no better).
LOSS_CHUNK_ROWS = 128
# Rows whose logit gradients are turned into x's and the weight's gradients together, by two matmuls.
LOSS_GROUP_ROWS = 512
# Below this vocabulary the loss is a small part of a step and compiling it (a few seconds, once) does not pay.
COMPILED_LOSS_MIN_VOCAB = 4096


def use_fast_kernels(model: GPT, wanted: bool, device_type: str, compiled: bool) -> str:
    """Switch the model to the fast paths where they apply, in place; return one line saying what runs and why.

    The switch changes the classes of the model and of its attention layers to the subclasses below: the
    parameters, their names and so the checkpoints stay exactly those of model.py's GPT.
    """
    if not wanted:
        return "fast kernels: off (--fast_kernels=False): model.py's plain path"
    if device_type != "cpu":
        return f"fast kernels: off on {device_type} (they are CPU paths): model.py's plain path"
    if compiled:
        return "fast kernels: off under torch.compile, which fuses model.py's plain path itself"
    model.__class__ = FastGPT
    for block in model.transformer.h:
        block.attn.__class__ = MatmulCausalSelfAttention
    return ("fast kernels: on (fast.py: matmul attention in bf16, one tied-weight gradient, chunked LM-head loss); "
            "--fast_kernels=False for model.py's plain path")


class FastGPT(GPT):
    """GPT whose training loss runs as the chunked loss with one tied-weight gradient; sampling is GPT's own."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        if targets is None or kv_cache is not None:
            return super().forward(idx, targets, kv_cache, last_only)
        weight = self.transformer.wte.weight
        is_tied = self.lm_head.weight is weight  # tie_embeddings=False: two matrices, each its own gradient
        tied = TiedGradient(weight) if torch.is_grad_enabled() and is_tied else None
        tokens = TiedEmbedding.apply(idx, weight, tied) if tied else F.embedding(idx, weight)  # (B, T, C)
        x = self.hidden_states(tokens)  # (B, T, C)
        return lm_head_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), tied=tied)


class MatmulCausalSelfAttention(CausalSelfAttention):
    """CausalSelfAttention whose uncached bf16 attention up to MATMUL_ATTENTION_MAX_CONTEXT runs as matmuls."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dtype == torch.bfloat16 and q.size(2) == k.size(2) <= MATMUL_ATTENTION_MAX_CONTEXT:
            return matmul_causal_attention(q, k, v, self.dropout if self.training else 0.0)
        return super().attend(q, k, v)


def matmul_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal attention of q, k, v (B, nh, T, hs) as two batched matmuls and a softmax. The scores are rounded to
    q's dtype, as any matmul's output is (the fused kernel keeps them in float32 until the softmax)."""
    B, n_head, T, head_size = q.shape
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)  # added: masks the future
    q, k, v = (t.reshape(B * n_head, T, head_size) for t in (q, k, v))
    scores = torch.baddbmm(future, q, k.transpose(1, 2), alpha=head_size ** -0.5)  # (B * nh, T, T)
    probs = F.dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.bmm(probs, v).view(B, n_head, T, head_size)


class TiedGradient:
    """Where the LM-head loss leaves its weight gradient for the token embedding to add its rows into.

    With the usual ops the tied weight gets two full (V, C) gradients, the head's and the embedding's (mostly
    zeros), which autograd then adds. Here the loss's backward (which runs first) stores its gradient, and the
    embedding's backward adds the looked-up rows into it in place and hands the sum to autograd as the weight's
    only gradient.
    """

    def __init__(self, weight: torch.Tensor):
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device  # the gradient's
        self.grad: torch.Tensor | None = None


class TiedEmbedding(torch.autograd.Function):
    """F.embedding(idx, weight), whose weight gradient is the head's (from `tied`) plus the looked-up rows'."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, weight: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.tied = tied
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (idx,) = ctx.saved_tensors
        tied = ctx.tied
        grad_weight, tied.grad = tied.grad, None
        if grad_weight is None:  # the head's loss was not in this backward
            grad_weight = torch.zeros(tied.shape, dtype=tied.dtype, device=tied.device)
        rows = grad_out.reshape(-1, grad_out.size(-1)).to(grad_weight.dtype)
        grad_weight.index_add_(0, idx.reshape(-1), rows)
        return None, grad_weight, None


def softmax_cross_entropy_chunk(logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor,
                                grad_out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of logits (n, V) against targets (n, 1), in float32; writes into grad_out (n, V),
    in its own dtype, the gradient of sum(row_weight * loss) with respect to the logits: (softmax - one_hot) * weight.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    row_losses = -log_probs.gather(1, targets).squeeze(1)  # (n,)
    grad = log_probs.exp_()  # softmax; in place, for the uncompiled runs
    grad.scatter_add_(1, targets, torch.full_like(targets, -1, dtype=grad.dtype))
    torch.mul(grad, row_weight[:, None], out=grad_out)
    return row_losses


class CompiledChunk:
    """softmax_cross_entropy_chunk compiled on first use, where that pays: on the CPU, for large vocabularies.

    Eagerly the chunk is four passes over a (128, V) block (a float copy, log_softmax, exp, the scaled copy);
    compiled, it is one fused loop. Made on first use: importing the compiler takes a second, which a run with a
    small vocabulary does not need. dynamic=True: one compilation serves every chunk height and vocabulary size.
    """

    def __init__(self):
        self.compiled = None
        self.failed = False  # this machine cannot compile (no C++ compiler): the eager version, said once

    def __call__(self, logits, targets, row_weight, grad_out) -> torch.Tensor:
        if self.failed or logits.size(1) < COMPILED_LOSS_MIN_VOCAB:
            return softmax_cross_entropy_chunk(logits, targets, row_weight, grad_out)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(softmax_cross_entropy_chunk, dynamic=True)
            return self.compiled(logits, targets, row_weight, grad_out)
        except Exception as error:  # a machine without a working C++ compiler: the same result, eagerly
            self.failed = True
            print(f"warning: the loss runs uncompiled (slower) because torch.compile failed here: "
                  f"{error_summary(error)}; installing g++ fixes that (see INSTALL.md)", file=sys.stderr)
            return softmax_cross_entropy_chunk(logits, targets, row_weight, grad_out)


loss_chunk = CompiledChunk()


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of softmax(x @ weight.T) against targets, computed a chunk of rows at a time.

    Forward takes each chunk's logits in the matmul dtype, its loss in float32, and at once the gradient of the
    mean loss with respect to those logits, (softmax - one_hot) / n, in the matmul dtype. Each group of rows' logit
    gradients then becomes x's and weight's gradients right away (two matmuls, weight's accumulated over the groups),
    so neither the float32 logits nor the whole (N, V) gradient ever exist, and backward only scales the two.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                group_rows: int, tied: TiedGradient | None) -> torch.Tensor:
        valid = targets != -1  # ignore_index=-1, as F.cross_entropy(ignore_index=-1)
        n_valid = valid.sum()
        safe_targets = targets.clamp(min=0)[:, None]  # (N, 1)
        row_weight = valid.to(torch.float32) / n_valid  # (N,): d(mean loss) / d(row loss)
        rows_total, vocab = x.size(0), weight.size(0)
        grad_x = torch.empty_like(x)  # (N, C)
        grad_weight_t = torch.zeros(x.size(1), vocab, dtype=x.dtype, device=x.device)  # (C, V), see below
        grad_logits = torch.empty(min(group_rows, rows_total), vocab, dtype=x.dtype, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):  # the caller chose the dtypes
            for group_start in range(0, rows_total, group_rows):
                group = slice(group_start, min(group_start + group_rows, rows_total))
                group_size = group.stop - group.start
                for start in range(0, group_size, chunk_rows):
                    rows = slice(group.start + start, min(group.start + start + chunk_rows, group.stop))
                    row_losses = loss_chunk(x[rows] @ weight.t(), safe_targets[rows], row_weight[rows],
                                            grad_logits[start:start + rows.stop - rows.start])
                    total += (row_losses * valid[rows]).sum()
                group_grad_logits = grad_logits[:group_size]  # (n, V)
                torch.mm(group_grad_logits, weight, out=grad_x[group])
                # weight's gradient as (x.T @ grad_logits).T: the same product, in the orientation MKL runs faster
                grad_weight_t.addmm_(x[group].t(), group_grad_logits)
        ctx.save_for_backward(grad_x, grad_weight_t)
        ctx.tied = tied
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_weight_t = ctx.saved_tensors
        grad_x = grad_x.float().mul_(grad_loss)  # small: scaled in float32 (1/5 is 0.2002 in bf16)
        if ctx.tied is None:  # in weight's dtype, as autograd wants it
            if grad_weight_t.dtype == torch.float16:
                # scaled in float32: GradScaler's first scale, 2**16, is itself past float16's largest value (65504)
                return grad_x, (grad_weight_t.t().float() * grad_loss).half(), None, None, None, None
            return grad_x, grad_weight_t.t() * grad_loss.to(grad_weight_t.dtype), None, None, None, None
        # in the parameter's own dtype and layout, ready to become its .grad without another copy
        tied = ctx.tied
        tied.grad = torch.empty(tied.shape, dtype=tied.dtype, device=tied.device).copy_(grad_weight_t.t())
        tied.grad.mul_(grad_loss)
        return grad_x, None, None, None, None, None


def lm_head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int | None = None, group_rows: int | None = None,
                          tied: TiedGradient | None = None) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1) for x (N, C), weight (V, C), without (N, V).

    Under autocast the matmuls run in the autocast dtype (as nn.Linear would) and the loss in float32.
    With `tied`, weight's gradient is left there for a TiedEmbedding of the same weight instead of returned.
    """
    chunk_rows = chunk_rows or LOSS_CHUNK_ROWS
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if not torch.is_grad_enabled():  # evaluation: the loss alone, still a chunk at a time
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk_rows):
            logits = (x[start:start + chunk_rows] @ weight.t()).float()
            total += F.cross_entropy(logits, targets[start:start + chunk_rows], ignore_index=-1, reduction="sum")
        return total / (targets != -1).sum()
    return ChunkedLMHeadLoss.apply(x, weight, targets, chunk_rows, group_rows or LOSS_GROUP_ROWS, tied)


def lay_out_for_decoding(model: GPT) -> GPT:
    """Store each Linear weight column-major, (in, out) in memory, keeping its (out, in) shape; ties stay tied.

    Decoding one token multiplies a vector by every weight matrix, so its speed is the speed of reading them; on
    the CPU, MKL reads the (in, out) layout much faster than the usual (out, in) one (bench.py's decode line). The
    products differ only by float32 rounding (another summation order). CUDA's kernels do not care, so off the CPU
    the model is returned as it is.
    """
    if model.lm_head.weight.device.type != "cpu":
        return model
    relaid: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            if id(weight) not in relaid:
                relaid[id(weight)] = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)
            module.weight = relaid[id(weight)]
    for module in model.modules():  # the token embedding shares the LM head's tensor (weight tying)
        if isinstance(module, nn.Embedding) and id(module.weight) in relaid:
            module.weight = relaid[id(module.weight)]
    return model
