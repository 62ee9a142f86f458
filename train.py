"""Train a GPT: mixed precision, a warmup then a cosine or wsd decay, periodic evaluation, and checkpoints that
never lose a run. The loop here is also the one the fine-tuning scripts run (classify.py, instruct.py).

    python train.py                                  # defaults: tiny on a CPU, small on a GPU
    python train.py --preset=tiny --max_iters=200 --dataset=shakespeare
    python train.py --resume                         # continue the latest pretraining run exactly where it stopped
    torchrun --standalone --nproc_per_node=2 train.py --preset=tiny   # DDP

main() reads as the phases of a run: resolve the run, its data, the model and optimizer, the loop, the finish.
The loop (train_loop), its evaluate-and-checkpoint (evaluate, save) and restore work on a Run, whatever it trains;
a task passes what differs: `measure` (its validation) and `record` (its entries in the checkpoint).
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
from config import Config, ConfigError, TrainConfig, UserError
from data import Batches
from gptkit import checkpoint, fast, finetune, loading, runinfo
from gptkit.cli import merge_resume_config, parse_args, run_cli
from gptkit.optimizers import MuonWithAdamW, make_optimizer, set_learning_rate, set_muon_momentum
from gptkit.runtime import Runtime, StopRequest, explain_lost_ranks, measure_matmul_peak, setup_runtime, stop_agreed
from model import GPT, count_parameters, flops_per_token


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must hold to continue it exactly."""
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0  # training wall time over all sessions of this run


def learning_rate_at(step: int, base_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                     schedule: str = "cosine", cooldown_frac: float = 0.2) -> float:
    """Linear warmup from base_lr/warmup_iters to base_lr, then a decay to min_lr at decay_iters, then flat.

    Warmup: at the start AdamW's moment estimates rest on a few batches and the weights are random, so full-size
    steps can throw the model into a bad region it never leaves; ramping the rate up lets both settle first.
    Cosine decay: a large rate makes fast progress early, a small one settles into a minimum late; the cosine moves
    smoothly from one to the other, slowly at both ends (Loshchilov & Hutter 2017).
    wsd (warmup, stable, decay): base_lr until the last cooldown_frac of decay_iters, then down to min_lr as
    1 - sqrt(progress) (Hägele et al. 2024). The long flat part keeps making fast progress; the short cooldown
    takes the loss down at the end.
    """
    if step < warmup_iters:
        return base_lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    if schedule == "wsd":
        cooldown_start = decay_iters - max(1, round(cooldown_frac * decay_iters))
        if step < cooldown_start:
            return base_lr
        progress = (step - cooldown_start) / max(1, decay_iters - cooldown_start)
        return min_lr + (1.0 - math.sqrt(progress)) * (base_lr - min_lr)
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def perplexity(loss: float) -> float:
    """exp(loss), capped so that the loss of a diverged run prints as a large number instead of overflowing."""
    return math.exp(min(loss, 50))


def train_step(model, optimizer, scaler, batches: Batches, runtime: Runtime, train: TrainConfig,
               lr: float, culprits: list[int] | None = None,
               compute_loss: Callable[[object], torch.Tensor] | None = None) -> torch.Tensor | None:
    """One optimizer step over gradient_accumulation_steps micro-batches: batch, forward, backward, clip, step.

    A batch is (x, y) and its loss the model's next-token loss, unless the task passes `compute_loss`, which takes
    whatever its batches serve (dpo.py's preference pairs, rl.py's sampled replies) and returns the loss to minimise.

    Returns the mean loss as a tensor (no host sync), or None when the loss or a gradient was not finite: then the
    weights and optimizer state are left exactly as they were. Under DDP every rank agrees on skipping, and the
    ranks whose own loss was not finite are appended to `culprits` (all ranks when only the gradients were).
    """
    set_learning_rate(optimizer, lr, train)
    accumulation = train.gradient_accumulation_steps
    total_loss = torch.zeros((), device=runtime.device)
    for micro_step in range(accumulation):
        batch = batches.next()
        last = micro_step == accumulation - 1
        # Under DDP, all-reduce gradients only on the last micro-step; the others accumulate locally.
        sync = nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            with runtime.autocast():
                if compute_loss is None:
                    x, y = batch
                    loss = model(runtime.to_device(x), runtime.to_device(y)) / accumulation
                else:
                    loss = compute_loss(batch) / accumulation
            scaler.scale(loss).backward()
        total_loss += loss.detach()
    # Clipping the gradient's norm bounds the size of one step: a rare batch with a huge gradient (a loss spike)
    # then moves the weights no further than an ordinary one, instead of undoing what the run has learned.
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
            total += model(runtime.to_device(x), runtime.to_device(y)).float()
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


