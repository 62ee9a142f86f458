"""The GPT-2 model: token and position embeddings, pre-LayerNorm transformer blocks, a weight-tied LM head.

Pure tensors in, tensors out: no files, devices, optimizers, tokenizers or DDP. Parameter names follow OpenAI's
GPT-2 checkpoint (wte, wpe, h.N.attn.c_attn, ...) so that importing or exporting its weights is a key map.
Try it: python -c "import model, config; print(model.count_parameters(config.PRESETS['gpt2']().model))"
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one position's work.

    Lives beside the model (generate.py owns it) and is passed into GPT.forward; `length` is how many positions
    are filled. Preallocated for `max_length` positions: appending never copies the past.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, device, dtype: torch.dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, nh, T, hs) and return all of them so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} requested")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reset(self) -> None:
        self.length = 0


# On the CPU in bf16, the fused attention kernel is slower than two batched matmuls and a softmax for short
# contexts. Forward + backward of one layer on 2 cores (`bench.py --quick`, its attention line): SMALL (batch 8,
# 6 heads, T 256) 17.3 against 31.2 ms, TINY (12, 4, 128) 2.6 against 9.9, T 512 37.7 against 45.8; at T 1024
# (139.9 against 97.5), or in float32 (24.4 against 21.9 at SMALL), the fused kernel wins.
MATMUL_ATTENTION_MAX_CONTEXT = 512


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, is_causal=True) for q, k, v (B, nh, T, hs), run as matmuls where
    that was measured to pay (above)."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.size(2) <= MATMUL_ATTENTION_MAX_CONTEXT
            and not torch.compiler.is_compiling()):
        return matmul_causal_attention(q, k, v, dropout)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


def matmul_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal attention as two batched matmuls and a softmax. The scores are rounded to q's dtype, as any matmul's
    output is (the fused kernel keeps them in float32 until the softmax)."""
    B, n_head, T, head_size = q.shape
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)  # added: masks the future
    q, k, v = (t.reshape(B * n_head, T, head_size) for t in (q, k, v))
    scores = torch.baddbmm(future, q, k.transpose(1, 2), alpha=head_size ** -0.5)  # (B * nh, T, T)
    probs = F.dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.bmm(probs, v).view(B, n_head, T, head_size)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

        past = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # (B, nh, past + T, hs)
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            y = causal_attention(q, k, v, dropout)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # one new query sees every past key
        else:
            # new queries after a filled cache: query i sits at position past + i and sees keys 0..past + i
            visible = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation; keeps imported weights exact
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017), as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(2 * n_layer), two per block, so that the residual
        # stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Linear and embedding weights ~ N(0, 0.02), biases 0, LayerNorm weight 1 and bias 0 (GPT-2's scheme).

        The residual projections (c_proj) are rescaled after this pass; the LM head shares wte's tensor.
        """
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab), or the mean cross-entropy loss when targets (B, T) are given.

        The loss goes through forward (not a separate method) so that DDP's gradient hooks see it.
        With a kv_cache, idx holds only the new tokens; their positions continue after the cached ones.
        last_only (sampling): logits (B, 1, vocab) of the last position only, skipping the (T, vocab) LM-head matmul.
        """
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        # The LM head's chunked loss and the token embedding share one weight; in training on the CPU, where it was
        # measured to pay, they also share its gradient's memory (see TiedGradient). Elsewhere (and when
        # torch.compile traces the model) the plain ops run; CUDA's index_add_ would add in a nondeterministic order.
        share_gradient = (targets is not None and torch.is_grad_enabled() and idx.device.type == "cpu"
                          and not torch.compiler.is_compiling())
        tied = TiedGradient(self.transformer.wte.weight) if share_gradient else None
        tokens = _TiedEmbedding.apply(idx, self.transformer.wte.weight, tied) if tied else self.transformer.wte(idx)
        x = self.transformer.drop(tokens + self.transformer.wpe(positions))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)
        if last_only and targets is None:
            x = x[:, -1:]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.length += T
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab)
        return lm_head_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), tied=tied)


class TiedGradient:
    """Where the LM-head loss leaves its weight gradient for the token embedding to add its rows into.

    With the usual ops, the tied weight gets two full (vocab, C) gradients, the head's and the embedding's (mostly
    zeros), which autograd then adds; at GPT-2's vocabulary that is ~77 MB in float32 written and read several
    times a step. Here the loss's backward (which runs first) stores its gradient and the embedding's backward adds
    the looked-up rows into it in place and hands the sum to autograd as the weight's only gradient.
    """

    def __init__(self, weight: torch.Tensor):
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device  # the gradient's
        self.grad: torch.Tensor | None = None


class _TiedEmbedding(torch.autograd.Function):
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


# Rows of logits computed at once by the loss: 128 rows of GPT-2's 50k vocabulary are 26 MB in float32. Measured
# on 2 CPU cores (bench.py; loss forward + backward alone, bf16): 0.63x the time of F.cross_entropy over the whole
# (B*T, vocab) logits at SMALL, ~0.5x at TINY; 256 rows and more were slower, 64 no better.
LOSS_CHUNK_ROWS = 128


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


