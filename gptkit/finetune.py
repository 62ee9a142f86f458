"""Where a fine-tuning run starts, for classify.py (chapter 6) and instruct.py (chapter 7): the script's defaults,
then validation, then the options both take, then a new run from a pretrained model or a resumed one. Their loop,
checkpoints and restore are train.py's; EpochBatches is their batch source.

    python classify.py --init_from=checkpoints/<run>/best.pt      # a new run from a pretraining run
    python instruct.py --resume                                   # the latest instruct run, where it stopped

Nothing here imports a lesson: the tokenizer comes back as its spec ({"name": "gpt2"}), for data.get_tokenizer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from config import Config, ConfigError, ModelConfig, TrainConfig, UserError
from gptkit import checkpoint, loading
from gptkit.cli import ParsedArgs, merge_resume_config, parse_args
from model import GPT

# Config fields the fine-tuning scripts do not read, and why: given on the command line they are refused, not
# silently ignored (as generate.py refuses the fields it does not read).
NOT_READ = {
    "compile": "fine-tuning batches change length every step, so the model runs uncompiled",
    "sampling": "fine-tuning takes every training example once per epoch (--epochs)",
    "zero_init_proj": "fine-tuning starts from trained weights, not from a new initialisation",
    "global_batch_size": "fine-tuning runs in one process; use --batch_size and --gradient_accumulation_steps",
    "eval_iters": "fine-tuning evaluates the whole validation split",
    "ddp_timeout_s": "fine-tuning runs in one process",
    "tokenizer": "the model's own tokenizer is used",
    "data_dir": "the fine-tuning data come from --dataset",
    "encoding_errors": "the fine-tuning data are read as UTF-8",
    **{f.name: "the model's config comes from its weights" for f in dataclasses.fields(ModelConfig)},
}
# Data fields that a resume may not change either: they decide the train/val/test splits
FIXED_ON_RESUME = ("val_fraction", "text_column")


# --init_from's "scratch" (config.py's default) means no random weights here: load_base takes the latest pretrained run
INIT_FROM_HELP = ("the model to fine-tune: a checkpoint of this repository (checkpoints/<run>/best.pt or a run "
                  "folder); gpt2 (-medium, -large, -xl): OpenAI's; or a Hugging Face folder; scratch: the latest "
                  "pretraining run")


def parse(argv: list[str], options: dict, defaults: dict, not_read: dict[str, str] | None = None) -> ParsedArgs:
    """The command line over the script's `defaults` (applied before validation, so --learning_rate alone scales
    min_lr from the script's rates), refusing the config fields it does not read, then the options both take."""
    parsed = parse_args(argv, extra=options, defaults=defaults, meanings={"init_from": INIT_FROM_HELP})
    refused = sorted(parsed.overridden & {**NOT_READ, **(not_read or {})}.keys())
    if refused:
        name = refused[0]
        value = next(getattr(s, name) for s in (parsed.config.model, parsed.config.train, parsed.config.data)
                     if hasattr(s, name))
        raise ConfigError(f"--{name}={value} has no effect here: {(not_read or {}).get(name) or NOT_READ[name]}")
    if "lora_rank" in options:  # classify.py's and instruct.py's; dpo.py and rl.py train every weight
        check_shared_options(argv, parsed.config, parsed.options)
    return parsed


