"""Configuration: one dataclass per concern, named presets, and nanoGPT-style `--key=value` overrides.

    python train.py --preset=tiny --n_layer=8 --learning_rate=1e-3

How to scale a model: pick the preset closest to what you want and override a few fields on the command line
(`--n_layer=8 --n_embd=512`), or add your own entry to PRESETS below by copying one and editing its numbers.
Rules of thumb: n_embd must be divisible by n_head (64 per head is the GPT-2 choice); parameters grow with
n_layer * n_embd**2; memory and time per step grow with batch_size * block_size; halve learning_rate when you
double n_embd. `make info PRESET=... ARGS="..."` prints the parameter count, FLOPs per token and memory estimate.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, bad prompt): printed as one line, exit code 2."""


class ConfigError(UserError):
    """A config value is invalid; the message names the field, the value and the fix."""


def error_summary(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type's name), for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


@dataclass
class ModelConfig:
    vocab_size: int = 50257  # GPT-2's BPE; replaced by the tokenizer's size when the data says otherwise
    n_layer: int = 6  # transformer blocks, each attention then an MLP
    n_head: int = 6  # attention heads per block; must divide n_embd
    n_embd: int = 384  # width of every token's vector (the embedding and residual stream)
    block_size: int = 512  # context length in tokens
    dropout: float = 0.0  # share of activations zeroed during training; 0 for short runs and big data
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2
    arch: str = "gpt2"  # gpt2 or llama: one word for position, norm, mlp, n_kv_head and bias; options beside it win
    position: str = "learned"  # learned: GPT-2's position embedding table; rope: rotary embeddings that turn q and k
    rope_theta: float = 10000.0  # RoPE's base: channel pair i turns by position * rope_theta ** (-2i / head size)
    norm: str = "layernorm"  # layernorm (GPT-2) or rmsnorm (Llama): the normalisation before each sublayer and the head
    mlp: str = "gelu"  # gelu: GPT-2's 4x MLP; swiglu: Llama's gated MLP, hidden 8/3 x n_embd rounded up to 32
    n_kv_head: int = 0  # key/value heads, shared by groups of query heads (grouped-query attention); 0: n_head
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix, as in GPT-2; False: its own matrix

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads: n_kv_head, or n_head when it is 0 (every query head its own, as GPT-2)."""
        return self.n_kv_head or self.n_head

    def apply_arch(self, keep: Collection[str] = ()) -> ModelConfig:
        """Set the switches that `arch` names (ARCHITECTURES), except the fields in `keep`: the options a user gave
        beside --arch win over it. llama's key/value heads are n_head // 2 (all n_head when n_head is odd)."""
        require_choice("arch", self.arch, tuple(ARCHITECTURES))
        form = dict(ARCHITECTURES[self.arch])
        heads_per_kv = form.pop("query_heads_per_kv_head")
        grouped = heads_per_kv > 1 and self.n_head % heads_per_kv == 0
        form["n_kv_head"] = self.n_head // heads_per_kv if grouped else 0  # 0: one key/value head per query head
        for name, value in form.items():
            if name not in keep:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            _require_positive(name, getattr(self, name))
        if self.n_embd % self.n_head:
            divisors = [d for d in range(1, self.n_embd + 1) if self.n_embd % d == 0 and d <= 64]
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                              f"pick n_head from {divisors} or change n_embd")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} is outside [0, 1); use e.g. --dropout=0.1")
        require_choice("arch", self.arch, tuple(ARCHITECTURES))
        require_choice("position", self.position, POSITIONS)
        require_choice("norm", self.norm, NORMS)
        require_choice("mlp", self.mlp, MLPS)
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise ConfigError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; pick n_kv_head "
                              f"from {divisors} (0 means n_head)")
        head_size = self.n_embd // self.n_head
        if self.position == "rope" and head_size % 2:
            even = [d for d in range(1, self.n_embd + 1) if self.n_embd % d == 0 and (self.n_embd // d) % 2 == 0]
            raise ConfigError(f"position=rope turns pairs of channels, but the head size n_embd/n_head = "
                              f"{self.n_embd}/{self.n_head} = {head_size} is odd; pick n_head from {even[:8]} or "
                              "change n_embd")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be positive, e.g. --rope_theta=10000")


POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
# What --arch sets. llama: the form of Llama (Touvron et al. 2023) and of most models since (Qwen, Mistral, Gemma
# differ in details): rotary positions, RMSNorm, a SwiGLU MLP, no biases, and grouped-query attention (Ainslie et al.
# 2023) with two query heads per key/value head. model.py comments each switch where it acts.
ARCHITECTURES = {
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", query_heads_per_kv_head=1, bias=True),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", query_heads_per_kv_head=2, bias=False),
}


DTYPES = ("auto", "float32", "bfloat16", "float16")
SAMPLING = ("random", "epoch")
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
MUON_ADJUST_LR = ("original", "match_rms_adamw")


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch (per process under DDP)
    gradient_accumulation_steps: int = 1  # micro-batches summed into one optimizer step
    max_iters: int = 10000  # optimizer steps
    learning_rate: float = 3e-4  # peak rate, reached at the end of warmup
    min_lr: float = 3e-5  # the rate at the end of the decay
    warmup_iters: int = 200  # steps of linear warmup from 0 to learning_rate
    lr_decay_iters: int = 0  # 0 means max_iters: cosine decay over the whole run
    lr_schedule: str = "cosine"  # cosine decay after warmup, or wsd: warmup, constant, then a 1-sqrt cooldown
    cooldown_frac: float = 0.2  # wsd: the share of lr_decay_iters spent cooling down to min_lr
    optimizer: str = "adamw"  # adamw for every weight, or muon for the blocks' matrices and AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak rate; the schedule scales it as it scales learning_rate
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises from 0.85 to muon_momentum; 0: none
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay (multiplied by its lr, as AdamW's is)
    muon_adjust_lr: str = "original"  # torch.optim.Muon's adjust_lr_fn: original or match_rms_adamw
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon step: fewer are cheaper and orthogonalise less exactly
    zero_init_proj: bool = False  # a new model starts with every block's output projections (c_proj) at zero
    weight_decay: float = 0.1  # AdamW's decoupled weight decay, on matrices only (not biases or LayerNorm gains)
    beta1: float = 0.9  # AdamW's decay of the gradient average
    beta2: float = 0.95  # AdamW's decay of the squared-gradient average
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 500  # steps between evaluations (and checkpoints)
    eval_iters: int = 100  # batches averaged for each evaluation's loss
    log_interval: int = 10  # steps between printed (and logged) training losses
    sampling: str = "random"  # random windows, or "epoch": every window once per epoch, reshuffled
    patience: int = 0  # stop after this many evals without a better val loss; 0 never stops early
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    dtype: str = "auto"  # auto: bfloat16 where the device supports it, else float16 on CUDA, else float32
    compile: bool | None = None  # None: use torch.compile where it pays off (see train.py)
    fast_kernels: bool = True  # the CPU fast paths of fast.py; False runs model.py's plain path
    device: str = "auto"  # auto: cuda, then mps, then cpu
    seed: int = 1337  # seeds the weights, the batches and dropout
    out_dir: str = ""  # empty: checkpoints/<run_name>
    run_name: str = ""  # empty: <preset>-<dataset>-<timestamp>
    resume: bool = False  # continue the run in out_dir (default: the latest) from its newest valid checkpoint
    keep_last: int = 2  # step checkpoints kept besides the best one
    init_from: str = "scratch"  # scratch: random weights; gpt2 (-medium, -large, -xl): OpenAI's; or a HF folder
    tensorboard: bool = False  # also write TensorBoard logs into the run folder
    global_batch_size: int = 0  # sequences per optimizer step, all processes; 0: batch_size x accumulation x processes
    ddp_timeout_s: float = 300.0  # under torchrun: how long a collective waits for a dead or stuck rank before failing
    max_minutes: float = 0.0  # stop once the steps (evals not counted) have taken this long; 0: max_iters alone

    def validate(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters",
                     "log_interval", "max_bad_steps", "keep_last"):
            _require_positive(name, getattr(self, name))
        for name in ("warmup_iters", "lr_decay_iters", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is negative; use 0 or more")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be positive, e.g. --learning_rate=3e-4")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"min_lr={self.min_lr} must be between 0 and learning_rate={self.learning_rate}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} and grad_clip={self.grad_clip} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1), e.g. --{name}=0.9")
        if self.global_batch_size < 0 or self.global_batch_size % self.batch_size:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not a multiple of batch_size="
                              f"{self.batch_size}; use e.g. --global_batch_size={self.batch_size * 4}, or 0 for "
                              "batch_size x gradient_accumulation_steps x processes")
        if self.max_minutes < 0:
            raise ConfigError(f"max_minutes={self.max_minutes} is negative; use 0 (no limit) or e.g. --max_minutes=8")
        if self.ddp_timeout_s <= 0:
            raise ConfigError(f"ddp_timeout_s={self.ddp_timeout_s} must be positive, e.g. --ddp_timeout_s=300")
        require_choice("dtype", self.dtype, DTYPES)
        require_choice("sampling", self.sampling, SAMPLING)
        require_choice("optimizer", self.optimizer, OPTIMIZERS)
        require_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        require_choice("muon_adjust_lr", self.muon_adjust_lr, MUON_ADJUST_LR)
        if not 0 < self.cooldown_frac <= 1:
            raise ConfigError(f"cooldown_frac={self.cooldown_frac} must be in (0, 1], e.g. --cooldown_frac=0.2")
        if self.muon_lr <= 0:
            raise ConfigError(f"muon_lr={self.muon_lr} must be positive, e.g. --muon_lr=0.02")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum={self.muon_momentum} must be in [0, 1), e.g. --muon_momentum=0.95")
        if self.muon_ns_steps < 1:
            raise ConfigError(f"muon_ns_steps={self.muon_ns_steps} must be at least 1, e.g. --muon_ns_steps=5")
        if self.muon_momentum_warmup < 0 or self.muon_weight_decay < 0:
            raise ConfigError(f"muon_momentum_warmup={self.muon_momentum_warmup} and muon_weight_decay="
                              f"{self.muon_weight_decay} must be >= 0")
        device_type = self.device.split(":")[0]
        if device_type not in ("auto", "cpu", "cuda", "mps"):
            raise ConfigError(f"device={self.device!r} is not known; use auto, cpu, cuda, cuda:N or mps")


