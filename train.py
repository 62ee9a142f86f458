"""Train a GPT: mixed precision, warmup + cosine schedule, periodic evaluation, and checkpoints that never lose a run.

    python train.py                                  # defaults: tiny on a CPU, small on a GPU
    python train.py --preset=tiny --max_iters=200 --dataset=shakespeare
    python train.py --resume                         # continue the latest run exactly where it stopped
    torchrun --standalone --nproc_per_node=2 train.py --preset=tiny   # DDP
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import data
from config import Config, ConfigError, ModelConfig, TrainConfig, UserError, parse_args, run_cli
from model import GPT, count_parameters, flops_per_token
from runtime import Runtime, explain_lost_ranks, measure_matmul_peak, setup_runtime


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must hold to continue it exactly."""
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0  # training wall time over all sessions of this run


def learning_rate_at(step: int, base_lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Linear warmup from base_lr/warmup_iters to base_lr, then cosine decay to min_lr at decay_iters, then flat."""
    if step < warmup_iters:
        return base_lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def make_optimizer(model: torch.nn.Module, train: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, LayerNorm or... nothing else 1-D); fused if available."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {}
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu"):
        extra["fused"] = True  # one kernel for all parameters instead of a dozen per tensor
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2), **extra)


class Batches:
    """Training batches from the token file: random windows, or each window once per epoch (--sampling=epoch).

    Under DDP every rank draws the same batch_size x world_size window starts from one shared stream and keeps its
    own slice: ranks never see the same window, an epoch still covers each window once, a 2-process run with batch
    b takes exactly the samples of a 1-process run with batch 2b, and the sampler state is identical on every rank,
    so a checkpoint holds one and resumes on any number of processes.
    """

    def __init__(self, tokens: np.ndarray, train: TrainConfig, block_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if len(tokens) < block_size + 1:
            raise UserError(f"{len(tokens)} tokens are fewer than block_size+1={block_size + 1}; lower --block_size")
        self.tokens, self.batch_size, self.block_size = tokens, train.batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epochs = data.EpochSampler(len(tokens), block_size, seed) if train.sampling == "epoch" else None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        global_batch = self.batch_size * self.world_size
        if self.epochs is None:  # the same draw as data.random_batch, so one process behaves as before
            starts = torch.randint(len(self.tokens) - self.block_size, (global_batch,), generator=self.generator)
            starts = starts.numpy()
        else:
            starts = self.epochs.next_starts(global_batch)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return data.batch_from_starts(self.tokens, mine, self.block_size)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epochs": self.epochs.state_dict() if self.epochs else None}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.epochs is not None and state.get("epochs"):
            self.epochs.load_state_dict(state["epochs"])


def to_device(x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.device_type == "cuda":
        return x.pin_memory().to(runtime.device, non_blocking=True)
    return x.to(runtime.device)


def rng_state() -> dict:
    """The global RNGs (dropout, anything random) as tensors and plain values, which weights_only loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": _python_rng_to_tensor(random.getstate()),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_to_tensor(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss if gauss is not None else float("nan")}


def set_rng_state(state: dict) -> None:
    python = state["python"]
    gauss = None if math.isnan(python["gauss"]) else python["gauss"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU of the machine that saved it; torch fails on an index past this machine's GPUs, so a
        # run saved on 8 GPUs and resumed on 1 restores the GPUs this machine has.
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


class StopRequest:
    """SIGINT/SIGTERM: finish the current step, save, exit 0. A second Ctrl-C exits at once."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            print("\nsecond Ctrl-C: exiting now without saving", file=sys.stderr)
            os._exit(130)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: finishing this step and saving a checkpoint (Ctrl-C again to quit now)",
              file=sys.stderr)


def stop_agreed(stop: StopRequest, runtime: Runtime) -> bool:
    """Has a stop been requested, on any rank? A signal reaches the ranks at slightly different steps; one that
    stopped alone would enter the checkpoint's collectives while the others enter the next step's: a hang."""
    if not runtime.distributed:
        return stop.requested
    requested = torch.tensor(float(stop.requested), device=runtime.device)
    dist.all_reduce(requested, op=dist.ReduceOp.MAX)
    if requested.item() and not stop.requested:
        stop.requested, stop.signal_name = True, "a signal to another rank"
    return stop.requested


def train_step(model, optimizer, scaler, batches: Batches, runtime: Runtime, train: TrainConfig,
               lr: float, culprits: list[int] | None = None) -> torch.Tensor | None:
    """One optimizer step over gradient_accumulation_steps micro-batches.

    Returns the mean loss as a tensor (no host sync), or None when the loss or a gradient was not finite: then the
    weights and optimizer state are left exactly as they were. Under DDP every rank agrees on skipping, and the
    ranks whose own loss was not finite are appended to `culprits` (all ranks when only the gradients were).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    accumulation = train.gradient_accumulation_steps
    total_loss = torch.zeros((), device=runtime.device)
    for micro_step in range(accumulation):
        x, y = batches.next()
        x, y = to_device(x, runtime), to_device(y, runtime)
        last = micro_step == accumulation - 1
        # Under DDP, all-reduce gradients only on the last micro-step; the others accumulate locally.
        sync = nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            with runtime.autocast():
                loss = model(x, y) / accumulation
            scaler.scale(loss).backward()
        total_loss += loss.detach()
    if train.grad_clip > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip, error_if_nonfinite=False)
    else:
        grad_norm = torch.zeros((), device=runtime.device)
    loss_finite = torch.isfinite(total_loss)
    finite = loss_finite & torch.isfinite(grad_norm)
    local_loss_finite = loss_finite
    if runtime.distributed:
        # Every rank must take the same decision, or their step counts drift apart and the next collective hangs.
        # One all-reduce: how many ranks saw a bad loss / a bad loss or gradient, and which ranks had a bad loss.
        counts = torch.zeros(2 + runtime.world_size, device=runtime.device)
        counts[0], counts[1] = (~loss_finite).float(), (~finite).float()
        counts[2 + runtime.rank] = (~loss_finite).float()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        loss_finite, finite = counts[0] == 0, counts[1] == 0
        local_loss_finite = counts[2:] == 0
    if scaler.is_enabled():
        # fp16: the scaler skips steps with inf gradients itself and lowers the scale; that is not a failure
        scaler.step(optimizer)
        scaler.update()
        ok = bool(loss_finite)
    else:
        ok = bool(finite)  # the one host sync per step: we must know before touching the weights
        if ok:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not ok and culprits is not None:
        if runtime.distributed:
            bad = torch.nonzero(~local_loss_finite).flatten().tolist()
            culprits.extend(bad or range(runtime.world_size))
        else:
            culprits.append(runtime.rank)
    return total_loss if ok else None


@torch.no_grad()
def estimate_loss(model, tokens: np.ndarray, runtime: Runtime, batch_size: int, block_size: int,
                  eval_iters: int, seed: int) -> float:
    """Mean loss over eval_iters batches drawn from a fixed seed, so evals at different steps are comparable.

    Under DDP rank r evaluates batches r, r + world_size, ... of the same sequence and the sums are added up: the
    same number a single process gets, in 1/world_size of the time. Pass the unwrapped model: DDP's forward may
    broadcast buffers, a collective that ranks with fewer batches would never join.
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=runtime.device)
    for i in range(eval_iters):
        x, y = data.random_batch(tokens, batch_size, block_size, generator)  # every rank draws, to stay in step
        if i % runtime.world_size != runtime.rank:
            continue
        with runtime.autocast():
            total += model(to_device(x, runtime), to_device(y, runtime)).float()
    if runtime.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return total.item() / eval_iters


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy on val of predicting every token by its train frequency (add-one smoothed): the bar to beat."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for chunk in _chunks(train_tokens):
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    total = -sum(log_probs[chunk].sum() for chunk in _chunks(val_tokens))
    return total / len(val_tokens)


def _chunks(tokens: np.ndarray, size: int = 1 << 20):
    """Pieces of a token array, read without mapping the file (see data.read_tokens). Each piece becomes int64 and
    float64 temporaries (16 bytes a token), so the piece size bounds the peak: 1M tokens, about 17 MB."""
    for start in range(0, len(tokens), size):
        yield data.read_tokens(tokens, start, size)


def resident_memory_mb() -> float | None:
    """Current resident memory of this process (Linux), logged so that a leak shows in metrics.jsonl."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy", "tiktoken", "datasets", "tqdm", "matplotlib"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class MetricsLog:
    """Appends one JSON line per log step and eval to metrics.jsonl; mirrors to TensorBoard when asked."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard=True needs the tensorboard package: venv/bin/pip install tensorboard")
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])
            self.writer.flush()


def new_run_dir(config: Config, dataset_name: str) -> Path:
    if config.train.out_dir:
        return Path(config.train.out_dir)
    name = config.train.run_name or f"{config.preset}-{dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return checkpoint.CHECKPOINTS_ROOT / name


def merge_resume_config(saved: Config, parsed: Config, overridden: frozenset[str]) -> Config:
    """The saved run's config, with the user's explicit overrides on top (e.g. more max_iters) where they are safe."""
    fixed = {f.name for f in dataclasses.fields(ModelConfig)} - {"dropout"}
    fixed |= {"tokenizer", "dataset", "data_dir", "batch_size", "gradient_accumulation_steps", "sampling", "seed"}
    for key in sorted(overridden):
        if key in ("resume", "out_dir", "run_name"):
            continue
        section = next(s for s in (parsed.model, parsed.train, parsed.data) if hasattr(s, key))
        new = getattr(section, key)
        target = next(s for s in (saved.model, saved.train, saved.data) if hasattr(s, key))
        old = getattr(target, key)
        if key in fixed and new != old:
            raise ConfigError(f"--{key}={new} contradicts the run being resumed ({key}={old}); "
                              "drop the override or start a new run with another --out_dir")
        setattr(target, key, new)
    saved.train.resume = True
    return saved.validate()


def resolve_global_batch(train: TrainConfig, world_size: int, overridden: frozenset[str]) -> None:
    """--global_batch_size=G: set gradient_accumulation_steps so batch_size x accumulation x processes = G."""
    if not train.global_batch_size:
        return
    per_micro_step = train.batch_size * world_size
    if train.global_batch_size % per_micro_step:
        nearest = per_micro_step * max(1, train.global_batch_size // per_micro_step)
        fits = [n for n in range(1, 65) if train.global_batch_size % (train.batch_size * n) == 0]
        raise ConfigError(f"global_batch_size={train.global_batch_size} is not a multiple of batch_size="
                          f"{train.batch_size} x {world_size} processes = {per_micro_step}; use "
                          f"--global_batch_size={nearest}, or a number of processes from {fits}")
    accumulation = train.global_batch_size // per_micro_step
    if "gradient_accumulation_steps" in overridden and accumulation != train.gradient_accumulation_steps:
        raise ConfigError(f"gradient_accumulation_steps={train.gradient_accumulation_steps} contradicts "
                          f"global_batch_size={train.global_batch_size} on {world_size} processes (which needs "
                          f"{accumulation}); give only one of them")
    train.gradient_accumulation_steps = accumulation


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """The GradScaler's saved scale, where the run had one. A run saved without loss scaling (bf16 or float32, e.g.
    on a CPU) and resumed in fp16 (a GPU without bf16, or --dtype=float16) starts from a fresh scale: torch refuses
    to load the empty state of a disabled scaler into an enabled one."""
    if saved or not scaler.is_enabled():
        scaler.load_state_dict(saved)


def restore_rank_rng(saved: dict, rank: int, seed: int, step: int) -> None:
    """Each rank takes back its own RNG (dropout masks). A rank the saved run did not have (it ran on fewer
    processes) gets a fresh seed from (seed, rank, step) instead of a copy of another rank's stream."""
    per_rank = saved.get("rng_per_rank") or [saved["rng"]]
    if rank < len(per_rank):
        set_rng_state(per_rank[rank])
        return
    fresh = seed + 1_000_003 * step + rank
    torch.manual_seed(fresh)
    random.seed(fresh)
    np.random.seed(fresh % 2**32)


