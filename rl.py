"""Reinforcement learning with verifiable rewards (GRPO): the model answers each question several times, a checker
scores the answers, and the model learns to make its better answers more likely. No reward model, no value network.

    python rl.py                                           # the latest instruct run, on the built-in addition task
    python rl.py --init_from=checkpoints/<instruct run> --dataset=questions.jsonl --reward=my_reward.py:score
    python rl.py --resume                                  # the latest RL run, where it stopped
    python chat.py --ckpt=checkpoints/<rl run>             # ask it the task's questions

Data: JSON Lines of {"prompt", "answer"} (the prompt a string or chat messages; other fields go to the reward).
Each step: prompts_per_step prompts, group_size replies each, sampled together through the KV cache; reward 1 for
an exact answer (or --reward's number); advantage = (reward - group mean) / group std; loss on the sampled tokens
only, averaged per token (posttrain.grpo_loss). The loop, checkpoints, resume and --max_minutes are train.py's.
docs/post-training.md has the measurements behind the defaults (the temperature above all).
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import generate
import instruct
from config import RLConfig, UserError
from gptkit import checkpoint, finetune, loading, posttrain, runinfo, tasks
from gptkit.cli import run_cli
from gptkit.prompts import ChatTemplate
from gptkit.runtime import StopRequest, setup_runtime
from model import GPT
from train import Evaluation, Run, end_of_training, start_fine_tuning, train_loop

OPTIONS_CONFIG = RLConfig  # --help reads each option's help from its field in config.py
OPTIONS = dataclasses.asdict(RLConfig())
# AdamW at 1e-4 without decay, as the measured prototype (issue 37); a constant rate after a short warmup.
DEFAULTS = {"learning_rate": 1e-4, "min_lr": 1e-4, "weight_decay": 0.0, "warmup_iters": 5, "max_iters": 200,
            "eval_interval": 50, "log_interval": 5, "dataset": tasks.ADDITION, "optimizer": "adamw",
            "lr_schedule": "cosine"}
NOT_READ = {"text_column": "rl.py reads the prompt and answer fields",
            "batch_size": "a step's batch is --prompts_per_step prompts x --group_size sampled replies"}


# ----------------------------------------------------------------------------------------------------------------
# Data: questions with a checkable answer

def read_rows(path: Path, needs_answer: bool) -> tuple[list[dict], list[str]]:
    """A .jsonl file of {"prompt", "answer", ...} rows (answer needed by the default reward), each checked; and each
    row's place in the file ("q.jsonl line 4"), to name it when the reward fails on it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--dataset={path} does not exist; give a .jsonl of {{\"prompt\", \"answer\"}} rows, or "
                        f"--dataset={tasks.ADDITION} for the built-in task") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--dataset={path} could not be read as UTF-8 text ({err})") from None
    rows, places = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where} is not JSON ({err.msg}); fix it or remove the line") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise UserError(f"{where} has no 'prompt'; each row needs a prompt (and an answer for the default reward)")
        posttrain.prompt_messages(row["prompt"], where)
        if needs_answer and not str(row.get("answer", "")).strip():
            raise UserError(f"{where} has no 'answer' for the default exact-match reward; add it, or pass "
                            "--reward=path/to/file.py:function")
        rows.append(row)
        places.append(where)
    if len(rows) < 2:
        raise UserError(f"--dataset={path} holds {len(rows)} row(s); give at least a few dozen")
    return rows, places


def load_rows(dataset: str, needs_answer: bool, val_fraction: float) -> tuple[dict, dict]:
    """train, val and test rows, and each row's place (named when the reward fails on it): the built-in task's own
    splits, or a file's last val_fraction held out (as both val and test: a file has one held-out part)."""
    if dataset == tasks.ADDITION:
        splits = tasks.addition_splits()
        return splits, {split: [f"{split} row {i}" for i in range(len(rows))] for split, rows in splits.items()}
    rows, places = read_rows(Path(dataset), needs_answer)
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    return ({"train": rows[:-n_val], "val": rows[-n_val:], "test": rows[-n_val:]},
            {"train": places[:-n_val], "val": places[-n_val:], "test": places[-n_val:]})