@dataclass
class DataConfig:
    dataset: str = "wikitext2"  # wikitext2, shakespeare, tang_poems, hf:owner/name:config, a .txt/.jsonl/.parquet path
    tokenizer: str = "gpt2"  # gpt2 (tiktoken BPE), char, or bpe:N (N tokens learned from the train split)
    data_dir: str = ""  # empty: data/<dataset>; a folder with train.bin/val.bin (nanoGPT layout) is used as is
    text_column: str = "text"  # the column (or JSON field) holding the text in .jsonl, .parquet and hf: data
    val_fraction: float = 0.1  # share held out for validation when the source has no validation split
    encoding_errors: str = "strict"  # strict: a file that is not UTF-8 is an error; replace: decode with U+FFFD

    def validate(self) -> None:
        if not self.tokenizer.startswith("bpe:"):
            require_choice("tokenizer", self.tokenizer, ("gpt2", "char", "bpe:N"))
        bpe_size(self.tokenizer)
        require_choice("encoding_errors", self.encoding_errors, ("strict", "replace"))
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1), e.g. --val_fraction=0.1")
        if not self.dataset:
            raise ConfigError("dataset is empty; use --dataset=wikitext2, shakespeare or a path to your text")


DPO_LOSS_TYPES = ("sigmoid", "sigmoid_norm")


