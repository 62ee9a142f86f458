"""tools/sweep.py: the variants it builds, its refusals, the table it prints, and the timed comparison behind the
decision benchmarks (--minutes, --bits_per_byte, train.py's --max_minutes), end to end on a tiny model."""

import json
from pathlib import Path

import pytest

from config import ConfigError, UserError
from tests.helpers import TINY_ARGS, make_text, metrics, run_train
from tools import sweep as sweep_tool
from tools.sweep import parse, table


def test_vary_and_variant_make_one_run_each_with_the_common_arguments(tmp_path):
    argv = ["--vary=learning_rate=1e-3,2e-3", "--variant=--optimizer=muon --muon_lr=0.02",
            f"--out_dir={tmp_path / 'sweep'}", "--jobs=2", "--", "--preset=tiny"]
    sweep = parse(argv)
    assert sweep.variants == [["--learning_rate=1e-3"], ["--learning_rate=2e-3"],
                              ["--optimizer=muon", "--muon_lr=0.02"]]
    assert sweep.common == ["--preset=tiny"] and sweep.out_dir == tmp_path / "sweep" and sweep.jobs == 2
    assert sweep.minutes == 0 and not sweep.bits_per_byte  # equal steps, val loss only: the default


def test_minutes_and_bits_per_byte_compare_settings_at_equal_training_time(tmp_path):
    sweep = parse(["--minutes=7.5", "--bits_per_byte", "--vary=arch=gpt2,llama", f"--out_dir={tmp_path / 's'}"])
    assert sweep.minutes == 7.5 and sweep.bits_per_byte
    assert sweep.variants == [["--arch=gpt2"], ["--arch=llama"]]


@pytest.mark.parametrize("argv, error, message", [
    ([], ConfigError, "nothing to sweep"),
    (["--vary=learning_rate"], ConfigError, "use --vary=NAME=V1,V2"),
    (["--vary=lr=1", "--jobs=0"], ConfigError, "--jobs must be a positive integer"),
    (["--vary=lr=1", "--", "--out_dir=x"], ConfigError, "would make every run write to one folder"),
    (["--vary=lr=1", "--seed=1"], ConfigError, "unknown option --seed=1"),
    (["--vary=lr=1", "--minutes=soon"], ConfigError, "--minutes=soon is not a number"),
    (["--vary=lr=1", "--minutes=-1"], ConfigError, "--minutes must be a positive number"),
])
def test_bad_arguments_are_refused_with_the_fix(argv, error, message):
    with pytest.raises(error, match=message):
        parse(argv)


def test_a_non_empty_out_dir_is_refused(tmp_path):
    (tmp_path / "old.log").write_text("a previous sweep")
    with pytest.raises(UserError, match="is not empty"):
        parse(["--vary=learning_rate=1e-3", f"--out_dir={tmp_path}"])


def test_table_has_a_row_per_run_and_a_column_per_eval_step():
    results = [{"args": "--a", "curve": [{"step": 50, "minutes": 0.5, "val_loss": 6.0},
                                         {"step": 100, "minutes": 1.0, "val_loss": 5.5}]},
               {"args": "--b", "curve": [{"step": 50, "minutes": 0.6, "val_loss": 5.9}]}]  # stopped early
    lines = table(results).splitlines()
    assert lines[0] == "| run | step 50 | step 100 | minutes |"
    assert lines[2] == "| `--a` | 6.0000 | 5.5000 | 1.00 |" and lines[3] == "| `--b` | 5.9000 | - | 0.60 |"


def test_timed_runs_end_at_their_own_step_and_get_their_score_in_the_table():
    def point(step, minutes, val_loss):
        return {"step": step, "minutes": minutes, "val_loss": val_loss}
    results = [{"args": "--arch=gpt2", "bits_per_byte": 2.1, "curve": [point(200, 1.0, 6.0), point(400, 2.0, 5.0)]},
               {"args": "--arch=llama", "bits_per_byte": 2.0, "curve": [point(200, 1.2, 5.8), point(330, 2.0, 4.9)]}]
    lines = table(results, timed=True).splitlines()
    assert lines[0] == "| run | step 200 | minutes | steps | val loss | bits per byte |"
    assert lines[1].count("---") == 6
    assert lines[2] == "| `--arch=gpt2` | 6.0000 | 2.00 | 400 | 5.0000 | 2.1000 |"
    assert lines[3] == "| `--arch=llama` | 5.8000 | 2.00 | 330 | 4.9000 | 2.0000 |"


