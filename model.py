"""The GPT-2 model: token and position embeddings, pre-LayerNorm transformer blocks, a weight-tied LM head; and the
few switches that turn it into the form of Llama and most models since.

Pure tensors in, tensors out: no files, devices, optimizers, tokenizers or DDP. This is the plain model a learner
reads; fast.py holds the CPU speed-ups that train.py switches on (`--fast_kernels=False` runs exactly this file).
Try it: python -c "import model, config; print(model.count_parameters(config.PRESETS['gpt2']().model))"

GPT-2's names, kept so that OpenAI's checkpoint loads by a key map (hf.py):
    wte     word (token) embedding: one vector of n_embd numbers per token id
    wpe     position embedding: one vector per position 0 .. block_size - 1
    h       the list of transformer blocks ("hidden layers")
    ln_1, ln_2, ln_f   LayerNorms: before attention, before the MLP, and the final one before the LM head
    c_attn  the attention's input projection, queries, keys and values in one matmul
    c_fc    the MLP's first ("fully connected") layer, n_embd -> 4 * n_embd (SwiGLU: its gate and value together)
    c_proj  an output projection back into the residual stream (in attention and in the MLP)
Beyond GPT-2: each switch of config.py is a small branch beside the GPT-2 line it replaces (--arch=llama: the first
four and bias=False), commented with what it changes and why models adopted it:
    position=rope       rotary embeddings turn q and k by position; no wpe     rope_angles, apply_rope, hidden_states
    norm=rmsnorm        RMSNorm instead of LayerNorm                            norm_layer
    mlp=swiglu          a gated SiLU MLP instead of GELU's 4x one               mlp_hidden_size, MLP
    n_kv_head           grouped-query attention: fewer key/value heads          CausalSelfAttention, KVCache
    bias=False          no biases in Linear and LayerNorm layers                nn.Linear(..., bias=config.bias)
    tie_embeddings      False: the LM head gets a matrix of its own             GPT.__init__
Shapes: B batch, T sequence length, C = n_embd, nh = n_head, nkv = key/value heads (nh unless n_kv_head says fewer),
hs = head size C // nh, V vocabulary.
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
        shape = (config.n_layer, batch_size, config.kv_heads, max_length, head_size)  # GQA caches nkv heads only
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.position = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, nkv, T, hs) and return all of them so far (B, nkv, past + T, hs)."""
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


