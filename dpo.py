"""Direct Preference Optimization (the book's chapter 7 bonus), from scratch: teach an instruction-tuned model to
prefer one reply over another, with no reward model, against a frozen copy of itself.

    python dpo.py                                          # the latest instruct run, on the built-in addition task
    python dpo.py --init_from=checkpoints/<instruct run> --dataset=pairs.jsonl --beta=0.1
    python dpo.py --resume                                 # the latest DPO run, where it stopped
    python chat.py --ckpt=checkpoints/<dpo run>            # its checkpoints are instruct checkpoints too

Data: JSON Lines of {"prompt", "chosen", "rejected"} (TRL's preference format); the prompt is a string or a list of
chat messages, rendered in the checkpoint's chat template. On the built-in task the pairs are the start model's own
samples, labelled by the checker: a right reply chosen, a wrong one rejected (pairs.jsonl in the run folder).
The loss (posttrain.dpo_loss): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on the reply tokens only;
the loop, checkpoints, resume and --max_minutes are train.py's. docs/post-training.md has the measurements.
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import copy
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import generate
import instruct
from config import DPOConfig, UserError
from gptkit import checkpoint, finetune, loading, posttrain, runinfo, tasks
from gptkit.cli import run_cli
from gptkit.prompts import ChatTemplate
from gptkit.runtime import StopRequest, setup_runtime
from model import GPT
from train import Evaluation, Run, end_of_training, start_fine_tuning, train_loop

OPTIONS_CONFIG = DPOConfig  # --help reads each option's help from its field in config.py
OPTIONS = dataclasses.asdict(DPOConfig())
# Measured on the built-in task from a 67.3% start, 500 steps (docs/post-training.md): AdamW at 1e-5 took the test
# exact match down to 35.0% (per-token mean) and 36.3% (summed), both replies' log-probabilities falling; at 2e-6
# it ended at 70.0%. The per-token mean is the default: as good here, and its margins do not grow with reply length.
DEFAULTS = {"batch_size": 8, "learning_rate": 2e-6, "min_lr": 2e-7, "weight_decay": 0.0, "warmup_iters": 10,
            "max_iters": 500, "eval_interval": 100, "log_interval": 10, "dataset": tasks.ADDITION,
            "optimizer": "adamw", "lr_schedule": "cosine"}
NOT_READ = {"text_column": "dpo.py reads the prompt, chosen and rejected fields"}


@dataclass
class Pair:
    prompt: object  # a string, or chat messages
    chosen: str
    rejected: str
    split: str = "train"  # train or val: the built-in task's pairs keep their question's split


# ----------------------------------------------------------------------------------------------------------------
# Data: preference pairs from a file, or made on the built-in task from the start model's own samples


def reply_of(value: object, where: str) -> str:
    """A chosen or rejected reply: a string, or TRL's conversational form [{"role": "assistant", "content": ...}]."""
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        value = value[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where} is empty or not a string; every pair needs a non-empty reply")
    return value


