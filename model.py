"""The GPT-2 model: token and position embeddings, pre-LayerNorm transformer blocks, a weight-tied LM head.

Pure tensors in, tensors out: no files, devices, optimizers, tokenizers or DDP. This is the plain model a learner
reads; fast.py holds the CPU speed-ups that train.py switches on (`--fast_kernels=False` runs exactly this file).
Try it: python -c "import model, config; print(model.count_parameters(config.PRESETS['gpt2']().model))"

GPT-2's names, kept so that OpenAI's checkpoint loads by a key map (hf.py):
    wte     word (token) embedding: one vector of n_embd numbers per token id
    wpe     position embedding: one vector per position 0 .. block_size - 1
    h       the list of transformer blocks ("hidden layers")
    ln_1, ln_2, ln_f   LayerNorms: before attention, before the MLP, and the final one before the LM head
    c_attn  the attention's input projection, queries, keys and values in one matmul
    c_fc    the MLP's first ("fully connected") layer, n_embd -> 4 * n_embd
    c_proj  an output projection back into the residual stream (in attention and in the MLP)
Shapes: B batch, T sequence length, C = n_embd, nh = n_head, hs = head size C // nh, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so that each new token costs one position's work.

    Lives beside the model (generate.py owns it) and is passed into GPT.forward. `position` is how many positions
    are filled; the last layer's append moves it on. Preallocated for `max_length` positions: appending never
    copies the past.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, device, dtype: torch.dtype):
        head_size = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_length, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.position = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, nh, T, hs) and return all of them so far (B, nh, past + T, hs)."""
        start, end = self.position, self.position + k.size(2)
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} requested")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        if layer == self.keys.size(0) - 1:  # every layer has stored these positions
            self.position = end
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reset(self) -> None:
        self.position = 0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and the positions before it.

    For each head: attention(q, k, v) = softmax(q k^T / sqrt(hs) + mask) v, where mask is -inf above the diagonal.
    The mask is what makes the model causal: the prediction at position t may use tokens 0..t but never the token it
    is trained to predict, t + 1, nor anything after it (training would otherwise be copying, not predicting).
    Dividing by sqrt(hs) keeps the dot products' variance near 1, so the softmax does not saturate.
    """

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer = layer  # which slot of a KV cache is this layer's
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        # Split C into nh heads of hs numbers; each head attends on its own, in parallel.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer, k, v)  # (B, nh, past + T, hs)
        y = self.attend(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs) + mask) v for q (B, nh, T, hs) and k, v (B, nh, past + T, hs).

        With nothing cached (past = 0) the mask is the plain causal one. After a filled cache, new query i sits at
        position past + i and sees keys 0 .. past + i: a lower-triangular mask shifted right by `past` (one new
        query, T = 1, sees every key).
        """
        T, past = q.size(2), k.size(2) - q.size(2)
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        visible = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)  # (T, past + T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout)


class MLP(nn.Module):
    """Position-wise feed-forward network: widen to 4 * C, GELU, project back. Where each token 'thinks' alone."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation; keeps imported weights exact
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One transformer block: attention, then the MLP, each added to the residual stream x.

    Pre-LayerNorm (GPT-2's choice): each sublayer reads a normalised copy of x and adds its output to x itself.
    The residual stream is then a clean sum from the embeddings to the last block, so gradients reach the first
    layers undiminished and deep stacks train without the careful warm-up that post-LayerNorm needs.
    """

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)  # (B, T, C)
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
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as in GPT-2: the LM head scores a hidden state against every token's
        # embedding. One matrix serves both ends, which saves V * C parameters (38M at GPT-2's size) and helps
        # small models: a token that is rarely an input still learns its vector from being a target.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self.init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):  # the residual projections: see init_weights
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """GPT-2's initialisation of one module (GPT.__init__ applies it to every module, then rescales c_proj).

        - Linear and embedding weights ~ N(0, 0.02): small enough that the first logits are nearly uniform (the
          initial loss is about ln V), large enough that the signal does not vanish through the layers.
        - The residual projections (each block's two c_proj) are then drawn again from N(0, 0.02 / sqrt(2 * n_layer)):
          every block adds two outputs to the residual stream, and the variance of a sum grows with the number of
          terms, so scaling each term down by sqrt(2 * n_layer) keeps the stream's variance the same at any depth.
        - Biases 0; LayerNorm gains 1 and biases 0.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V), or the mean cross-entropy loss when targets (B, T) are given.

        targets are the inputs shifted by one (data.py): the logits at position t are scored against token t + 1,
        so one sequence of T tokens trains T predictions at once. Positions whose target is -1 are not scored.
        The loss goes through forward (not a separate method) so that DDP's gradient hooks see it.
        With a kv_cache, idx holds only the new tokens; their positions continue after the cached ones.
        last_only (sampling): logits (B, 1, V) of the last position only, skipping the other rows of the LM head.
        """
        x = self.hidden_states(self.transformer.wte(idx), kv_cache)  # (B, T, C)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(x)

    def hidden_states(self, token_embeddings: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Token embeddings (B, T, C) -> the final hidden states (B, T, C): add the position embeddings, run every
        block, then the final LayerNorm."""
        T = token_embeddings.size(1)
        start = kv_cache.position if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        positions = torch.arange(start, start + T, dtype=torch.long, device=token_embeddings.device)  # (T,)
        x = self.transformer.drop(token_embeddings + self.transformer.wpe(positions))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        return self.transformer.ln_f(x)


def count_parameters(config: ModelConfig) -> int:
    """Trainable parameters of GPT(config), counting the tied LM head once and the position embeddings."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    bias = 1 if config.bias else 0
    layer_norm = C + bias * C
    attention = C * 3 * C + bias * 3 * C + C * C + bias * C  # c_attn, c_proj
    mlp = C * 4 * C + bias * 4 * C + 4 * C * C + bias * C  # c_fc, c_proj
    per_block = 2 * layer_norm + attention + mlp
    return V * C + config.block_size * C + L * per_block + layer_norm


def flops_per_token(config: ModelConfig, context: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token: 6 per weight plus attention (PaLM paper, appendix B).

    A weight does a multiply and an add per token forward (2 FLOPs) and twice that backward (4). Position
    embeddings do no matmul, so they are left out of the 6N term; `context` defaults to block_size.
    """
    T = context or config.block_size
    matmul_params = count_parameters(config) - config.block_size * config.n_embd
    attention = 12 * config.n_layer * config.n_embd * T
    return 6 * matmul_params + attention