def test_max_minutes_stops_the_loop_which_then_finishes_as_at_max_iters(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_text())
    done = run_train(tmp_path, *TINY_ARGS, "--dataset=corpus.txt", "--max_iters=100000", "--max_minutes=0.002",
                     "--log_interval=1", "--eval_interval=100000", "--out_dir=run")
    steps = [r["step"] for r in metrics(tmp_path / "run", "train")]
    assert "max_minutes=0.002: stopping at step" in done.stdout and 0 < steps[-1] < 100000
    assert [r["step"] for r in metrics(tmp_path / "run", "eval")] == [steps[-1]]  # the final eval, then best.pt
    assert (tmp_path / "run" / "best.pt").exists()


def test_timed_sweep_gives_each_setting_the_steps_its_calibration_says_fit_and_scores_it(tmp_path, monkeypatch):
    """The glue of --minutes and --bits_per_byte, with the child processes faked: train.py and tools.evaluate have
    their own tests (a real timed sweep of the tiny model takes ~40 s on a quiet 2-core machine)."""
    sweep = parse(["--minutes=2", "--bits_per_byte", "--variant=--arch=llama", f"--out_dir={tmp_path}", "--",
                   "--preset=tiny"])
    commands = []

    def fake_run(command, log, what, jobs):
        commands.append(command)
        out_dir = Path(next(a for a in command if a.startswith(("--out_dir=", "--ckpt="))).split("=", 1)[1])
        if "tools.evaluate" in command:
            return "loss 1.2 | token perplexity 3.3 | word perplexity 9.9 (10 words) | bits per byte 1.2345 (9 bytes)"
        rows = [{"kind": "train", "step": s, "elapsed_s": 0.1 * s} for s in (5, 10, 20, 30)] + \
            [{"kind": "eval", "step": 30, "elapsed_s": 3.0, "val_loss": 4.0}]  # 0.1 s per step
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
        return ""
    monkeypatch.setattr(sweep_tool, "run_logged", fake_run)
    [result] = sweep_tool.run_all(sweep)
    *calibrations, run, evaluate = commands
    assert [c[-5:] for c in calibrations] == [["--max_iters=30", "--log_interval=5", "--eval_iters=1",
                                               "--eval_interval=30", f"--out_dir={tmp_path / f'0-calibration-{n}'}"]
                                              for n in range(sweep_tool.CALIBRATION_ROUNDS)]
    assert run[-3:] == ["--max_iters=1200", "--max_minutes=6.0", f"--out_dir={tmp_path / '0'}"]  # 120 s / 0.1 s
    assert run[2:5] == ["--preset=tiny", "--arch=llama", "--max_iters=1200"]  # common, own, then the timed steps
    assert evaluate[1:] == ["-m", "tools.evaluate", f"--ckpt={tmp_path / '0' / 'best.pt'}", "--split=val"]
    assert result["bits_per_byte"] == 1.2345
    assert table([result], timed=True).splitlines()[0] == "| run | minutes | steps | val loss | bits per byte |"


def test_each_setting_is_given_steps_by_its_fastest_calibration_in_alternating_rounds(tmp_path, monkeypatch):
    """A setting timed while the machine was busy must not get fewer steps: the rounds alternate the order, and the
    fastest round of each setting counts."""
    sweep = parse(["--minutes=1", "--variant=--a", "--variant=--b", f"--out_dir={tmp_path}"])
    busy = {("--a", 0): 0.5, ("--a", 1): 0.1, ("--b", 0): 0.2, ("--b", 1): 0.4}  # seconds per step in each round
    order = []

    def fake_run(command, log, what, jobs):
        out_dir = Path(next(a for a in command if a.startswith("--out_dir=")).split("=", 1)[1])
        index, round_number = out_dir.name.split("-calibration-")
        order.append(int(index))
        per_step = busy[(command[2], int(round_number))]
        rows = [{"kind": "train", "step": s, "elapsed_s": per_step * s} for s in (10, 30)]
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
        return ""
    monkeypatch.setattr(sweep_tool, "run_logged", fake_run)
    assert sweep_tool.calibrate(sweep) == pytest.approx([0.1, 0.2])
    assert order == [0, 1, 1, 0]
