"""The built-in verifiable task, `addition`: questions with one checkable answer ("123+45" -> "168"), written by the
project itself (no download), split train/val/test with no question shared between splits.

    python train.py --preset=tiny --dataset=addition --tokenizer=bpe:257 --max_iters=300   # its text, one byte a token
    python instruct.py --dataset=addition --init_from=checkpoints/<that run>                # the SFT start
    python rl.py                                                                            # then GRPO on it

Each row is {"prompt", "answer"} (rl.py's format); instruct.py reads the same rows as instruction and output. The
size was chosen by measurement (docs/post-training.md): a `tiny` model gets some but not most of two-digit sums
right after a short SFT, the range where RL has right answers to learn from and room to improve.
"""

from __future__ import annotations

import random

ADDITION = "addition"
DIGITS = 2  # each number has up to this many digits: 10,000 questions in all
SPLIT_SIZES = {"test": 300, "val": 200}  # train: every other question
SEED = 37  # the data set is the same on every machine: its rows are part of the benchmark


def addition_question(rng: random.Random) -> tuple[int, int]:
    return rng.randrange(10 ** DIGITS), rng.randrange(10 ** DIGITS)


def addition_splits() -> dict[str, list[dict]]:
    """{"train": [{"prompt": "123+45", "answer": "168"}, ...], "val": [...], "test": [...]}: held-out questions are
    drawn first and never appear in train (a+b and b+a count as different questions)."""
    rng = random.Random(SEED)
    seen: set[tuple[int, int]] = set()
    splits: dict[str, list[dict]] = {}
    for split in ("test", "val", "train"):
        rows = []
        wanted = SPLIT_SIZES.get(split, 10 ** (2 * DIGITS) - len(seen))
        while len(rows) < wanted:
            a, b = addition_question(rng)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            rows.append({"prompt": f"{a}+{b}", "answer": str(a + b)})
        splits[split] = rows
    return {split: splits[split] for split in ("train", "val", "test")}


def addition_transcripts(rows: list[dict]) -> list[str]:
    """Rows as the chat transcripts instruct.py's chat style renders ("User: 1+2\\nAssistant: 3"): the text a model
    is pretrained on with --dataset=addition, one document (ended by the end-of-text token) per question."""
    return [f"User: {row['prompt']}\nAssistant: {row['answer']}" for row in rows]


def exact_match(reply: str, answer: str) -> float:
    """The default reward and accuracy: 1.0 when the reply, stripped of surrounding whitespace, is the answer."""
    return float(reply.strip() == str(answer).strip())
