"""Perplexity of a trained checkpoint or of OpenAI's GPT-2 over a whole split, scored with a sliding window.

    python evaluate.py --split=val                                  # the latest run (or --ckpt=PATH, --run=NAME)
    python evaluate.py --init_from=gpt2 --dataset=wikitext2 --split=test --stride=512
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import hf
from checkpoint import load_model
from config import Config, ConfigError, DataConfig, UserError, parse_args, run_cli
from model import GPT
from runtime import setup_runtime

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


@dataclasses.dataclass
class Subject:
    """What is evaluated: the model, its tokenizer, the data to score it on, and a name for the report."""

    model: GPT
    tokenizer: dict  # {"name": "gpt2"} or {"name": "char", "chars": ...}, as checkpoints store it
    data: DataConfig
    explicit_dataset: bool  # False: WikiText-2 may fall back to Shakespeare offline, as it did in training
    name: str
    trained_on: str | None = None  # the data set's name at training time, when the checkpoint recorded it


def load_subject(config: Config, options: dict, overridden: frozenset[str]) -> Subject:
    """A pretrained model (--init_from=gpt2|PATH) on the command line's data, or a checkpoint on its training data."""
    loaded = load_model(config.train.init_from, ckpt=options["ckpt"], run=options["run"])
    hf.check_overrides(loaded.model_config, config.model, overridden)
    if loaded.saved_config is None:  # pretrained weights: the command line's data, in the model's tokenizer
        if "tokenizer" not in overridden:
            config.data.tokenizer = loaded.tokenizer["name"]
        return Subject(loaded.model, loaded.tokenizer, config.data, "dataset" in overridden, loaded.source)
    saved_data = loaded.saved_config.data
    for field in dataclasses.fields(DataConfig):  # the training data, unless the command line names other data
        if field.name in overridden:
            setattr(saved_data, field.name, getattr(config.data, field.name))
    return Subject(loaded.model, loaded.tokenizer, saved_data, "dataset" in overridden, loaded.source,
                   loaded.trained_on)


def main(argv: list[str] | None = None) -> Perplexity:
    parsed = parse_args(sys.argv[1:] if argv is None else argv,
                        extra={"ckpt": "", "run": "", "split": "val", "stride": 0, "max_tokens": 0})
    config, options, overridden = parsed
    if options["split"] not in ("val", "test"):
        raise ConfigError(f"split={options['split']!r} is not one of val, test")
    subject = load_subject(config, options, overridden)
    model = subject.model
    window = model.config.block_size
    stride = options["stride"] or window // 2  # half the context: every token sees at least window/2 tokens
    window_spans(window + 1, window, stride)  # reject a bad --stride before preparing any data

    data_dir = data.prepare(subject.data, window, explicit_dataset=subject.explicit_dataset)
    meta = data.read_meta(data_dir)
    if meta["tokenizer"] != subject.tokenizer:
        same_name = meta["tokenizer"].get("name") == subject.tokenizer.get("name")
        what = "a different character set" if same_name else f"the {meta['tokenizer'].get('name')} tokenizer"
        raise UserError(f"{data_dir} uses {what}, but {subject.name} was trained with the "
                        f"{subject.tokenizer.get('name')} tokenizer; evaluate it on its own data set")
    if meta["vocab_size"] > model.config.vocab_size:
        raise UserError(f"{data_dir} has {meta['vocab_size']} token ids but {subject.name} knows only "
                        f"{model.config.vocab_size}; evaluate it on data made with its tokenizer")
    if subject.trained_on and meta.get("dataset") != subject.trained_on:
        print(f"note: {subject.name} was trained on {subject.trained_on}; this evaluates it on {meta.get('dataset')}")
    if options["split"] not in meta["splits"]:
        raise UserError(f"{data_dir} has no {options['split']} split ({meta.get('dataset')} has "
                        f"{', '.join(meta['splits'])}); use --split=val")
    split_tokens = np.asarray(data.open_split(data_dir, options["split"]))
    if options["max_tokens"]:
        split_tokens = split_tokens[:options["max_tokens"]]
    if len(split_tokens) < 2:
        raise UserError(f"the {options['split']} split of {data_dir} has {len(split_tokens)} tokens; nothing to score")
    tokenizer = data.get_tokenizer(meta["tokenizer"])
    words, n_bytes = text_statistics([tokenizer.decode(document.tolist())
                                      for document in split_documents(split_tokens, tokenizer.eot_token)])

    # Evaluation defaults to float32: perplexities are compared with published ones to two decimals, and bf16
    # logits move them. --dtype=bfloat16 trades that for speed.
    runtime = setup_runtime(config.train.device, config.train.dtype if "dtype" in overridden else "float32")
    if "dtype" not in overridden:
        runtime.reason = "evaluate.py scores in float32 unless --dtype is given, as published perplexities are"
    model.to(runtime.device)
    batch_size = config.train.batch_size if "batch_size" in overridden else \
        default_batch_size(window, model.config.vocab_size)
    print(f"evaluating {subject.name} on the {options['split']} split of {data_dir}: {len(split_tokens):,} tokens, "
          f"window {window}, stride {stride}, {batch_size} windows per batch")
    print(runtime.describe())
    tokens = torch.from_numpy(split_tokens.astype(np.int64))
    start = time.perf_counter()
    with tqdm(total=len(tokens) - 1, unit="tok", unit_scale=True, disable=None, file=sys.stderr) as bar:
        total_nll, scored = sliding_window_loss(model, tokens, window, stride, runtime.device, batch_size,
                                                runtime.autocast, bar.update)
    runtime.synchronize()
    result = Perplexity(total_nll, scored, words, n_bytes, time.perf_counter() - start)
    print(result.report())
    return result


if __name__ == "__main__":
    run_cli(main)
