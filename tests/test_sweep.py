"""sweep.py: the variants it builds, its refusals, and the table it prints (no training: that is train.py's)."""

import pytest

from config import ConfigError, UserError
from tools.sweep import parse, steps_in, table


def test_vary_and_variant_make_one_run_each_with_the_common_arguments(tmp_path):
    argv = ["--vary=learning_rate=1e-3,2e-3", "--variant=--optimizer=muon --muon_lr=0.02",
            f"--out_dir={tmp_path / 'sweep'}", "--jobs=2", "--", "--preset=tiny"]
    variants, common, out_dir, jobs, minutes, evaluate = parse(argv)
    assert variants == [["--learning_rate=1e-3"], ["--learning_rate=2e-3"], ["--optimizer=muon", "--muon_lr=0.02"]]
    assert common == ["--preset=tiny"] and out_dir == tmp_path / "sweep" and jobs == 2
    assert (minutes, evaluate) == (0.0, False)
    timed = parse(["--vary=tokenizer=gpt2,bpe:2048", "--minutes=5", "--evaluate", f"--out_dir={tmp_path / 't'}"])
    assert timed.variants == [["--tokenizer=gpt2"], ["--tokenizer=bpe:2048"]] and timed.minutes == 5 and timed.evaluate


@pytest.mark.parametrize("argv, error, message", [
    ([], ConfigError, "nothing to sweep"),
    (["--vary=learning_rate"], ConfigError, "use --vary=NAME=V1,V2"),
    (["--vary=lr=1", "--jobs=0"], ConfigError, "--jobs must be a positive integer"),
    (["--vary=lr=1", "--", "--out_dir=x"], ConfigError, "would make every run write to one folder"),
    (["--vary=lr=1", "--seed=1"], ConfigError, "unknown option --seed=1"),
    (["--vary=lr=1", "--minutes=0"], ConfigError, "--minutes must be a positive number"),
    (["--vary=lr=1", "--minutes=5", "--", "--max_iters=9"], ConfigError, "--minutes sets each run's --max_iters"),
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


def test_minutes_become_steps_at_the_pace_after_the_first_logged_step():
    logs = [{"step": 5, "elapsed_s": 9.0}, {"step": 10, "elapsed_s": 10.0}, {"step": 30, "elapsed_s": 14.0}]
    assert steps_in(5, logs) == 1500  # 0.2 s per step after step 5 (the slow start is left out)


def test_evaluated_runs_get_a_bits_per_byte_column():
    results = [{"args": "--tokenizer=gpt2", "curve": [{"step": 100, "minutes": 5.0, "val_loss": 5.1}],
                "bits_per_byte": 2.1},
               {"args": "--tokenizer=bpe:4096", "curve": [{"step": 200, "minutes": 5.0, "val_loss": 3.9}],
                "bits_per_byte": 1.9}]
    lines = table(results).splitlines()
    assert lines[0] == "| run | step 100 | step 200 | minutes | bits per byte |"
    assert lines[3] == "| `--tokenizer=bpe:4096` | - | 3.9000 | 5.00 | 1.9000 |"
