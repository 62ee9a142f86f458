"""What dpo.py and rl.py share past SFT: prompts rendered in the checkpoint's chat template, padded prompt + reply
batches, the log-probability of each reply token, the DPO and GRPO losses as pure functions of those, and the
reward a learner plugs in with --reward=path/to/file.py:function.

    python dpo.py     # preference tuning from the latest instruct run
    python rl.py      # GRPO with verifiable rewards from the latest instruct run

The losses take log-probabilities and return tensors, with no model inside, so a test can hold them against a
formula computed by hand (tests/test_posttrain.py).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from config import UserError, error_summary
from gptkit import prompts, tasks
from gptkit.prompts import ChatTemplate
from model import GPT

# ----------------------------------------------------------------------------------------------------------------
# Prompts and replies as token ids


def prompt_messages(prompt: object, where: str) -> list[dict]:
    """A data row's prompt, a string (one user message) or a list of chat messages, as checked messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: the prompt is empty; fill it in or remove the row")
        return [{"role": "user", "content": prompt}]
    if prompt is None:
        raise UserError(f"{where}: no \"prompt\"; give a string or a list of {{\"role\", \"content\"}} messages")
    messages = prompts.check_messages(prompt, f"{where}: prompt")
    if messages[-1]["role"] == "assistant":
        raise UserError(f"{where}: the prompt's last message is the assistant's; end it with the user's question")
    return messages


def template_of(instruct_record: dict | None, end_of_turn: int | None, source: str,
                trained_on: str | None = None) -> tuple[dict, ChatTemplate]:
    """The instruct record and chat template of a start: what turns a prompt into the text the model answers. An
    instruct checkpoint records them; a model pretrained on the built-in task's transcripts (train.py
    --dataset=addition) has read nothing but that chat style, so it gets the chat template."""
    if end_of_turn is not None and not instruct_record and trained_on == tasks.ADDITION:
        instruct_record = {"prompt_style": "chat", "mask_prompt": False, "lora_rank": 0, "lora_alpha": 16.0,
                           "base": source, "dataset": tasks.ADDITION,
                           "chat_template": prompts.chat_template("chat", end_of_turn).to_dict()}
    if not instruct_record or end_of_turn is None:
        raise UserError(f"{source} has no chat template (it was not instruction-tuned); start from an instruct run: "
                        "`make addition` (or --init_from=checkpoints/<instruct run>)")
    return instruct_record, prompts.recorded_template(instruct_record, end_of_turn)


def encode_prompt(template: ChatTemplate, prompt: object, encode: Callable[[str], list[int]], where: str) -> list[int]:
    """A prompt's ids, up to where the assistant's reply begins."""
    return prompts.encode_conversation(template, prompt_messages(prompt, where), encode, open_reply=True)[0]


def reply_tokens(sampled: list[int], end_of_turn: int) -> list[int]:
    """A sampled row's reply: up to and including its end token (the model learns to stop), or all of it if none."""
    return sampled[:sampled.index(end_of_turn) + 1] if end_of_turn in sampled else sampled


def pad_pairs(prompts_ids: list[list[int]], replies: list[list[int]], pad: int,
              block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T), y (B, T) and the reply mask (B, T) of prompt + reply rows, right-padded with `pad`.

    mask[b, t] is 1 where target y[b, t] is a reply token: the losses count those alone, never the prompt or the
    padding. A row longer than block_size + 1 keeps its end (the reply) and loses the start of its prompt.
    """
    rows = [(p + r)[-(block_size + 1):] for p, r in zip(prompts_ids, replies)]
    reply_lengths = [min(len(r), len(row) - 1) for r, row in zip(replies, rows)]
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest - 1))
    for b, (row, n_reply) in enumerate(zip(rows, reply_lengths)):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, len(row) - 1 - n_reply:len(row) - 1] = 1.0  # target j is token j + 1
    return ids[:, :-1], ids[:, 1:], mask


def token_logprobs(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y[b, t] | x[b, :t + 1]) for every position (B, T), in float32 whatever the autocast."""
    logits = model(x)  # (B, T, V)
    return -F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)


