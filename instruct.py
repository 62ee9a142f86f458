"""Instruction fine-tuning (the book's chapter 7): teach a pretrained GPT to answer an instruction, then save its
answers to the test entries and, optionally, have a larger local model score them.

    python instruct.py                                   # offline default: chatterbot-corpus dialogues, latest run
    python instruct.py --init_from=checkpoints/<run>/best.pt --dataset=PATH.json
    python instruct.py --init_from=gpt2-medium --dataset=hf:tatsu-lab/alpaca
    python instruct.py --dataset=chats.jsonl             # {"messages": [...]} per line: whole conversations
    python generate.py --ckpt=checkpoints/<instruct-run>/best.pt --instruction="Rewrite in passive voice" \\
        --input="The cat ate the fish."

Read in order: the data (files, `hf:`, the offline default; the prompt styles are gptkit/prompts.py's), the
batches (padded per batch, the loss kept off padding and, with --mask_prompt, off the prompt), the responses and
the judge, and the run: it starts as classify.py's does (gptkit/finetune.py) and trains in train.py's loop.
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import json
import random
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import generate
import lora
from config import ConfigError, UserError, error_summary
from gptkit import fast, finetune, posttrain, prompts, runinfo, sources, tasks
from gptkit.cli import ParsedArgs, parse_bool, run_cli
from gptkit.prompts import format_prompt
from gptkit.runtime import Runtime, StopRequest, setup_runtime
from model import GPT
from train import Evaluation, Run, end_of_training, perplexity, start_fine_tuning, train_loop

OPTIONS = {
    "prompt_style": "auto",  # alpaca (the book's) or chat; auto: chat for messages conversations, else alpaca
    "mask_prompt": False,  # True: the loss counts only the response's tokens; False measured better offline (README)
    "epochs": 0,  # 0: --max_iters when given, else 2 passes over the training split (the book's)
    "instruction_column": "instruction",  # the field holding each entry's task
    "input_column": "input",  # the field holding its optional input
    "output_column": "output",  # the field holding the answer the model learns
    "test_fraction": 0.05,  # with val_fraction: the shares held out when the source has no such splits
    "lora_rank": 0,  # > 0: LoRA adapters on attention and MLP; only they train
    "lora_alpha": 16.0,  # LoRA's scale: the adapters' update is multiplied by lora_alpha / lora_rank
    "max_new_tokens": 100,  # the longest response generated for responses.json
    "judge_url": "",  # an Ollama-compatible server, e.g. http://localhost:11434: scores each response 0-100
    "judge_model": "llama3",  # the judge server's model that scores the responses
}
DEFAULT_DATASET = "chatterbot"
DEFAULT_EPOCHS = 2  # the book's
# The book's settings (AdamW at 5e-5, weight decay 0.1, batch 8) where the command line gives none, but with the
# learning rate measured on the offline default (README): a small model pretrained briefly needs larger steps.
DEFAULTS = {"batch_size": 8, "learning_rate": 2e-3, "min_lr": 2e-4, "weight_decay": 0.1, "warmup_iters": 20,
            "eval_interval": 100, "log_interval": 20, "val_fraction": 0.1, "dataset": DEFAULT_DATASET,
            "optimizer": "adamw", "lr_schedule": "cosine"}  # the book's AdamW and cosine, whatever the preset says
SPLITS = ("train", "val", "test")
PROMPT_STYLES = ("auto", *prompts.PROMPT_STYLES)
IGNORE = -1  # a target the loss skips (model.py's F.cross_entropy(ignore_index=-1))


# ----------------------------------------------------------------------------------------------------------------
# Data: entries of instruction, input and output, or whole conversations, split three ways


@dataclass
class Entry:
    instruction: str
    input: str
    output: str


@dataclass
class Conversation:
    """A whole chat, trained as one sequence: the loss counts every assistant reply (and the end token after it)
    and nothing else. Its last question and reply stand in for an entry's instruction and output where a test
    response is written and judged."""

    messages: list[dict]  # {"role": "system" | "user" | "assistant", "content": ...}, ending with a reply

    @property
    def instruction(self) -> str:
        return next((m["content"] for m in reversed(self.asked()) if m["role"] == "user"), "")

    @property
    def input(self) -> str:
        return ""

    @property
    def output(self) -> str:
        return self.messages[-1]["content"]

    def asked(self) -> list[dict]:
        """The conversation up to its last reply: what a test response answers."""
        return self.messages[:-1]

    def opening(self) -> tuple:
        """The messages before the first reply: conversations that open alike are kept in one split."""
        first_reply = next(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return tuple((m["role"], m["content"]) for m in self.messages[:first_reply])


def entries_from_records(records: object, where: str, columns: dict[str, str]) -> list[Entry | Conversation]:
    """JSON records -> entries. Each record is {instruction, input (optional), output} (names from --*_column), or
    {"messages": [{"role", "content"}, ...]}, a conversation trained whole."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{where} is not a list of objects; give a JSON list like [{{\"instruction\": ..., "
                        "\"output\": ...}, ...] or JSON Lines with one such object per line")
    entries = []
    for index, record in enumerate(records):
        if "messages" in record:
            entries.append(conversation_from_messages(record["messages"], f"{where}, entry {index}"))
            continue
        missing = [columns[key] for key in ("instruction", "output") if not str(record.get(columns[key]) or "")]
        if missing:
            option = "instruction_column" if missing[0] == columns["instruction"] else "output_column"
            raise UserError(f"{where}: entry {index} has no {missing[0]!r} (it has {', '.join(record) or 'nothing'})"
                            f"; fill it in or remove it, or name the field with --{option}=...")
        entries.append(Entry(str(record[columns["instruction"]]), str(record.get(columns["input"]) or ""),
                             str(record[columns["output"]])))
    return entries


