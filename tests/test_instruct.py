"""Instruction fine-tuning (instruct.py): the book's template, per-batch padding and the loss mask, a tiny model that
learns to follow an instruction, the judge client against a local server, and the command line end to end."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import instruct
import lora
from config import Config, ConfigError, ModelConfig, TrainConfig, UserError
from gptkit import checkpoint, loading, prompts
from gptkit.prompts import format_prompt
from gptkit.runtime import setup_runtime
from instruct import Entry, collate, encode_entries
from model import GPT
from tests.helpers import REPO
from train import make_optimizer, train_step

# GPT-2's ranks, shared by every test run on this checkout (seeded once from the package index when missing)
TIKTOKEN_CACHE = REPO / "data" / "tiktoken"


# ------------------------------------------------------------------------------------------------ the template


def test_the_alpaca_template_is_the_books_byte_for_byte_with_and_without_an_input():
    # rasbt/LLMs-from-scratch ch07: format_input(entry) + f"\n\n### Response:\n{entry['output']}"
    with_input = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.\n\n### Instruction:\nRewrite the sentence in passive voice.\n\n### Input:\nThe cat ate "
                  "the fish.\n\n### Response:\nThe fish was eaten by the cat.")
    assert format_prompt("alpaca", "Rewrite the sentence in passive voice.", "The cat ate the fish.") + \
        "The fish was eaten by the cat." == with_input
    without_input = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\nName a primary color.\n\n### Response:\nRed.")
    assert format_prompt("alpaca", "Name a primary color.") + "Red." == without_input
    assert format_prompt("chat", "Name a primary color.") == "User: Name a primary color.\nAssistant: "
    with pytest.raises(ConfigError, match="prompt_style='vicuna' is not one of alpaca, chat"):
        format_prompt("vicuna", "x")


# ------------------------------------------------------------------------------------------------ batches


def prompt_then_response(prompt_length: int, length: int) -> list[int]:
    return [instruct.PROMPT] * prompt_length + [instruct.RESPONSE] * (length - prompt_length)


def test_collate_pads_per_batch_keeps_the_first_end_token_and_masks_exactly_the_prompt():
    end = 9
    sequences = [[1, 2, 3, 4, end], [5, 6, end]]
    prompt_lengths = [prompt_then_response(3, 5), prompt_then_response(1, 3)]
    x, y = collate(sequences, prompt_lengths, end, mask_prompt=False)
    assert x.tolist() == [[1, 2, 3, 4], [5, 6, end, end]]  # padded to this batch's longest, with the end token
    assert y.tolist() == [[2, 3, 4, end], [6, end, -1, -1]]  # each row's end token kept, the padding after it not
    x_masked, y_masked = collate(sequences, prompt_lengths, end, mask_prompt=True)
    assert torch.equal(x_masked, x)
    # row 0's prompt is 1 2 3: the targets 2 and 3 are prompt tokens; 4 (the response's first) is kept
    assert y_masked.tolist() == [[-1, -1, 4, end], [6, end, -1, -1]]

    rng = np.random.default_rng(0)
    for _ in range(20):  # the same two rules on random batches
        lengths = rng.integers(2, 12, size=5)
        prompts = [int(rng.integers(1, n)) for n in lengths]
        batch = [[int(t) for t in rng.integers(0, end, size=n - 1)] + [end] for n in lengths]
        kinds = [prompt_then_response(p, n) for p, n in zip(prompts, lengths)]
        x, y = collate(batch, kinds, end, mask_prompt=False)
        assert x.shape == (5, max(lengths) - 1)
        assert int((y != -1).sum()) == sum(n - 1 for n in lengths)
        _, y = collate(batch, kinds, end, mask_prompt=True)
        assert int((y != -1).sum()) == sum(n - p for n, p in zip(lengths, prompts))


class CharsWithEnd(data.CharTokenizer):
    """The char tokenizer plus an end-of-text id after the characters (test data only)."""

    def __init__(self, chars: str):
        super().__init__(chars)
        self.eot_token, self.vocab_size = len(chars), len(chars) + 1

    def decode(self, ids):
        return super().decode([i for i in ids if i != self.eot_token])


CHARS = "\n :ARUabcdeghiklmnoprstuwxy"


def test_entries_longer_than_the_context_are_cut_there_and_counted():
    tokenizer = CharsWithEnd(CHARS)
    entries = [Entry("hi", "", "ok"), Entry("hi", "", "a long answer here"), Entry("a prompt too long" * 3, "", "x")]
    encoded = encode_entries(entries, tokenizer, "chat", block_size=24)
    assert (encoded.truncated, encoded.dropped) == (1, 1)  # the third: its prompt alone fills the context
    assert [len(s) for s in encoded.ids] == [len("User: hi\nAssistant: ok") + 1, 25]  # block_size + 1 at most
    assert encoded.ids[0][-1] == tokenizer.eot_token and encoded.ids[1][-1] != tokenizer.eot_token
    x, y = collate(encoded.ids, encoded.kinds, tokenizer.eot_token, True)
    assert x.shape[1] == 24


def test_a_conversation_is_one_sequence_whose_loss_is_on_the_replies_and_their_end_tokens_only():
    tokenizer = CharsWithEnd("".join(sorted(set(CHARS + "Sfy"))))
    end = tokenizer.eot_token
    talk = instruct.Conversation([{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name"},
                                  {"role": "assistant", "content": "sam"}])
    encoded = encode_entries([talk], tokenizer, "chat", block_size=100)
    assert tokenizer.decode(encoded.ids[0]) == "System: be kind\nUser: hi\nAssistant: helloUser: name\nAssistant: sam"
    assert encoded.ids[0].count(end) == 2  # each reply closed by the one end-of-turn token
    for mask_prompt in (False, True):  # --mask_prompt is about entries' prompts: a conversation's turns never count
        x, y = collate(encoded.ids, encoded.kinds, end, mask_prompt)
        kept = y[0][y[0] != -1].tolist()
        assert kept == tokenizer.encode("hello") + [end] + tokenizer.encode("sam") + [end]
    cut = encode_entries([talk], tokenizer, "chat", block_size=40)  # the second reply falls past the context
    assert (cut.truncated, cut.dropped, len(cut.ids[0])) == (1, 0, 41)
    assert encode_entries([talk], tokenizer, "chat", block_size=20).dropped == 1  # not even the first reply fits
    assert talk.instruction == "name" and talk.output == "sam" and talk.asked() == talk.messages[:-1]


# ------------------------------------------------------------------------------------------------ data


def test_records_messages_and_the_seeded_split_that_keeps_an_instruction_in_one_split():
    columns = {"instruction": "instruction", "input": "input", "output": "output"}
    records = [{"instruction": "a", "input": "b", "output": "c"},
               {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                             {"role": "assistant", "content": "see you"}, {"role": "user", "content": "?"}]}]
    assert instruct.entries_from_records(records, "x.json", columns) == [
        Entry("a", "b", "c"), instruct.Conversation(records[1]["messages"][:-1])]  # the unanswered "?" left out
    entries = [Entry(f"q{i % 40}", "", f"a{i}") for i in range(200)]  # 40 instructions, 5 answers each
    splits = instruct.split_entries(entries, {"val": 0.1, "test": 0.1}, seed=3)
    seen = {split: {e.instruction for e in splits[split]} for split in splits}
    assert len(seen["val"]) == len(seen["test"]) == 4 and not seen["train"] & (seen["val"] | seen["test"])
    assert sum(len(v) for v in splits.values()) == 200
    assert instruct.split_entries(entries, {"val": 0.1, "test": 0.1}, seed=3) == splits
    with pytest.raises(UserError, match="entry 1 has no 'output'"):
        instruct.entries_from_records([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "x.json", columns)
    with pytest.raises(UserError, match=r"3 entries \(1 distinct prompts\) are too few"):
        instruct.split_entries([Entry("q", "", f"a{i}") for i in range(3)], {"val": 0.1, "test": 0.1}, seed=0)
    with pytest.raises(UserError, match="is not a list of objects"):
        instruct.entries_from_records({"instruction": "a"}, "x.json", columns)
    with pytest.raises(UserError, match=r"x.json, entry 0: messages\[1\].role='bot' is not one of system, user"):
        instruct.entries_from_records([{"messages": [{"role": "user", "content": "a"}, {"role": "bot",
                                                                                     "content": "b"}]}], "x.json", {})
    with pytest.raises(UserError, match="entry 0: the conversation has no assistant message"):
        instruct.entries_from_records([{"messages": [{"role": "user", "content": "a"}]}], "x.json", {})


def test_a_data_set_of_one_instruction_splits_by_input_and_keeps_identical_prompts_together():
    # 600 x "Translate into French" with 200 sentences, each three times: refused before ("1 distinct instructions")
    entries = [Entry("Translate into French", f"sentence {i % 200}", f"phrase {i % 200}") for i in range(600)]
    splits = instruct.split_entries(entries, {"val": 0.1, "test": 0.05}, seed=0)
    inputs = {split: {e.input for e in splits[split]} for split in splits}
    assert (len(inputs["val"]), len(inputs["test"]), len(inputs["train"])) == (20, 10, 170)
    assert not inputs["train"] & inputs["val"] and not inputs["train"] & inputs["test"]
    assert not inputs["val"] & inputs["test"]
    assert all(len(splits[split]) == 3 * len(inputs[split]) for split in splits)  # each prompt's three copies


# ------------------------------------------------------------------------------------------------ learning


def repeat_entries(words: list[str]) -> list[Entry]:
    return [Entry(f"Repeat: {w}", "", f"{w} {w}") for w in words]


def test_a_tiny_model_learns_to_follow_an_instruction_and_answers_held_out_words():
    rng = np.random.default_rng(0)
    letters = "abcdeghiklmnoprstuy"
    words = sorted({"".join(rng.choice(list(letters), size=int(rng.integers(3, 6)))) for _ in range(700)})
    rng.shuffle(words)
    held_out, trained = words[:30], words[30:]
    tokenizer = CharsWithEnd(CHARS)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=40,
                            dropout=0.0))
    train = TrainConfig(batch_size=32, learning_rate=3e-3, weight_decay=0.0, grad_clip=1.0)
    runtime = setup_runtime("cpu", "float32")
    encoded = encode_entries(repeat_entries(trained), tokenizer, "chat", 40)
    held_out_encoded = encode_entries(repeat_entries(held_out), tokenizer, "chat", 40)
    batches = instruct.batches_for(encoded, train.batch_size, 0, tokenizer.eot_token, mask_prompt=True)
    optimizer = make_optimizer(model, train, "cpu")
    before = instruct.response_loss(model, held_out_encoded, runtime, 32, tokenizer.eot_token)
    for _ in range(600):  # about 20 epochs of 670 words
        assert train_step(model, optimizer, runtime.grad_scaler(), batches, runtime, train, 3e-3) is not None
    after = instruct.response_loss(model, held_out_encoded, runtime, 32, tokenizer.eot_token)
    assert after < before / 4, (before, after)
    model.eval()
    template = prompts.chat_template("chat", tokenizer.eot_token)
    answers = [instruct.respond(model, tokenizer, template, entry, 16) for entry in repeat_entries(held_out)]
    right = sum(answer == f"{w} {w}" for answer, w in zip(answers, held_out))
    assert right >= 0.7 * len(held_out), list(zip(held_out, answers))


# ------------------------------------------------------------------------------------------------ the judge


class FakeJudge(http.server.BaseHTTPRequestHandler):
    """An Ollama-like /api/chat that answers the score its test chose for each reference."""

    answers: dict[str, str] = {}
    requests: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append({"path": self.path, **body})
        prompt = body["messages"][0]["content"]
        answer = next((a for reference, a in self.answers.items() if f"correct output `{reference}`" in prompt), "?")
        payload = json.dumps({"model": body["model"], "message": {"role": "assistant", "content": answer},
                              "done": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_the_judge_client_scores_numbers_skips_other_answers_and_survives_a_dead_server(judge_server, capsys):
    FakeJudge.answers = {"Red.": "85", "Paris": " 60\n", "blue": "I would give it 70 out of 100", "four": "250"}
    FakeJudge.requests = []
    responses = [{"instruction": "Name a primary color.", "input": "", "reference": ref, "response": "red"}
                 for ref in ("Red.", "Paris", "blue", "four")]
    summary = instruct.judge_responses(responses, judge_server, "llama3")
    assert [r["score"] for r in responses] == [85, 60, None, None]  # prose and 250 are not scores 0-100
    assert summary["mean_score"] == 72.5 and (summary["scored"], summary["unscored"]) == (2, 2)
    assert "2 of 4 responses with something other than an integer" in capsys.readouterr().err
    sent = FakeJudge.requests[0]
    assert sent["path"] == "/api/chat" and sent["model"] == "llama3" and sent["stream"] is False
    assert sent["messages"][0]["content"] == instruct.JUDGE_PROMPT.format(
        task=format_prompt("alpaca", "Name a primary color.").removesuffix("\n\n### Response:\n"),
        reference="Red.", response="red")

    dead = instruct.judge_responses([dict(r) for r in responses], closed_port_url(), "llama3")
    assert "error" in dead and "mean_score" not in dead
    warning = capsys.readouterr().err
    assert warning.count("warning: the judge at") == 1 and "responses.json has the responses" in warning


# ------------------------------------------------------------------------------------------------ the command line


def run(*args: str, cwd: Path, script: str = "instruct.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TIKTOKEN_CACHE_DIR": str(TIKTOKEN_CACHE)}
    return subprocess.run([sys.executable, str(REPO / script), "--device=cpu", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def save_pretrained_gpt2_tiny(folder: Path) -> Path:
    """A tiny 'pretrained' run with GPT-2's tokenizer (instruction tuning needs its end-of-text token)."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=16, block_size=64))
    payload = {"config": config.to_dict(), "model": GPT(config.model).state_dict(), "tokenizer": {"name": "gpt2"},
               "state": {"step": 1}}
    return checkpoint.save_checkpoint(folder / "best.pt", payload)