# ----------------------------------------------------------------------------------------------------------------
# Phase 1: what run this is (a new one, a resumed one, a fine-tuning one) and its config


@dataclass
class RunRequest:
    config: Config
    overridden: frozenset[str]  # the fields the user set on the command line
    resume_from: dict | None  # the checkpoint being continued
    run_dir: Path | None  # known now only when resuming
    pretrained: GPT | None  # the weights being fine-tuned (--init_from)
    tokenizer: dict | None = None  # the resumed or fine-tuned weights' tokenizer: a bpe:N one encodes the data
    preset_chosen: bool = False  # --preset was given (parse_args keeps the preset out of `overridden`)


def resolve_run(argv: list[str]) -> RunRequest:
    parsed = parse_args(argv)
    config, overridden = parsed.config, parsed.overridden
    preset_chosen = any(arg.partition("=")[0] == "--preset" for arg in argv)
    resume_from, run_dir, pretrained, tokenizer = None, None, None, None
    if config.train.resume:
        # without --out_dir, the latest run this script wrote: `make classify` may have written a newer one since
        run_dir = Path(config.train.out_dir) if config.train.out_dir else \
            checkpoint.latest_run(kinds=(checkpoint.PRETRAIN_KIND,))
        if not run_dir.is_dir():
            raise UserError(f"--resume: no run folder {run_dir}; see the runs under {checkpoint.CHECKPOINTS_ROOT}/")
        for stale in checkpoint.clean_stale_temp_files(run_dir):
            print(f"removed {stale.name}, left by a save that was interrupted", file=sys.stderr)
        resume_from = checkpoint.load_checkpoint(
            checkpoint.newest_valid_checkpoint(run_dir, say=lambda m: print(m, file=sys.stderr)))
        config = merge_resume_config(Config.from_dict(resume_from["config"]), config, overridden)
        tokenizer = resume_from.get("tokenizer")
    elif config.train.init_from != "scratch":
        loading.check_pretrained_form(config.model, overridden)  # e.g. --arch=llama, before downloading GPT-2
        loaded = loading.load_model(config.train.init_from, dropout=config.model.dropout)
        loading.check_overrides(loaded.model_config, config.model, overridden)
        pretrained, config.model, tokenizer = loaded.model, loaded.model_config, loaded.tokenizer
        if "tokenizer" not in overridden:
            config.data.tokenizer = loaded.tokenizer["name"]
    return RunRequest(config, overridden, resume_from, run_dir, pretrained, tokenizer, preset_chosen)


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


def new_run_dir(config: Config, dataset_name: str, runtime: Runtime) -> Path:
    """checkpoints/<preset>-<dataset>-<time> (or --out_dir, --run_name), refusing a folder that holds a run."""
    if config.train.out_dir:
        run_dir = Path(config.train.out_dir)
    else:
        name = config.train.run_name or f"{config.preset}-{dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = checkpoint.CHECKPOINTS_ROOT / name
    if runtime.distributed:  # the name holds a timestamp: all ranks take rank 0's, which may be a second off
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    checkpoint.refuse_existing_run(run_dir)
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# Phase 2: the data, which everything else depends on (vocabulary, epochs, the baseline)


@dataclass
class TrainData:
    data_dir: Path
    meta: dict
    tokenizer: data.Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray


def prepare_data(run: RunRequest, runtime: Runtime) -> TrainData:
    """Token files for the run (built once per node while the other processes wait), with the vocabulary checked
    against the model's."""
    config, overridden = run.config, run.overridden
    explicit = "dataset" in overridden
    if runtime.local_rank == 0:  # multi-node without a shared disk included
        data_dir = data.prepare(config.data, config.model.block_size, explicit, tokenizer=run.tokenizer)
    if runtime.distributed:
        dist.barrier()
    if runtime.local_rank != 0:
        data_dir = data.prepare(config.data, config.model.block_size, explicit, tokenizer=run.tokenizer)
    meta = data.read_meta(data_dir)
    if not explicit and run.resume_from is None and meta["dataset"] == "shakespeare":
        config.data.dataset = "shakespeare"  # the fallback for an unreachable WikiText-2: record what was used
    if "vocab_size" in overridden and config.model.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"vocab_size={config.model.vocab_size} is smaller than the {meta['tokenizer']['name']} "
                          f"tokenizer's {meta['vocab_size']}; drop --vocab_size")
    if run.resume_from is not None and config.model.vocab_size != meta["vocab_size"]:
        raise UserError(f"the run was trained with vocab_size={config.model.vocab_size} but {data_dir} has "
                        f"{meta['vocab_size']}; resume it with its own data set")
    if run.pretrained is not None and meta["vocab_size"] != config.model.vocab_size:
        raise UserError(f"{config.train.init_from} has a vocabulary of {config.model.vocab_size} but the data's "
                        f"{meta['tokenizer']['name']} tokenizer has {meta['vocab_size']}; use --tokenizer=gpt2")
    if "vocab_size" not in overridden:
        config.model.vocab_size = meta["vocab_size"]
    return TrainData(data_dir, meta, data.get_tokenizer(meta["tokenizer"]), data.open_split(data_dir, "train"),
                     data.open_split(data_dir, "val"))


# ----------------------------------------------------------------------------------------------------------------
# Phase 3: the model, its optimizer and everything the loop touches


@dataclass
class Run:
    """Everything the loop and its checkpoints touch, in pretraining and fine-tuning alike; `state` is the part of
    it that changes every step, and exactly what a checkpoint saves about the loop."""

    config: Config
    runtime: Runtime
    run_dir: Path
    model: torch.nn.Module  # what the loop calls: maybe compiled, maybe wrapped in DDP
    raw_model: torch.nn.Module  # the weights themselves, as checkpoints save them (a GPT, or classify.py's classifier)
    optimizer: torch.optim.Optimizer | MuonWithAdamW  # AdamW, or Muon beside AdamW (gptkit/optimizers.py)
    scaler: torch.amp.GradScaler
    batches: Batches | finetune.EpochBatches  # next() -> (x, y); tokens_served; state_dict(), load_state_dict()
    record: Callable[[], dict]  # the checkpoint's entries beside the loop's: the tokenizer, the data, the task's own
    compute_loss: Callable[[object], torch.Tensor] | None = None  # a batch's loss, when not next-token (DPO, RL)
    step_metrics: Callable[[], dict] | None = None  # the task's numbers of the latest step, logged with the loss
    state: TrainState = field(default_factory=TrainState)
    log: Callable[..., None] = print
    metrics: runinfo.MetricsLog | None = None
    peak_flops: float = math.nan  # this machine's measured matmul FLOP/s, the denominator of MFU (pretraining's)
    last_val_loss: float = math.nan  # the latest evaluation's


@dataclass
class Evaluation:
    """What a task's `measure` found: the validation loss (which picks best.pt and counts for --patience), the rest of
    the line printed after "eval step N: ", and more numbers for metrics.jsonl (val_accuracy, ...)."""

    val_loss: float
    summary: str
    metrics: dict = field(default_factory=dict)


@dataclass
class Training:
    """Pretraining's run: the loop's Run, and what only pretraining has (token files, evaluation without DDP)."""

    run: Run
    data: TrainData
    local_model: torch.nn.Module  # compiled but never DDP-wrapped: evaluation has no collectives
    compiled: bool = False
    fast_kernels: str = ""  # fast.py's line saying whether its paths run
    baseline: float = math.nan  # the unigram loss, the bar to beat

    @property
    def tokens_per_step(self) -> int:
        train = self.run.config.train
        return train.batch_size * self.run.config.model.block_size * train.gradient_accumulation_steps * \
            self.run.runtime.world_size