def conversation_from_messages(messages: object, where: str) -> Conversation:
    """A chat's messages, checked; what follows its last assistant reply is left out (nothing there to learn)."""
    messages = prompts.check_messages(messages, f"{where}: messages")
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise UserError(f"{where}: the conversation has no assistant message to learn from; add the reply or "
                        "remove the entry")
    return Conversation(messages[:replies[-1] + 1])


def read_entries(path: Path, columns: dict[str, str]) -> list[Entry]:
    """A .json file (a list of records) or a .jsonl file (one record per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--dataset={path} does not exist; give a .json or .jsonl file, hf:owner/name, or leave "
                        f"it out for the offline default ({DEFAULT_DATASET})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--dataset={path} could not be read as UTF-8 text ({err})") from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--dataset={path} is not valid JSON{' Lines' if path.suffix == '.jsonl' else ''} "
                        f"({err}); fix the file") from None
    return entries_from_records(records, str(path), columns)


def read_hf(dataset: str, columns: dict[str, str]) -> dict[str, list[Entry]]:
    """The splits of a Hugging Face data set with these columns (or a `messages` column)."""
    return {split: entries_from_records(rows.to_list(), f"{dataset} ({split})", columns)
            for split, rows in sources.hf_splits(dataset, ".json/.jsonl").items()}


def chatterbot_entries() -> list[Entry]:
    """chatterbot-corpus's English dialogues (BSD-3-Clause, from the package index): each turn and the reply to it
    become one entry, about 2,000 of them, from greetings and trivia to tech support."""
    entries = []
    for conversations in sources.chatterbot_conversations().values():
        for turns in conversations:
            entries += [Entry(ask, "", answer) for ask, answer in zip(turns, turns[1:]) if ask and answer]
    return entries


def prompt_of(entry: Entry | Conversation) -> tuple:
    """What the model is asked: entries with the same one are kept in one split."""
    return entry.opening() if isinstance(entry, Conversation) else (entry.instruction, entry.input)


def split_entries(entries: list[Entry], fractions: dict[str, float], seed: int) -> dict[str, list[Entry]]:
    """train and the held-out splits named in `fractions` ({"val": 0.1, "test": 0.05}), by seeded shares, for a
    source without its own. Entries with the same prompt (instruction and input; a conversation's opening) stay
    together, so no held-out prompt is one the model was trained on (chatterbot asks "What is AI?" five times);
    entries that share only the instruction ("Translate into French" with a different sentence each) may be split
    apart."""
    groups: dict[tuple, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(prompt_of(entry), []).append(entry)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    parts, start = {}, 0
    for split, fraction in fractions.items():
        count = max(1, round(len(keys) * fraction))
        parts[split], start = keys[start:start + count], start + count
    parts["train"] = keys[start:]
    if not parts["train"]:
        raise UserError(f"{len(entries)} entries ({len(keys)} distinct prompts) are too few to hold out "
                        + " and ".join(f"{split} ({fraction:g})" for split, fraction in fractions.items())
                        + " and keep some to train on; give more entries")
    return {split: [entry for key in keys_of_split for entry in groups[key]] for split, keys_of_split in parts.items()}


def load_splits(dataset: str, options: dict, val_fraction: float, seed: int) -> dict[str, list[Entry]]:
    """The train, val and test entries of --dataset (a file, hf:..., or the offline default): the source's own
    splits, the missing ones held out of train."""
    columns = {key: options[f"{key}_column"] for key in ("instruction", "input", "output")}
    if dataset == DEFAULT_DATASET:
        splits = {"train": chatterbot_entries()}
    elif dataset == tasks.ADDITION:  # the built-in verifiable task: its own splits, its teacher's answers (tasks.py)
        return {split: [Entry(row["prompt"], "", row["teacher"]) for row in rows]
                for split, rows in tasks.addition_splits().items()}
    elif dataset.startswith("hf:"):
        splits = read_hf(dataset, columns)
    else:
        splits = {"train": read_entries(Path(dataset), columns)}
    if not splits["train"]:
        raise UserError(f"--dataset={dataset} holds no entries; give a file with at least a few dozen")
    missing = {split: fraction for split, fraction in (("val", val_fraction), ("test", options["test_fraction"]))
               if split not in splits}
    if missing:
        splits = {**splits, **split_entries(splits["train"], missing, seed)}
    return splits


# ----------------------------------------------------------------------------------------------------------------
# Tokens and batches: prompt + response + end token (or a whole conversation), padded per batch, the loss kept off
# the padding

# What each token of an example is to the loss, as a target:
CONTEXT = 0  # never: a conversation's system and user turns and the assistant's marker, and the padding
PROMPT = 1  # an entry's prompt: only without --mask_prompt (the book trains on it)
RESPONSE = 2  # always: a response or an assistant reply, and the end token after it (the model must learn to stop)


@dataclass
class Encoded:
    ids: list[list[int]]  # an entry's prompt, response and end token, or a whole conversation; cut at the context
    kinds: list[list[int]]  # CONTEXT, PROMPT or RESPONSE for each of those ids
    truncated: int  # entries cut at the context
    dropped: int  # entries with nothing of a response within the context


def record_template(info: dict, train_entries: list[Entry | Conversation], tokenizer: data.Tokenizer) -> None:
    """Settle the run's prompt style and record its chat template in `info`, the checkpoint's "instruct" entry that
    chat.py and serve.py read. --prompt_style=auto is chat for a data set with conversations, alpaca (the book's)
    otherwise. A conversation's loss is on its replies alone, so a data set of conversations only records that as
    mask_prompt."""
    conversations = sum(isinstance(entry, Conversation) for entry in train_entries)
    if info["prompt_style"] == "auto":  # the built-in task's questions are short: its text is a chat transcript
        info["prompt_style"] = "chat" if conversations or info.get("dataset") == tasks.ADDITION else "alpaca"
    if conversations == len(train_entries):
        info["mask_prompt"] = True
    info["chat_template"] = prompts.chat_template(info["prompt_style"], tokenizer.eot_token).to_dict()


def encode_entry(entry: Entry | Conversation, tokenizer: data.Tokenizer, style: str) -> tuple[list[int], list[int]]:
    """An entry's ids and their kinds: the prompt in the style, the response, the end token. A conversation is
    rendered in the style's chat template (gptkit/prompts.py), as chat.py and serve.py will render it."""
    if isinstance(entry, Conversation):
        template = prompts.chat_template(style, tokenizer.eot_token)
        ids, is_reply = prompts.encode_conversation(template, entry.messages, tokenizer.encode)
        return ids, [RESPONSE if reply else CONTEXT for reply in is_reply]
    prompt = tokenizer.encode(format_prompt(style, entry.instruction, entry.input))
    response = tokenizer.encode(entry.output) + [tokenizer.eot_token]
    return prompt + response, [PROMPT] * len(prompt) + [RESPONSE] * len(response)


def encode_entries(entries: list[Entry | Conversation], tokenizer: data.Tokenizer, style: str,
                   block_size: int) -> Encoded:
    """Token ids for each entry; a sequence of block_size + 1 tokens gives block_size inputs and targets."""
    encoded = Encoded([], [], 0, 0)
    for entry in entries:
        ids, kinds = encode_entry(entry, tokenizer, style)
        if RESPONSE not in kinds[1:block_size + 1]:  # no target of a response would be left within the context
            encoded.dropped += 1
            continue
        if len(ids) > block_size + 1:
            ids, kinds, encoded.truncated = ids[:block_size + 1], kinds[:block_size + 1], encoded.truncated + 1
        encoded.ids.append(ids)
        encoded.kinds.append(kinds)
    return encoded


def collate(sequences: list[list[int]], kinds: list[list[int]], end_token: int,
            mask_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, longest - 1): padded with the end token to the batch's longest sequence, not to the context.

    y is x shifted by one, as in pretraining. Each row keeps its own end token as a target (the model must learn
    to stop) and ignores the padding after it and every CONTEXT token. With mask_prompt the targets inside an
    entry's prompt are ignored too: the first target kept is the response's first token, predicted from the
    prompt's last position.
    """
    longest = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), longest), end_token, dtype=torch.long)
    kind = torch.full((len(sequences), longest), CONTEXT, dtype=torch.long)  # the padding is never a target
    for row, (sequence, sequence_kinds) in enumerate(zip(sequences, kinds)):
        padded[row, :len(sequence)] = torch.tensor(sequence)
        kind[row, :len(sequence)] = torch.tensor(sequence_kinds)
    x, y = padded[:, :-1], padded[:, 1:].clone()
    target_kind = kind[:, 1:]  # target j is token j + 1
    y[target_kind == CONTEXT] = IGNORE
    if mask_prompt:
        y[target_kind == PROMPT] = IGNORE
    return x, y


def batches_for(encoded: Encoded, batch_size: int, seed: int, end_token: int,
                mask_prompt: bool) -> finetune.EpochBatches:
    def make_batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.tolist()
        return collate([encoded.ids[r] for r in rows], [encoded.kinds[r] for r in rows], end_token, mask_prompt)
    real_tokens = torch.tensor([len(ids) - 1 for ids in encoded.ids])  # the inputs of each row, not its padding
    return finetune.EpochBatches(real_tokens, batch_size, seed, make_batch)


@torch.no_grad()
def response_loss(model: GPT, encoded: Encoded, runtime: Runtime, batch_size: int, end_token: int) -> float:
    """Mean cross-entropy over every response token (and its end token) of a split, the prompt never counted: the
    same measure whichever --mask_prompt trained the model."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded.ids), batch_size):
        rows = range(start, min(start + batch_size, len(encoded.ids)))
        x, y = collate([encoded.ids[r] for r in rows], [encoded.kinds[r] for r in rows], end_token, True)
        scored = int((y != IGNORE).sum())
        with runtime.autocast():
            total += model(runtime.to_device(x), runtime.to_device(y)).float().item() * scored
        count += scored
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------------------
# Responses, and the judge that scores them


def respond(model: GPT, tokenizer: data.Tokenizer, template: prompts.ChatTemplate, entry: Entry | Conversation,
            max_new_tokens: int) -> str:
    """The model's greedy response to one entry (a conversation's last question) in the run's recorded chat
    template, fitted to the context by chat.py's rule, up to its end token or the template's next header."""
    device = model.lm_head.weight.device
    messages = entry.asked() if isinstance(entry, Conversation) else \
        [{"role": "user", "content": prompts.instruction_message(template.style, entry.instruction, entry.input)}]
    try:
        fitted = prompts.fit_conversation(template, messages, tokenizer.encode, model.config.block_size,
                                          max_new_tokens)
    except UserError:  # a test question longer than the context: nothing to answer it with
        return ""
    stop = prompts.stop_strings(template)
    result = generate.generate(model, torch.tensor([fitted.ids], device=device), fitted.reply_tokens,
                               generate.Sampling(temperature=0.0), stop_token=template.end_of_turn,
                               vocab_size=tokenizer.vocab_size)
    reply = generate.until_stop(result.tokens[0].tolist(), template.end_of_turn)
    return generate.text_until_stop(tokenizer, reply, stop).strip()


def sample_replies(model: GPT, prompt_ids: list[list[int]], max_new_tokens: int, sampling: generate.Sampling,
                   end_token: int, vocab_size: int, generator: torch.Generator | None = None,
                   max_rows: int = 256) -> tuple[list[list[int]], int]:
    """A reply to each prompt (its ids up to and including the end token), and the tokens decoded. Prompts of the
    same length are continued together, up to max_rows at a time, through one KV cache: rl.py's G samples of a
    question are G rows of one batch, never G runs. Call with the model in eval mode."""
    device = model.lm_head.weight.device
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(index)
    replies: list[list[int]] = [[] for _ in prompt_ids]
    decoded = 0
    for rows in by_length.values():
        for start in range(0, len(rows), max_rows):
            chunk = rows[start:start + max_rows]
            batch = torch.tensor([prompt_ids[i][-model.config.block_size:] for i in chunk], device=device)
            result = generate.generate(model, batch, max_new_tokens, sampling, generator, stop_token=end_token,
                                       vocab_size=vocab_size)
            for row, sampled in zip(chunk, result.tokens.tolist()):
                replies[row] = posttrain.reply_tokens(sampled, end_token)
            decoded += result.decoded_tokens
    return replies, decoded


def reply_text(tokenizer: data.Tokenizer, reply: list[int]) -> str:
    return tokenizer.decode(generate.until_stop(reply, tokenizer.eot_token))


@torch.no_grad()
def exact_match_accuracy(model: GPT, tokenizer: data.Tokenizer, template: prompts.ChatTemplate, rows: list[dict],
                         max_new_tokens: int = 0) -> float:
    """The share of rows ({"prompt", "answer"}) whose greedy reply, stripped, is the answer: the verifiable task's
    accuracy, printed before and after each stage (SFT, DPO, RL). max_new_tokens 0: the longest answer's tokens + 2."""
    was_training = model.training
    model.eval()
    ids = [posttrain.encode_prompt(template, row["prompt"], tokenizer.encode, f"row {i}") for i, row in enumerate(rows)]
    longest = max(len(tokenizer.encode(str(row["answer"]))) for row in rows)
    replies, _ = sample_replies(model, ids, max_new_tokens or longest + 2, generate.Sampling(temperature=0.0),
                                tokenizer.eot_token, tokenizer.vocab_size)
    model.train(was_training)
    right = sum(tasks.exact_match(reply_text(tokenizer, reply), row["answer"]) for reply, row in zip(replies, rows))
    return right / len(rows)


def task_rows(entries: list[Entry]) -> list[dict]:
    return [{"prompt": entry.instruction, "answer": entry.output} for entry in entries]


# The book's judge prompt (chapter 7.8), with the task as the alpaca prompt shows it (without "### Response:").
JUDGE_PROMPT = ("Given the input `{task}` and correct output `{reference}`, score the model response `{response}` "
                "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")
JUDGE_TIMEOUT_S = 120.0


class JudgeUnreachable(Exception):
    pass


def ask_judge(url: str, model: str, prompt: str, timeout: float = JUDGE_TIMEOUT_S) -> str:
    """One chat turn with an Ollama-compatible server (POST URL/api/chat), deterministic settings as the book's."""
    request = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": False,
               "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    http_request = urllib.request.Request(url.rstrip("/") + "/api/chat", data=json.dumps(request).encode(),
                                          headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http_request, timeout=timeout) as answer:
            body = answer.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise JudgeUnreachable(error_summary(err)) from None
    # stream=False gives one JSON object; a server that streams anyway sends one object per line
    try:
        return "".join(json.loads(line)["message"]["content"] for line in body.splitlines() if line.strip())
    except (ValueError, KeyError, TypeError):
        raise JudgeUnreachable(f"the answer is not Ollama's /api/chat JSON: {body[:80]!r}") from None


def parse_score(text: str) -> int | None:
    """The integer 0-100 the judge was asked for, or None when it answered something else."""
    match = re.fullmatch(r"\s*(\d{1,3})(?:\.0*)?\s*\.?\s*", text)
    return int(match.group(1)) if match and int(match.group(1)) <= 100 else None


def judge_responses(responses: list[dict], url: str, model: str) -> dict:
    """Score each response in place ("score": int or None); the mean over the scored ones. A server that does not
    answer ends the judging with one warning: the responses themselves are already saved."""
    scores = []
    from tqdm import tqdm
    for response in tqdm(responses, desc="judging", unit="response", disable=None, file=sys.stderr):
        task = format_prompt("alpaca", response["instruction"], response["input"]).removesuffix(
            "\n\n### Response:\n")
        prompt = JUDGE_PROMPT.format(task=task, reference=response["reference"], response=response["response"])
        try:
            response["score"] = parse_score(ask_judge(url, model, prompt))
        except JudgeUnreachable as err:
            print(f"warning: the judge at {url} did not answer ({err}); responses.json has the responses without "
                  "scores. Start the server (e.g. `ollama serve` and `ollama pull llama3`) and rerun with "
                  "--judge_url, or leave the option out", file=sys.stderr)
            return {"judge_url": url, "judge_model": model, "error": str(err)}
        if response["score"] is not None:
            scores.append(response["score"])
    unscored = len(responses) - len(scores)
    if unscored:
        print(f"warning: the judge answered {unscored} of {len(responses)} responses with something other than an "
              "integer from 0 to 100; they are left out of the mean", file=sys.stderr)
    return {"judge_url": url, "judge_model": model, "mean_score": sum(scores) / len(scores) if scores else None,
            "scored": len(scores), "unscored": unscored}


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class InstructTask:
    """An instruction-tuning run: the loop's Run (train.py), and what the task holds beside it."""

    run: Run
    options: dict
    tokenizer: data.Tokenizer
    splits: dict[str, list[Entry]]
    encoded: dict[str, Encoded]
    model: GPT
    info: dict  # what the checkpoint records: the prompt style, the base model, LoRA, the data set


def resolve_config(argv: list[str]) -> ParsedArgs:
    """The command line over DEFAULTS, checked: the shared options (gptkit/finetune.py), then instruct's own."""
    parsed = finetune.parse(argv, OPTIONS, DEFAULTS, not_read={
        "text_column": "instruct.py reads --instruction_column, --input_column and --output_column"})
    options = parsed.options
    if options["prompt_style"] not in PROMPT_STYLES:
        raise ConfigError(f"prompt_style={options['prompt_style']!r} is not one of {', '.join(PROMPT_STYLES)}")
    options["mask_prompt"] = parse_bool("mask_prompt", options["mask_prompt"])
    if options["max_new_tokens"] < 1:
        raise ConfigError(f"max_new_tokens={options['max_new_tokens']} must be 1 or more")
    if options["judge_url"] and not options["judge_url"].startswith(("http://", "https://")):
        raise ConfigError(f"judge_url={options['judge_url']!r} is not an http:// or https:// URL; e.g. "
                          "--judge_url=http://localhost:11434 for a local Ollama")
    return parsed


def start_run(parsed: ParsedArgs, argv: list[str]) -> InstructTask:
    """The data, the model with what trains, and the loop's Run around it: a new run from a pretrained model, or
    (--resume) the run in --out_dir from its newest checkpoint."""
    start = finetune.start(parsed, argv, kind="instruct", folder_prefix="instruct", record_key="instruct",
                           options_a_resume_may_change=("max_new_tokens", "judge_url", "judge_model"))
    config, options, model = start.config, start.options, start.gpt
    train = config.train
    tokenizer = data.get_tokenizer(start.tokenizer)
    if start.saved is not None:
        info = start.saved["instruct"]
    else:
        info = {"prompt_style": options["prompt_style"], "mask_prompt": options["mask_prompt"],
                "lora_rank": options["lora_rank"], "lora_alpha": options["lora_alpha"], "base": start.base.source,
                "dataset": config.data.dataset}
    if tokenizer.eot_token is None:
        raise UserError(f"{info['base']} uses the {tokenizer.name} tokenizer, which has no end-of-text token to end a "
                        "response with; pretrain with --tokenizer=gpt2 (the default), or use --init_from=gpt2")

    splits = load_splits(config.data.dataset, options, config.data.val_fraction, train.seed)
    record_template(info, splits["train"], tokenizer)
    block_size = config.model.block_size
    encoded = {split: encode_entries(splits[split], tokenizer, info["prompt_style"], block_size) for split in SPLITS}
    truncated, dropped = sum(e.truncated for e in encoded.values()), sum(e.dropped for e in encoded.values())
    print(f"data: {config.data.dataset}: " + ", ".join(f"{s} {len(e.ids)}" for s, e in encoded.items()) + " entries"
          + (f"; {truncated} longer than the context of {block_size} tokens were cut there" if truncated else "")
          + (f"; {dropped} whose prompt alone fills the context were left out" if dropped else ""))
    if not encoded["train"].ids:
        raise UserError(f"no training entry fits the context of {block_size} tokens; use shorter entries or a model "
                        "with a longer --block_size")

    runtime = setup_runtime(train.device, train.dtype)
    if runtime.distributed:
        raise UserError("instruct.py runs in one process; start it with python, not torchrun")
    torch.manual_seed(train.seed)
    if info["lora_rank"]:
        lora.add_lora(model, info["lora_rank"], info["lora_alpha"])
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"model: {info['base']}; trainable: {n_trainable:,} of {n_total:,} parameters"
          + (f" (LoRA rank {info['lora_rank']}, alpha {info['lora_alpha']:g})" if info["lora_rank"] else "")
          + f"; prompt style {info['prompt_style']}, loss on "
          + ("the response only" if info["mask_prompt"] else "prompt and response"))
    print(runtime.describe())
    finetune.set_max_iters(start, len(encoded["train"].ids), DEFAULT_EPOCHS)
    model.to(runtime.device)
    print(fast.use_fast_kernels(model, train.fast_kernels, runtime.device_type, compiled=False))
    batches = batches_for(encoded["train"], train.batch_size, train.seed, tokenizer.eot_token, info["mask_prompt"])

    def record() -> dict:  # an instruct checkpoint's entries beside the loop's (generate.py reads the prompt style)
        return {"tokenizer": tokenizer.to_dict(), "instruct": info, "options": options}

    run = start_fine_tuning(start, runtime, model, batches, record, kind="instruct")
    steps_per_epoch = finetune.steps_per_epoch(len(encoded["train"].ids), train)
    print(f"training: {train.max_iters} steps of {train.batch_size * train.gradient_accumulation_steps} entries = "
          f"{train.max_iters / steps_per_epoch:.1f} epochs, learning rate {train.learning_rate:g}")
    return InstructTask(run, options, tokenizer, splits, encoded, model, info)