@pytest.fixture(scope="module")
def offline_default(tmp_path_factory):
    """What `make instruct` runs with nothing named: the latest pretrained run, chatterbot-corpus; few steps."""
    root = tmp_path_factory.mktemp("instruct")
    save_pretrained_gpt2_tiny(root / "checkpoints" / "tiny-pretrained")
    done = run("--max_iters=6", "--eval_interval=3", "--max_new_tokens=6", "--batch_size=4",
               f"--judge_url={closed_port_url()}", "--out_dir=tuned", cwd=root)
    return root, done


def test_make_instruct_default_runs_offline_and_saves_every_test_response(offline_default):
    root, done = offline_default
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data: chatterbot: train" in done.stdout and "tiny-pretrained" in done.stdout
    results = json.loads((root / "tuned" / "results.json").read_text())
    loss = results["val_response_loss"]
    assert loss["after"] < loss["before"]
    responses = json.loads((root / "tuned" / "responses.json").read_text())
    assert len(responses) == results["test_entries"] > 10
    assert all(set(r) == {"instruction", "input", "reference", "response"} for r in responses)
    assert done.stderr.count("warning: the judge at") == 1  # nothing answered there; the responses were kept
    assert (root / "tuned" / "loss.png").stat().st_size > 1000
    assert json.loads((root / "tuned" / "manifest.json").read_text())["kind"] == "instruct"
    assert checkpoint.latest_run(root / "checkpoints", exclude_kinds=("instruct",)).name == "tiny-pretrained"