def build_training(request: RunRequest, runtime: Runtime, train_data: TrainData, run_dir: Path, log) -> Training:
    config = request.config
    checkpoint.seed_everything(config.train.seed + runtime.rank)
    raw_model = (request.pretrained if request.pretrained is not None else GPT(config.model)).to(runtime.device)
    if config.train.zero_init_proj and request.pretrained is None and request.resume_from is None:
        zero_output_projections(raw_model)
    optimizer = make_optimizer(raw_model, config.train, runtime.device_type)
    batches = Batches(train_data.train_tokens, config.train, config.model.block_size, seed=config.train.seed,
                      rank=runtime.rank, world_size=runtime.world_size)

    def record() -> dict:  # a checkpoint's entries beside the loop's: what turns its tokens into text, and its data
        return {"tokenizer": train_data.tokenizer.to_dict(),
                "dataset": {"name": train_data.meta.get("dataset"), "text_sha256": train_data.meta.get("text_sha256")}}

    run = Run(config, runtime, run_dir, raw_model, raw_model, optimizer, runtime.grad_scaler(), batches, record,
              log=log)
    if request.resume_from is not None:
        restore(run, request.resume_from)

    compile_model = config.train.compile if config.train.compile is not None else runtime.device_type == "cuda"
    fast_kernels = fast.use_fast_kernels(raw_model, config.train.fast_kernels, runtime.device_type, compile_model)
    local_model = torch.compile(raw_model) if compile_model else raw_model
    run.model = local_model
    if runtime.distributed:
        device_ids = [runtime.local_rank] if runtime.device_type == "cuda" else None
        run.model = DistributedDataParallel(local_model, device_ids=device_ids)
    return Training(run, train_data, local_model, compile_model, fast_kernels)


def zero_output_projections(model: GPT) -> None:
    """Start every block as the identity: with its attention and MLP output projections at zero, each block adds
    nothing to the residual stream until their gradients (non-zero: the inputs to c_proj are not) grow them, so the
    first steps train a shallow model that deepens itself (modded-nanogpt's init; GPT-2's own is model.py's)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("c_proj.weight"):
                param.zero_()


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """The GradScaler's saved scale, where the run had one. A run saved without loss scaling (bf16 or float32, e.g.
    on a CPU) and resumed in fp16 (a GPU without bf16, or --dtype=float16) starts from a fresh scale: torch refuses
    to load the empty state of a disabled scaler into an enabled one."""
    if saved or not scaler.is_enabled():
        scaler.load_state_dict(saved)


def restore(run: Run, saved: dict) -> None:
    """Load a checkpoint's weights, optimizer, scaler, loop state, data position and RNGs: the run goes on exactly."""
    run.raw_model.load_state_dict(checkpoint.strip_wrapper_prefixes(saved["model"]))
    run.optimizer.load_state_dict(saved["optimizer"])
    restore_scaler(run.scaler, saved["scaler"])
    run.state = TrainState(**saved["state"])
    run.batches.load_state_dict(saved["batches"][0])  # one shared stream, whatever the number of processes
    checkpoint.restore_rank_rng(saved, run.runtime.rank, run.config.train.seed, run.state.step)
    run.log(f"resuming {run.run_dir} at step {run.state.step}")
    saved_world_size = saved.get("world_size", 1)
    if saved_world_size != run.runtime.world_size:
        run.log(f"note: the run was saved by {saved_world_size} process(es) and continues on "
                f"{run.runtime.world_size}: the data stream continues where it stopped; the global batch stays the "
                "same only with --global_batch_size (see README, Multi-GPU and multi-node)")


def start_fine_tuning(start: finetune.Start, runtime: Runtime, model: torch.nn.Module, batches: finetune.EpochBatches,
                      record: Callable[[], dict], kind: str,
                      compute_loss: Callable[[object], torch.Tensor] | None = None) -> Run:
    """The Run of a fine-tuning script around its model (on the device) and batches: an optimizer for what trains,
    then either the checkpoint it continues restored, or manifest.json written for a new run (what it is, from what
    code and packages). metrics.jsonl is opened for appending either way."""
    config = start.config
    optimizer = make_optimizer(model, config.train, runtime.device_type)
    run = Run(config, runtime, start.run_dir, model, model, optimizer, runtime.grad_scaler(), batches, record,
              compute_loss)
    if start.saved is not None:
        restore(run, start.saved)
    else:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"kind": kind, "git_commit": runinfo.git_commit(), "config": config.to_dict(), **record(),
                    "packages": runinfo.package_versions(),
                    "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        (run.run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    run.metrics = runinfo.MetricsLog(run.run_dir, config.train.tensorboard)
    return run