# ----------------------------------------------------------------------------------------------------------------
# Rollouts: the loop's batches, sampled by the model being trained


@dataclass
class Rollout:
    """One step's samples: prompts_per_step x group_size rows of prompt + reply, ready for the loss."""
    x: torch.Tensor  # (B, T) inputs
    y: torch.Tensor  # (B, T) targets
    mask: torch.Tensor  # (B, T) 1 on sampled reply tokens
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor | None  # (B, T) the sampling policy's, when the batch serves several updates
    reference_logprobs: torch.Tensor | None  # (B, T) the start model's, for the KL penalty


class Rollouts:
    """next() samples a group of replies for each of the next prompts_per_step prompts (a seeded order, reshuffled
    every epoch), scores them and returns a Rollout; with updates_per_batch > 1 the same Rollout is served that many
    times. `stats` holds the latest sampling's numbers for the log. A resumed run continues the order and the
    sampler's random stream from the checkpoint; a batch being reused when the run stopped is sampled afresh."""

    def __init__(self, task: RLTask, seed: int):
        self.task = task
        self.generator = torch.Generator().manual_seed(seed)  # the order of the prompts
        self.sampler = torch.Generator(task.model.lm_head.weight.device).manual_seed(seed + 1)  # the replies
        self.order, self.position = torch.randperm(len(task.rows["train"]), generator=self.generator), 0
        self.tokens_served = 0
        self.current: Rollout | None = None
        self.uses = 0
        self.stats: dict = {}

    def next(self) -> Rollout:
        if self.current is not None and self.uses < self.task.options.updates_per_batch:
            self.uses += 1
            return self.current
        options = self.task.options
        if self.position + options.prompts_per_step > len(self.order):
            self.order, self.position = torch.randperm(len(self.order), generator=self.generator), 0
        picked = self.order[self.position:self.position + options.prompts_per_step].tolist()
        self.position += options.prompts_per_step
        self.current, self.uses = self.sample(picked), 1
        return self.current

    def sample(self, picked: list[int]) -> Rollout:
        task, options = self.task, self.task.options
        model, tokenizer = task.model, task.tokenizer
        prompts = [task.prompt_ids[i] for i in picked for _ in range(options.group_size)]
        model.eval()
        started = time.perf_counter()
        replies, decoded = instruct.sample_replies(model, prompts, options.max_new_tokens,
                                                   generate.Sampling(temperature=options.temperature),
                                                   tokenizer.eot_token, tokenizer.vocab_size, self.sampler)
        seconds = time.perf_counter() - started
        model.train()
        indices = [i for i in picked for _ in range(options.group_size)]  # each sample's train row
        rewards = torch.tensor([posttrain.score(task.reward, task.rows["train"][i]["prompt"],
                                                instruct.reply_text(tokenizer, reply), task.rows["train"][i],
                                                task.places["train"][i])
                                for reply, i in zip(replies, indices)])
        groups = rewards.view(len(picked), options.group_size)
        advantages = posttrain.group_advantages(groups, options.scale_by_std).flatten()
        x, y, mask = posttrain.pad_pairs(prompts, [r if r else [tokenizer.eot_token] for r in replies],
                                         tokenizer.eot_token, model.config.block_size)
        device = model.lm_head.weight.device
        x, y, mask, advantages = x.to(device), y.to(device), mask.to(device), advantages.to(device)
        old = reference = None
        with torch.no_grad(), task.run.runtime.autocast():
            if options.updates_per_batch > 1:
                old = posttrain.token_logprobs(model, x, y)
            if task.reference is not None:
                reference = posttrain.token_logprobs(task.reference, x, y)
        self.tokens_served += int(mask.sum())
        self.stats = {"mean_reward": groups.mean().item(),
                      "any_right": (groups.max(dim=1).values > 0).float().mean().item(),
                      "learning_groups": (groups.std(dim=1) > 0).float().mean().item(),
                      "reply_tokens": mask.sum().item() / len(prompts), "sample_tok_s": decoded / max(seconds, 1e-9)}
        return Rollout(x, y, mask, advantages, old, reference)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "sampler": self.sampler.get_state(), "order": self.order,
                "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.sampler.set_state(state["sampler"])
        self.order, self.position = state["order"], state["position"]


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class RLTask:
    run: Run | None
    options: RLConfig
    tokenizer: data.Tokenizer
    template: ChatTemplate
    model: GPT
    reference: GPT | None  # only with --kl_coef > 0
    rows: dict[str, list[dict]]
    places: dict[str, list[str]]  # each row's place, named when the reward fails on it
    prompt_ids: list[list[int]]  # the train rows' prompts as ids
    reward: posttrain.Reward
    info: dict
    last: dict = dataclasses.field(default_factory=dict)