def val_loss_now(task: InstructTask) -> float:
    return response_loss(task.model, task.encoded["val"], task.run.runtime, task.run.config.train.batch_size,
                         task.tokenizer.eot_token)


def measure(task: InstructTask) -> Evaluation:
    """The validation response loss now (train.py's evaluate keeps the best and saves)."""
    val_loss = val_loss_now(task)
    return Evaluation(val_loss, f"val response loss {val_loss:.4f}, perplexity {perplexity(val_loss):.2f}",
                      {"val_perplexity": perplexity(val_loss)})


def finish(task: InstructTask, val_before: float | None, val_after: float) -> None:
    """responses.json (every test entry answered), the judge's mean score when asked, results.json, loss.png."""
    run, options = task.run, task.options
    template = prompts.ChatTemplate.from_dict(task.info["chat_template"])
    state, run_dir = run.state, run.run_dir
    ms_per_step = state.elapsed_s / max(1, state.step) * 1e3
    print(f"trained {state.step} steps in {state.elapsed_s:.1f} s ({ms_per_step:.1f} ms per step)")
    task.model.eval()
    from tqdm import tqdm
    responses = [{"instruction": e.instruction, "input": e.input, "reference": e.output,
                  "response": respond(task.model, task.tokenizer, template, e, options["max_new_tokens"])}
                 for e in tqdm(task.splits["test"], desc="answering the test split", unit="entry", disable=False,
                               file=sys.stderr)]  # shown in a pipe too: tens of seconds that would look like a hang
    (run_dir / "responses.json").write_text(json.dumps(responses, indent=2, ensure_ascii=False) + "\n")
    results = {"val_response_loss": {"before": val_before, "after": val_after},
               "val_perplexity": {"before": perplexity(val_before) if val_before is not None else None,
                                  "after": perplexity(val_after)},
               "test_response_loss": response_loss(task.model, task.encoded["test"], run.runtime,
                                                   run.config.train.batch_size, task.tokenizer.eot_token),
               "ms_per_step": ms_per_step, "steps": state.step, "test_entries": len(responses)}
    if options["judge_url"]:
        results["judge"] = judge_responses(responses, options["judge_url"], options["judge_model"])
        (run_dir / "responses.json").write_text(json.dumps(responses, indent=2, ensure_ascii=False) + "\n")
        if results["judge"].get("mean_score") is not None:
            print(f"judge {options['judge_model']}: mean score {results['judge']['mean_score']:.1f} of 100 over "
                  f"{results['judge']['scored']} responses")
    if task.info.get("dataset") == tasks.ADDITION:
        template = prompts.recorded_template(task.info, task.tokenizer.eot_token)
        results["test_exact_match"] = exact_match_accuracy(task.model, task.tokenizer, template,
                                                           task_rows(task.splits["test"]))
        print(f"test exact match (greedy): {results['test_exact_match']:.1%} of {len(responses)} questions")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    runinfo.plot_run(run_dir)
    for example in responses[:3]:  # plain labels: the run's own prompt style may be alpaca's or chat's
        print(f"\ninstruction: {example['instruction']}" + (f"\ninput: {example['input']}" if example["input"] else "")
              + f"\nreference: {example['reference']}\nmodel: {example['response']}")
    before = f"{val_before:.4f} -> " if val_before is not None else ""
    print(f"\ndone: val response loss {before}{val_after:.4f}, test {results['test_response_loss']:.4f}; "
          f"{run_dir}/responses.json, loss.png; ask it with python generate.py --ckpt={run_dir} "
          "--instruction=\"...\"")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    task = start_run(resolve_config(argv), argv)
    run = task.run
    val_before = None
    if run.state.step == 0:
        val_before = val_loss_now(task)
        print(f"before training: val response loss {val_before:.4f}, perplexity {perplexity(val_before):.2f}")
        if task.info.get("dataset") == tasks.ADDITION:
            template = prompts.recorded_template(task.info, task.tokenizer.eot_token)
            accuracy = exact_match_accuracy(task.model, task.tokenizer, template, task_rows(task.splits["test"]))
            print(f"before training: test exact match (greedy) {accuracy:.1%}")
    stop = StopRequest()
    stop.install()
    stopped_early = train_loop(run, stop, measure=lambda: measure(task))
    if end_of_training(run, stop, stopped_early, lambda: measure(task),
                       f"python instruct.py --resume --out_dir={run.run_dir}"):
        finish(task, val_before, run.last_val_loss)


if __name__ == "__main__":
    run_cli(main)
