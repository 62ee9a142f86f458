"""docs/book-map.md's parameter counts, recomputed from model.py: GPT-2 here against the book's GPTModel.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_book_map.py
"""

import dataclasses
from pathlib import Path

import torch

from classify import GPTClassifier
from config import PRESETS
from model import GPT, count_parameters

REPO = Path(__file__).resolve().parents[1]
BOOK_MAP = (REPO / "docs" / "book-map.md").read_text(encoding="utf-8")


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_counts_of_gpt2_here_and_in_the_book_are_the_pages():
    config = PRESETS["gpt2"]().model
    with torch.device("meta"):  # the sizes without the memory
        tied, untied = GPT(config), GPT(dataclasses.replace(config, tie_embeddings=False))
        classifier = GPTClassifier(GPT(config), 2)
    qkv_biases = sum(block.attn.c_attn.bias.numel() for block in tied.transformer.h)
    embedding = config.vocab_size * config.n_embd
    counts = {"here": parameters(tied), "book_tied": parameters(tied) - qkv_biases,
              "book_untied": parameters(tied) - qkv_biases + embedding, "untied": parameters(untied),
              "qkv_biases": qkv_biases, "embedding": embedding, "classifier": parameters(classifier),
              "block_here": parameters(tied.transformer.h[0]),
              "block_book": parameters(tied.transformer.h[0]) - tied.transformer.h[0].attn.c_attn.bias.numel()}
    assert counts["here"] == count_parameters(config) == 124_439_808
    assert counts["book_tied"] == 124_412_160 and counts["book_untied"] == 163_009_536  # the book's own figures
    for name, count in counts.items():
        assert f"{count:,}" in BOOK_MAP, f"{name}: {count:,} not in docs/book-map.md"


def test_the_tiny_presets_counts_and_the_chapter_5_rows_are_the_pages():
    tiny = PRESETS["tiny"]()
    char = tiny.model.apply_arch()  # GPT-2's form, as tour.py model shows it
    counts = {"tour_model": count_parameters(dataclasses.replace(char, vocab_size=65)),
              "gpt2_tokens": count_parameters(dataclasses.replace(char, vocab_size=50257)),
              "embedding": 50257 * char.n_embd,
              "chapter_5_row": count_parameters(dataclasses.replace(char, vocab_size=50257, n_embd=64, block_size=64)),
              "chapter_5_embedding": 50257 * 64}
    preset = PRESETS["tiny"]()
    if preset.data.tokenizer.startswith("bpe:"):
        preset.model.vocab_size = int(preset.data.tokenizer.partition(":")[2])
        counts["make_train"] = count_parameters(preset.model)
    for name, count in counts.items():
        assert f"{count:,}" in BOOK_MAP, f"{name}: {count:,} not in docs/book-map.md"