def read_pairs(path: Path) -> list[Pair]:
    """A .jsonl file of {"prompt", "chosen", "rejected"} rows, each checked; the first bad row is named."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--dataset={path} does not exist; give a .jsonl of {{\"prompt\", \"chosen\", \"rejected\"}} "
                        f"rows, or --dataset={tasks.ADDITION} for the built-in task") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--dataset={path} could not be read as UTF-8 text ({err})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where} is not JSON ({err.msg}); fix it or remove the line") from None
        missing = [key for key in ("prompt", "chosen", "rejected") if not isinstance(row, dict) or key not in row]
        if missing:
            raise UserError(f"{where} has no {missing[0]!r}; each row needs prompt, chosen and rejected")
        posttrain.prompt_messages(row["prompt"], where)
        pair = Pair(row["prompt"], reply_of(row["chosen"], f"{where}: chosen"),
                    reply_of(row["rejected"], f"{where}: rejected"), "val" if row.get("split") == "val" else "train")
        if pair.chosen.strip() == pair.rejected.strip():
            raise UserError(f"{where}: chosen and rejected are the same reply ({pair.chosen[:40]!r}); there is nothing "
                            "to prefer; fix or remove the row")
        pairs.append(pair)
    if len(pairs) < 2:
        raise UserError(f"--dataset={path} holds {len(pairs)} pair(s); give at least a few dozen")
    return pairs


def pairs_from_samples(model: GPT, tokenizer: data.Tokenizer, template: ChatTemplate, rows: list[dict],
                       options: DPOConfig, seed: int, split: str) -> list[Pair]:
    """For each question, samples_per_prompt replies of the start model, checked: a right one is chosen and a
    wrong one rejected. A question it never gets right takes its reference answer as chosen (off-policy); one it
    always gets right gives no pair (nothing to prefer)."""
    ids = [posttrain.encode_prompt(template, row["prompt"], tokenizer.encode, f"row {i}")
           for i, row in enumerate(rows) for _ in range(options.samples_per_prompt)]
    model.eval()
    replies, _ = instruct.sample_replies(model, ids, options.max_new_tokens,
                                         generate.Sampling(temperature=options.sample_temperature),
                                         tokenizer.eot_token, tokenizer.vocab_size,
                                         torch.Generator(model.lm_head.weight.device).manual_seed(seed))
    pairs = []
    for i, row in enumerate(rows):
        texts = [instruct.reply_text(tokenizer, r).strip()
                 for r in replies[i * options.samples_per_prompt:(i + 1) * options.samples_per_prompt]]
        right = [t for t in texts if tasks.exact_match(t, row["answer"])]
        wrong = [t for t in texts if t and not tasks.exact_match(t, row["answer"])]
        if wrong:
            pairs.append(Pair(row["prompt"], right[0] if right else str(row["answer"]), wrong[0], split))
    return pairs


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]  # the reply's ids and the end token
    rejected: list[int]


def encode_pairs(pairs: list[Pair], tokenizer: data.Tokenizer, template: ChatTemplate) -> list[EncodedPair]:
    end = [tokenizer.eot_token]
    return [EncodedPair(posttrain.encode_prompt(template, p.prompt, tokenizer.encode, f"pair {i}"),
                        tokenizer.encode(p.chosen) + end, tokenizer.encode(p.rejected) + end)
            for i, p in enumerate(pairs)]


# ----------------------------------------------------------------------------------------------------------------
# The loss of a batch of pairs


@dataclass
class DPOTask:
    run: Run
    options: DPOConfig
    tokenizer: data.Tokenizer
    template: ChatTemplate
    model: GPT
    reference: GPT
    pairs: dict[str, list[EncodedPair]]  # train, val
    rows: dict[str, list[dict]]  # the built-in task's val and test questions (empty for a file of pairs)
    info: dict
    last: dict = dataclasses.field(default_factory=dict)  # the latest step's numbers, for the log


def pair_logprobs(model: GPT, pairs: list[EncodedPair], loss_type: str, block_size: int,
                  pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen and rejected replies' log-probabilities (B,) each, in one forward of 2B rows; and the chosen
    rows' per-token NLL (for the optional NLL term)."""
    device = model.lm_head.weight.device
    x, y, mask = posttrain.pad_pairs([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] +
                                     [p.rejected for p in pairs], pad, block_size)
    x, y, mask = x.to(device), y.to(device), mask.to(device)
    logprobs = posttrain.token_logprobs(model, x, y)  # (2B, T)
    per_reply = posttrain.reply_logprob(logprobs, mask, loss_type)
    n = len(pairs)
    chosen_nll = -(logprobs[:n] * mask[:n]).sum() / mask[:n].sum().clamp(min=1)
    return per_reply[:n], per_reply[n:], chosen_nll