def options_given(argv: list[str]) -> set[str]:
    """The names of the options on the command line, as parse_args reads them (--lora-rank is --lora_rank)."""
    return {arg[2:].partition("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}


def check_shared_options(argv: list[str], config: Config, options: dict) -> None:
    """The command-line options classify.py and instruct.py both take: --lora_rank, --epochs, --test_fraction."""
    if options["lora_rank"] < 0 or ("lora_rank" in options_given(argv) and options["lora_rank"] < 1):
        raise ConfigError(f"lora_rank={options['lora_rank']} must be 1 or more (16 is the book's), or leave it out "
                          "to train every weight")
    if options["epochs"] < 0:
        raise ConfigError(f"epochs={options['epochs']} must be 1 or more")
    if not 0 < options["test_fraction"] < 1 or options["test_fraction"] + config.data.val_fraction >= 1:
        raise ConfigError(f"test_fraction={options['test_fraction']} must be in (0, 1) and leave room for val_fraction="
                          f"{config.data.val_fraction} and the train split")


@dataclass
class Start:
    """Where a run starts: its config and options, its folder, the network to fine-tune, and either the pretrained
    model it comes from (`base`, a new run) or the checkpoint it continues (`saved`, a resumed run)."""

    config: Config
    options: dict
    overridden: frozenset[str]  # the config fields given on the command line
    run_dir: Path
    gpt: GPT  # the pretrained network, or for a resumed run one of its shape (train.restore loads the weights)
    base: loading.LoadedModel | None = None
    saved: dict | None = None

    @property
    def tokenizer(self) -> dict:
        """The model's tokenizer spec, for data.get_tokenizer."""
        return self.saved["tokenizer"] if self.saved is not None else self.base.tokenizer


def start(parsed: ParsedArgs, argv: list[str], kind: str, folder_prefix: str, record_key: str,
          options_a_resume_may_change: tuple[str, ...] = ()) -> Start:
    """A new run (--init_from, default: the latest pretraining run) in a new folder, or with --resume the run in
    --out_dir (default: the latest run of this kind) from its newest checkpoint that verifies."""
    config, options, overridden = parsed
    if config.train.resume:
        return resumed_start(parsed, argv, kind, record_key, options_a_resume_may_change)
    base = load_base(config.train.init_from)
    config.model = base.model_config  # the checkpoint's sizes, whatever the preset said
    return Start(config, options, overridden, new_run_dir(config.train, folder_prefix), base.model, base=base)


def load_base(init_from: str) -> loading.LoadedModel:
    """A checkpoint of this repository (a .pt file or a run folder; default: the latest pretraining run) or
    OpenAI's GPT-2 (--init_from=gpt2 or a local Hugging Face folder)."""
    if init_from == "scratch":
        try:
            run = checkpoint.latest_run(kinds=(checkpoint.PRETRAIN_KIND,))
        except UserError:
            raise UserError("no pretrained run under checkpoints/ to start from; run `make train` first, or pass "
                            "--init_from=gpt2 or --init_from=checkpoints/<run>/best.pt") from None
        return loading.load_model(ckpt=str(run))
    path = Path(init_from)
    if path.suffix == ".pt" and not path.exists():  # said here: loading would name its own option, --ckpt
        raise UserError(f"--init_from={init_from} does not exist; give a checkpoint of a run "
                        "(checkpoints/<run>/best.pt), a run folder, or gpt2")
    if path.suffix == ".pt" or (path.is_dir() and not (path / "config.json").exists()):
        return loading.load_model(ckpt=init_from)
    return loading.load_model(init_from=init_from)


def new_run_dir(train: TrainConfig, folder_prefix: str) -> Path:
    """--out_dir, else checkpoints/<run_name or prefix-time>, refusing a folder that already holds a run."""
    run_dir = Path(train.out_dir) if train.out_dir else \
        checkpoint.CHECKPOINTS_ROOT / (train.run_name or f"{folder_prefix}-{time.strftime('%Y%m%d-%H%M%S')}")
    checkpoint.refuse_existing_run(run_dir)
    return run_dir


def resumed_start(parsed: ParsedArgs, argv: list[str], kind: str, record_key: str,
                  options_a_resume_may_change: tuple[str, ...]) -> Start:
    """The run's newest valid checkpoint, which must be of this kind, with its config and options; the command
    line's overrides are applied where a resume may change them (more --max_iters) and refused where not."""
    config, options, overridden = parsed
    run_dir = Path(config.train.out_dir) if config.train.out_dir else checkpoint.latest_run(kinds=(kind,))
    if not run_dir.is_dir():
        raise UserError(f"--resume: no run folder {run_dir}")
    saved = checkpoint.load_checkpoint(checkpoint.newest_valid_checkpoint(run_dir, say=print))
    if not saved.get(record_key):
        raise UserError(f"{run_dir} is not a {kind} run; resume it with the script that wrote it")
    resumed = merge_resume_config(Config.from_dict(saved["config"]), config, overridden, also_fixed=FIXED_ON_RESUME)
    resumed_options = {**options, **saved["options"]}  # options added since the run was saved: their defaults
    for name in sorted(options_given(argv) & options.keys()):
        if name in options_a_resume_may_change:
            resumed_options[name] = options[name]
        elif options[name] != saved["options"].get(name, options[name]):
            raise ConfigError(f"--{name}={options[name]} contradicts the run being resumed ({name}="
                              f"{saved['options'][name]}); drop the option or start a new run with another --out_dir")
    return Start(resumed, resumed_options, overridden, run_dir, GPT(resumed.model), saved=saved)


def steps_per_epoch(n_examples: int, train: TrainConfig) -> int:
    """Optimizer steps in one pass over the training examples: a step takes batch_size x accumulation of them."""
    return max(1, n_examples // (train.batch_size * train.gradient_accumulation_steps))


def set_max_iters(start: Start, n_examples: int, default_epochs: int) -> None:
    """A new run trains --epochs (else --max_iters when given, else default_epochs); a resumed run keeps its own."""
    if start.saved is None and (start.options["epochs"] or "max_iters" not in start.overridden):
        start.config.train.max_iters = steps_per_epoch(n_examples, start.config.train) * \
            (start.options["epochs"] or default_epochs)


class EpochBatches:
    """Each training example once per epoch, in a fresh seeded order; `make_batch` turns a batch's example indices
    into (x, y), padded to its longest example. The last partial batch of an epoch is dropped.

    `example_tokens` holds each example's real (not padding) tokens; tokens_served adds up those of the batches
    served, so a fine-tuning run's tokens_seen (loss.png's x axis) counts tokens, as pretraining's does.
    """

    def __init__(self, example_tokens: torch.Tensor, batch_size: int, seed: int,
                 make_batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.example_tokens, self.batch_size, self.make_batch = example_tokens, batch_size, make_batch
        self.n_examples = len(example_tokens)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(self.n_examples, generator=self.generator), 0
        self.tokens_served = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.order):  # a new epoch
            self.order, self.position = torch.randperm(self.n_examples, generator=self.generator), 0
        rows = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        self.tokens_served += int(self.example_tokens[rows].sum())  # CPU tensors: no device sync
        return self.make_batch(rows)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]