@dataclass
class DPOConfig:
    """dpo.py's own settings (its --help lists them); the optimisation is TrainConfig's."""
    beta: float = 0.1  # DPO's beta: the larger, the closer the policy stays to the reference (the start)
    loss_type: str = "sigmoid_norm"  # sigmoid: summed reply log-probs (the paper's); sigmoid_norm: per-token mean
    nll_weight: float = 0.0  # > 0: add the chosen reply's per-token NLL times this (RPO); that term is more SFT
    samples_per_prompt: int = 4  # built-in task: replies sampled per question, labelled by the checker, into pairs
    sample_temperature: float = 1.0  # built-in task: the temperature of those samples
    max_new_tokens: int = 16  # the longest reply sampled (pairs, and the accuracy's greedy replies)

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta} must be positive, e.g. --beta=0.1")
        require_choice("loss_type", self.loss_type, DPO_LOSS_TYPES)
        if self.nll_weight < 0:
            raise ConfigError(f"nll_weight={self.nll_weight} must be 0 (off) or more, e.g. --nll_weight=1")
        for name in ("samples_per_prompt", "max_new_tokens"):
            _require_positive(name, getattr(self, name))
        if self.sample_temperature <= 0:
            raise ConfigError(f"sample_temperature={self.sample_temperature} must be positive, e.g. 1.0")