# ----------------------------------------------------------------------------------------------------------------
# DPO (Rafailov et al. 2023)

DPO_LOSS_TYPES = ("sigmoid", "sigmoid_norm")  # TRL's names: summed, or per-token averaged, reply log-probabilities


def reply_logprob(logprobs: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """One number per row (B,): the reply's log-probability, summed (sigmoid) or averaged per token (sigmoid_norm)."""
    total = (logprobs * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if loss_type == "sigmoid_norm" else total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over pairs; and the implicit rewards
    beta * (pi - ref) of the chosen and rejected replies (B,), whose margin the loss widens.

    The reference's log-probabilities anchor the policy: the loss rewards moving the chosen reply up *relative to
    where the start model had it*, so a reply both models like equally earns nothing and the policy stays near it.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


# ----------------------------------------------------------------------------------------------------------------
# GRPO (Shao et al. 2024, DeepSeekMath), with DAPO's per-token normalisation


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G), G samples for each of P prompts -> advantages (P, G): reward minus its group's mean, divided
    by the group's standard deviation when scale_by_std. A group whose samples all scored alike gets 0 everywhere:
    with nothing better or worse than the others in it, there is nothing to learn from it."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, reference_logprobs: torch.Tensor | None = None,
              kl_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped policy-gradient loss over every sampled reply token, normalised per token (B, T inputs; one
    advantage per row, (B,)); and the mean KL estimate to the reference (0 without one).

    ratio = pi / pi_old is 1 on the first update of a batch (old = the sampling policy), so the loss's gradient is
    -advantage * grad log pi, REINFORCE's; on later updates of the same samples clipping the ratio to 1 +- clip_eps
    stops a step from moving a token's probability far from where it was sampled (PPO). The KL term is the k3
    estimator exp(ref - pi) - (ref - pi) - 1 (>= 0, unbiased), as in DeepSeekMath.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages[:, None]
    per_token = -torch.minimum(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)
    kl = torch.zeros((), device=logprobs.device)
    if reference_logprobs is not None:
        log_ratio = reference_logprobs - logprobs
        kl_per_token = torch.exp(log_ratio) - log_ratio - 1
        kl = (kl_per_token * mask).sum() / mask.sum().clamp(min=1)
        per_token = per_token + kl_coef * kl_per_token
    return (per_token * mask).sum() / mask.sum().clamp(min=1), kl.detach()


# ----------------------------------------------------------------------------------------------------------------
# Rewards

Reward = Callable[[object, str, dict], float]


def exact_match_reward(prompt: object, reply: str, row: dict) -> float:
    """The default: 1.0 when the stripped reply is the row's answer, else 0.0."""
    return tasks.exact_match(reply, row["answer"])


def load_reward(spec: str) -> Reward:
    """--reward=path/to/file.py:function -> the function, called as function(prompt, reply, row) -> a number."""
    path_text, _, name = spec.rpartition(":")
    if not path_text or not name:
        raise UserError(f"--reward={spec!r} is not path/to/file.py:function; e.g. --reward=my_reward.py:score")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"--reward={spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise UserError(f"--reward={spec}: {path} failed to load ({error_summary(err)})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"--reward={spec}: {path} has no function {name!r}")
    return function


def score(reward: Reward, prompt: object, reply: str, row: dict, where: str) -> float:
    """The reward of one reply as a float, or a UserError naming the row when the function raises or returns
    something that is not a finite number."""
    try:
        value = reward(prompt, reply, row)
    except Exception as err:
        raise UserError(f"the reward function raised on {where} (prompt {str(prompt)[:60]!r}, reply "
                        f"{reply[:60]!r}): {type(err).__name__}: {error_summary(err)}") from None
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UserError(f"the reward function returned {value!r} for {where} (prompt {str(prompt)[:60]!r}); it must "
                        "return a finite number")
    return float(value)
