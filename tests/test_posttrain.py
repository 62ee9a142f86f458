"""Past SFT: the DPO loss and GRPO's advantages and loss held against formulas computed by hand, the reply mask, the
built-in task's splits, rewards that misbehave, and dpo.py and rl.py end to end on a tiny model (resume and bad
input included).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_posttrain.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chat
from config import UserError
from gptkit import posttrain, tasks
from tests.helpers import REPO

# ------------------------------------------------------------------------------------------------ the formulas


def test_dpo_loss_matches_the_papers_formula_on_fixed_log_probabilities():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.5])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.8, -2.5])
    beta = 0.1
    loss, chosen, rejected = posttrain.dpo_loss(pc, pr, rc, rr, beta)
    by_hand = []
    for i in range(2):
        margin = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        by_hand.append(-math.log(1 / (1 + math.exp(-margin))))
    assert loss.item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    assert chosen.tolist() == pytest.approx([beta * 0.5, beta * -1.0])
    assert rejected.tolist() == pytest.approx([beta * -0.2, beta * 1.0])
    # at the start the policy is the reference: every implicit reward is 0 and the loss is log 2
    assert posttrain.dpo_loss(pc, pr, pc, pr, beta)[0].item() == pytest.approx(math.log(2))


def test_reply_log_probability_is_summed_or_averaged_over_reply_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert posttrain.reply_logprob(logprobs, mask, "sigmoid").item() == -5.0
    assert posttrain.reply_logprob(logprobs, mask, "sigmoid_norm").item() == -2.5


def test_pad_pairs_masks_exactly_the_reply_targets():
    x, y, mask = posttrain.pad_pairs([[1, 2, 3], [4, 5]], [[6, 9], [7, 8, 9]], pad=9, block_size=16)
    assert x.tolist() == [[1, 2, 3, 6], [4, 5, 7, 8]]
    assert y.tolist() == [[2, 3, 6, 9], [5, 7, 8, 9]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]  # targets 6, <end> and 7, 8, <end>; never prompt or pad


def test_group_advantages_centre_and_scale_per_group_and_a_uniform_group_gives_zero():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    centred = posttrain.group_advantages(rewards, scale_by_std=False)
    assert centred.tolist() == [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]
    scaled = posttrain.group_advantages(rewards)
    assert scaled[0].tolist() == pytest.approx([1, -1, -1, 1], abs=1e-3)  # std 0.5
    assert scaled[1].tolist() == [0, 0, 0, 0]  # all wrong: nothing to learn from this group


def test_grpo_loss_is_reinforce_on_the_first_update_and_normalised_per_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([2.0, -1.0])
    loss, kl = posttrain.grpo_loss(logprobs, logprobs.detach(), advantages, mask)
    assert loss.item() == pytest.approx(-(2 + 2 - 1) / 3)  # ratio 1: -sum(A * mask) / tokens
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-2 / 3, -2 / 3, 0], [1 / 3, 0, 0]]))
    assert kl.item() == 0


def test_grpo_clipping_stops_a_ratio_beyond_one_plus_eps_from_pushing_further():
    old = torch.tensor([[0.0]])
    moved = torch.tensor([[math.log(1.5)]], requires_grad=True)  # ratio 1.5 > 1.2
    loss, _ = posttrain.grpo_loss(moved, old, torch.tensor([1.0]), torch.ones(1, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert moved.grad.item() == 0  # clipped: no gradient to push the ratio higher


def test_grpo_kl_penalty_is_k3_and_zero_at_the_reference():
    logprobs = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    _, kl = posttrain.grpo_loss(logprobs, logprobs, torch.zeros(1), mask, reference_logprobs=logprobs, kl_coef=0.1)
    assert kl.item() == 0
    reference = torch.tensor([[-1.5, -1.0]])
    _, kl = posttrain.grpo_loss(logprobs, logprobs, torch.zeros(1), mask, reference_logprobs=reference, kl_coef=0.1)
    by_hand = sum(math.exp(r - p) - (r - p) - 1 for r, p in ((-1.5, -1.0), (-1.0, -2.0))) / 2
    assert kl.item() == pytest.approx(by_hand, rel=1e-6)


# ------------------------------------------------------------------------------------------------ task and rewards


def test_the_addition_task_is_fixed_and_no_held_out_question_is_in_train():
    splits = tasks.addition_splits()
    assert splits == tasks.addition_splits()
    train = {row["prompt"] for row in splits["train"]}
    assert not train & {row["prompt"] for row in splits["test"] + splits["val"]}
    assert all(eval(row["prompt"]) == int(row["answer"]) for row in splits["test"])  # noqa: S307 (our own sums)


def test_the_teacher_forgets_the_carry_only_in_train_and_the_answer_stays_true():
    splits = tasks.addition_splits()
    for split, rows in splits.items():
        assert all(eval(row["prompt"]) == int(row["answer"]) for row in rows), split  # noqa: S307 (our own sums)
    for row in splits["val"] + splits["test"]:
        assert row["teacher"] == row["answer"]
    carrying = [row for row in splits["train"] if sum(int(n) % 10 for n in row["prompt"].split("+")) >= 10]
    slips = [row for row in splits["train"] if row["teacher"] != row["answer"]]
    assert {row["prompt"] for row in slips} <= {row["prompt"] for row in carrying}  # only a carry is forgotten
    assert all(int(row["answer"]) - int(row["teacher"]) == 10 for row in slips)
    assert abs(len(slips) / len(carrying) - tasks.TEACHER_SLIP) < 0.03
    assert tasks.addition_transcripts(slips[:1]) == [f"User: {slips[0]['prompt']}\nAssistant: {slips[0]['teacher']}"]


def test_rewards_that_raise_or_return_no_number_name_the_row(tmp_path):
    file = tmp_path / "my_reward.py"
    file.write_text("def boom(prompt, reply, row):\n    raise ValueError('bad')\n"
                    "def text(prompt, reply, row):\n    return 'high'\n"
                    "def good(prompt, reply, row):\n    return reply == row['answer']\n")
    with pytest.raises(UserError, match="raised on train row 7.*ValueError: bad"):
        posttrain.score(posttrain.load_reward(f"{file}:boom"), "1+1", "2", {"answer": "2"}, "train row 7")
    with pytest.raises(UserError, match="returned 'high' for train row 3"):
        posttrain.score(posttrain.load_reward(f"{file}:text"), "1+1", "2", {"answer": "2"}, "train row 3")
    assert posttrain.score(posttrain.load_reward(f"{file}:good"), "1+1", "2", {"answer": "2"}, "row 0") == 1.0
    with pytest.raises(UserError, match="has no function 'missing'"):
        posttrain.load_reward(f"{file}:missing")
    with pytest.raises(UserError, match="no file"):
        posttrain.load_reward("nowhere.py:score")


# ------------------------------------------------------------------------------------------------ end to end

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32"]


def run(script: str, *args: str, cwd, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sft_start(tmp_path_factory):
    """A tiny instruct run on the built-in task: pretrained a few steps on its transcripts, then SFT."""
    folder = tmp_path_factory.mktemp("posttrain")
    run("train.py", "--preset=tiny", "--dataset=addition", "--tokenizer=bpe:257", *TINY, "--max_iters=30",
        "--eval_interval=30", "--eval_iters=2", "--out_dir=ck/base", "--device=cpu", cwd=folder)
    result = run("instruct.py", "--init_from=ck/base", "--dataset=addition", "--max_iters=10", "--eval_interval=10",
                 "--out_dir=ck/sft", "--max_new_tokens=6", "--device=cpu", cwd=folder)
    assert "before training: test exact match (greedy)" in result.stdout
    assert "test exact match (greedy):" in result.stdout
    return folder


def test_rl_runs_resumes_and_its_run_chats(sft_start):
    folder = sft_start
    args = ["--init_from=ck/sft", "--prompts_per_step=2", "--group_size=4", "--eval_rows=8", "--max_new_tokens=5",
            "--eval_interval=2", "--log_interval=1", "--device=cpu", "--out_dir=ck/rl"]
    result = run("rl.py", *args, "--max_iters=2", cwd=folder)
    assert "before RL: test reward" in result.stdout and "test reward (greedy" in result.stdout
    train_log = [json.loads(line) for line in (folder / "ck/rl/metrics.jsonl").read_text().splitlines()]
    step = next(r for r in train_log if r["kind"] == "train")
    for key in ("mean_reward", "any_right", "reply_tokens", "sample_tok_s"):
        assert key in step, step
    assert any(r["kind"] == "eval" and "val_accuracy" in r for r in train_log)
    resumed = run("rl.py", "--resume", "--out_dir=ck/rl", "--max_iters=3", "--device=cpu", cwd=folder)
    assert "resuming ck/rl at step 2" in resumed.stdout and "done: 3 steps" in resumed.stdout
    # the KL penalty to the frozen start and PPO-style reuse of one batch for two updates
    run("rl.py", *args[:-1], "--out_dir=ck/rl-kl", "--kl_coef=0.1", "--updates_per_batch=2", "--max_iters=2",
        cwd=folder)
    kl_steps = [json.loads(line) for line in (folder / "ck/rl-kl/metrics.jsonl").read_text().splitlines()]
    assert [r["kl"] for r in kl_steps if r["kind"] == "train"][0] == pytest.approx(0, abs=1e-6)  # step 1: at the start
    resumed = run("rl.py", "--resume", "--out_dir=ck/rl-kl", "--max_iters=3", "--device=cpu", cwd=folder)
    assert "done: 3 steps" in resumed.stdout  # the reference reloaded from where the run started
    # its checkpoint is an instruct checkpoint too: chat.py answers the task's question in its template
    chat = subprocess.run([sys.executable, str(REPO / "chat.py"), "--ckpt=ck/rl", "--max_new_tokens=5"], cwd=folder,
                          input="12+30\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert chat.returncode == 0, chat.stderr[-2000:]


def test_dpo_runs_with_pairs_from_its_own_samples_and_logs_margins(sft_start):
    folder = sft_start
    result = run("dpo.py", "--init_from=ck/sft", "--max_iters=2", "--eval_interval=2", "--log_interval=1",
                 "--batch_size=4", "--max_new_tokens=5", "--device=cpu", "--out_dir=ck/dpo", cwd=folder)
    assert "before DPO: test exact match" in result.stdout and "making pairs" in result.stdout
    pairs = [json.loads(line) for line in (folder / "ck/dpo/pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    steps = [json.loads(line) for line in (folder / "ck/dpo/metrics.jsonl").read_text().splitlines()]
    first = next(r for r in steps if r["kind"] == "train")
    assert {"reward_margin", "reward_accuracy"} <= first.keys()
    assert first["train_loss"] == pytest.approx(math.log(2), abs=0.05)  # step 1: the policy is the reference
    resumed = run("dpo.py", "--resume", "--out_dir=ck/dpo", "--max_iters=3", "--device=cpu", cwd=folder)
    assert "resuming ck/dpo at step 2" in resumed.stdout and "done: 3 steps" in resumed.stdout
    assert "making pairs" not in resumed.stdout  # it trains on the pairs it made


@pytest.mark.parametrize("row, message", [
    ({"prompt": "1+1", "chosen": "2"}, "line 1 has no 'rejected'"),
    ({"prompt": "1+1", "chosen": "2", "rejected": " 2 "}, "chosen and rejected are the same reply"),
    ({"prompt": "1+1", "chosen": "", "rejected": "3"}, "chosen is empty"),
])
def test_dpo_refuses_bad_pairs_with_the_row_and_exit_2(sft_start, row, message):
    pairs = sft_start / "bad.jsonl"
    pairs.write_text(json.dumps(row) + "\n" + json.dumps({"prompt": "2+2", "chosen": "4", "rejected": "5"}) + "\n")
    result = run("dpo.py", "--init_from=ck/sft", f"--dataset={pairs}", "--device=cpu", "--out_dir=ck/bad-dpo",
                 cwd=sft_start, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (sft_start / "ck/bad-dpo/last.pt").exists()


def test_rl_refuses_a_missing_answer_and_names_the_row_a_reward_raised_on(sft_start, tmp_path):
    rows = tmp_path / "q.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1"}) + "\n" for i in range(10)))
    result = run("rl.py", "--init_from=ck/sft", f"--dataset={rows}", "--device=cpu", "--out_dir=ck/bad-rl",
                 cwd=sft_start, check=False)
    assert result.returncode == 2 and "line 1 has no 'answer'" in result.stderr
    reward = tmp_path / "r.py"
    reward.write_text("def score(prompt, reply, row):\n    if row['n'] == 3:\n        raise KeyError('x')\n"
                      "    return 0.0\n")
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1", "n": i}) + "\n" for i in range(10)))
    result = run("rl.py", "--init_from=ck/sft", f"--dataset={rows}", f"--reward={reward}:score", "--device=cpu",
                 "--out_dir=ck/bad-rl2", "--max_iters=1", cwd=sft_start, check=False)
    assert result.returncode == 2 and f"reward function raised on {rows} line 4 " in result.stderr
    assert "Traceback" not in result.stderr


def test_a_start_without_a_chat_template_is_refused_unless_it_read_only_the_tasks_transcripts():
    with pytest.raises(UserError, match="base.pt has no chat template"):
        posttrain.template_of(None, 256, "base.pt", trained_on="shakespeare")
    info, template = posttrain.template_of(None, 256, "base.pt", trained_on="addition")
    assert info["prompt_style"] == "chat" and template.user == "User: {content}\n"


def test_make_chat_takes_the_latest_dpo_or_rl_run_as_it_takes_an_instruct_run(tmp_path, monkeypatch):
    """`make rl` then `make chat` must talk to the RL run, not to the older instruct run it started from."""
    monkeypatch.chdir(tmp_path)
    for age, (name, kind) in enumerate([("instruct-a", "instruct"), ("rl-b", "rl"), ("classify-c", "classify")]):
        folder = tmp_path / "checkpoints" / name
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"kind": kind}))
        (folder / "best.pt").write_bytes(b"")
        os.utime(folder / "best.pt", (1_000_000 + age, 1_000_000 + age))
    assert Path(chat.default_chat_checkpoint()).name == "rl-b"
    (tmp_path / "checkpoints" / "rl-b" / "manifest.json").write_text(json.dumps({"kind": "dpo"}))
    assert Path(chat.default_chat_checkpoint()).name == "rl-b"
