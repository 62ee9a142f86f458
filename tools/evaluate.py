"""Perplexity of a trained checkpoint or of OpenAI's GPT-2 over a whole split, scored with a sliding window.

    python -m tools.evaluate --split=val            # the latest run (or --ckpt=PATH, --run=NAME); make eval
    python -m tools.evaluate --init_from=gpt2 --dataset=wikitext2 --split=test --stride=512

The scoring itself (sliding windows, bits per byte) is gptkit/perplexity.py.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
from config import Config, ConfigError, DataConfig, UserError
from gptkit import loading
from gptkit.cli import parse_args, run_cli
from gptkit.loading import load_model
from gptkit.perplexity import (
    Perplexity,
    default_batch_size,
    sliding_window_loss,
    split_documents,
    text_statistics,
    window_spans,
)
from gptkit.runtime import setup_runtime
from model import GPT

OPTIONS = {
    "ckpt": "",  # a checkpoint file or run folder; default: the best checkpoint of the most recent run
    "run": "",  # a run name under checkpoints/
    "split": "val",  # val or test
    "stride": 0,  # tokens the window moves each time; 0: half the context, so every token sees at least half of it
    "max_tokens": 0,  # score only the split's first N tokens; 0: all of them
}


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
    if config.train.init_from != "scratch":
        loading.check_pretrained_form(config.model, overridden)  # e.g. --arch=llama, before downloading GPT-2
    loaded = load_model(config.train.init_from, ckpt=options["ckpt"], run=options["run"])
    loading.check_overrides(loaded.model_config, config.model, overridden)
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
    parsed = parse_args(sys.argv[1:] if argv is None else argv, extra=OPTIONS)
    config, options, overridden = parsed
    if options["split"] not in ("val", "test"):
        raise ConfigError(f"split={options['split']!r} is not one of val, test")
    subject = load_subject(config, options, overridden)
    model = subject.model
    window = model.config.block_size
    stride = options["stride"] or window // 2  # half the context: every token sees at least window/2 tokens
    window_spans(window + 1, window, stride)  # reject a bad --stride before preparing any data

    data_dir = data.prepare(subject.data, window, subject.explicit_dataset, tokenizer=subject.tokenizer)
    meta = data.read_meta(data_dir)
    if meta["tokenizer"] != subject.tokenizer:
        same_name = meta["tokenizer"].get("name") == subject.tokenizer.get("name")
        what = "a different vocabulary" if same_name else f"the {meta['tokenizer'].get('name')} tokenizer"
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
