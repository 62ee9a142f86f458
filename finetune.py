"""What classify.py and instruct.py share: where a fine-tuning run starts, its loop over train.py's step, and its
checkpoints.

A fine-tuning run is any object with these attributes: config, runtime, run_dir, model (what trains: a classifier
or a GPT), optimizer, scaler, batches (next(), state_dict(), load_state_dict()), state (train.TrainState), metrics
(runinfo.MetricsLog) and record() (the checkpoint's entries beside the weights: tokenizer, what kind of run, its
options). The step itself (mixed precision, AdamW, warmup and cosine decay, clipping, skipped non-finite steps) is
train.train_step; checkpoints are checkpoint.py's atomic, verified saves, so a run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import data
from config import Config, ConfigError, TrainConfig, UserError
from gptkit import checkpoint, loading, runinfo
from gptkit.runtime import StopRequest
from model import GPT
from train import TrainState, learning_rate_at, restore_scaler, train_step

# manifest.json "kind" of the runs these scripts write; neither is a pretrained language model to start from
FINE_TUNED_KINDS = ("classifier", "instruct")


@dataclass
class Start:
    """Where a run starts: its config and options, what the checkpoint records about the run (`info`), the model to
    fine-tune and its tokenizer, and for a resumed run the checkpoint it continues."""

    config: Config
    options: dict
    info: dict
    gpt: GPT
    tokenizer: data.Tokenizer
    run_dir: Path
    saved: dict | None = None


def check_shared_options(argv: list[str], config: Config, options: dict) -> None:
    """The command-line options classify.py and instruct.py both take: --lora_rank, --epochs, --test_fraction."""
    lora_given = any(arg.startswith(("--lora_rank=", "--lora-rank=")) for arg in argv)
    if options["lora_rank"] < 0 or (lora_given and options["lora_rank"] < 1):
        raise ConfigError(f"lora_rank={options['lora_rank']} must be 1 or more (16 is the book's), or leave it out "
                          "to train every weight")
    if options["epochs"] < 0:
        raise ConfigError(f"epochs={options['epochs']} must be 1 or more")
    if not 0 < options["test_fraction"] < 1 or options["test_fraction"] + config.data.val_fraction >= 1:
        raise ConfigError(f"test_fraction={options['test_fraction']} must be in (0, 1) and leave room for val_fraction="
                          f"{config.data.val_fraction} and the train split")


def load_base(init_from: str) -> loading.LoadedModel:
    """A checkpoint of this repository (a .pt file or a run folder; default: the latest pretraining run) or
    OpenAI's GPT-2 (--init_from=gpt2 or a local Hugging Face folder)."""
    if init_from == "scratch":
        try:
            run = checkpoint.latest_run(exclude_kinds=FINE_TUNED_KINDS)
        except UserError:
            raise UserError("no pretrained run under checkpoints/ to start from; run `make train` first, or pass "
                            "--init_from=gpt2 or --init_from=checkpoints/<run>/best.pt") from None
        return loading.load_model(ckpt=str(run))
    path = Path(init_from)
    if path.suffix == ".pt" or (path.is_dir() and not (path / "config.json").exists()):
        return loading.load_model(ckpt=init_from)
    return loading.load_model(init_from=init_from)


