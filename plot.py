"""Plot a run's train and validation loss against tokens seen, from its metrics.jsonl, to loss.png beside it.

    python plot.py                 # the most recent run under checkpoints/
    python plot.py --run=NAME      # or --out_dir=DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import checkpoint
from config import UserError, parse_args, run_cli


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run: skip it, keep the rest
    return records


def plot_run(run_dir: Path) -> Path | None:
    """Write run_dir/loss.png; None when the run has logged nothing yet."""
    records = read_metrics(run_dir)
    train = [(r["tokens_seen"], r["train_loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["tokens_seen"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    if not train and not val:
        return None
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    manifest_path = run_dir / "manifest.json"
    if manifest_path.is_file():
        baseline = json.loads(manifest_path.read_text()).get("unigram_val_loss")
        if baseline:
            ax.axhline(baseline, color="gray", linestyle="--", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parsed = parse_args(sys.argv[1:], extra={"run": ""})
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
