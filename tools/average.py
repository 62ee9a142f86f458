"""Checkpoint averaging: the mean of a run's last N step checkpoints, scored on the validation split beside the last.

    python average.py --run=checkpoints/<run> --last=3      # writes checkpoints/<run>/average.pt
    make average RUN=<run> ARGS="--last=3"

Late in training the weights jitter around a minimum along directions the learning rate is too large to settle;
averaging a few snapshots cancels much of that jitter, much as a cooldown of the rate does (Izmailov et al. 2018,
"Averaging Weights Leads to Wider Optima"; Sanyal et al. 2023, "Early Weight Averaging"). It needs step
checkpoints to average: train with --keep_last=N and an --eval_interval that saves often enough.
`python generate.py --ckpt=checkpoints/<run>/average.pt` samples from the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import data
from config import ConfigError, UserError
from gptkit import checkpoint, loading
from gptkit.cli import parse_bool, run_cli
from gptkit.perplexity import sliding_window_loss
from gptkit.runtime import setup_runtime

OPTIONS = {"run": "", "last": 3, "evaluate": True, "max_tokens": 0}


def parse(argv: list[str]) -> dict:
    options = dict(OPTIONS)
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in options:
            raise ConfigError(f"unknown option {arg}; average.py takes --run=DIR, --last=N, --evaluate=True|False, "
                              "--max_tokens=N")
        if key in ("last", "max_tokens"):
            if not value.isdigit():
                raise ConfigError(f"--{key}={value} is not a whole number; use e.g. --{key}=3")
            options[key] = int(value)
        else:
            options[key] = parse_bool(key, value if eq else "True") if key == "evaluate" else value
    if options["last"] < 2:
        raise ConfigError(f"--last={options['last']} averages nothing; use 2 or more")
    return options


def run_folder(run: str) -> Path:
    """--run as a path, or as a name under checkpoints/."""
    if not run:
        raise ConfigError("give the run to average: --run=checkpoints/<run> (make average RUN=<run>)")
    for path in (Path(run), checkpoint.CHECKPOINTS_ROOT / run):
        if path.is_dir():
            return path
    raise UserError(f"--run={run}: no run folder {run} (nor {checkpoint.CHECKPOINTS_ROOT / run})")


def average_weights(states: list[dict]) -> dict:
    """The element-wise mean of several state dicts with the same keys, summed in float64, kept in each dtype."""
    return {key: (sum(s[key].double() for s in states) / len(states)).to(states[0][key].dtype) for key in states[0]}


def val_loss(model, tokens: torch.Tensor, runtime) -> float:
    """Mean loss over the split, non-overlapping windows of the full context (each token scored once)."""
    window = model.config.block_size
    total, scored = sliding_window_loss(model.to(runtime.device), tokens, window, window, runtime.device,
                                        batch_size=8)
    return total / scored


def main(argv: list[str] | None = None) -> None:
    options = parse(sys.argv[1:] if argv is None else argv)
    run_dir = run_folder(options["run"])
    steps = checkpoint.step_checkpoints(run_dir)[:options["last"]]
    if len(steps) < options["last"]:
        raise UserError(f"{run_dir} keeps {len(steps)} step checkpoint(s), fewer than --last={options['last']}; "
                        f"train with --keep_last={options['last']} (or more), or average fewer")
    payloads = [checkpoint.load_checkpoint(path) for path in steps]  # verified: a damaged file stops here
    newest = payloads[0]
    averaged = average_weights([checkpoint.strip_wrapper_prefixes(p["model"]) for p in payloads])
    step_numbers = [p["state"]["step"] for p in payloads]
    out = run_dir / "average.pt"
    payload = {key: newest[key] for key in ("config", "tokenizer", "dataset", "state") if key in newest}
    payload.update(model=averaged, averaged_steps=step_numbers)
    checkpoint.save_checkpoint(out, payload, info={"averaged_steps": step_numbers})
    print(f"wrote {out}: the mean of steps {', '.join(map(str, sorted(step_numbers)))}")
    if not options["evaluate"]:
        return
    last_model, config = loading.model_from_checkpoint(newest)
    average_model, _ = loading.model_from_checkpoint(payload)
    data_dir = data.prepare(config.data, config.model.block_size, tokenizer=newest.get("tokenizer"))
    tokens = torch.from_numpy(np.asarray(data.open_split(data_dir, "val")).astype(np.int64))
    if options["max_tokens"]:
        tokens = tokens[:options["max_tokens"]]
    runtime = setup_runtime(config.train.device, "float32")
    last, mean = val_loss(last_model, tokens, runtime), val_loss(average_model, tokens, runtime)
    print(f"val loss over {len(tokens):,} tokens: last checkpoint (step {step_numbers[0]}) {last:.4f}, "
          f"average of {len(steps)} {mean:.4f} ({mean - last:+.4f})")


if __name__ == "__main__":
    run_cli(main)
