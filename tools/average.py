"""Checkpoint averaging: the mean of a run's last N step checkpoints, scored on the validation split beside the last.

    python -m tools.average --run=checkpoints/<run> --last=3      # writes checkpoints/<run>/average.pt
    make average RUN=<run> ARGS="--last=3"

Late in training the weights jitter around a minimum along directions the learning rate is too large to settle;
averaging a few snapshots cancels much of that jitter, much as a cooldown of the rate does (Izmailov et al. 2018,
"Averaging Weights Leads to Wider Optima"; Sanyal et al. 2023, "Early Weight Averaging"). It needs step
checkpoints to average: train with --keep_last=N and an --eval_interval that saves often enough. It averages
pretraining runs (train.py's); a fine-tuned run (classify.py's, instruct.py's) is refused.
`python generate.py --ckpt=checkpoints/<run>/average.pt` samples from the result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import data
from config import ConfigError, UserError
from gptkit import checkpoint, loading
from gptkit.cli import parse_args, run_cli
from gptkit.perplexity import sliding_window_loss
from gptkit.runtime import setup_runtime

OPTIONS = {
    "run": "",  # the run folder, or its name under checkpoints/
    "last": 3,  # how many of its newest step checkpoints to average
    "evaluate": True,  # score the average and the last checkpoint on the validation split
    "max_tokens": 0,  # score only the split's first N tokens; 0: all of them
}
# manifest.json "kind" of the fine-tuning scripts' runs: their checkpoints hold a classifier head or LoRA adapters and
# a record that the average would have to carry, and their loss is not the validation split's next-token loss
FINE_TUNED_KINDS = ("classifier", "instruct")


def parse(argv: list[str]) -> dict:
    # The config comes from the run's checkpoints: the command line sets none of its fields.
    options = parse_args(argv, extra=OPTIONS, reads=()).options
    if options["last"] < 2:
        raise ConfigError(f"--last={options['last']} averages nothing; use 2 or more")
    if options["max_tokens"] < 0:
        raise ConfigError(f"--max_tokens={options['max_tokens']} is negative; use 0 for the whole split")
    return options


def run_folder(run: str) -> Path:
    """--run as a path, or as a name under checkpoints/."""
    if not run:
        raise ConfigError("give the run to average: --run=checkpoints/<run> (make average RUN=<run>)")
    for path in (Path(run), checkpoint.CHECKPOINTS_ROOT / run):
        if path.is_dir():
            return path
    raise UserError(f"--run={run}: no run folder {run} (nor {checkpoint.CHECKPOINTS_ROOT / run})")


def fine_tuned_kind(run_dir: Path, payload: dict | None = None) -> str:
    """"classifier" or "instruct" for a fine-tuning script's run, as its manifest.json or a checkpoint's record says;
    "" for a pretraining run."""
    try:
        kind = json.loads((run_dir / "manifest.json").read_text()).get("kind", "")
    except (OSError, ValueError, AttributeError):
        kind = ""
    return kind if kind in FINE_TUNED_KINDS else next((k for k in FINE_TUNED_KINDS if (payload or {}).get(k)), "")


def refuse_fine_tuned(run_dir: Path, payload: dict | None = None) -> None:
    kind = fine_tuned_kind(run_dir, payload)
    if kind:
        raise UserError(f"{run_dir} is a fine-tuned run ({kind}); average.py averages pretraining runs only, whose "
                        "checkpoints are plain language models scored on their data set's validation split")


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
    refuse_fine_tuned(run_dir)
    steps = checkpoint.step_checkpoints(run_dir)[:options["last"]]
    if len(steps) < options["last"]:
        raise UserError(f"{run_dir} keeps {len(steps)} step checkpoint(s), fewer than --last={options['last']}; "
                        f"train with --keep_last={options['last']} (or more), or average fewer")
    payloads = [checkpoint.load_checkpoint(path) for path in steps]  # verified: a damaged file stops here
    newest = payloads[0]
    refuse_fine_tuned(run_dir, newest)  # a run folder without its manifest.json
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
