"""tools/bench.py's own options: bad values are one line and exit 2 before any measuring starts.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_bench.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("option, message", [
    ("--dtypes=float16", "--dtypes=float16 is not a list of float32 and bfloat16"),
    ("--dtypes=", "--dtypes= is not a list of float32 and bfloat16"),
    ("--baseline_dir=no/such/checkout", "has no train.py; point it at a checkout of this repository"),
    ("--time_to_loss", "--time_to_loss compares with nanoGPT: give --nanogpt_dir=DIR"),
])
def test_bad_options_are_one_line_and_exit_2_before_measuring(tmp_path, option, message):
    done = subprocess.run([sys.executable, "-m", "tools.bench", option, f"--out={tmp_path / 'bench.json'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "matmul peak" not in done.stdout + done.stderr and not (tmp_path / "bench.json").exists()


def test_time_to_target_is_the_first_eval_at_or_below_the_target_not_the_best_or_the_last():
    from tools import bench
    metrics = [{"kind": "train", "step": 10, "loss": 1.0, "elapsed_s": 5.0},  # a train loss below: not an eval
               {"kind": "eval", "step": 25, "val_loss": 6.0, "elapsed_s": 10.0},
               {"kind": "eval", "step": 50, "val_loss": 5.5, "elapsed_s": 20.0},  # exactly the target
               {"kind": "eval", "step": 75, "val_loss": 5.2, "elapsed_s": 30.0},
               {"kind": "eval", "step": 100, "val_loss": 5.3, "elapsed_s": 40.0}]
    row = bench.time_to_target(metrics, target=5.5, nanogpt_s=80.0)
    assert (row["reached_at_step"], row["seconds"], row["ratio"]) == (50, 20.0, 0.25)
    assert (row["final_step"], row["final_val_loss"]) == (100, 5.3)
    never = bench.time_to_target(metrics, target=5.0, nanogpt_s=80.0)
    assert never["reached_at_step"] is None and never["seconds"] is None and never["ratio"] is None


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_time_to_loss_runs_nanogpts_recipe_whatever_the_presets_defaults_and_ours_on_top(tmp_path, preset):
    from gptkit.cli import parse_args
    from tools import bench
    theirs = parse_args(bench.time_to_loss_args(preset, tmp_path, tmp_path / "out", ())).config
    assert (theirs.train.optimizer, theirs.train.lr_schedule) == ("adamw", "cosine")
    assert (theirs.train.learning_rate, theirs.train.warmup_iters, theirs.train.beta2) == (1e-3, 50, 0.99)
    assert theirs.train.max_iters == bench.TTL_STEPS[preset] and theirs.model.dropout == 0.0
    assert theirs.model.n_embd == bench.SHAPES[preset]["n_embd"]
    ours = parse_args(bench.time_to_loss_args(preset, tmp_path, tmp_path / "out", bench.TTL_OURS[preset])).config
    assert ours.train.optimizer == "muon" and ours.train.lr_schedule == "wsd"
    assert ours.model.n_embd == theirs.model.n_embd and ours.model.block_size == theirs.model.block_size
    windows = bench.TTL_EVAL_ITERS * bench.SHAPES[preset]["batch_size"]  # what nanoGPT's eval averages over
    assert theirs.train.eval_iters * theirs.train.batch_size == windows
    for recipe in (bench.TTL_OURS[preset], ("--batch_size=3",)):  # a batch that divides and one that does not
        ours = parse_args(bench.time_to_loss_args(preset, tmp_path, tmp_path / "out", recipe)).config
        batch, iters = ours.train.batch_size, ours.train.eval_iters
        assert iters * batch >= windows > (iters - 1) * batch  # the fewest of our batches that cover as many


def test_our_training_rows_come_from_the_runs_metrics_not_its_printed_lines(tmp_path):
    from tests.helpers import TINY_ARGS, make_text, run_train
    from tools import bench
    (tmp_path / "corpus.txt").write_text(make_text(3000))
    run_train(tmp_path, *TINY_ARGS, "--dataset=corpus.txt", "--max_iters=6", "--eval_interval=6", "--log_interval=1",
              "--out_dir=run")
    row = bench.read_our_training(tmp_path / "run")
    assert len(row["steady_ms"]) == 6 - bench.WARMUP_ITERATIONS and all(ms > 0 for ms in row["steady_ms"])
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert row["val_loss"] == evals[-1]["val_loss"]
