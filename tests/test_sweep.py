"""sweep.py: the variants it builds, its refusals, and the table it prints (no training: that is train.py's)."""

import pytest

from config import ConfigError, UserError
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
    (["--vary=lr=1", "--minutes=soon"], ConfigError, "--minutes must be a positive number"),
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