def test_fine_tuning_counts_tokens_seen_in_tokens_not_examples(offline_default):
    root, done = offline_default
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (root / "tuned" / "metrics.jsonl").read_text().splitlines()]
    template = 30  # GPT-2 tokens of the alpaca template around a one-token instruction, less one
    assert records and all(r["tokens_seen"] >= r["step"] * 4 * template for r in records)  # 4 entries a step


def test_the_prompt_style_survives_the_checkpoint_and_generate_answers_as_instruct_does(offline_default, monkeypatch):
    root, done = offline_default
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = loading.load_model(ckpt=str(root / "tuned"))
    assert loaded.instruct["prompt_style"] == "alpaca" and loaded.instruct["mask_prompt"] is False
    asked = run("--ckpt=tuned", "--instruction=Name a primary color.", "--input=Pick one.", "--temperature=0",
                "--max_new_tokens=6", cwd=root, script="generate.py")
    assert asked.returncode == 0, asked.stderr[-2000:]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    tokenizer = data.get_tokenizer(loaded.tokenizer)
    template = prompts.recorded_template(loaded.instruct, tokenizer.eot_token)
    expected = instruct.respond(loaded.model.eval(), tokenizer, template,
                                Entry("Name a primary color.", "Pick one.", ""), 6)
    assert asked.stdout.strip() == expected  # the response alone: what follows "### Response:"
    assert "### Response:" not in asked.stdout and "Below is an instruction" not in asked.stdout