def batch_loss(task: DPOTask, pairs: list[EncodedPair]) -> torch.Tensor:
    options, block_size, pad = task.options, task.model.config.block_size, task.tokenizer.eot_token
    policy_chosen, policy_rejected, chosen_nll = pair_logprobs(task.model, pairs, options.loss_type, block_size, pad)
    with torch.no_grad():
        reference_chosen, reference_rejected, _ = pair_logprobs(task.reference, pairs, options.loss_type,
                                                                block_size, pad)
    loss, chosen_rewards, rejected_rewards = posttrain.dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                                reference_rejected, options.beta)
    task.last = {"dpo_loss": loss.item(), "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
                 "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
                 "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item()}
    if options.nll_weight:
        task.last["chosen_nll"] = chosen_nll.item()
        loss = loss + options.nll_weight * chosen_nll
    return loss


@torch.no_grad()
def val_numbers(task: DPOTask) -> dict:
    """The DPO loss, reward margin and reward accuracy over the val pairs, and the built-in task's val accuracy."""
    was_training = task.model.training
    task.model.eval()
    totals, pairs = {"dpo_loss": 0.0, "reward_margin": 0.0, "reward_accuracy": 0.0}, task.pairs["val"]
    size = task.run.config.train.batch_size
    for start in range(0, len(pairs), size):
        chunk = pairs[start:start + size]
        with task.run.runtime.autocast():
            batch_loss(task, chunk)
        for key in totals:
            totals[key] += task.last[key] * len(chunk)
    numbers = {f"val_{key}": value / max(1, len(pairs)) for key, value in totals.items()}
    if task.rows.get("val"):
        numbers["val_accuracy"] = instruct.exact_match_accuracy(task.model, task.tokenizer, task.template,
                                                                task.rows["val"], task.options.max_new_tokens)
    task.model.train(was_training)
    return numbers


def measure(task: DPOTask) -> Evaluation:
    """best.pt is the best val accuracy on the built-in task (val_loss = its error), else the lowest val DPO loss."""
    numbers = val_numbers(task)
    val_loss = 1 - numbers["val_accuracy"] if "val_accuracy" in numbers else numbers["val_dpo_loss"]
    summary = (f"val DPO loss {numbers['val_dpo_loss']:.4f}, reward margin {numbers['val_reward_margin']:.4f}, "
               f"reward accuracy {numbers['val_reward_accuracy']:.1%}"
               + (f", val exact match {numbers['val_accuracy']:.1%}" if "val_accuracy" in numbers else ""))
    return Evaluation(val_loss, summary, numbers)


# ----------------------------------------------------------------------------------------------------------------
# The run


def resolve_config(argv: list[str]):
    parsed = finetune.parse(argv, OPTIONS, DEFAULTS, not_read=NOT_READ)
    options_of(parsed.options)  # a bad option is named before anything is looked for
    if parsed.config.train.init_from == "scratch" and not parsed.config.train.resume:
        parsed.config.train.init_from = str(latest_instruct_run())
    return parsed


def latest_instruct_run() -> Path:
    try:
        return checkpoint.latest_run(kinds=("instruct",))
    except UserError:
        raise UserError("no instruct run under checkpoints/ to start from; make one with `make addition` "
                        "(see docs/post-training.md), or pass --init_from=checkpoints/<instruct run>") from None


def options_of(raw: dict) -> DPOConfig:
    raw = dict(raw)
    options = DPOConfig(**{f.name: raw[f.name] for f in dataclasses.fields(DPOConfig)})
    options.validate()
    return options


def start_run(argv: list[str]) -> DPOTask:
    """A new run from an instruct checkpoint (its weights twice: the policy that trains, the frozen reference), or
    with --resume the run in --out_dir, its reference reloaded from where the run started."""
    parsed = resolve_config(argv)
    start = finetune.start(parsed, argv, kind="dpo", folder_prefix="dpo", record_key="dpo",
                           options_a_resume_may_change=("max_new_tokens",))
    config, options, model = start.config, options_of(start.options), start.gpt
    tokenizer = data.get_tokenizer(start.tokenizer)
    if start.saved is None:
        base = start.base
        info, template = posttrain.template_of(base.instruct, tokenizer.eot_token, base.source, base.trained_on)
        reference = copy.deepcopy(base.model)
        record = {"reference": base.source, "dataset": config.data.dataset}
    else:
        info, record = start.saved["instruct"], start.saved["dpo"]
        template = posttrain.template_of(info, tokenizer.eot_token, str(start.run_dir))[1]
        reference = loading.load_model(ckpt=record["reference"]).model
    runtime = setup_runtime(config.train.device, config.train.dtype)
    if runtime.distributed:
        raise UserError("dpo.py runs in one process; start it with python, not torchrun")
    torch.manual_seed(config.train.seed)
    model.to(runtime.device)
    reference.to(runtime.device).eval().requires_grad_(False)

    rows, pairs_file = {}, start.run_dir / "pairs.jsonl"
    if config.data.dataset == tasks.ADDITION:
        splits = tasks.addition_splits()
        rows = {"val": splits["val"], "test": splits["test"]}
        if pairs_file.exists():  # a resumed run trains on the pairs it made
            pairs = read_pairs(pairs_file)
        else:
            needed = min(len(splits["train"]), config.train.max_iters * config.train.batch_size)
            print(f"making pairs: {options.samples_per_prompt} samples at temperature {options.sample_temperature} "
                  f"for each of {needed} train questions, checked against their answers")
            source = start.base.model.to(runtime.device) if start.base is not None else reference
            pairs = pairs_from_samples(source, tokenizer, template, splits["train"][:needed], options,
                                       config.train.seed, "train")
            pairs += pairs_from_samples(source, tokenizer, template, splits["val"], options, config.train.seed + 1,
                                        "val")
    else:
        pairs = read_pairs(Path(config.data.dataset))
    if not pairs_file.exists():
        start.run_dir.mkdir(parents=True, exist_ok=True)
        pairs_file.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in pairs))
    if not any(p.split == "val" for p in pairs):  # a file without a "split" field: its last val_fraction
        n_val = min(len(pairs) - 1, max(1, round(len(pairs) * config.data.val_fraction)))
        pairs = [dataclasses.replace(p, split="val" if i >= len(pairs) - n_val else "train")
                 for i, p in enumerate(pairs)]
    encoded = encode_pairs(pairs, tokenizer, template)
    split = {name: [e for e, p in zip(encoded, pairs) if p.split == name] for name in ("train", "val")}
    if not split["train"]:
        raise UserError("no training pair: the start model got every sampled train question right; raise "
                        "--sample_temperature or --samples_per_prompt")
    print(f"data: {len(split['train'])} train pairs, {len(split['val'])} val pairs ({pairs_file})")

    def record_entries() -> dict:
        return {"tokenizer": tokenizer.to_dict(), "instruct": info, "dpo": record,
                "options": dataclasses.asdict(options)}

    lengths = torch.tensor([len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in split["train"]])
    batches = finetune.EpochBatches(lengths, config.train.batch_size, config.train.seed,
                                    lambda rows_: [split["train"][i] for i in rows_.tolist()])
    task_box: list[DPOTask] = []
    run = start_fine_tuning(start, runtime, model, batches, record_entries, kind="dpo",
                            compute_loss=lambda batch: batch_loss(task_box[0], batch))
    task = DPOTask(run, options, tokenizer, template, model, reference, split, rows, info)
    task_box.append(task)
    run.step_metrics = lambda: {k: v for k, v in task.last.items() if k != "dpo_loss"}
    print(f"DPO: beta {options.beta}, {options.loss_type} ({'summed' if options.loss_type == 'sigmoid' else 'mean'} "
          f"reply log-probabilities), NLL weight {options.nll_weight}; reference {record['reference']}; "
          f"{config.train.max_iters} steps of {config.train.batch_size} pairs at learning rate "
          f"{config.train.learning_rate:g}")
    return task


