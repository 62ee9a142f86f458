"""What a run records about itself: the git commit, package versions, memory, and metrics.jsonl (and TensorBoard).

Written by train.py into each run folder (manifest.json, metrics.jsonl, loss.png), so a result can be traced to the
code and the environment that produced it. `make check-deps` prints the same package versions.
Try it: python -c "from gptkit import runinfo; print(runinfo.git_commit(), runinfo.package_versions())"
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from config import UserError

PACKAGES = ("torch", "numpy", "tiktoken", "datasets", "tqdm", "matplotlib")


def git_commit() -> str:
    """The commit of this checkout, or "unknown" (not a git checkout, or no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


NOT_INSTALLED = "not installed"


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python's version and each package's ("not installed" for one that is missing)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def resident_memory_mb() -> float | None:
    """Current resident memory of this process (Linux), logged so that a leak shows in metrics.jsonl."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


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
