"""Tests of generate.py: the KV-cached decoder against the plain model, the sampler, and the CLI end to end.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_generate.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from config import Config, ModelConfig, UserError
from generate import (
    Decoder,
    Sampling,
    StopReply,
    apply_repetition_penalty,
    choose_device_and_dtype,
    encode_prompt,
    generate,
    next_token_probs,
    print_stream,
    read_prompt,
    sample_from,
    sample_next_token,
)
from gptkit import checkpoint
from gptkit.fast import lay_out_for_decoding
from model import GPT
from tools.bench import decode_speed

ROOT = Path(__file__).resolve().parent.parent
CHARS = "\n !',.?abcdefghijklmnopqrstuvwxyz"
BLOCK = 16


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, dropout=0.0))
    with torch.no_grad():  # sharper logits than GPT-2's 0.02 init, so that samples vary with the context
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model.eval()


def random_prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(len(CHARS), (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the decoder ------------------------------------------------------------------------------------------------


def test_cached_logits_equal_the_uncached_model_on_the_same_window_across_slides():
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        decoder = Decoder(model, batch_size=2, use_cache=True)
        logits = decoder.prefill(random_prompt(2, 5))
        for _ in range(3 * BLOCK):  # 5 + 48 tokens: the window slides several times
            assert decoder.context.size(1) <= BLOCK
            expected = model(decoder.context)[:, -1]  # the plain forward over exactly the current window
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
            next_ids = sample_next_token(logits, temperature=1.0, generator=generator)
            logits = decoder.step(next_ids)
    assert decoder.slides >= 3
    assert decoder.context.size(1) < BLOCK  # after a slide the window restarts at block_size // 2


def test_column_major_weights_decode_the_same_and_stay_tied():
    model, relaid = tiny_model(), lay_out_for_decoding(tiny_model())
    assert relaid.lm_head.weight is relaid.transformer.wte.weight  # the tie survives the new storage
    for name, module in relaid.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            assert module.weight.stride() == (1, out_features), name  # (in, out) in memory, same shape
    prompt = random_prompt(2, 5)
    with torch.inference_mode():
        torch.testing.assert_close(relaid(prompt), model(prompt), atol=1e-6, rtol=0)  # float32 rounding only
        sampling = Sampling(temperature=0.9, top_k=10)
        runs = [generate(m, prompt, 2 * BLOCK, sampling, torch.Generator().manual_seed(3)).tokens
                for m in (model, relaid)]
    assert torch.equal(runs[0], runs[1])


def test_greedy_decoding_is_deterministic_and_the_same_with_and_without_cache():
    model, prompt = tiny_model(), random_prompt(2, 4)
    greedy = Sampling(temperature=0, repetition_penalty=2.0)  # the penalty keeps a random model out of a loop
    runs = [generate(model, prompt, 3 * BLOCK, greedy, use_cache=use_cache).tokens
            for use_cache in (True, True, False)]
    assert runs[0].shape == (2, 3 * BLOCK)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])
    assert len(set(runs[0][0].tolist())) > 5  # not a degenerate constant output


def test_generate_stops_once_every_row_has_produced_the_stop_token():
    model, prompt = tiny_model(), random_prompt(1, 4)
    greedy = Sampling(temperature=0, repetition_penalty=2.0)
    free_run = generate(model, prompt, 40, greedy).tokens[0].tolist()
    first = next(i for i in range(5, 30) if free_run[i] not in free_run[:i])  # a token first seen mid-run
    stop_token = free_run[first]
    streamed = []
    stopped = generate(model, prompt, 40, greedy, stop_token=stop_token, on_tokens=streamed.append)
    assert stopped.tokens[0].tolist() == free_run[:first + 1]  # streaming checks every token: exact stop
    assert [ids[0] for ids in streamed] == free_run[:first + 1]
    batched = generate(model, prompt, 40, greedy, stop_token=stop_token).tokens[0].tolist()
    assert batched[:first + 1] == free_run[:first + 1] and len(batched) < 40


def test_decode_speed_is_measured_for_both_paths():
    model = tiny_model()
    assert decode_speed(model, use_cache=True, new_tokens=2 * BLOCK, batch_size=2, prompt_tokens=4) > 0
    assert decode_speed(model, use_cache=False, new_tokens=2 * BLOCK, batch_size=2, prompt_tokens=4) > 0


def test_decoder_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval"):
        Decoder(tiny_model().train(), batch_size=1)


# --- the sampler ------------------------------------------------------------------------------------------------


def test_temperature_zero_picks_the_most_likely_token():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 2.9]])
    assert sample_next_token(logits, temperature=0).tolist() == [1, 0]


def test_draws_follow_the_distribution_and_never_pick_a_zero_probability_token():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).expand(20000, 5)
    counts = torch.bincount(sample_from(probs, torch.Generator().manual_seed(0)), minlength=5) / 20000
    assert counts[1] == 0 and counts[4] == 0
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)


def test_top_k_never_emits_a_token_outside_the_k_most_likely():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).expand(4000, 50)
    emitted = sample_next_token(logits, temperature=2.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert set(emitted.tolist()) == set(torch.topk(logits[0], 5).indices.tolist())  # all k used, none outside


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    probs = torch.tensor([0.05, 0.3, 0.15, 0.5])  # the most likely tokens are 3, then 1, then 2
    logits = probs.log()[None]
    for top_p, kept in [(0.45, [3]), (0.75, [3, 1]), (0.81, [3, 1, 2]), (1.0, [3, 1, 2, 0])]:
        expected = torch.zeros(4)
        expected[kept] = probs[kept] / probs[kept].sum()
        torch.testing.assert_close(next_token_probs(logits, 1.0, top_p=top_p)[0], expected)
        emitted = sample_next_token(logits.expand(2000, 4), top_p=top_p, generator=torch.Generator().manual_seed(0))
        assert set(emitted.tolist()) == set(kept)


def test_top_k_then_top_p_apply_to_the_tempered_distribution():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    probs = next_token_probs(logits, temperature=0.5, top_k=3, top_p=1.0)
    expected = torch.softmax(torch.tensor([8.0, 6.0, 4.0]), dim=0)
    torch.testing.assert_close(probs[0, :3], expected)
    assert probs[0, 3] == 0


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once_per_token():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    previous = torch.tensor([[0, 1, 0, 1]])  # repeats are penalised once, not once per occurrence
    assert apply_repetition_penalty(logits, previous, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert sample_next_token(torch.tensor([[3.0, 2.0]]), 0, repetition_penalty=2.0,
                             previous_ids=torch.tensor([[0]])).tolist() == [1]


def test_the_same_seed_gives_the_same_text_and_another_seed_other_text():
    model, prompt = tiny_model(), random_prompt(2, 3)

    def sample(seed):
        return generate(model, prompt, 30, Sampling(temperature=1.0), torch.Generator().manual_seed(seed)).tokens

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature=-0.1 is negative"),
    ("top_k", 0, "top_k=0 must be 1 or more"),
    ("top_p", 0.0, "outside (0, 1]"),
    ("top_p", 1.5, "outside (0, 1]"),
    ("repetition_penalty", 0.0, "must be positive"),
])
def test_sampling_settings_are_checked(field, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
        Sampling(**{field: value}).validate()


def test_dtype_is_float32_on_a_cpu_unless_dtype_is_given():
    assert choose_device_and_dtype("cpu", "auto", False, "bfloat16")[1] == torch.float32  # faster decoding on a CPU
    assert choose_device_and_dtype("cpu", "auto", False, "float16")[1] == torch.float32
    assert choose_device_and_dtype("cpu", "bfloat16", True, "float32")[1] == torch.bfloat16
    with pytest.raises(UserError, match="float16"):
        choose_device_and_dtype("cpu", "float16", True)


# --- prompts ----------------------------------------------------------------------------------------------------


def test_empty_prompt_starts_from_endoftext_where_the_tokenizer_has_it():
    class WithEndOfText:
        name, eot_token = "test", 99

        def encode(self, text):
            return [ord(c) for c in text]

    assert encode_prompt("", WithEndOfText(), BLOCK) == [99]
    with pytest.raises(UserError, match="prompt is empty"):
        encode_prompt("", data.get_tokenizer({"name": "char", "chars": CHARS}), BLOCK)


def test_a_prompt_longer_than_block_size_keeps_its_end(capsys):
    tokenizer = data.get_tokenizer({"name": "char", "chars": CHARS})
    assert tokenizer.decode(encode_prompt("abcdefghijklmnopqrstuvwxyz", tokenizer, BLOCK)) == "klmnopqrstuvwxyz"
    assert "keeping its last 16" in capsys.readouterr().err


def test_prompt_comes_from_the_file_then_the_option_then_stdin(tmp_path, monkeypatch):
    (tmp_path / "prompt.txt").write_text("from the file")
    assert read_prompt({"prompt_file": str(tmp_path / "prompt.txt"), "prompt": "opt"}) == "from the file"
    assert read_prompt({"prompt_file": "", "prompt": ""}) == ""
    monkeypatch.setattr(sys, "stdin", type("Pipe", (), {"isatty": lambda self: False, "read": lambda self: "piped"})())
    assert read_prompt({"prompt_file": "", "prompt": None}) == "piped"
    with pytest.raises(UserError, match="does not exist"):
        read_prompt({"prompt_file": str(tmp_path / "missing.txt"), "prompt": None})


def test_streaming_holds_back_a_character_split_across_tokens_and_stops_at_the_stop_token(capsys):
    class Bytes:  # a byte-level tokenizer, like GPT-2's: one character may span several tokens
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    show, end = print_stream(Bytes(), stop_token=0)
    show([0xC3])  # the first byte of "é"
    assert capsys.readouterr().out == ""
    for ids in ([0xA9], [ord("!")], [0]):
        show(ids)
    end()
    assert capsys.readouterr().out == "é!\n"
    show, end = print_stream(Bytes(), stop_token=0, stop=["##"])
    with pytest.raises(StopReply):  # a stop string ends the generation, and none of it is shown
        for byte in b"ok #ab ##x":
            show([byte])
    end()
    assert capsys.readouterr().out == "ok #ab \n"


def test_a_tiny_temperature_still_samples_a_real_token_the_most_likely_one():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    for temperature in (1e-300, 1e-30, 5e-324):
        token = sample_next_token(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
        assert token.tolist() == [1], temperature  # was 4, the vocabulary size: softmax of inf - inf is NaN
    nan_probs = torch.full((1, 4), float("nan"))
    assert 0 <= sample_from(nan_probs, torch.Generator().manual_seed(0)).item() < 4


# --- the command line -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained-looking checkpoint at <tmp>/checkpoints/tiny-run/best.pt."""
    root = tmp_path_factory.mktemp("generate")
    model = tiny_model()
    config = Config(model=model.config)
    config.train.dtype = "float32"  # "auto" would pick bfloat16 on a CPU with AMX, and the texts would differ
    payload = {"config": config.to_dict(), "model": model.state_dict(),
               "tokenizer": {"name": "char", "chars": CHARS}, "optimizer": {}, "state": {"step": 1}}
    checkpoint.save_checkpoint(root / "checkpoints" / "tiny-run" / "best.pt", payload)
    return root / "checkpoints" / "tiny-run"


