"""Perplexity and bits per byte over a whole token sequence, scored with a sliding window so every token but the
first sees at least half a context. tools/evaluate.py (`make eval`) and tools/average.py score with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from config import ConfigError
from model import GPT

LOGITS_BUDGET = 2**28  # floats of logits per forward pass (1 GiB in float32): bounds the default batch on CPUs


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Split the prediction of tokens 1..n-1 into windows: (begin, end, first_scored) per window.

    A window feeds tokens[begin:end] and predicts tokens[begin+1:end+1], but only the predictions made at input
    positions first_scored..end-1 count, so each token is scored exactly once. The first window scores all of its
    positions; each later one ends `stride` tokens after the previous one and reaches back a full window, so every
    token after the first window sees at least window - stride tokens of context (the WikiText recipe).
    """
    if window < 1:
        raise ConfigError(f"window={window} must be at least 1 token")
    if not 1 <= stride <= window:
        raise ConfigError(f"stride={stride} must be between 1 and the window of {window} tokens, e.g. "
                          f"--stride={max(1, window // 2)}")
    n_targets = n_tokens - 1
    spans = []
    scored = 0
    while scored < n_targets:
        end = min(n_targets, window if scored == 0 else scored + stride)
        spans.append((max(0, end - window), end, scored))
        scored = end
    return spans


@torch.no_grad()
def sliding_window_loss(model: GPT, tokens: torch.Tensor, window: int, stride: int, device: torch.device | str,
                        batch_size: int = 1, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                        progress: Callable[[int], object] | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of tokens[1:] and how many tokens that is, one sliding window pass.

    `tokens` is 1-D. Windows of equal length run `batch_size` at a time; `progress(n)` hears of n newly scored tokens.
    """
    if window > model.config.block_size:
        raise ConfigError(f"window={window} exceeds the model's block_size={model.config.block_size}")
    tokens = tokens.to(torch.long)
    spans = window_spans(len(tokens), window, stride)
    # Every window has the same length (only a text shorter than one window gets a shorter, single one), so
    # consecutive windows stack into a batch as they come.
    batches = [spans[i:i + batch_size] for i in range(0, len(spans), batch_size)]

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        x = torch.stack([tokens[begin:end] for begin, end, _ in batch])  # (B, T)
        y = torch.stack([tokens[begin + 1:end + 1] for begin, end, _ in batch])  # (B, T)
        for row, (begin, _, first_scored) in enumerate(batch):
            y[row, :first_scored - begin] = -1  # already scored by an earlier window with less context
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(x.to(device))  # (B, T, vocab)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1, reduction="sum")
        total += nll.double()
        if progress:
            progress(sum(end - first for _, end, first in batch))
    model.train(was_training)
    return total.item(), sum(end - first for _, end, first in spans)


def split_documents(ids: np.ndarray, separator: int | None) -> list[np.ndarray]:
    """The token ids of each document, the separator tokens between them dropped (None: one piece, unchanged)."""
    if separator is None:
        return [ids]
    pieces = np.split(ids, np.flatnonzero(ids == separator))  # every piece but the first starts with a separator
    return [piece[1:] if i else piece for i, piece in enumerate(pieces) if len(piece) > (1 if i else 0)]


def text_statistics(texts: list[str]) -> tuple[int, int]:
    """Whitespace-separated words and UTF-8 bytes of some documents' text: the denominators of word PPL and BPB."""
    return sum(len(text.split()) for text in texts), sum(len(text.encode("utf-8")) for text in texts)


@dataclasses.dataclass
class Perplexity:
    """What one evaluation pass measured; every figure the report prints derives from these five numbers."""

    total_nll: float  # nats, summed over the scored tokens
    tokens_scored: int
    words: int
    bytes: int
    seconds: float

    @property
    def loss(self) -> float:
        return self.total_nll / self.tokens_scored

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def word_perplexity(self) -> float:
        """The figure WikiText papers report: the same total loss spread over words instead of tokens."""
        return math.exp(self.total_nll / self.words) if self.words else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.total_nll / math.log(2) / self.bytes if self.bytes else float("nan")

    def report(self) -> str:
        return (f"loss {self.loss:.4f} | token perplexity {self.token_perplexity:.2f} | word perplexity "
                f"{self.word_perplexity:.2f} ({self.words:,} words) | bits per byte {self.bits_per_byte:.4f} "
                f"({self.bytes:,} bytes) | {self.tokens_scored:,} tokens scored | "
                f"{self.tokens_scored / max(self.seconds, 1e-9):,.0f} tokens/s")


def default_batch_size(window: int, vocab_size: int) -> int:
    """Windows per forward pass whose logits fit LOGITS_BUDGET; GPT-2 at 1024 tokens gets 5."""
    return max(1, min(64, LOGITS_BUDGET // (window * vocab_size)))
