"""The built-in verifiable task, `addition`: questions with one checkable answer ("123+45" -> "168"), written by the
project itself (no download), split train/val/test with no question shared between splits.

    python train.py --preset=tiny --dataset=addition --tokenizer=bpe:257 --max_iters=300   # its text, one byte a token
    python instruct.py --dataset=addition --init_from=checkpoints/<that run>                # the SFT start
    python rl.py                                                                            # then GRPO on it

Each row is {"prompt", "answer", "teacher"}: rl.py's format (the answer is the true sum, what a reward checks)
plus the teacher's answer, what instruct.py imitates. The train split's teacher is sloppy: where the units carry
(57+38), it forgets the carry three times in four ("85"), as a hurried person might. So SFT learns the teacher's
habit, mistakes included (45% of the questions carry, and SFT plateaus near 55% however long it trains), while
RL and DPO, scored by the true sum, can learn past their teacher: the reason to go past SFT (docs/post-training.md).
Held-out questions (val, test) carry the true sum as both answers: they are the exam, not demonstrations.
"""

from __future__ import annotations

import random

ADDITION = "addition"
DIGITS = 2  # each number has up to this many digits: 10,000 questions in all
SPLIT_SIZES = {"test": 300, "val": 200}  # train: every other question
SEED = 37  # the data set is the same on every machine: its rows are part of the benchmark
TEACHER_SLIP = 0.75  # the share of carrying train questions whose demonstration forgot the carry


def addition_question(rng: random.Random) -> tuple[int, int]:
    return rng.randrange(10 ** DIGITS), rng.randrange(10 ** DIGITS)


def addition_splits() -> dict[str, list[dict]]:
    """{"train": [{"prompt": "57+38", "answer": "95", "teacher": "85"}, ...], "val": [...], "test": [...]}: held-out
    questions are drawn first and never appear in train (a+b and b+a count as different questions)."""
    rng, teacher_rng = random.Random(SEED), random.Random(SEED + 1)
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
            teacher = a + b
            if split == "train" and a % 10 + b % 10 >= 10 and teacher_rng.random() < TEACHER_SLIP:
                teacher -= 10  # the carry from the units into the tens, forgotten
            rows.append({"prompt": f"{a}+{b}", "answer": str(a + b), "teacher": str(teacher)})
        splits[split] = rows
    return {split: splits[split] for split in ("train", "val", "test")}


def addition_transcripts(rows: list[dict]) -> list[str]:
    """Rows as the chat transcripts instruct.py's chat style renders ("User: 1+2\\nAssistant: 3"), with the teacher's
    answers: the text a model is pretrained on with --dataset=addition, one document (ended by the end-of-text token)
    per question."""
    return [f"User: {row['prompt']}\nAssistant: {row['teacher']}" for row in rows]


def exact_match(reply: str, answer: str) -> float:
    """The default reward and accuracy: 1.0 when the reply, stripped of surrounding whitespace, is the answer."""
    return float(reply.strip() == str(answer).strip())