def test_accuracy(task: DPOTask) -> float | None:
    if not task.rows.get("test"):
        return None
    return instruct.exact_match_accuracy(task.model, task.tokenizer, task.template, task.rows["test"],
                                         task.options.max_new_tokens)


def finish(task: DPOTask, before: float | None) -> None:
    run = task.run
    after = test_accuracy(task)
    results = {"steps": run.state.step, "elapsed_s": run.state.elapsed_s, **val_numbers(task),
               "test_exact_match": {"before": before, "after": after}}
    (run.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    runinfo.plot_run(run.run_dir)
    if after is not None:
        shown = f"{before:.1%} -> " if before is not None else ""
        print(f"test exact match (greedy): {shown}{after:.1%} of {len(task.rows['test'])} questions")
    print(f"done: {run.state.step} steps in {run.state.elapsed_s:.1f} s; {run.run_dir}; chat with it: "
          f"python chat.py --ckpt={run.run_dir}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    task = start_run(argv)
    run, before = task.run, None
    if run.state.step == 0:
        before = test_accuracy(task)
        if before is not None:
            print(f"before DPO: test exact match (greedy) {before:.1%}")
    stop = StopRequest()
    stop.install()
    stopped_early = train_loop(run, stop, measure=lambda: measure(task))
    if end_of_training(run, stop, stopped_early, lambda: measure(task),
                       f"python dpo.py --resume --out_dir={run.run_dir}"):
        finish(task, before)


if __name__ == "__main__":
    run_cli(main)