def run_cli(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), "--device=cpu", *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def expected_text(prompt: str, seed: int, temperature: float, new_tokens: int, rows: int = 1) -> list[str]:
    tokenizer = data.get_tokenizer({"name": "char", "chars": CHARS})
    ids = torch.tensor([tokenizer.encode(prompt)] * rows)
    result = generate(tiny_model(), ids, new_tokens, Sampling(temperature=temperature, top_k=200),
                      torch.Generator().manual_seed(seed))
    return [prompt + tokenizer.decode(row) for row in result.tokens.tolist()]


def test_cli_prints_the_same_text_as_the_library_for_the_same_seed(run_dir):
    done = run_cli(f"--ckpt={run_dir / 'best.pt'}", "--prompt=to be", "--max_new_tokens=40", "--temperature=1",
                   "--seed=3", "--stream=False", cwd=run_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_text("to be", seed=3, temperature=1.0, new_tokens=40)[0] + "\n"
    assert "decode: 40 tokens" in done.stderr and "tokens/s" in done.stderr


def test_cli_without_the_fast_decode_layout_prints_the_same_text(run_dir):
    done = run_cli(f"--ckpt={run_dir / 'best.pt'}", "--prompt=to be", "--max_new_tokens=40", "--temperature=1",
                   "--seed=3", "--stream=False", "--fast_kernels=False", cwd=run_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_text("to be", seed=3, temperature=1.0, new_tokens=40)[0] + "\n"


def test_cli_streams_the_same_text_from_the_latest_run_by_name(run_dir):
    root = run_dir.parent.parent  # checkpoints/ is resolved from the working directory
    streamed = run_cli("--run=tiny-run", "--prompt=to be", "--max_new_tokens=40", "--temperature=1", "--seed=3",
                       "--stream", cwd=root)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected_text("to be", seed=3, temperature=1.0, new_tokens=40)[0] + "\n"


def test_cli_batches_num_samples_and_reads_stdin_without_a_prompt(run_dir):
    done = run_cli("--num_samples=3", "--max_new_tokens=20", "--temperature=1", "--seed=5", cwd=run_dir.parent.parent,
                   stdin="hello")
    assert done.returncode == 0, done.stderr
    samples = done.stdout.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert samples == expected_text("hello", seed=5, temperature=1.0, new_tokens=20, rows=3)
    assert len(set(samples)) == 3
    assert "decode: 60 tokens" in done.stderr


def test_cli_interactive_answers_each_prompt_and_survives_a_bad_one(run_dir):
    done = run_cli(f"--ckpt={run_dir}", "--interactive", "--max_new_tokens=10", "--temperature=0", cwd=run_dir,
                   stdin="ab\nXYZ\nba\n")
    assert done.returncode == 0, done.stderr
    answers = [text[2:] for text in expected_text("ab", 0, 0.0, 10) + expected_text("ba", 0, 0.0, 10)]
    assert done.stdout == "".join(answer + "\n" for answer in answers)  # the continuation only, no echo
    assert done.stderr.count("decode: 10 tokens") == 2
    assert "not in the char vocabulary" in done.stderr and "Traceback" not in done.stderr


def test_cli_keeps_the_end_of_a_prompt_longer_than_block_size(run_dir):
    done = run_cli(f"--ckpt={run_dir}", "--prompt=" + "abc" * 10, "--max_new_tokens=5", cwd=run_dir)
    assert done.returncode == 0, done.stderr
    assert "the prompt has 30 tokens; keeping its last 16" in done.stderr
    assert done.stdout.startswith(("abc" * 10)[-BLOCK:])


@pytest.mark.parametrize("args, message", [
    (["--prompt="], "the prompt is empty and the char tokenizer has no start token"),
    (["--prompt=Hello"], "character(s) not in the char vocabulary: 'H'"),
    (["--prompt=a", "--temperature=-1"], "temperature=-1.0 is negative"),
    (["--prompt=a", "--top_p=0"], "top_p=0.0 is outside (0, 1]"),
    (["--prompt=a", "--top_p=1.5"], "top_p=1.5 is outside (0, 1]"),
    (["--prompt=a", "--top_k=0"], "top_k=0 must be 1 or more"),
    (["--prompt=a", "--n_layer=4"], "--n_layer has no effect here"),
    (["--prompt_file=nowhere.txt"], "--prompt_file=nowhere.txt does not exist"),
    (["--prompt=a", "--num_samples=2", "--stream=True"], "--stream prints one sample"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(run_dir, args, message):
    done = run_cli("--run=tiny-run", *args, cwd=run_dir.parent.parent)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr


def test_cli_without_any_checkpoint_says_to_train_first(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    done = run_cli("--prompt=a", cwd=tmp_path)
    assert done.returncode == 2
    assert "no checkpoint found under checkpoints/; run `make train` first" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_rejects_a_path_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    done = run_cli(f"--ckpt={tmp_path / 'notes.pt'}", "--prompt=a", cwd=tmp_path)
    assert done.returncode == 2
    assert "notes.pt" in done.stderr and "not written by this project's train.py" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_cli(f"--ckpt={tmp_path}", "--prompt=a", cwd=tmp_path)  # a folder without checkpoints
    assert done.returncode == 2
    assert "holds no checkpoint yet; run `make train` first" in done.stderr and "Traceback" not in done.stderr