def rollout_loss(task: RLTask, rollout: Rollout) -> torch.Tensor:
    logprobs = posttrain.token_logprobs(task.model, rollout.x, rollout.y)
    old = rollout.old_logprobs if rollout.old_logprobs is not None else logprobs.detach()
    loss, kl = posttrain.grpo_loss(logprobs, old, rollout.advantages, rollout.mask, task.options.clip_eps,
                                   rollout.reference_logprobs, task.options.kl_coef)
    if rollout.reference_logprobs is not None:
        task.last["kl"] = kl.item()
    return loss


@torch.no_grad()
def held_out_reward(task: RLTask, split: str, limit: int | None = None) -> float:
    """The mean reward of greedy replies to a held-out split (its first `limit` rows): with the default reward, the
    exact-match accuracy."""
    was_training = task.model.training
    task.model.eval()
    tokenizer, rows, places = task.tokenizer, task.rows[split][:limit], task.places[split][:limit]
    ids = [posttrain.encode_prompt(task.template, row["prompt"], tokenizer.encode, place)
           for row, place in zip(rows, places)]
    replies, _ = instruct.sample_replies(task.model, ids, task.options.max_new_tokens,
                                         generate.Sampling(temperature=0.0), tokenizer.eot_token, tokenizer.vocab_size)
    task.model.train(was_training)
    return sum(posttrain.score(task.reward, row["prompt"], instruct.reply_text(tokenizer, reply), row, place)
               for reply, row, place in zip(replies, rows, places)) / len(rows)


def measure(task: RLTask) -> Evaluation:
    """best.pt is the best held-out reward (val_loss = 1 - it)."""
    accuracy = held_out_reward(task, "val", task.options.eval_rows)
    return Evaluation(1 - accuracy, f"val reward (greedy) {accuracy:.1%}", {"val_accuracy": accuracy})


def latest_instruct_run() -> Path:
    try:
        return checkpoint.latest_run(kinds=("instruct",))
    except UserError:
        raise UserError("no instruct run under checkpoints/ to start from; make one with `make addition` "
                        "(see docs/post-training.md), or pass --init_from=checkpoints/<instruct run>") from None