def test_lora_adapters_train_and_the_checkpoint_samples_as_a_plain_gpt(offline_default):
    root, _ = offline_default
    done = run("--init_from=checkpoints/tiny-pretrained", "--lora_rank=2", "--max_iters=2", "--eval_interval=100",
               "--max_new_tokens=2", "--prompt_style=chat", "--out_dir=adapted", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(LoRA rank 2, alpha 16)" in done.stdout
    saved = checkpoint.load_checkpoint(root / "adapted" / "last.pt")
    base = checkpoint.load_checkpoint(root / "checkpoints" / "tiny-pretrained" / "best.pt")["model"]
    assert torch.equal(saved["model"]["transformer.h.0.attn.c_attn.base.weight"],
                       base["transformer.h.0.attn.c_attn.weight"])  # the base stayed frozen
    loaded = loading.load_model(ckpt=str(root / "adapted"))
    assert loaded.instruct["prompt_style"] == "chat"
    assert not any(isinstance(m, lora.LoRALinear) for m in loaded.model.modules())
    asked = run("--ckpt=adapted", "--instruction=hi", "--max_new_tokens=2", cwd=root, script="generate.py")
    assert asked.returncode == 0, asked.stderr[-2000:]


def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(offline_default):
    root, _ = offline_default
    (root / "object.json").write_text('{"instruction": "a", "output": "b"}')
    (root / "missing.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}]')
    (root / "empty.json").write_text("[]")
    (root / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    char_model = root / "char"
    config = Config(model=ModelConfig(vocab_size=len(CHARS), n_layer=1, n_head=1, n_embd=8, block_size=16))
    checkpoint.save_checkpoint(char_model / "best.pt", {"config": config.to_dict(), "model": GPT(config.model)
                                                        .state_dict(), "tokenizer": {"name": "char", "chars": CHARS}})
    pretrained = "--init_from=checkpoints/tiny-pretrained"
    cases = [
        ([pretrained, "--dataset=object.json"], "instruct.py", "object.json is not a list of objects"),
        ([pretrained, "--dataset=missing.json"], "instruct.py", "entry 1 has no 'output'"),
        ([pretrained, "--dataset=empty.json"], "instruct.py", "holds no entries"),
        ([pretrained, "--dataset=broken.jsonl"], "instruct.py", "is not valid JSON Lines"),
        ([pretrained, "--dataset=nothing.json"], "instruct.py", "--dataset=nothing.json does not exist"),
        ([pretrained, "--prompt_style=vicuna"], "instruct.py", "'vicuna' is not one of auto, alpaca, chat"),
        ([pretrained, "--judge_url=localhost:11434"], "instruct.py", "is not an http:// or https:// URL"),
        ([f"--init_from={char_model}"], "instruct.py", "has no end-of-text token"),
        (["--ckpt=checkpoints/tiny-pretrained", "--instruction=hi"], "generate.py", "was not instruction-tuned"),
        (["--ckpt=tuned", "--input=only this"], "generate.py", "--input goes with --instruction"),
    ]
    before = (root / "tuned" / "last.pt").read_bytes()
    for args, script, message in cases:
        done = run(*args, cwd=root, script=script)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert done.stderr.count("\n") == 1 and message in done.stderr, (args, done.stderr)
    taken = run(pretrained, "--out_dir=tuned", cwd=root)
    assert taken.returncode == 2 and "already holds a run" in taken.stderr
    assert (root / "tuned" / "last.pt").read_bytes() == before


def test_an_hf_data_set_keeps_its_own_splits_and_other_column_names(monkeypatch):
    import datasets
    rows = {"train": [{"prompt": f"q{i}", "context": "", "answer": f"a{i}"} for i in range(30)],
            "validation": [{"prompt": "v", "context": "c", "answer": "w"}]}
    loaded = datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: loaded)
    options = {**instruct.OPTIONS, "instruction_column": "prompt", "input_column": "context", "output_column": "answer"}
    splits = instruct.load_splits("hf:someone/qa", options, val_fraction=0.1, seed=0)
    assert splits["val"] == [Entry("v", "c", "w")]  # the source's own validation split, not a share of train
    assert len(splits["test"]) == 2 and len(splits["train"]) == 28  # test: 5% of the 30 train entries, rounded up
    with pytest.raises(UserError, match="entry 0 has no 'reply' .*--output_column="):
        instruct.load_splits("hf:someone/qa", dict(instruct.OPTIONS, instruction_column="prompt",
                                                   output_column="reply"), 0.1, 0)


def test_resume_continues_bitwise_like_a_run_that_never_stopped(offline_default):
    root, _ = offline_default
    entries = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in "red green blue cyan gold pink".split()]
    (root / "repeat.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries * 6))
    common = ["--init_from=checkpoints/tiny-pretrained", "--dataset=repeat.jsonl", "--dtype=float32",
              "--batch_size=4", "--lr_decay_iters=8", "--eval_interval=4", "--keep_last=10", "--max_new_tokens=2"]
    assert run(*common, "--max_iters=8", "--out_dir=straight", cwd=root).returncode == 0
    assert run(*common, "--max_iters=4", "--out_dir=halves", cwd=root).returncode == 0
    resumed = run("--resume", "--out_dir=halves", "--max_iters=8", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming halves at step 4" in resumed.stdout
    weights = [checkpoint.load_checkpoint(root / name / "last.pt")["model"] for name in ("straight", "halves")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    first_half = checkpoint.load_checkpoint(root / "halves" / "ckpt-0000004.pt")["model"]
    assert not all(torch.equal(weights[0][k], first_half[k]) for k in first_half)  # it did train on


def test_test_answers_use_the_recorded_chat_template_and_stop_at_its_next_header(monkeypatch):
    tokenizer = CharsWithEnd(CHARS + "Q")
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_embd=8, block_size=64)).eval()
    recorded = prompts.ChatTemplate("chat", "{content}\n", "Q: {content}\n", "A: ", tokenizer.eot_token)
    seen = []

    def fake_generate(model, prompt, max_new_tokens, sampling, generator=None, stop_token=None, **kwargs):
        seen.append((prompt[0].tolist(), max_new_tokens))
        said = tokenizer.encode("ok\nQ: more")  # a small model going on to ask the next question itself
        return type("Generation", (), {"tokens": torch.tensor([said])})()

    monkeypatch.setattr(instruct.generate, "generate", fake_generate)
    answer = instruct.respond(model, tokenizer, recorded, Entry("hi", "", "x"), 40)
    assert tokenizer.decode(seen[0][0]) == "Q: hi\nA: "  # the recorded template, not the style's own
    assert seen[0][1] == 40 and answer == "ok"  # the reply stopped where the model wrote "Q:"
