"""Plot a run's train and validation loss against tokens seen, from its metrics.jsonl, to loss.png beside it.

    python -m tools.plot                 # the most recent run under checkpoints/ (make plot)
    python -m tools.plot --run=NAME      # or --out_dir=DIR

Training draws the same picture at the end of every run (gptkit/runinfo.py's plot_run).
"""

from __future__ import annotations

import sys
from pathlib import Path

from config import UserError
from gptkit import checkpoint
from gptkit.cli import parse_args, run_cli
from gptkit.runinfo import plot_run

OPTIONS = {"run": ""}  # a run name under checkpoints/; default: the most recent run (or --out_dir=DIR)


def main() -> None:
    parsed = parse_args(sys.argv[1:], extra=OPTIONS, reads=("out_dir",))
    if parsed.config.train.out_dir:
        run_dir = Path(parsed.config.train.out_dir)
    elif parsed.options["run"]:
        run_dir = checkpoint.CHECKPOINTS_ROOT / parsed.options["run"]
    else:
        run_dir = checkpoint.latest_run()
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; see the folders under {checkpoint.CHECKPOINTS_ROOT}/")
    png = plot_run(run_dir)
    if png is None:
        raise UserError(f"{run_dir} has no metrics.jsonl entries yet; train for at least log_interval steps")
    print(png)


if __name__ == "__main__":
    run_cli(main)