@dataclass
class RLConfig:
    """rl.py's own settings (its --help lists them); the optimisation is TrainConfig's."""
    group_size: int = 8  # G: replies sampled per prompt; advantages compare them with each other
    prompts_per_step: int = 8  # prompts per optimizer step (each with its G replies)
    temperature: float = 0.5  # sampling temperature; at 1.0 a small model rarely samples a right answer (docs)
    max_new_tokens: int = 16  # the longest reply sampled
    scale_by_std: bool = True  # divide each advantage by its group's standard deviation (GRPO); False: only centre
    kl_coef: float = 0.0  # > 0: penalise the KL divergence to the reference (the start) by this weight
    clip_eps: float = 0.2  # PPO's clipping of the probability ratio, when a batch serves several updates
    updates_per_batch: int = 1  # optimizer steps on each batch of samples (> 1: PPO-style reuse, clipped)
    reward: str = ""  # path/to/file.py:function(prompt, reply, row) -> number; empty: exact match with "answer"
    eval_rows: int = 200  # held-out prompts scored (greedy) at each evaluation

    def validate(self) -> None:
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "updates_per_batch", "eval_rows"):
            _require_positive(name, getattr(self, name))
        if self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size}: a group needs 2 or more replies to compare, e.g. 8")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be positive (RL samples), e.g. 0.5")
        if self.kl_coef < 0 or not 0 < self.clip_eps < 1:
            raise ConfigError(f"kl_coef={self.kl_coef} must be >= 0 and clip_eps={self.clip_eps} in (0, 1)")


BPE_SPECIAL_TOKENS = ("<|endoftext|>",)  # a bpe:N vocabulary holds the 256 bytes, these, and N - 257 merges
BPE_MIN_SIZE = 256 + len(BPE_SPECIAL_TOKENS)


def bpe_size(tokenizer: str) -> int | None:
    """N of --tokenizer=bpe:N (None for gpt2 or char), or a ConfigError saying what N may be."""
    if not tokenizer.startswith("bpe:"):
        return None
    size = tokenizer.removeprefix("bpe:")
    if not size.isdigit():
        raise ConfigError(f"tokenizer={tokenizer!r}: N in bpe:N is the vocabulary size, a whole number; use e.g. "
                          "--tokenizer=bpe:4096")
    if int(size) < BPE_MIN_SIZE:
        raise ConfigError(f"tokenizer={tokenizer!r} is smaller than the 256 byte tokens + {len(BPE_SPECIAL_TOKENS)} "
                          f"special token every byte-level BPE holds; use at least bpe:{BPE_MIN_SIZE}, e.g. bpe:4096")
    return int(size)