def main(argv: list[str] | None = None) -> None:
    parsed = parse_args(sys.argv[1:] if argv is None else argv)
    config, overridden = parsed.config, parsed.overridden
    resume = config.train.resume
    resume_from = None
    if resume:
        run_dir = Path(config.train.out_dir) if config.train.out_dir else checkpoint.latest_run()
        if not run_dir.is_dir():
            raise UserError(f"--resume: no run folder {run_dir}; see the runs under {checkpoint.CHECKPOINTS_ROOT}/")
        for stale in checkpoint.clean_stale_temp_files(run_dir):
            print(f"removed {stale.name}, left by a save that was interrupted", file=sys.stderr)
        resume_from = checkpoint.load_checkpoint(
            checkpoint.newest_valid_checkpoint(run_dir, say=lambda m: print(m, file=sys.stderr)))
        config = merge_resume_config(Config.from_dict(resume_from["config"]), config, overridden)

    pretrained = None
    if config.train.init_from != "scratch" and not resume:
        import hf  # only fine-tuning needs safetensors and the Hub client
        pretrained, loaded = hf.load_pretrained(config.train.init_from, dropout=config.model.dropout)
        hf.check_overrides(loaded, config.model, overridden)
        config.model = loaded
        if "tokenizer" not in overridden:
            config.data.tokenizer = hf.pretrained_tokenizer(config.train.init_from)["name"]

    runtime = setup_runtime(config.train.device, config.train.dtype, config.train.ddp_timeout_s)
    log = print if runtime.is_main else (lambda *a, **k: None)
    resolve_global_batch(config.train, runtime.world_size, overridden)
    if "preset" not in overridden and not resume:
        log(f"preset {config.preset}: the default on this {runtime.device_type} (choose with PRESET=... or --preset=)")

    # Data first: everything else (vocabulary, number of epochs, the baseline) depends on it.
    # One process per node builds the token files while the others wait (multi-node without a shared disk included).
    if runtime.local_rank == 0:
        data_dir = data.prepare(config.data, config.model.block_size, explicit_dataset="dataset" in overridden)
    if runtime.distributed:
        dist.barrier()
    if runtime.local_rank != 0:
        data_dir = data.prepare(config.data, config.model.block_size, explicit_dataset="dataset" in overridden)
    meta = data.read_meta(data_dir)
    tokenizer = data.get_tokenizer(meta["tokenizer"])
    if "dataset" not in overridden and not resume and meta["dataset"] == "shakespeare":
        config.data.dataset = "shakespeare"  # the fallback for an unreachable WikiText-2: record what was used
    if not resume:
        run_dir = new_run_dir(config, meta["dataset"])
        if runtime.distributed:  # the name holds a timestamp: all ranks take rank 0's, which may be a second off
            shared = [str(run_dir)]
            dist.broadcast_object_list(shared, src=0)
            run_dir = Path(shared[0])
        if any((run_dir / name).exists() for name in ("last.pt", "best.pt")) or checkpoint.step_checkpoints(run_dir):
            raise UserError(f"{run_dir} already holds a run; continue it with --resume --out_dir={run_dir}, "
                            "or pick another --out_dir/--run_name")
    if "vocab_size" in overridden and config.model.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"vocab_size={config.model.vocab_size} is smaller than the {meta['tokenizer']['name']} "
                          f"tokenizer's {meta['vocab_size']}; drop --vocab_size")
    if resume_from is not None and config.model.vocab_size != meta["vocab_size"]:
        raise UserError(f"the run was trained with vocab_size={config.model.vocab_size} but {data_dir} has "
                        f"{meta['vocab_size']}; resume it with its own data set")
    if pretrained is not None and meta["vocab_size"] != config.model.vocab_size:
        raise UserError(f"{config.train.init_from} has a vocabulary of {config.model.vocab_size} but the data's "
                        f"{meta['tokenizer']['name']} tokenizer has {meta['vocab_size']}; use --tokenizer=gpt2")
    if "vocab_size" not in overridden:
        config.model.vocab_size = meta["vocab_size"]
    train_tokens = data.open_split(data_dir, "train")
    val_tokens = data.open_split(data_dir, "val")

    torch.manual_seed(config.train.seed + runtime.rank)
    random.seed(config.train.seed + runtime.rank)
    np.random.seed(config.train.seed + runtime.rank)
    model = (pretrained if pretrained is not None else GPT(config.model)).to(runtime.device)
    optimizer = make_optimizer(model, config.train, runtime.device_type)
    scaler = runtime.grad_scaler()
    batches = Batches(train_tokens, config.train, config.model.block_size, seed=config.train.seed,
                      rank=runtime.rank, world_size=runtime.world_size)
    state = TrainState()
    if resume_from is not None:
        model.load_state_dict(checkpoint.strip_wrapper_prefixes(resume_from["model"]))
        optimizer.load_state_dict(resume_from["optimizer"])
        restore_scaler(scaler, resume_from["scaler"])
        state = TrainState(**resume_from["state"])
        batches.load_state_dict(resume_from["batches"][0])  # one shared stream, whatever the number of processes
        restore_rank_rng(resume_from, runtime.rank, config.train.seed, state.step)
        log(f"resuming {run_dir} at step {state.step}")
        saved_world_size = resume_from.get("world_size", 1)
        if saved_world_size != runtime.world_size:
            log(f"note: the run was saved by {saved_world_size} process(es) and continues on {runtime.world_size}: "
                "the data stream continues where it stopped; the global batch stays the same only with "
                "--global_batch_size (see README, Multi-GPU and multi-node)")

    compile_model = config.train.compile if config.train.compile is not None else runtime.device_type == "cuda"
    raw_model = model
    if compile_model:
        model = torch.compile(model)
    local_model = model  # evaluation runs on the unwrapped model: no collectives inside its forward
    if runtime.distributed:
        device_ids = [runtime.local_rank] if runtime.device_type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)

    train = config.train
    tokens_per_step = (train.batch_size * config.model.block_size * train.gradient_accumulation_steps
                       * runtime.world_size)
    decay_iters = train.lr_decay_iters or train.max_iters
    n_params = count_parameters(config.model)
    flops_per_step = flops_per_token(config.model) * tokens_per_step
    peak_flops = measure_matmul_peak(runtime.device, runtime.dtype) * runtime.world_size
    epochs = train.max_iters * tokens_per_step / len(train_tokens)
    log(config.describe())
    log(runtime.describe())
    log(f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token(config.model) / 1e6:.1f} MFLOP per token; "
        f"compile: {compile_model}")
    log(f"batch: {train.batch_size} x {config.model.block_size} tokens x {train.gradient_accumulation_steps} "
        f"accumulation x {runtime.world_size} processes = {tokens_per_step:,} tokens per step "
        f"(global batch {train.batch_size * train.gradient_accumulation_steps * runtime.world_size} sequences)")
    log(f"data: {data_dir} ({len(train_tokens):,} train tokens, {len(val_tokens):,} val tokens, "
        f"tokenizer {tokenizer.name}); {train.max_iters} steps = {epochs:.2f} epochs")
    baseline = unigram_loss(train_tokens, val_tokens, config.model.vocab_size)
    log(f"baseline: predicting the unigram distribution of the train tokens gives val loss {baseline:.4f}")

    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"run_dir": str(run_dir), "git_commit": git_commit(), "config": config.to_dict(),
                    "packages": package_versions(), "device": str(runtime.device), "dtype": str(runtime.dtype),
                    "world_size": runtime.world_size, "matmul_peak_flops": peak_flops, "parameters": n_params,
                    "tokens_per_step": tokens_per_step, "unigram_val_loss": baseline,
                    "data": {"dir": str(data_dir), "text_sha256": meta.get("text_sha256"),
                             "source": meta.get("source")}}
        (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    metrics = MetricsLog(run_dir, train.tensorboard) if runtime.is_main else None

    def save(is_best: bool = False, val_loss: float | None = None) -> None:
        """Only rank 0 writes; every rank's RNG (dropout) goes into the file so a DDP run resumes exactly."""
        rng_per_rank = [rng_state()]
        if runtime.distributed:
            rng_per_rank = [None] * runtime.world_size
            dist.all_gather_object(rng_per_rank, rng_state())
        if runtime.is_main:
            # raw_model: the weights without DDP's `module.` or compile's `_orig_mod.` prefixes
            payload = {"config": config.to_dict(), "model": raw_model.state_dict(),
                       "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                       "state": dataclasses.asdict(state), "batches": [batches.state_dict()],
                       "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank, "world_size": runtime.world_size,
                       "tokenizer": tokenizer.to_dict(),
                       "dataset": {"name": meta.get("dataset"), "text_sha256": meta.get("text_sha256")}}
            checkpoint.save_run_checkpoint(run_dir, payload, state.step, val_loss, is_best, train.keep_last)
        if runtime.distributed:
            dist.barrier()

    def evaluate() -> float:
        val_loss = estimate_loss(local_model, val_tokens, runtime, train.batch_size, config.model.block_size,
                                 train.eval_iters, seed=train.seed + 1)
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.evals_without_improvement = val_loss, 0
        else:
            state.evals_without_improvement += 1
        log(f"eval step {state.step}: val loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}, "
            f"best {state.best_val_loss:.4f} (unigram baseline {baseline:.4f})")
        if metrics:
            metrics.write({"kind": "eval", "step": state.step, "tokens_seen": state.tokens_seen, "val_loss": val_loss,
                           "val_perplexity": math.exp(min(val_loss, 50)), "elapsed_s": state.elapsed_s})
        save(is_best=improved, val_loss=val_loss)
        return val_loss

    stop = StopRequest()
    stop.install()
    progress = None
    if runtime.is_main and sys.stdout.isatty():
        from tqdm import tqdm
        progress = tqdm(total=train.max_iters, initial=state.step, unit="step", dynamic_ncols=True)

    model.train()
    bad_steps = 0
    stopped_early = False
    while state.step < train.max_iters and not stop_agreed(stop, runtime):
        lr = learning_rate_at(state.step, train.learning_rate, train.min_lr, train.warmup_iters, decay_iters)
        started = time.perf_counter()
        culprits: list[int] = []
        loss = train_step(model, optimizer, scaler, batches, runtime, train, lr, culprits)
        if loss is None:
            bad_steps += 1
            ranks = ", ".join(map(str, sorted(set(culprits))))
            log(f"warning: non-finite loss or gradient at step {state.step} (rank {ranks}); step skipped on every "
                "rank, weights unchanged", file=sys.stderr)
            if bad_steps >= train.max_bad_steps:
                raise UserError(f"{bad_steps} non-finite steps in a row at step {state.step}; stopping with the last "
                                f"good checkpoint in {run_dir}. Lower --learning_rate or use --dtype=float32")
            continue
        bad_steps = 0
        state.step += 1
        state.tokens_seen += tokens_per_step
        if state.step % train.log_interval == 0 or state.step == train.max_iters:
            if runtime.distributed:  # every rank reaches the same log steps; log the loss of the whole global batch
                dist.all_reduce(loss, op=dist.ReduceOp.SUM)
                loss /= runtime.world_size
            loss_value = loss.item()  # host sync only at log steps
            runtime.synchronize()
            step_time = time.perf_counter() - started
            tokens_per_s = tokens_per_step / step_time
            mfu = flops_per_step / step_time / peak_flops
            if metrics:
                metrics.write({"kind": "train", "step": state.step, "tokens_seen": state.tokens_seen,
                               "train_loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu,
                               "elapsed_s": state.elapsed_s, "rss_mb": resident_memory_mb()})
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                     mfu=f"{mfu:.1%}")
            else:
                log(f"iter {state.step}: loss {loss_value:.4f}, time {step_time * 1000:.1f} ms, lr {lr:.2e}, "
                    f"{tokens_per_s:,.0f} tok/s, mfu {mfu:.1%}", flush=True)
        state.elapsed_s += time.perf_counter() - started
        if progress is not None:
            progress.update(1)
        if state.step % train.eval_interval == 0 and state.step < train.max_iters:
            evaluate()
            if train.patience and state.evals_without_improvement >= train.patience:
                log(f"early stop: no better val loss for {train.patience} evals")
                stopped_early = True
                break
    if progress is not None:
        progress.close()

    if stop.requested:
        save()
        log(f"{stop.signal_name}: saved {run_dir / 'last.pt'} at step {state.step}; continue with "
            f"`python train.py --resume --out_dir={run_dir}` (or `make resume`)")
    else:
        if not stopped_early:
            evaluate()
        if "test" in meta.get("splits", {}):
            test_loss = estimate_loss(local_model, data.open_split(data_dir, "test"), runtime, train.batch_size,
                                      config.model.block_size, train.eval_iters, seed=train.seed + 2)
            log(f"test loss {test_loss:.4f}, perplexity {math.exp(min(test_loss, 50)):.2f}")
            if metrics:
                metrics.write({"kind": "test", "step": state.step, "tokens_seen": state.tokens_seen,
                               "test_loss": test_loss})
        log(f"done: best val loss {state.best_val_loss:.4f} vs unigram baseline {baseline:.4f}; "
            f"checkpoints in {run_dir}; sample with `make generate`")
    if runtime.is_main:
        import plot
        png = plot.plot_run(run_dir)
        if png:
            log(f"loss curves: {png}")
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(explain_lost_ranks(main))