def describe_start(t: Training) -> None:
    """Say what is about to run, measure the peak and the baseline, and write the run's manifest.json."""
    run, d = t.run, t.data
    config, runtime, train = run.config, run.runtime, run.config.train
    run.peak_flops = measure_matmul_peak(runtime.device, runtime.dtype) * runtime.world_size
    epochs = train.max_iters * t.tokens_per_step / len(d.train_tokens)
    run.log(config.describe())
    run.log(runtime.describe())
    embedding = config.model.vocab_size * config.model.n_embd  # most of a small model with a large vocabulary
    run.log(f"model: {count_parameters(config.model) / 1e6:.2f}M parameters ({embedding / 1e6:.2f}M of them the "
            f"{config.model.vocab_size:,} x {config.model.n_embd} token embedding), "
            f"{flops_per_token(config.model) / 1e6:.1f} MFLOP per token; compile: {t.compiled}")
    run.log(t.fast_kernels)
    run.log(f"batch: {train.batch_size} x {config.model.block_size} tokens x {train.gradient_accumulation_steps} "
            f"accumulation x {runtime.world_size} processes = {t.tokens_per_step:,} tokens per step "
            f"(global batch {train.batch_size * train.gradient_accumulation_steps * runtime.world_size} sequences)")
    run.log(f"data: {d.data_dir} ({len(d.train_tokens):,} train tokens, {len(d.val_tokens):,} val tokens, "
            f"tokenizer {d.tokenizer.name}); {train.max_iters} steps = {epochs:.2f} epochs")
    if train.warmup_iters >= train.max_iters:  # the decay shrinks with max_iters; the warmup does not
        run.log(f"schedule: warmup_iters={train.warmup_iters} is as long as the run's {train.max_iters} steps: the "
                f"learning rate rises the whole run and never reaches {train.learning_rate:.1e}; give a short run "
                f"--warmup_iters={max(1, train.max_iters // 10)}")
    t.baseline = unigram_loss(d.train_tokens, d.val_tokens, config.model.vocab_size)
    run.log(f"baseline: predicting the unigram distribution of the train tokens gives val loss {t.baseline:.4f}")
    if runtime.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"kind": checkpoint.PRETRAIN_KIND, "run_dir": str(run.run_dir), "git_commit": runinfo.git_commit(),
                    "config": config.to_dict(), "packages": runinfo.package_versions(),
                    "device": str(runtime.device), "dtype": str(runtime.dtype), "world_size": runtime.world_size,
                    "matmul_peak_flops": run.peak_flops, "parameters": count_parameters(config.model),
                    "tokens_per_step": t.tokens_per_step, "unigram_val_loss": t.baseline,
                    "data": {"dir": str(d.data_dir), "text_sha256": d.meta.get("text_sha256"),
                             "source": d.meta.get("source")}}
        (run.run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        run.metrics = runinfo.MetricsLog(run.run_dir, train.tensorboard)


# ----------------------------------------------------------------------------------------------------------------
# Phase 4: the loop, and what it does at eval steps


def save(run: Run, is_best: bool = False, val_loss: float | None = None) -> None:
    """Only rank 0 writes; every rank's RNG (dropout) goes into the file so a DDP run resumes exactly."""
    rng_per_rank = [checkpoint.rng_state()]
    if run.runtime.distributed:
        rng_per_rank = [None] * run.runtime.world_size
        dist.all_gather_object(rng_per_rank, checkpoint.rng_state())
    if run.runtime.is_main:
        # raw_model: the weights without DDP's `module.` or compile's `_orig_mod.` prefixes
        payload = {"config": run.config.to_dict(), "model": run.raw_model.state_dict(),
                   "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                   "state": dataclasses.asdict(run.state), "batches": [run.batches.state_dict()],
                   "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank, "world_size": run.runtime.world_size,
                   **run.record()}
        checkpoint.save_run_checkpoint(run.run_dir, payload, run.state.step, val_loss, is_best,
                                       run.config.train.keep_last)
    if run.runtime.distributed:
        dist.barrier()


def evaluate(run: Run, measure: Callable[[], Evaluation]) -> float:
    """The task's validation now; a better loss than before becomes best.pt, --patience counts the evals without
    one. Every eval saves a checkpoint."""
    result, state = measure(), run.state
    improved = result.val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.evals_without_improvement = result.val_loss, 0
    else:
        state.evals_without_improvement += 1
    run.last_val_loss = result.val_loss
    run.log(f"eval step {state.step}: {result.summary}")
    if run.metrics:
        run.metrics.write({"kind": "eval", "step": state.step, "tokens_seen": state.tokens_seen,
                           "val_loss": result.val_loss, **result.metrics, "elapsed_s": state.elapsed_s})
    save(run, is_best=improved, val_loss=result.val_loss)
    return result.val_loss


def train_loop(run: Run, stop: StopRequest, measure: Callable[[], Evaluation]) -> bool:
    """Step until max_iters, a stop signal or early stopping; True when it stopped early (patience). Every
    eval_interval steps: evaluate, with the task's `measure`, and save."""
    train, state, runtime = run.config.train, run.state, run.runtime
    decay_iters = train.lr_decay_iters or train.max_iters
    progress = None
    if runtime.is_main and sys.stdout.isatty():
        from tqdm import tqdm
        progress = tqdm(total=train.max_iters, initial=state.step, unit="step", dynamic_ncols=True)
    run.model.train()
    bad_steps = 0
    stopped_early = False
    while state.step < train.max_iters and not stop_agreed(stop, runtime) and not out_of_time(run):
        # A skipped step is retried at the same step: the schedule, the momentum and the evals stay on their steps.
        lr = learning_rate_at(state.step, train.learning_rate, train.min_lr, train.warmup_iters, decay_iters,
                              train.lr_schedule, train.cooldown_frac)
        set_muon_momentum(run.optimizer, state.step, train)
        started = time.perf_counter()
        served = run.batches.tokens_served
        culprits: list[int] = []
        loss = train_step(run.model, run.optimizer, run.scaler, run.batches, runtime, train, lr, culprits,
                          run.compute_loss)
        if loss is None:
            bad_steps += 1
            ranks = ", ".join(map(str, sorted(set(culprits))))
            run.log(f"warning: non-finite loss or gradient at step {state.step} (rank {ranks}); step skipped on "
                    "every rank, weights unchanged", file=sys.stderr)
            if bad_steps >= train.max_bad_steps:
                raise UserError(f"{bad_steps} non-finite steps in a row at step {state.step}; stopping with the "
                                f"last good checkpoint in {run.run_dir}. Lower --learning_rate or use --dtype=float32")
            continue
        bad_steps = 0
        state.step += 1
        tokens = (run.batches.tokens_served - served) * runtime.world_size  # every process served as many
        state.tokens_seen += tokens
        if state.step % train.log_interval == 0 or state.step == train.max_iters:
            log_step(run, loss, lr, started, tokens, progress)
        state.elapsed_s += time.perf_counter() - started
        if progress is not None:
            progress.update(1)
        if state.step % train.eval_interval == 0 and state.step < train.max_iters:
            evaluate(run, measure)
            if train.patience and state.evals_without_improvement >= train.patience:
                run.log(f"early stop: no better val loss for {train.patience} evals")
                stopped_early = True
                break
    if progress is not None:
        progress.close()
    return stopped_early


def out_of_time(run: Run) -> bool:
    """--max_minutes: have the steps (evals not counted) used the run's time? Rank 0's clock decides for every rank,
    so that all stop at the same step, as stop_agreed does for signals. The loop then finishes as at max_iters."""
    if not run.config.train.max_minutes:
        return False
    over = torch.tensor(float(run.state.elapsed_s >= run.config.train.max_minutes * 60), device=run.runtime.device)
    if run.runtime.distributed:
        dist.broadcast(over, src=0)
    if over.item():
        run.log(f"max_minutes={run.config.train.max_minutes}: stopping at step {run.state.step} of "
              f"{run.config.train.max_iters}")
    return bool(over.item())


def log_step(run: Run, loss: torch.Tensor, lr: float, started: float, tokens: int, progress) -> None:
    """Loss, speed (and MFU where the peak was measured) at a log step, to metrics.jsonl and the progress bar (or one
    line without a terminal)."""
    runtime, state = run.runtime, run.state
    if runtime.distributed:  # every rank reaches the same log steps; log the loss of the whole global batch
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        loss /= runtime.world_size
    loss_value = loss.item()  # host sync only at log steps
    runtime.synchronize()
    step_time = time.perf_counter() - started
    tokens_per_s = tokens / step_time
    record = {"kind": "train", "step": state.step, "tokens_seen": state.tokens_seen, "train_loss": loss_value,
              "lr": lr, "tokens_per_s": tokens_per_s}
    speed = {"tok_s": f"{tokens_per_s:,.0f}"}
    task_numbers = run.step_metrics() if run.step_metrics else {}  # e.g. rl.py's mean reward
    record.update(task_numbers)
    if not math.isnan(run.peak_flops):
        record["mfu"] = flops_per_token(run.config.model) * tokens / step_time / run.peak_flops
        speed["mfu"] = f"{record['mfu']:.1%}"
    if run.metrics:
        run.metrics.write({**record, "elapsed_s": state.elapsed_s, "rss_mb": runinfo.resident_memory_mb()})
    if progress is not None:
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", **speed,
                             **{key: f"{value:.3g}" for key, value in task_numbers.items()})
    else:
        run.log(f"iter {state.step}: loss {loss_value:.4f}, time {step_time * 1000:.1f} ms, lr {lr:.2e}, "
                f"{speed['tok_s']} tok/s" + (f", mfu {speed['mfu']}" if "mfu" in speed else "")
                + "".join(f", {key} {value:.4g}" for key, value in task_numbers.items()), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Phase 5: the finish: a checkpoint to resume from, or the final evaluation


def end_of_training(run: Run, stop: StopRequest, stopped_early: bool, measure: Callable[[], Evaluation],
                    resume_with: str) -> bool:
    """After the loop. A stop signal saves at once, with no evaluation first (whoever sent it may kill the process
    seconds later), says how to continue, and returns False. Otherwise the final evaluation (early stopping has
    just done one) and True: the task's own finish follows."""
    if stop.agreed:  # not stop.requested: a signal after the last agreement reached only some ranks
        save(run)
        run.log(f"{stop.signal_name}: saved {run.run_dir / 'last.pt'} at step {run.state.step}; continue with "
                f"{resume_with}")
        return False
    if not stopped_early:
        evaluate(run, measure)
    return True


def measure_val_loss(t: Training) -> Evaluation:
    """Pretraining's validation: the mean loss over eval_iters batches of the val tokens."""
    run, train = t.run, t.run.config.train
    val_loss = estimate_loss(t.local_model, t.data.val_tokens, run.runtime, train.batch_size,
                             run.config.model.block_size, train.eval_iters, seed=train.seed + 1)
    best = min(run.state.best_val_loss, val_loss)
    return Evaluation(val_loss, f"val loss {val_loss:.4f}, perplexity {perplexity(val_loss):.2f}, best {best:.4f} "
                                f"(unigram baseline {t.baseline:.4f})", {"val_perplexity": perplexity(val_loss)})


def finish(t: Training, stop: StopRequest, stopped_early: bool) -> None:
    run, train = t.run, t.run.config.train
    if end_of_training(run, stop, stopped_early, lambda: measure_val_loss(t),
                       f"`python train.py --resume --out_dir={run.run_dir}` (or `make resume`)"):
        if "test" in t.data.meta.get("splits", {}):
            test_loss = estimate_loss(t.local_model, data.open_split(t.data.data_dir, "test"), run.runtime,
                                      train.batch_size, run.config.model.block_size, train.eval_iters,
                                      seed=train.seed + 2)
            run.log(f"test loss {test_loss:.4f}, perplexity {perplexity(test_loss):.2f}")
            if run.metrics:
                run.metrics.write({"kind": "test", "step": run.state.step, "tokens_seen": run.state.tokens_seen,
                                   "test_loss": test_loss})
        run.log(f"done: best val loss {run.state.best_val_loss:.4f} vs unigram baseline {t.baseline:.4f}; "
                f"checkpoints in {run.run_dir}; sample with `make generate`")
    if run.runtime.is_main:
        png = runinfo.plot_run(run.run_dir)
        if png:
            run.log(f"loss curves: {png}")


def main(argv: list[str] | None = None) -> None:
    request = resolve_run(sys.argv[1:] if argv is None else argv)
    config = request.config
    runtime = setup_runtime(config.train.device, config.train.dtype, config.train.ddp_timeout_s)
    log = print if runtime.is_main else (lambda *a, **k: None)
    resolve_global_batch(config.train, runtime.world_size, request.overridden)
    if not request.preset_chosen and request.resume_from is None:
        log(f"preset {config.preset}: the default on this {runtime.device_type} (choose with PRESET=... or --preset=)")

    train_data = prepare_data(request, runtime)
    run_dir = request.run_dir or new_run_dir(config, train_data.meta["dataset"], runtime)
    t = build_training(request, runtime, train_data, run_dir, log)
    describe_start(t)

    stop = StopRequest()
    stop.install()
    stopped_early = train_loop(t.run, stop, measure=lambda: measure_val_loss(t))
    finish(t, stop, stopped_early)
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(explain_lost_ranks(main))