@dataclass
class Config:
    preset: str = "small"  # the PRESETS entry these values started from
    model: ModelConfig = field(default_factory=ModelConfig)  # the network's shape
    train: TrainConfig = field(default_factory=TrainConfig)  # the optimisation, its schedule and the run
    data: DataConfig = field(default_factory=DataConfig)  # the text and its tokenizer

    def validate(self) -> Config:
        require_choice("preset", self.preset, tuple(PRESETS))
        self.model.validate()
        self.train.validate()
        self.data.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Rebuild from to_dict()'s output, e.g. a checkpoint's; unknown keys from newer versions are dropped."""
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in values.items() if k in names})
        return cls(preset=d.get("preset", "small"), model=build(ModelConfig, d.get("model", {})),
                   train=build(TrainConfig, d.get("train", {})), data=build(DataConfig, d.get("data", {})))

    def describe(self) -> str:
        """The effective config as a few readable lines, printed at the start of a run."""
        lines = [f"preset: {self.preset}"]
        for section in ("model", "train", "data"):
            values = dataclasses.asdict(getattr(self, section))
            lines.append(f"{section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        return "\n".join(lines)


def _preset(model: dict, train: dict, data: dict | None = None) -> Config:
    return Config(model=ModelConfig(**model), train=TrainConfig(**train), data=DataConfig(**(data or {})))


# Each preset is a complete config. `tiny` is sized for 2 CPU cores: `make train` trains it for about 5 minutes, with
# the recipe that reached the lowest bits per byte in that time here: Muon (weight decay 0.1, three Newton-Schulz
# steps) and a wsd schedule (docs/optimizer.md), a 2,048-token BPE learned from the data, whose small LM head makes
# a step ~4x cheaper than GPT-2's 50,257-token one (docs/tokenizer.md), and rotary positions
# (docs/architecture.md); `--tokenizer=gpt2 --arch=gpt2` gives back the book's GPT-2. `small` holds the numbers
# users of nanoGPT-style repos know (~30M parameters); the gpt2* presets are OpenAI's GPT-2 sizes, for GPUs.
PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": lambda: _preset(
        dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, position="rope"),
        dict(batch_size=12, max_iters=6000, learning_rate=4e-3, min_lr=4e-4, warmup_iters=100,
             eval_interval=200, eval_iters=20, log_interval=10, weight_decay=0.1, optimizer="muon",
             muon_adjust_lr="match_rms_adamw", muon_lr=8e-3, muon_weight_decay=0.1, muon_ns_steps=3,
             lr_schedule="wsd", cooldown_frac=0.3),
        dict(tokenizer="bpe:2048")),
    "small": lambda: _preset(
        dict(n_layer=6, n_head=6, n_embd=384, block_size=512, dropout=0.1),
        dict(batch_size=16, max_iters=10000, learning_rate=3e-4, min_lr=3e-5, warmup_iters=200,
             eval_interval=500, eval_iters=100)),
    "gpt2": lambda: _preset(
        dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0),
        dict(batch_size=16, gradient_accumulation_steps=4, max_iters=5000, learning_rate=6e-4, min_lr=6e-5,
             warmup_iters=200, eval_interval=250, eval_iters=50)),
    # Fine-tuning OpenAI's GPT-2 (`make finetune-gpt2`, --init_from=gpt2): sizes come from the weights; a learning rate
    # 20x lower than pretraining's so the first steps do not wash out what the model knows.
    "gpt2-finetune": lambda: _preset(
        dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.1),
        dict(batch_size=8, gradient_accumulation_steps=4, max_iters=300, learning_rate=3e-5, min_lr=3e-6,
             warmup_iters=20, eval_interval=50, eval_iters=20, init_from="gpt2")),
    "gpt2-medium": lambda: _preset(
        dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, dropout=0.0),
        dict(batch_size=8, gradient_accumulation_steps=8, max_iters=5000, learning_rate=3e-4, min_lr=3e-5,
             warmup_iters=200, eval_interval=250, eval_iters=50)),
    "gpt2-large": lambda: _preset(
        dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, dropout=0.0),
        dict(batch_size=4, gradient_accumulation_steps=16, max_iters=5000, learning_rate=2.5e-4, min_lr=2.5e-5,
             warmup_iters=200, eval_interval=250, eval_iters=50)),
}


def _require_positive(name: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value} must be a positive number; use 1 or more")


def require_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}{hint}")
