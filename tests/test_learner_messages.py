"""What a learner meets on the first day, said in words: a wrong option named as given, a misspelt demonstration, a
multi-byte character's pieces, the help of each option in the command's own meaning, the Python without the venv.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_learner_messages.py
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import classify
import instruct
from gptkit import sources
from gptkit.cli import parse_args

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL_ENTRY_POINTS = sorted(path.name for path in REPO.glob("*.py")
                                if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8"))


def run(*args: str, cwd: Path, python: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*python, *(str(REPO / a) if a.endswith(".py") else a for a in args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("script", ["classify.py", "instruct.py"])
def test_a_missing_init_from_checkpoint_is_named_as_init_from_not_ckpt(script, tmp_path):
    error = one_line_error(run(script, "--init_from=checkpoints/nope/best.pt", cwd=tmp_path))
    assert "--init_from=checkpoints/nope/best.pt does not exist" in error and "--ckpt" not in error, error


def test_a_prompt_given_no_value_is_refused_not_sampled_from_the_word_true(tmp_path):
    error = one_line_error(run("generate.py", "--prompt", "--max_new_tokens=5", cwd=tmp_path))
    assert "--prompt was given no value" in error and '--prompt="two words"' in error, error


def test_a_bare_switch_is_still_true():
    parsed = parse_args(["--fast_kernels", "--stream"], extra={"stream": "auto"}, reads=("fast_kernels",))
    assert parsed.config.train.fast_kernels is True and parsed.options["stream"] == "True"


def test_a_misspelt_demonstration_gets_a_did_you_mean(tmp_path):
    error = one_line_error(run("tour.py", "atention", cwd=tmp_path))
    assert "did you mean `python tour.py attention`?" in error, error


def test_the_missing_dataset_error_lists_every_named_data_set(tmp_path):
    error = one_line_error(run("data.py", "--dataset=no_such_corpus.txt", cwd=tmp_path))
    for name in ("wikitext2", "shakespeare", "tang_poems"):
        assert name in error, error
    assert "tang_poems" in sources.NAMED_DATASETS


def test_chinese_pieces_are_explained_as_parts_of_multi_byte_characters(tmp_path, monkeypatch):
    result = run("tour.py", "tokens", "你好，世界！", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'\ufffd'" in result.stdout  # the pieces a learner sees
    assert "bytes:  [b'\\xe4\\xbd', b'\\xa0'," in result.stdout, result.stdout  # 你 = e4 bd a0, split in two
    assert "part of a character that UTF-8 writes in several bytes ('你' is b'\\xe4\\xbd\\xa0')" in result.stdout
    english = run("tour.py", "tokens", "Hello, world!", cwd=tmp_path)
    assert "bytes:" not in english.stdout  # whole characters need no note


@pytest.mark.parametrize("script", ["generate.py", "chat.py", "serve.py"])
def test_help_of_a_command_that_does_not_train_gives_seed_device_dtype_their_own_section(script, tmp_path):
    result = run(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train options" not in result.stdout, result.stdout
    runtime = result.stdout.split("runtime options", 1)[1]
    assert re.search(r"--device .*where the model runs", runtime), runtime
    assert "--seed" not in result.stdout or re.search(r"--seed .*seeds the sampling", runtime), runtime
    assert "--dtype" in runtime and "the weights, the batches" not in result.stdout


@pytest.mark.parametrize("module", [classify, instruct])
def test_fine_tuning_help_says_what_init_from_and_epochs_mean_there(module, tmp_path):
    result = run(Path(module.__file__).name, "--help", cwd=tmp_path)
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("--init_from"))
    assert "random weights" not in line and "scratch: the latest pretraining run" in line, line
    epochs = next(line for line in result.stdout.splitlines() if line.strip().startswith("--epochs"))
    assert "DEFAULT_EPOCHS" not in epochs and f"else {module.DEFAULT_EPOCHS} passes" in epochs, epochs


def test_make_help_says_how_long_make_test_takes():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    line = next(line for line in makefile.splitlines() if line.startswith("test:"))
    assert "a few minutes" not in line and "10-15 minutes" in line, line


@pytest.mark.parametrize("script", TOP_LEVEL_ENTRY_POINTS)
def test_a_python_without_torch_says_how_to_run_with_the_venv(script, tmp_path):
    """`python -S` leaves out site-packages: a Python without torch, as the system python3 is on a fresh machine."""
    error = one_line_error(run(script, "--help", cwd=tmp_path, python=(sys.executable, "-S")))
    assert "has no torch" in error and "make setup-all" in error and "venv/bin/python" in error, error


def test_max_iters_alone_shrinks_the_presets_warmup_with_the_run():
    """The DDP row's 20 steps once ran inside tiny's 100-step warmup from start to end, never at the peak rate."""
    assert parse_args(["--preset=tiny", "--max_iters=20"]).config.train.warmup_iters == 2
    assert parse_args(["--preset=tiny", "--max_iters=20", "--warmup_iters=5"]).config.train.warmup_iters == 5
    assert parse_args(["--preset=tiny", "--max_iters=2000"]).config.train.warmup_iters == 100  # already short


def test_a_bare_switch_whose_default_is_auto_is_true():
    assert parse_args(["--compile"], reads=("compile",)).config.train.compile is True