def start_run(argv: list[str]) -> RLTask:
    parsed = finetune.parse(argv, OPTIONS, DEFAULTS, not_read=NOT_READ)
    options = RLConfig(**{f.name: parsed.options[f.name] for f in dataclasses.fields(RLConfig)})
    options.validate()  # a bad option or reward is named before anything is looked for
    reward = posttrain.load_reward(options.reward) if options.reward else posttrain.exact_match_reward
    if parsed.config.train.init_from == "scratch" and not parsed.config.train.resume:
        parsed.config.train.init_from = str(latest_instruct_run())
    start = finetune.start(parsed, argv, kind="rl", folder_prefix="rl", record_key="rl",
                           options_a_resume_may_change=("eval_rows", "max_new_tokens"))
    config, model = start.config, start.gpt
    options = RLConfig(**{f.name: start.options[f.name] for f in dataclasses.fields(RLConfig)})
    options.validate()
    if options.reward != parsed.options["reward"]:  # a resumed run keeps the reward it was started with
        reward = posttrain.load_reward(options.reward) if options.reward else posttrain.exact_match_reward
    tokenizer = data.get_tokenizer(start.tokenizer)
    if start.saved is None:
        record = {"reference": start.base.source, "dataset": config.data.dataset}
        info, template = posttrain.template_of(start.base.instruct, tokenizer.eot_token, start.base.source,
                                               start.base.trained_on)
    else:
        info, record = start.saved["instruct"], start.saved["rl"]
        template = posttrain.template_of(info, tokenizer.eot_token, str(start.run_dir))[1]
    rows, places = load_rows(config.data.dataset, not options.reward, config.data.val_fraction)
    prompt_ids = [posttrain.encode_prompt(template, row["prompt"], tokenizer.encode, place)
                  for row, place in zip(rows["train"], places["train"])]
    runtime = setup_runtime(config.train.device, config.train.dtype)
    if runtime.distributed:
        raise UserError("rl.py runs in one process; start it with python, not torchrun")
    torch.manual_seed(config.train.seed)
    model.to(runtime.device)
    reference = None
    if options.kl_coef > 0:
        # the start's weights, frozen: a copy for a new run (the policy is the start's own model object), reloaded
        # from where the run started for a resumed one
        reference = copy.deepcopy(model) if start.saved is None else loading.load_model(ckpt=record["reference"]).model
        reference.to(runtime.device).eval().requires_grad_(False)

    task = RLTask(None, options, tokenizer, template, model, reference, rows, places, prompt_ids, reward, info)
    rollouts = Rollouts(task, config.train.seed)

    def record_entries() -> dict:
        return {"tokenizer": tokenizer.to_dict(), "instruct": info, "rl": record,
                "options": dataclasses.asdict(options)}

    task.run = start_fine_tuning(start, runtime, model, rollouts, record_entries, kind="rl",
                                 compute_loss=lambda rollout: rollout_loss(task, rollout))
    task.run.step_metrics = lambda: {**rollouts.stats, **task.last}
    print(f"data: {config.data.dataset}: " + ", ".join(f"{s} {len(r)}" for s, r in rows.items()) + " rows; reward: "
          + (options.reward or "exact match with the answer"))
    print(f"GRPO: {options.prompts_per_step} prompts x {options.group_size} replies per step at temperature "
          f"{options.temperature}; advantages {'over the group std' if options.scale_by_std else 'centred only'}; "
          f"KL {options.kl_coef}; {options.updates_per_batch} update(s) per batch (clip {options.clip_eps}); "
          f"{config.train.max_iters} steps at learning rate {config.train.learning_rate:g}")
    return task


def finish(task: RLTask, before: float | None) -> None:
    run = task.run
    after = held_out_reward(task, "test")
    results = {"steps": run.state.step, "elapsed_s": run.state.elapsed_s, "test_reward": {"before": before,
                                                                                          "after": after}}
    (run.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    runinfo.plot_run(run.run_dir)
    shown = f"{before:.1%} -> " if before is not None else ""
    print(f"test reward (greedy; exact match unless --reward): {shown}{after:.1%} of {len(task.rows['test'])} "
          "questions")
    print(f"done: {run.state.step} steps in {run.state.elapsed_s:.1f} s; {run.run_dir}; chat with it: "
          f"python chat.py --ckpt={run.run_dir}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    task = start_run(argv)
    run, before = task.run, None
    if run.state.step == 0:
        before = held_out_reward(task, "test")
        print(f"before RL: test reward (greedy; exact match unless --reward) {before:.1%}")
    stop = StopRequest()
    stop.install()
    stopped_early = train_loop(run, stop, measure=lambda: measure(task))
    if end_of_training(run, stop, stopped_early, lambda: measure(task),
                       f"python rl.py --resume --out_dir={run.run_dir}"):
        finish(task, before)


if __name__ == "__main__":
    run_cli(main)
