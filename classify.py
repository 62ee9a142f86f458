"""Fine-tune a GPT into a text classifier (the book's chapter 6), optionally with LoRA adapters (appendix E).

    python classify.py                                               # offline default: Shakespeare genres
    python classify.py --init_from=checkpoints/<run>/best.pt --dataset=PATH --text_column=text --label_column=label
    python classify.py --init_from=gpt2 --dataset=hf:ucirvine/sms_spam --text_column=sms --label_column=label
    python classify.py --ckpt=checkpoints/<classifier-run>/best.pt --predict="WINNER!! Claim your prize now"

The LM head is replaced by a Linear(n_embd, classes) read at the last real token of each text: under the causal
mask that is the one position that has seen the whole text, and padding after it cannot change what it saw.
Training is train.py's loop (mixed precision, AdamW, warmup and cosine decay, clipping, skipped non-finite steps,
early stopping, atomic verified checkpoints, exact --resume); this file holds what is the task's own: the data, the
classifier, its metrics and its finish. The run starts as instruct.py's does (gptkit/finetune.py).
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import csv
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import lora
from config import Config, ConfigError, UserError
from gptkit import checkpoint, finetune, runinfo, sources
from gptkit.cli import ParsedArgs, run_cli
from gptkit.runtime import Runtime, StopRequest, setup_runtime
from model import GPT
from train import Evaluation, Run, end_of_training, start_fine_tuning, train_loop

OPTIONS = {
    "label_column": "label",  # the column (or JSON field) holding each text's class
    "test_fraction": 0.2,  # with val_fraction: the shares held out when the source has no such splits
    "balance": False,  # undersample every class to the smallest one, as the book does
    "trainable": "all",  # head | last_block | last_N (e.g. last_2) | all; all measured best offline (README)
    "lora_rank": 0,  # > 0: LoRA adapters on attention and MLP; only they and the head train
    "lora_alpha": 16.0,  # LoRA's scale: the adapters' update is multiplied by lora_alpha / lora_rank
    "merge": False,  # with LoRA: also write merged.pt, the adapters folded into the weights
    "epochs": 0,  # 0: --max_iters when given, else 3 passes over the training split
    "passages_per_play": 40,  # the Shakespeare-genres default: passages taken from each play
    "examples_per_class": 300,  # --dataset=shakespeare-or-chat: lines taken of each kind
    "ckpt": "",  # a classifier checkpoint, for --predict / --predict_file
    "predict": "",  # a text to classify with --ckpt, instead of training
    "predict_file": "",  # a file to classify line by line with --ckpt, instead of training
}
DEFAULT_DATASET = "shakespeare-genres"
# An easy task for the learning path's minute, by word choice as the book's spam is: a line of Shakespeare or a turn of
# a modern chatbot dialogue. The genres need a better-trained model (docs/fine-tuning.md: 74% after 3 epochs).
STYLE_DATASET = "shakespeare-or-chat"
DEFAULT_EPOCHS = 3
# Fine-tuning settings where the command line gives none (the book's: AdamW at 5e-5, weight decay 0.1, batch 8);
# the learning rate is the best of 5e-5, 5e-4 and 2e-3 on the offline task's validation split (README).
DEFAULTS = {"batch_size": 8, "learning_rate": 5e-4, "min_lr": 5e-5, "weight_decay": 0.1, "warmup_iters": 20,
            "eval_interval": 100, "log_interval": 20, "dataset": DEFAULT_DATASET,
            "optimizer": "adamw", "lr_schedule": "cosine"}  # the book's AdamW and cosine, whatever the preset says
PASSAGE_CHARS = 400  # a Shakespeare passage: whole lines up to about this many characters
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------------------------
# The model: a GPT whose head scores classes at the last real token


class GPTClassifier(nn.Module):
    """GPT's blocks with a class head instead of the LM head: logits (B, classes) from the last real token."""

    def __init__(self, gpt: GPT, n_classes: int):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, n_classes)

    def logits(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """idx (B, T) right-padded token ids, lengths (B,) real tokens per row -> class logits (B, classes)."""
        x = self.gpt.hidden_states(self.gpt.transformer.wte(idx))  # (B, T, C)
        last = x[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C): has seen the whole text
        return self.head(last)

    def forward(self, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy over the batch; target (B, 2) holds each row's label and its length, so that
        train.train_step can call model(x, y) as it does for a language model."""
        return F.cross_entropy(self.logits(idx, target[:, 1]).float(), target[:, 0])


def set_trainable(classifier: GPTClassifier, trainable: str, lora_rank: int, lora_alpha: float) -> int:
    """Freeze what does not train and return how many parameters do.

    head: the head alone; last_block (the book's choice): the last block, the final LayerNorm and the head; last_N: the
    last N blocks too; all: everything. With LoRA, adapters on every block's matrices and the head, nothing else.
    """
    gpt = classifier.gpt
    if lora_rank:
        lora.add_lora(gpt, lora_rank, lora_alpha)
    else:
        n_blocks = {"head": 0, "all": len(gpt.transformer.h)}.get(trainable)
        if n_blocks is None:  # last_N
            n_blocks = int(trainable.removeprefix("last_"))
        gpt.requires_grad_(trainable == "all")
        if n_blocks:
            for block in gpt.transformer.h[len(gpt.transformer.h) - n_blocks:]:
                block.requires_grad_(True)
            gpt.transformer.ln_f.requires_grad_(True)
    classifier.head.requires_grad_(True)
    return sum(p.numel() for p in classifier.parameters() if p.requires_grad)


def parse_trainable(value: str, n_layer: int) -> str:
    """head, all, last_block (= last_1) or last_N with 1 <= N <= n_layer; else a ConfigError naming the choices."""
    if value in ("head", "all"):
        return value
    if value == "last_block":
        return "last_1"
    n = value.removeprefix("last_")
    if value.startswith("last_") and n.isdigit() and 1 <= int(n) <= n_layer:
        return value
    raise ConfigError(f"trainable={value!r} is not one of head, last_block, last_N (N from 1 to {n_layer}), all")


# ----------------------------------------------------------------------------------------------------------------
# Data: texts and labels, split three ways


@dataclass
class Split:
    texts: list[str]
    labels: list[str]


def read_rows(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """(text, label) pairs from a .csv, .tsv, .jsonl or .parquet file; labels as strings (ints become "0", "1")."""
    if not path.is_file():
        raise UserError(f"dataset {path} does not exist; give a .csv, .tsv, .jsonl or .parquet file, hf:owner/name, "
                        f"{DEFAULT_DATASET} or {STYLE_DATASET}")
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            rows, columns = list(reader), reader.fieldnames or []
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        columns = sorted({key for row in rows for key in row}) if rows else []
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        rows, columns = table.to_pylist(), table.column_names
    else:
        raise UserError(f"{path} is not a .csv, .tsv, .jsonl or .parquet file; convert it to one of those")
    check_columns(str(path), columns, text_column, label_column)
    return [(str(row[text_column] or ""), str(row[label_column])) for row in rows]


def check_columns(where: str, columns: list[str], text_column: str, label_column: str) -> None:
    for option, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in columns:
            raise UserError(f"{where} has no column {column!r}; use --{option}= one of {', '.join(columns)}")


def read_hf(dataset: str, text_column: str, label_column: str) -> dict[str, list[tuple[str, str]]]:
    """The splits of a Hugging Face data set (hf:owner/name or hf:owner/name:config), with label names kept."""
    splits = {}
    for split, rows in sources.hf_splits(dataset, ".csv/.jsonl/.parquet").items():
        check_columns(dataset, rows.column_names, text_column, label_column)
        names = getattr(rows.features.get(label_column), "names", None)  # ClassLabel: ints with names
        splits[split] = [(str(t or ""), names[lab] if names else str(lab))
                         for t, lab in zip(rows[text_column], rows[label_column])]
    return splits


def shakespeare_genre_rows(passages_per_play: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Passages of the First Folio's plays labelled comedy, history or tragedy, split by play: the validation and
    test plays are never seen in training, so the classifier must learn the genre, not the characters' names."""
    rng = np.random.default_rng(seed)
    plays = sources.shakespeare_plays_by_genre()
    held_out = {}
    for genre in sources.FIRST_FOLIO:
        names = sorted(p for p, (g, _) in plays.items() if g == genre)
        order = rng.permutation(len(names))
        held_out.update({names[order[0]]: "val", names[order[1]]: "val", names[order[2]]: "test",
                         names[order[3]]: "test"})
    splits: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for play, (genre, text) in sorted(plays.items()):
        passages = passages_of(text)
        take = rng.choice(len(passages), size=min(passages_per_play, len(passages)), replace=False)
        splits[held_out.get(play, "train")] += [(passages[i], genre) for i in sorted(take)]
    return splits


def shakespeare_or_chat_rows(per_class: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """`per_class` lines of the First Folio's plays (three words or more, not a speaker's name) labelled
    shakespeare and as many turns of chatterbot-corpus's English dialogues labelled chat, for split_rows's random cut.
    Both are a sentence or two long, so the length tells nothing: the words must (thou, doth; computer, okay)."""
    rng = np.random.default_rng(seed)
    lines = [line.strip() for _, (_, text) in sorted(sources.shakespeare_plays_by_genre().items())
             for line in text.splitlines() if len(line.split()) >= 3 and not line.strip().isupper()]
    turns = [turn.strip() for conversations in sources.chatterbot_conversations().values()
             for conversation in conversations for turn in conversation if len(turn.split()) >= 3]
    rows = []
    for label, texts in (("shakespeare", lines), ("chat", turns)):
        take = rng.choice(len(texts), size=min(per_class, len(texts)), replace=False)
        rows += [(texts[i], label) for i in sorted(take)]
    return {"train": [rows[i] for i in rng.permutation(len(rows))]}


def passages_of(text: str) -> list[str]:
    """Consecutive whole lines of about PASSAGE_CHARS characters each (short leftovers dropped)."""
    passages, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= PASSAGE_CHARS:
            passages.append(current.strip())
            current = ""
    return [p for p in passages if len(p) >= PASSAGE_CHARS // 2]


def split_rows(rows: dict[str, list[tuple[str, str]]], val_fraction: float, test_fraction: float,
               seed: int) -> dict[str, list[tuple[str, str]]]:
    """The source's own splits where it has them, else a seeded shuffle cut into train, val and test."""
    if "val" in rows and "test" in rows:
        return rows
    rng = np.random.default_rng(seed)
    pool = rows["train"]
    order = rng.permutation(len(pool))
    n_test = int(len(pool) * test_fraction) if "test" not in rows else 0
    n_val = int(len(pool) * val_fraction) if "val" not in rows else 0
    splits = {"train": [pool[i] for i in order[n_test + n_val:]]}
    splits["val"] = rows.get("val") or [pool[i] for i in order[n_test:n_test + n_val]]
    splits["test"] = rows.get("test") or [pool[i] for i in order[:n_test]]
    return splits


def balance(rows: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """Undersample every label to the count of the rarest one, keeping the rows' order."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(rows):
        by_label.setdefault(label, []).append(i)
    smallest = min(len(indices) for indices in by_label.values())
    keep = sorted(i for indices in by_label.values() for i in rng.choice(indices, smallest, replace=False))
    return [rows[i] for i in keep]


def load_examples(dataset: str, text_column: str, label_column: str, options: dict, val_fraction: float,
                  seed: int) -> tuple[dict[str, Split], list[str]]:
    """Every split's texts and labels, checked, and the label names (sorted; numbers in numeric order)."""
    if dataset == DEFAULT_DATASET:
        rows = shakespeare_genre_rows(options["passages_per_play"], seed)
    elif dataset == STYLE_DATASET:
        rows = shakespeare_or_chat_rows(options["examples_per_class"], seed)
    elif dataset.startswith("hf:"):
        rows = read_hf(dataset, text_column, label_column)
    else:
        rows = {"train": read_rows(Path(dataset).expanduser(), text_column, label_column)}
    rows = split_rows(rows, val_fraction, options["test_fraction"], seed)
    if options["balance"]:
        rows = {split: balance(pairs, seed) if pairs else pairs for split, pairs in rows.items()}
    for split, pairs in rows.items():
        for index, (text, _) in enumerate(pairs):
            if not text.strip():
                raise UserError(f"row {index} of the {split} split of {dataset} has an empty text; remove it or "
                                "fill it in")
    names = sorted({label for _, label in rows["train"]}, key=lambda n: (not n.lstrip("-").isdigit(), int(n)
                                                                          if n.lstrip("-").isdigit() else 0, n))
    if len(names) < 2:
        raise UserError(f"the train split of {dataset} has one class only ({names[0] if names else 'none'}); a "
                        "classifier needs two or more")
    for split in ("val", "test"):
        unseen = sorted({label for _, label in rows[split]} - set(names))
        if unseen:
            raise UserError(f"the {split} split of {dataset} has label {unseen[0]!r}, never seen in train; drop those "
                            "rows or add training examples of it")
        if not rows[split]:
            raise UserError(f"the {split} split of {dataset} is empty; raise --{'val' if split == 'val' else 'test'}"
                            "_fraction or add data")
    return {split: Split([t for t, _ in r], [lab for _, lab in r]) for split, r in rows.items()}, names


@dataclass
class Encoded:
    """One split as padded token ids (N, T), real lengths (N,) and class indices (N,)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    truncated: int  # texts cut at the context length


def encode_split(split: Split, tokenizer: data.Tokenizer, label_names: list[str], block_size: int) -> Encoded:
    rows = [tokenizer.encode(text) for text in split.texts]
    truncated = sum(len(r) > block_size for r in rows)
    rows = [r[:block_size] for r in rows]
    if any(not r for r in rows):
        raise UserError("a text encodes to no tokens; remove empty texts from the data")
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # padding: never read (see GPTClassifier.logits)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    index = {name: i for i, name in enumerate(label_names)}
    return Encoded(ids, torch.tensor([len(r) for r in rows]), torch.tensor([index[lab] for lab in split.labels]),
                   truncated)


def class_batches(examples: Encoded, batch_size: int, seed: int) -> finetune.EpochBatches:
    """Each training text once per epoch, in a fresh seeded order; a batch is padded to its longest text."""
    return finetune.EpochBatches(examples.lengths, batch_size, seed, lambda rows: batch_of(examples, rows))


def batch_of(examples: Encoded, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, longest) token ids, y (B, 2) label and length, for the given example indices."""
    lengths = examples.lengths[rows]
    x = examples.ids[rows, :int(lengths.max())]
    return x, torch.stack([examples.labels[rows], lengths], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Measuring: accuracy, the majority baseline, precision, recall, F1, the confusion matrix


@torch.no_grad()
def predict_split(classifier: GPTClassifier, examples: Encoded, runtime: Runtime, batch_size: int) -> torch.Tensor:
    """Class probabilities (N, classes) for every example of a split, in order."""
    was_training = classifier.training
    classifier.eval()
    probs = []
    for start in range(0, len(examples.labels), batch_size):
        x, y = batch_of(examples, torch.arange(start, min(start + batch_size, len(examples.labels))))
        with runtime.autocast():
            logits = classifier.logits(runtime.to_device(x), runtime.to_device(y[:, 1]))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    classifier.train(was_training)
    return torch.cat(probs)


def confusion_matrix(predicted: torch.Tensor, actual: torch.Tensor, n_classes: int) -> torch.Tensor:
    """counts[i, j]: examples of class i predicted as class j."""
    return torch.bincount(actual * n_classes + predicted, minlength=n_classes**2).view(n_classes, n_classes)


def per_class_scores(counts: torch.Tensor) -> list[dict[str, float]]:
    """Precision, recall and F1 of each class from a confusion matrix (0 where a denominator is 0)."""
    scores = []
    for c in range(counts.size(0)):
        true_positive = counts[c, c].item()
        predicted, actual = counts[:, c].sum().item(), counts[c].sum().item()
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append({"precision": precision, "recall": recall, "f1": f1, "support": actual})
    return scores


def accuracy(counts: torch.Tensor) -> float:
    return counts.diag().sum().item() / max(1, counts.sum().item())


def majority_accuracy(train_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of always answering the most common training class: the bar to beat."""
    return (labels == torch.bincount(train_labels).argmax()).float().mean().item()


def report_accuracies(classifier, encoded: dict[str, Encoded], runtime, batch_size, label_names, when: str,
                      log) -> dict[str, torch.Tensor]:
    counts = {}
    for split, examples in encoded.items():
        predicted = predict_split(classifier, examples, runtime, batch_size).argmax(dim=-1)
        counts[split] = confusion_matrix(predicted, examples.labels, len(label_names))
    log(f"accuracy {when}: " + ", ".join(
        f"{split} {accuracy(c):.2%} (majority {majority_accuracy(encoded['train'].labels, encoded[split].labels):.2%})"
        for split, c in counts.items()))
    return counts


def describe_scores(counts: torch.Tensor, label_names: list[str]) -> str:
    width = max(len(n) for n in label_names) + 2
    lines = [f"{'class':<{width}}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}"]
    for name, s in zip(label_names, per_class_scores(counts)):
        lines.append(f"{name:<{width}}{s['precision']:>10.3f}{s['recall']:>8.3f}{s['f1']:>8.3f}{s['support']:>9}")
    lines.append("confusion matrix (rows: actual, columns: predicted):")
    lines.append(" " * width + "".join(f"{n[:8]:>9}" for n in label_names))
    lines += [f"{name:<{width}}" + "".join(f"{v:>9}" for v in row) for name, row in zip(label_names, counts.tolist())]
    return "\n".join(lines)


def save_confusion_png(counts: torch.Tensor, label_names: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(1.2 * len(label_names) + 3, 1.2 * len(label_names) + 2))
    image = axes.imshow(counts.numpy(), cmap="Blues")
    for (i, j), value in np.ndenumerate(counts.numpy()):
        axes.text(j, i, str(value), ha="center", va="center",
                  color="white" if value > counts.max().item() / 2 else "black")
    axes.set_xticks(range(len(label_names)), label_names, rotation=30)
    axes.set_yticks(range(len(label_names)), label_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(title)
    figure.colorbar(image)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# Where the model comes from, and how a classifier checkpoint comes back


def classifier_from_checkpoint(payload: dict, path: Path) -> tuple[GPTClassifier, dict]:
    info = payload.get("classifier")
    if not info:
        raise UserError(f"{path} is a language model, not a classifier; train one with classify.py first "
                        "(generate.py samples from this one)")
    gpt = GPT(Config.from_dict(payload["config"]).model)
    classifier = GPTClassifier(gpt, len(info["label_names"]))
    if info["lora_rank"]:
        lora.add_lora(gpt, info["lora_rank"], info["lora_alpha"])
    classifier.load_state_dict(payload["model"])
    return classifier.eval(), info


def predict_texts(options: dict, config: Config) -> None:
    """--predict / --predict_file: the label and its probability for each text, one line each."""
    path = checkpoint.resolve_checkpoint(ckpt=options["ckpt"], run="", kinds=("classifier",))
    payload = checkpoint.load_checkpoint(path)
    classifier, info = classifier_from_checkpoint(payload, path)
    tokenizer = data.get_tokenizer(payload["tokenizer"])
    if options["predict_file"]:
        try:
            texts = Path(options["predict_file"]).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--predict_file={options['predict_file']} could not be read ({err})") from None
    else:
        texts = [options["predict"]]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("nothing to classify: --predict is empty, or --predict_file has only blank lines")
    runtime = setup_runtime(config.train.device, "float32")
    classifier.to(runtime.device)
    names = info["label_names"]
    encoded = encode_split(Split(texts, [names[0]] * len(texts)), tokenizer, names, classifier.gpt.config.block_size)
    probs = predict_split(classifier, encoded, runtime, 32)
    for text, row in zip(texts, probs):
        best = int(row.argmax())
        print(f"{names[best]}\t{row[best].item():.3f}" + (f"\t{text}" if options["predict_file"] else ""))


# ----------------------------------------------------------------------------------------------------------------
# Training


def resolve_config(argv: list[str]) -> ParsedArgs:
    """The command line over DEFAULTS, checked (gptkit/finetune.py); classify's own options are checked where used."""
    return finetune.parse(argv, OPTIONS, DEFAULTS, not_read={"fast_kernels": "classify.py runs model.py's plain path"})


@dataclass
class ClassifierTask:
    """A classification run: the loop's Run (train.py), and what the task holds beside it."""

    run: Run
    options: dict
    tokenizer: data.Tokenizer
    label_names: list[str]
    encoded: dict[str, Encoded]
    classifier: GPTClassifier
    info: dict  # what a classifier checkpoint records about itself: labels, what trains, LoRA, the base model


def start_run(parsed: ParsedArgs, argv: list[str]) -> ClassifierTask:
    """The data, the classifier with what trains, and the loop's Run around it: a new run from a pretrained model,
    or (--resume) the run in --out_dir from its newest checkpoint."""
    start = finetune.start(parsed, argv, kind="classifier", folder_prefix="classify", record_key="classifier")
    config, options = start.config, start.options
    train = config.train
    tokenizer = data.get_tokenizer(start.tokenizer)
    if start.saved is not None:
        info = start.saved["classifier"]
    else:
        info = {"trainable": parse_trainable(options["trainable"], config.model.n_layer),
                "lora_rank": options["lora_rank"], "lora_alpha": options["lora_alpha"], "base": start.base.source}
    splits, label_names = load_examples(config.data.dataset, config.data.text_column, options["label_column"],
                                        options, config.data.val_fraction, train.seed)
    block_size = config.model.block_size
    encoded = {split: encode_split(splits[split], tokenizer, label_names, block_size) for split in SPLITS}
    truncated = sum(e.truncated for e in encoded.values())
    print(f"data: {config.data.dataset}: " + ", ".join(f"{s} {len(e.labels)}" for s, e in encoded.items())
          + f" texts; classes {', '.join(label_names)}"
          + (f"; {truncated} texts longer than the context of {block_size} tokens were cut there" if truncated else ""))
    info["label_names"] = label_names

    runtime = setup_runtime(train.device, train.dtype)
    if runtime.distributed:
        raise UserError("classify.py runs in one process; start it with python, not torchrun")
    torch.manual_seed(train.seed)
    classifier = GPTClassifier(start.gpt, len(label_names))
    n_trainable = set_trainable(classifier, info["trainable"], info["lora_rank"], info["lora_alpha"])
    n_total = sum(p.numel() for p in classifier.parameters())
    what = f"adapters + head, LoRA rank {info['lora_rank']} alpha {info['lora_alpha']}" if info["lora_rank"] \
        else info["trainable"]
    print(f"model: {info['base']} + a {len(label_names)}-class head; trainable {what}: {n_trainable:,} of "
          f"{n_total:,} parameters ({n_trainable / n_total:.2%})")
    print(runtime.describe())
    finetune.set_max_iters(start, len(encoded["train"].labels), DEFAULT_EPOCHS)
    classifier.to(runtime.device)

    def record() -> dict:  # a classifier checkpoint's entries beside the loop's
        return {"tokenizer": tokenizer.to_dict(), "classifier": info, "options": options}

    run = start_fine_tuning(start, runtime, classifier, class_batches(encoded["train"], train.batch_size, train.seed),
                            record, kind="classifier")
    steps_per_epoch = finetune.steps_per_epoch(len(encoded["train"].labels), train)
    print(f"training: {train.max_iters} steps of {train.batch_size * train.gradient_accumulation_steps} texts = "
          f"{train.max_iters / steps_per_epoch:.1f} epochs, learning rate {train.learning_rate:g}")
    return ClassifierTask(run, options, tokenizer, label_names, encoded, classifier, info)


def measure(task: ClassifierTask) -> Evaluation:
    """Validation loss and accuracy now (train.py's evaluate keeps the best and saves)."""
    val = task.encoded["val"]
    probs = predict_split(task.classifier, val, task.run.runtime, task.run.config.train.batch_size)
    val_loss = F.nll_loss(probs.clamp_min(1e-12).log(), val.labels).item()
    val_accuracy = (probs.argmax(-1) == val.labels).float().mean().item()
    return Evaluation(val_loss, f"val loss {val_loss:.4f}, val accuracy {val_accuracy:.2%}",
                      {"val_accuracy": val_accuracy})


def finish(task: ClassifierTask, before: dict[str, torch.Tensor] | None) -> None:
    """Accuracy after training against before and the majority class, the test split's scores and confusion
    matrix (printed and confusion.png), results.json, loss.png, and with --merge the merged checkpoint."""
    run, names = task.run, task.label_names
    state, run_dir = run.state, run.run_dir
    ms_per_step = state.elapsed_s / max(1, state.step) * 1e3
    print(f"trained {state.step} steps in {state.elapsed_s:.1f} s ({ms_per_step:.1f} ms per step)")
    after = report_accuracies(task.classifier, task.encoded, run.runtime, run.config.train.batch_size, names,
                              "after training", print)
    print(f"test split, after training:\n{describe_scores(after['test'], names)}")
    save_confusion_png(after["test"], names, run_dir / "confusion.png",
                       f"test split: {accuracy(after['test']):.1%} accuracy")
    train_labels = task.encoded["train"].labels
    results = {split: {"before": accuracy(before[split]) if before else None, "after": accuracy(after[split]),
                       "majority": majority_accuracy(train_labels, task.encoded[split].labels)} for split in SPLITS}
    results["test_scores"] = dict(zip(names, per_class_scores(after["test"])))
    results["ms_per_step"] = ms_per_step
    results["trainable_parameters"] = sum(p.numel() for p in task.classifier.parameters() if p.requires_grad)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    runinfo.plot_run(run_dir)
    if task.options["merge"] and task.info["lora_rank"]:
        lora.merge_lora(task.classifier.gpt)
        merged = {"config": run.config.to_dict(), "model": task.classifier.state_dict(),
                  "tokenizer": task.tokenizer.to_dict(), "classifier": {**task.info, "lora_rank": 0},
                  "state": dataclasses.asdict(state)}
        checkpoint.save_checkpoint(run_dir / "merged.pt", merged)
        print(f"merged the adapters into the weights: {run_dir / 'merged.pt'}")
    print(f"done: test accuracy {accuracy(after['test']):.2%} (majority class {results['test']['majority']:.2%}); "
          f"{run_dir}/confusion.png, loss.png; predict with python classify.py --ckpt={run_dir} --predict=\"...\"")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parsed = resolve_config(argv)
    if parsed.options["predict"] or parsed.options["predict_file"]:
        predict_texts(parsed.options, parsed.config)
        return
    task = start_run(parsed, argv)
    run = task.run
    before = None
    if run.state.step == 0:
        before = report_accuracies(task.classifier, task.encoded, run.runtime, run.config.train.batch_size,
                                   task.label_names, "before training", print)
    stop = StopRequest()
    stop.install()
    stopped_early = train_loop(run, stop, measure=lambda: measure(task))
    if end_of_training(run, stop, stopped_early, lambda: measure(task),
                       f"python classify.py --resume --out_dir={run.run_dir}"):
        finish(task, before)


if __name__ == "__main__":
    run_cli(main)