def new_run_dir(train: TrainConfig, kind: str) -> Path:
    """--out_dir, else checkpoints/<run_name or kind-time>, refusing a folder that already holds a run."""
    run_dir = Path(train.out_dir) if train.out_dir else \
        checkpoint.CHECKPOINTS_ROOT / (train.run_name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    if checkpoint.step_checkpoints(run_dir) or (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with --resume --out_dir={run_dir}, or pick "
                        "another --out_dir/--run_name")
    return run_dir


def resumed_start(train: TrainConfig, overridden: frozenset[str], kind: str, record_key: str) -> Start:
    """--resume --out_dir=DIR: the run folder's newest valid checkpoint, which must be of this kind, with the
    config it was saved with; --max_iters is the one setting a resume may change (train for longer)."""
    if not train.out_dir:
        raise UserError(f"--resume needs the {kind} run's folder: --resume --out_dir=checkpoints/<run>")
    run_dir = Path(train.out_dir)
    if not run_dir.is_dir():
        raise UserError(f"--resume: no run folder {run_dir}")
    saved = checkpoint.load_checkpoint(checkpoint.newest_valid_checkpoint(run_dir, say=print))
    if not saved.get(record_key):
        raise UserError(f"{run_dir} is not a {kind} run; resume it with the script that wrote it")
    resumed = Config.from_dict(saved["config"])
    if "max_iters" in overridden:
        resumed.train.max_iters = train.max_iters
    return Start(resumed, saved["options"], saved[record_key], GPT(resumed.model),
                 data.get_tokenizer(saved["tokenizer"]), run_dir, saved)


class EpochBatches:
    """Each training example once per epoch, in a fresh seeded order; `make_batch` turns a batch's example indices
    into (x, y), padded to its longest example. The last partial batch of an epoch is dropped."""

    def __init__(self, n_examples: int, batch_size: int, seed: int,
                 make_batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.n_examples, self.batch_size, self.make_batch = n_examples, batch_size, make_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(n_examples, generator=self.generator), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.order):  # a new epoch
            self.order, self.position = torch.randperm(self.n_examples, generator=self.generator), 0
        rows = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.make_batch(rows)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


def begin(run, saved: dict | None, kind: str, trainable_parameters: int) -> None:
    """A resumed run continues from its checkpoint; a new one writes manifest.json (what it is, from what code and
    packages). Either way metrics.jsonl is opened for appending."""
    if saved is not None:
        restore(run, saved)
    else:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"kind": kind, "git_commit": runinfo.git_commit(), "config": run.config.to_dict(),
                    **run.record(), "packages": runinfo.package_versions(),
                    "trainable_parameters": trainable_parameters}
        (run.run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    run.metrics = runinfo.MetricsLog(run.run_dir, run.config.train.tensorboard)


def save(run, val_loss: float | None = None, is_best: bool = False) -> None:
    payload = {"config": run.config.to_dict(), "model": run.model.state_dict(),
               "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
               "state": dataclasses.asdict(run.state), "batches": [run.batches.state_dict()],
               "rng": checkpoint.rng_state(), **run.record()}
    checkpoint.save_run_checkpoint(run.run_dir, payload, run.state.step, val_loss, is_best, run.config.train.keep_last)


def restore(run, saved: dict) -> None:
    """Weights, optimizer, loss scale, loop state, data order and RNGs from a checkpoint: the run goes on exactly."""
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    restore_scaler(run.scaler, saved["scaler"])
    run.state = TrainState(**saved["state"])
    run.batches.load_state_dict(saved["batches"][0])
    checkpoint.set_rng_state(saved["rng"])
    print(f"resuming {run.run_dir} at step {run.state.step}")


def train_loop(run, stop: StopRequest, evaluate: Callable[[], float]) -> None:
    """train.py's step until max_iters or a stop signal, calling `evaluate` (which saves) every eval_interval steps.
    `tokens_seen` counts examples here: a fine-tuning batch is a number of examples, not of tokens."""
    train, state = run.config.train, run.state
    decay_iters = train.lr_decay_iters or train.max_iters
    from tqdm import tqdm
    run.model.train()
    with tqdm(total=train.max_iters, initial=state.step, unit="step", disable=None, file=sys.stderr) as progress:
        while state.step < train.max_iters and not stop.requested:
            lr = learning_rate_at(state.step, train.learning_rate, train.min_lr, train.warmup_iters, decay_iters,
                                  train.lr_schedule, train.cooldown_frac)
            started = time.perf_counter()
            loss = train_step(run.model, run.optimizer, run.scaler, run.batches, run.runtime, train, lr)
            state.step += 1
            state.tokens_seen = state.step * train.batch_size
            state.elapsed_s += time.perf_counter() - started
            progress.update(1)
            if loss is None:
                print(f"warning: non-finite loss or gradient at step {state.step}; step skipped", file=sys.stderr)
                continue
            if state.step % train.log_interval == 0 or state.step == train.max_iters:
                loss_value = loss.item()
                run.metrics.write({"kind": "train", "step": state.step, "tokens_seen": state.tokens_seen,
                                   "train_loss": loss_value, "lr": lr, "elapsed_s": state.elapsed_s})
                progress.set_postfix(loss=f"{loss_value:.4f}")
            if state.step % train.eval_interval == 0 and state.step < train.max_iters:
                evaluate()
