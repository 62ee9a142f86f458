"""The command line every entry point shares: --help generated from the source's own comments, one dialect, and
one-line errors that show the fix.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_cli.py
"""

import ast
import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import classify
import config
import data
import generate
from config import PRESETS, Config, ConfigError, ModelConfig
from gptkit import checkpoint
from gptkit.cli import default_preset, field_help, help_text, options_help, parse_args
from model import GPT
from tools import sweep

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(str(path.relative_to(REPO)) for path in [*REPO.glob("*.py"), *REPO.glob("tools/*.py")]
                      if 'if __name__ == "__main__":' in path.read_text())


def command(entry_point: str) -> list[str]:
    """How a user runs it: python train.py, python -m tools.bench."""
    if entry_point.startswith("tools/"):
        return [sys.executable, "-m", entry_point.removesuffix(".py").replace("/", ".")]
    return [sys.executable, str(REPO / entry_point)]


def run(entry_point: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*command(entry_point), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------- the help texts exist


def test_the_entry_points_are_found():
    assert {"train.py", "data.py", "generate.py", "tour.py", "tools/sweep.py", "tools/average.py"} <= \
        set(ENTRY_POINTS)


@pytest.mark.parametrize("kind", [k for _, k in inspect.getmembers(config, dataclasses.is_dataclass)
                                  if k.__module__ == "config"])
def test_every_field_of_every_config_dataclass_has_a_help_comment(kind):
    helps = field_help(kind)
    missing = [f.name for f in dataclasses.fields(kind) if not helps.get(f.name)]
    assert not missing, f"{kind.__name__}: give {missing} a trailing # comment on their line: it is their --help"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_options_entry_of_every_entry_point_has_a_help_comment(entry_point):
    source = (REPO / entry_point).read_text()
    tree = ast.parse(source)
    options = next((node.value for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", "") == "OPTIONS" for t in node.targets)), None)
    helps = options_help(source)
    if options is not None and not isinstance(options, ast.Dict):  # dpo.py's asdict(DPOConfig()): the fields' help
        assert "OPTIONS_CONFIG = " in source, f"{entry_point}: OPTIONS from a dataclass needs OPTIONS_CONFIG for --help"
    elif options is not None:
        keys = [key.value for key in options.keys]
        missing = [key for key in keys if not helps.get(key)]
        assert not missing, f"{entry_point}: give OPTIONS {missing} a trailing # comment: it is their --help"
    for call in ast.walk(tree):  # an inline dict would have no help: the options must be the OPTIONS dict
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "parse_args":
            extra = [k.value for k in call.keywords if k.arg == "extra"] + call.args[1:2]
            assert all(isinstance(e, ast.Name) and e.id == "OPTIONS" for e in extra), \
                f"{entry_point}: pass the entry point's options as extra=OPTIONS"


def test_a_help_comment_is_read_across_a_multi_line_default_and_a_lone_comment_is_not_help():
    source = '''
OPTIONS = {
    # a note for the reader, not help
    "plain": 1,  # the plain one
    "long": (1, 2,
             3),  # its default spans lines
    "wrapped": [  # the comment may sit on the first line too
        "a"],
    "bare": "#not a comment",
    "text": "x",  # help with a # inside
}
'''
    assert options_help(source) == {"plain": "the plain one", "long": "its default spans lines",
                                    "wrapped": "the comment may sit on the first line too", "bare": "",
                                    "text": "help with a # inside"}


# ----------------------------------------------------------------------------------------------- what --help shows


def test_train_help_lists_n_layer_with_its_type_default_and_config_comment(tmp_path):
    comment = re.search(r"^\s+n_layer: int = \d+  # (.+)$", (REPO / "config.py").read_text(), re.M).group(1)
    preset = default_preset()
    result = run("train.py", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python train.py [--key=value ...]\n\nTrain a GPT")
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("--n_layer "))
    assert line.split()[:3] == ["--n_layer", "int", str(PRESETS[preset]().model.n_layer)]
    assert line.endswith(comment)
    assert f"{preset} (the default on this machine)" in result.stdout
    assert all(name in result.stdout for name in PRESETS)
    sections = [line for line in result.stdout.splitlines() if line.endswith("in config.py):")]
    assert [s.split()[0] for s in sections] == ["model", "train", "data"]
    assert run("train.py", "-h", cwd=tmp_path).stdout == result.stdout
    assert not list(tmp_path.iterdir()), "--help wrote something"


def test_help_piped_into_a_reader_that_stops_early_exits_0_without_a_traceback(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has already stopped (like `| head -1` once it has its line): every write fails
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], cwd=tmp_path, stdout=write_end,
                          stderr=subprocess.PIPE, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(write_end)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_help_shows_the_chosen_presets_values(tmp_path):
    result = run("train.py", "--preset=gpt2", "--help", cwd=tmp_path)
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("--n_layer "))
    assert line.split()[2] == "12"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_entry_point_answers_help_without_touching_data_or_checkpoints(entry_point, tmp_path):
    result = run(entry_point, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = " ".join(command(entry_point)[1:]).replace(str(REPO) + "/", "")
    assert result.stdout.startswith(f"usage: python {shown}"), result.stdout[:200]
    docstring = ast.get_docstring(ast.parse((REPO / entry_point).read_text()))
    assert docstring.splitlines()[0] in result.stdout
    assert not list(tmp_path.iterdir()), f"{entry_point} --help wrote {list(tmp_path.iterdir())}"


def test_help_lists_only_the_config_fields_a_script_reads():
    text = help_text(generate, generate.OPTIONS, generate.CONFIG_FIELDS_USED)
    assert "--seed " in text and "--prompt " in text and "runtime options" in text
    assert "--n_layer" not in text and "model options" not in text and "data options" not in text
    assert "presets:" not in text  # the model comes from the checkpoint


def test_a_fine_tuning_scripts_help_shows_its_own_defaults_not_the_presets():
    config, _, _ = classify.resolve_config([])
    text = help_text(classify, classify.OPTIONS, defaults={**classify.DEFAULTS, "dataset": classify.DEFAULT_DATASET})
    line = next(line for line in text.splitlines() if line.strip().startswith("--batch_size "))
    assert line.split()[2] == str(config.train.batch_size) == str(classify.DEFAULTS["batch_size"])
    assert f'"{config.data.dataset}"' in text


# ---------------------------------------------------------------------------------------------- one dialect, errors


def test_a_misspelt_option_is_refused_with_did_you_mean(tmp_path):
    line = one_line_error(run("train.py", "--n_layr=3", cwd=tmp_path))
    assert "unknown option --n_layr; did you mean --n_layer" in line


@pytest.mark.parametrize("argv, fix", [
    (["--prompt", "ROMEO:"], '--prompt="ROMEO:"'),
    (["--prompt", 'say "hi"'], "--prompt='say \"hi\"'"),
    (["n_layer=3"], "write --n_layer=3"),
    (["--top_k=5", "ROMEO:"], '--key="ROMEO:"'),
])
def test_a_value_split_from_its_option_is_refused_with_the_fix(argv, fix):
    with pytest.raises(ConfigError, match="is not of the form --key=value") as caught:
        parse_args(argv, extra={"prompt": "", "top_k": 200})
    assert fix in str(caught.value)


def test_generate_shows_the_fix_for_a_prompt_given_with_a_space(tmp_path):
    line = one_line_error(run("generate.py", "--prompt", "ROMEO:", cwd=tmp_path))
    assert "argument 'ROMEO:' is not of the form --key=value" in line and '--prompt="ROMEO:"' in line


@pytest.mark.parametrize("entry_point, args, message", [
    ("data.py", ["--max_iters=5"], "--max_iters has no effect here"),
    ("tour.py", ["model", "--n_layer=3"], "unknown option --n_layer: this command sets no config field"),
    ("tools/average.py", ["--seed=1"], "unknown option --seed: this command sets no config field"),
    ("tools/average.py", ["--lst=2"], "unknown option --lst; did you mean --last?"),
])
def test_a_config_field_a_script_does_not_read_is_refused_not_ignored(entry_point, args, message, tmp_path):
    assert message in one_line_error(run(entry_point, *args, cwd=tmp_path))


def test_repeatable_options_collect_every_value():
    options = parse_args(["--variant=--a=1", "--variant=--b=2"], extra={"variant": [], "jobs": 1}, reads=()).options
    assert options == {"variant": ["--a=1", "--b=2"], "jobs": 1}
    assert parse_args([], extra={"variant": []}, reads=()).options == {"variant": []}


def test_sweep_starts_the_repositorys_train_py():
    assert (sweep.ROOT / "train.py").is_file()


def test_a_misspelt_data_set_name_gets_did_you_mean(tmp_path):
    line = one_line_error(run("data.py", "--dataset=shakespear", cwd=tmp_path))
    assert "did you mean shakespeare?" in line
    assert not (tmp_path / "data").exists()
    line = one_line_error(run("data.py", "--dataset=shakespeare.txt", cwd=tmp_path))  # a path: no name suggested
    assert "does not exist" in line and "did you mean" not in line


# ---------------------------------------------------------------------------------------------------------- tour.py


def save_run(run_dir: Path, chars: str, **extra) -> None:
    """A tiny run folder with a best.pt a loader accepts; `extra` adds a fine-tuning script's record to it."""
    tokenizer = data.CharTokenizer(chars)
    model_config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32)
    payload = {"config": dataclasses.asdict(Config(model=model_config)), "model": GPT(model_config).state_dict(),
               "tokenizer": tokenizer.to_dict(), **extra}
    checkpoint.save_checkpoint(run_dir / "best.pt", payload)


def test_tour_attention_uses_the_latest_language_model_run_not_a_newer_classifier(tmp_path):
    save_run(tmp_path / "checkpoints" / "pretrained", " Tbeo")
    classifier = tmp_path / "checkpoints" / "classifier"
    save_run(classifier, " Tbeo", classifier={"labels": ["a", "b"]})
    (classifier / "manifest.json").write_text('{"kind": "classifier"}\n')
    newer = (tmp_path / "checkpoints" / "pretrained" / "best.pt").stat().st_mtime + 10
    os.utime(classifier / "best.pt", (newer, newer))
    result = run("tour.py", "attention", "--text=To be", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoints/pretrained/best.pt, head 0 of layer 0, prompt 'To be'" in result.stdout
    assert "random weights" not in result.stdout
    assert "saved runs/tour/attention.png" in result.stdout and (tmp_path / "runs/tour/attention.png").is_file()
    assert not (tmp_path / "attention.png").exists()


def test_tour_attention_says_why_it_falls_back_to_random_weights(tmp_path):
    save_run(tmp_path / "checkpoints" / "pretrained", "ab")  # cannot encode the prompt
    result = run("tour.py", "attention", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "using a tiny model with random weights: checkpoints/pretrained/best.pt cannot encode the prompt" in \
        result.stdout


def test_tour_attention_takes_ckpt_as_an_option_not_as_the_prompt(tmp_path):
    line = one_line_error(run("tour.py", "attention", "--ckpt=nowhere", cwd=tmp_path))
    assert "--ckpt=nowhere does not exist" in line


def test_tour_schedule_saves_its_picture_under_runs(tmp_path):
    result = run("tour.py", "schedule", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved runs/tour/schedule.png" in result.stdout and (tmp_path / "runs/tour/schedule.png").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]


def test_tour_names_its_demonstrations_when_given_none(tmp_path):
    line = one_line_error(run("tour.py", cwd=tmp_path))
    assert "python tour.py tokens|bpe|batch|attention|model|schedule|rope" in line
    assert "tour.py model takes no text" in one_line_error(run("tour.py", "model", "hello", cwd=tmp_path))

