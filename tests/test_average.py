"""average.py: the mean of a run's last step checkpoints, scored beside the last; bad input is one line, exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptkit import checkpoint, loading
from tests.helpers import REPO, TINY_ARGS, make_text, run_train
from tools.average import average_weights


def run_average(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tools.average", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 9-step run that keeps its last 3 step checkpoints (the evals at steps 6 and 8, and the final one at 9)."""
    workdir = tmp_path_factory.mktemp("average")
    (workdir / "corpus.txt").write_text(make_text(4000))
    run_train(workdir, *TINY_ARGS, "--dataset=corpus.txt", "--max_iters=9", "--eval_interval=2", "--keep_last=3",
              "--dtype=float32", "--out_dir=run")
    return workdir / "run"


def test_average_weights_is_the_elementwise_mean():
    states = [{"w": torch.randn(3, 4), "b": torch.randn(4)} for _ in range(3)]
    mean = average_weights(states)
    for key in ("w", "b"):
        assert torch.allclose(mean[key], torch.stack([s[key] for s in states]).mean(0), atol=1e-7)
        assert mean[key].dtype == states[0][key].dtype


def test_average_writes_the_mean_of_the_last_n_and_scores_it_beside_the_last(run_dir):
    result = run_average(run_dir.parent, f"--run={run_dir}", "--last=3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the mean of steps 6, 8, 9" in result.stdout
    assert "last checkpoint (step 9)" in result.stdout and "average of 3" in result.stdout
    saved = checkpoint.load_checkpoint(run_dir / "average.pt")  # verified against its manifest
    steps = [checkpoint.load_checkpoint(p)["model"] for p in checkpoint.step_checkpoints(run_dir)[:3]]
    for key, value in saved["model"].items():
        assert torch.allclose(value, torch.stack([s[key] for s in steps]).mean(0), atol=1e-7), key
    weight = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(saved["model"][weight], steps[0][weight])  # not just a copy of the last
    loaded = loading.load_model(ckpt=str(run_dir / "average.pt"))  # what generate.py and evaluate.py do
    assert torch.equal(loaded.model.transformer.wte.weight, saved["model"]["transformer.wte.weight"])


@pytest.mark.parametrize("args, message", [
    (["--run=no/such/run"], "--run=no/such/run: no run folder"),
    (["--run={run}", "--last=7"], "keeps 3 step checkpoint(s), fewer than --last=7; train with --keep_last=7"),
    (["--run={run}", "--last=1"], "--last=1 averages nothing"),
])
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(run_dir, args, message):
    average = run_dir / "average.pt"
    average.write_bytes(b"an earlier average")
    result = run_average(run_dir.parent, *[a.format(run=run_dir) for a in args])
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert average.read_bytes() == b"an earlier average"
    average.unlink()


@pytest.mark.parametrize("how", ["manifest", "checkpoint"])
def test_a_fine_tuned_run_is_refused_in_one_line_naming_it(run_dir, tmp_path, how):
    """B9: a classifier's or an instruct run's average would lose its record (head, prompt style, adapters)."""
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for path in checkpoint.step_checkpoints(run_dir)[:3]:
        payload = checkpoint.load_checkpoint(path)
        if how == "checkpoint":  # a run folder without its manifest.json: the checkpoints' record says it
            payload["instruct"] = {"prompt_style": "alpaca", "lora_rank": 0}
        checkpoint.save_checkpoint(tuned / path.name, payload)
    if how == "manifest":
        (tuned / "manifest.json").write_text('{"kind": "classifier"}\n')
    result = run_average(tmp_path, f"--run={tuned}", "--last=3", "--evaluate=False")
    assert result.returncode == 2, result.stdout[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{tuned} is a fine-tuned run" in lines[0]
    assert not (tuned / "average.pt").exists()