# The chunk above is four passes over a (128, 50k) block in eager mode (a float copy, log_softmax, exp, the scaled
# copy); compiled, the CPU runs it as one fused loop: 5.7 against 23.5 ms per chunk at SMALL in bf16 on 2 cores, and
# whole train.py steps took 379-389 against 399-422 ms at TINY, 1405-1423 against 1457-1497 ms at SMALL.
# dynamic=True: one compilation serves every chunk height and vocabulary size.
_compiled_chunk = None  # made on first use: importing the compiler takes a second and ~30 MB, which a run on a GPU
_compiled_chunk_failed = False  # or with a small vocabulary does not need; set when this machine cannot compile

# Below this vocabulary the loss is a small part of a step and compiling it (a few seconds, once) does not pay.
COMPILED_LOSS_MIN_VOCAB = 4096


def _loss_chunk(logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor,
                grad_out: torch.Tensor) -> torch.Tensor:
    """softmax_cross_entropy_chunk, compiled where that was measured to pay: on the CPU, for large vocabularies.

    Inside a torch.compile'd model the eager version is traced into the model's own graph instead.
    """
    global _compiled_chunk, _compiled_chunk_failed
    if (logits.device.type != "cpu" or logits.size(1) < COMPILED_LOSS_MIN_VOCAB or _compiled_chunk_failed
            or torch.compiler.is_compiling()):
        return softmax_cross_entropy_chunk(logits, targets, row_weight, grad_out)
    try:
        if _compiled_chunk is None:
            _compiled_chunk = torch.compile(softmax_cross_entropy_chunk, dynamic=True)
        return _compiled_chunk(logits, targets, row_weight, grad_out)
    except Exception as error:  # a machine without a working C++ compiler: same result, eagerly
        _compiled_chunk_failed = True
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"warning: the loss runs uncompiled (slower) because torch.compile failed here: {reason}; "
              "installing g++ fixes that (see INSTALL.md)", file=sys.stderr)
        return softmax_cross_entropy_chunk(logits, targets, row_weight, grad_out)


# Rows whose logit gradients are held at once and turned into x's and weight's gradients by two matmuls: 512 rows
# of GPT-2's vocabulary are 51 MB in bf16, against 206 MB for all 2048 rows of a SMALL batch. Measured on 2 CPU cores
# (loss forward + backward alone, bf16, SMALL): 812 ms and 817 MB peak RSS, against 851 ms and 957 MB holding every
# row's gradient until backward; 256 rows took 908 ms, 1024 no faster than 512.
LOSS_GROUP_ROWS = 512


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of softmax(x @ weight.T) against targets, computed a chunk of rows at a time.

    Forward takes each chunk's logits in the matmul dtype, its loss in float32, and at once the gradient of the
    mean loss with respect to those logits, (softmax - one_hot) / n, in the matmul dtype. Each group of rows' logit
    gradients then becomes x's and weight's gradients right away (two matmuls, weight's accumulated over the groups),
    so neither the float32 logits nor the whole (N, vocab) gradient ever exist, and backward only scales the two.
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
        grad_weight_t = torch.zeros(x.size(1), vocab, dtype=x.dtype, device=x.device)  # (C, vocab), see below
        grad_logits = torch.empty(min(group_rows, rows_total), vocab, dtype=x.dtype, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):  # the caller chose the dtypes
            for group_start in range(0, rows_total, group_rows):
                group = slice(group_start, min(group_start + group_rows, rows_total))
                group_size = group.stop - group.start
                for start in range(0, group_size, chunk_rows):
                    rows = slice(group.start + start, min(group.start + start + chunk_rows, group.stop))
                    row_losses = _loss_chunk(x[rows] @ weight.t(), safe_targets[rows], row_weight[rows],
                                             grad_logits[start:start + rows.stop - rows.start])
                    total += (row_losses * valid[rows]).sum()
                group_grad_logits = grad_logits[:group_size]  # (n, vocab)
                torch.mm(group_grad_logits, weight, out=grad_x[group])
                # weight's gradient as (x.T @ grad_logits).T: the same product, but MKL runs it 1.4x faster in
                # this orientation than grad_logits.T @ x (219 vs 305 ms at SMALL, bf16, 2 cores)
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
                # scaled in float32: GradScaler's first scale, 2**16, is itself past float16's largest value (65504),
                # and in float16 it would make every first step of an fp16 run overflow and be skipped
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
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1) for x (N, C), weight (vocab, C), without (N, vocab).

    Under autocast the matmuls run in the autocast dtype (as nn.Linear would) and the loss in float32.
    With `tied`, weight's gradient is left there for a _TiedEmbedding of the same weight instead of returned.
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
    return _ChunkedLMHeadLoss.apply(x, weight, targets, chunk_rows, group_rows or LOSS_GROUP_ROWS, tied)


def count_parameters(config: ModelConfig) -> int:
    """Trainable parameters of GPT(config), counting the tied LM head once and the position embeddings."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    bias = 1 if config.bias else 0
    layer_norm = C + bias * C
    attention = C * 3 * C + bias * 3 * C + C * C + bias * C
    mlp = C * 4 * C + bias * 4 * C + 4 * C * C + bias * C
    per_block = 2 * layer_norm + attention + mlp
    return V * C + config.block_size * C + L * per_block + layer_norm


def flops_per_token(config: ModelConfig, context: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token: 6 per weight plus attention (PaLM paper, appendix B).

    Position embeddings do no matmul, so they are left out of the 6N term; `context` defaults to block_size.
    """
    T = context or config.block_size
    matmul_params = count_parameters(config) - config.block_size * config.n_embd
    attention = 12 * config.n_layer * config.n_embd * T
    return 6 * matmul_params + attention