def rope_angles(config: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, hs) of the angles by which position=rope turns q and k at these positions (T,).

    Channel pair i of a head (channels i and i + hs/2, paired as Llama's code pairs them) turns by position *
    rope_theta ** (-2i / hs) radians: the first pairs turn fast and tell neighbours apart, the last turn slowly and
    still tell distant positions apart, like the hands of a clock.
    """
    head_size = config.n_embd // config.n_head
    exponents = torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device) / head_size  # (hs/2,)
    frequencies = 1.0 / config.rope_theta ** exponents  # (hs/2,): radians per position
    angles = positions.float()[:, None] * frequencies[None, :]  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs): channels i and i + hs/2 share their pair's angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each channel pair (a, b) of x (B, heads, T, hs) by its angle: (a cos - b sin, b cos + a sin).

    Rotary position embedding (Su et al. 2021), instead of GPT-2's added position vectors: q at position m and k at n
    turn by m and n times the same frequencies, so their dot product depends only on m - n. Attention sees relative
    positions, with no table to learn; Llama, Qwen, Mistral and Gemma all use it.
    """
    half = x.size(-1) // 2
    a, b = x[..., :half], x[..., half:]  # (B, heads, T, hs/2) each
    turned = torch.cat((-b, a), dim=-1)  # (B, heads, T, hs): each pair (a, b) as (-b, a), a quarter turn
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and the positions before it.

    For each head: attention(q, k, v) = softmax(q k^T / sqrt(hs) + mask) v, where mask is -inf above the diagonal.
    The mask is what makes the model causal: the prediction at position t may use tokens 0..t but never the token it
    is trained to predict, t + 1, nor anything after it (training would otherwise be copying, not predicting).
    Dividing by sqrt(hs) keeps the dot products' variance near 1, so the softmax does not saturate.
    Grouped-query attention (n_kv_head < n_head; Ainslie et al. 2023, Llama 3): each key/value head serves a group of
    nh / nkv query heads. The KV cache, whose size bounds decoding's memory and speed, shrinks by that factor, and
    quality barely moves.
    """

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_size = config.n_embd // config.n_head
        self.layer = layer  # which slot of a KV cache is this layer's
        self.dropout = config.dropout
        kv_size = self.n_kv_head * self.head_size  # C, unless grouped-query attention makes it smaller
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_size, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.size()
        kv_size = self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split((C, kv_size, kv_size), dim=2)  # (B, T, C), then k, v (B, T, nkv * hs)
        # Split C into nh heads of hs numbers; each head attends on its own, in parallel.
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:  # position=rope: q and k turn by their positions' angles; v, the content, does not
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer, k, v)  # (B, nkv, past + T, hs), keys already turned
        if self.n_kv_head != self.n_head:  # grouped-query attention: each key/value head serves nh / nkv query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, past + T, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, past + T, hs)
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


def mlp_hidden_size(config: ModelConfig) -> int:
    """GPT-2's MLP widens to 4C: two C x 4C matrices, 8 C^2 weights. SwiGLU has three C x hidden matrices (gate, value,
    output), so hidden = 8C/3 keeps those 8 C^2; rounded up to a multiple of 32 for the matmul kernels."""
    if config.mlp == "swiglu":
        return 32 * math.ceil(8 * config.n_embd / 3 / 32)
    return 4 * config.n_embd


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, a nonlinearity, project back. Where each token 'thinks' alone.

    GPT-2: widen to 4C, GELU, back to C. mlp=swiglu (Shazeer 2020; PaLM, Llama): c_fc makes two vectors, a gate and a
    value, and SiLU(gate) * value goes back down: each channel's gate scales its value, which trained to a lower loss
    per FLOP than GELU in Shazeer's comparison.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = mlp_hidden_size(config)
        up = 2 * hidden if self.swiglu else hidden  # swiglu: the gate and the value in one matmul
        self.c_fc = nn.Linear(config.n_embd, up, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation; keeps imported weights exact
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 4C), or (B, T, 2 * hidden) with swiglu
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)  # (B, T, hidden) each
            h = F.silu(gate) * value  # (B, T, hidden)
        else:
            h = self.gelu(h)  # (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, C)


RMS_NORM_EPS = 1e-5  # as Llama 2 and 3; hf.py writes it into config.json


def norm_layer(config: ModelConfig) -> nn.Module:
    """The normalisation before each sublayer and before the LM head (ln_1, ln_2, ln_f).

    GPT-2's LayerNorm centres each vector (subtracts its mean), divides by its standard deviation, then applies a
    learned gain and bias. norm=rmsnorm (Zhang & Sennrich 2019; Llama and most models since) divides by the root mean
    square and applies the gain: one statistic instead of two, no bias, and models train as well without the centring.
    """
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=RMS_NORM_EPS)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    """One transformer block: attention, then the MLP, each added to the residual stream x.

    Pre-LayerNorm (GPT-2's choice): each sublayer reads a normalised copy of x and adds its output to x itself.
    The residual stream is then a clean sum from the embeddings to the last block, so gradients reach the first
    layers undiminished and deep stacks train without the careful warm-up that post-LayerNorm needs.
    """

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, rope)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            # position=rope has no table (None): attention turns q and k by their positions instead
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=norm_layer(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as in GPT-2: the LM head scores a hidden state against every token's
        # embedding. One matrix serves both ends, which saves V * C parameters (38M at GPT-2's size) and helps
        # small models: a token that is rarely an input still learns its vector from being a target. Large models
        # (Llama 2 and 3 from 8B) give the head its own matrix: tie_embeddings=False.
        if config.tie_embeddings:
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
        - Biases 0; LayerNorm and RMSNorm gains 1, LayerNorm biases 0.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:  # RMSNorm has none
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
        """Token embeddings (B, T, C) -> the final hidden states (B, T, C): add the position embeddings (or, with
        position=rope, compute the angles attention turns q and k by), run every block, then the final norm."""
        T = token_embeddings.size(1)
        start = kv_cache.position if kv_cache is not None else 0  # after a cache, positions continue from its end
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        positions = torch.arange(start, start + T, dtype=torch.long, device=token_embeddings.device)  # (T,)
        rope = None
        if self.config.position == "rope":
            x, rope = token_embeddings, rope_angles(self.config, positions)  # cos, sin (T, hs), for every layer
        else:
            x = token_embeddings + self.transformer.wpe(positions)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache, rope)
        return self.transformer.ln_f(x)


def count_parameters(config: ModelConfig) -> int:
    """Trainable parameters of GPT(config), counting a tied LM head once and the position embeddings."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    bias = 1 if config.bias else 0
    norm = C if config.norm == "rmsnorm" else C + bias * C  # RMSNorm has a gain and no bias
    qkv = C + 2 * config.kv_heads * (C // config.n_head)
    attention = C * qkv + bias * qkv + C * C + bias * C  # c_attn, c_proj
    hidden = mlp_hidden_size(config)
    up = 2 * hidden if config.mlp == "swiglu" else hidden
    mlp = C * up + bias * up + hidden * C + bias * C  # c_fc, c_proj
    per_block = 2 * norm + attention + mlp
    head = 0 if config.tie_embeddings else V * C
    return V * C + position_parameters(config) + L * per_block + norm + head


def position_parameters(config: ModelConfig) -> int:
    return config.block_size * config.n_embd if config.position == "learned" else 0


def flops_per_token(config: ModelConfig, context: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token: 6 per weight plus attention (PaLM paper, appendix B).

    A weight does a multiply and an add per token forward (2 FLOPs) and twice that backward (4). Position
    embeddings do no matmul, so they are left out of the 6N term (as is an untied token embedding, a lookup);
    `context` defaults to block_size.
    """
    T = context or config.block_size
    lookups = position_parameters(config) + (0 if config.tie_embeddings else config.vocab_size * config.n_embd)
    matmul_params = count_parameters(config) - lookups
    attention = 12 * config.n_layer * config.n_embd * T
    return 6 * matmul_params + attention
