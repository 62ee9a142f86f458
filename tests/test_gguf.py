"""make gguf: each form this project trains, written as GGUF and run by llama.cpp itself (llama-cpp-python, a test
dependency built from llama.cpp's source): its tokenizer, its greedy continuation, its logits, its chat template
through chat completion against serve.py, the Ollama Modelfile, and the bad inputs.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_gguf.py
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import generate
from config import Config, ModelConfig, UserError
from gptkit import bpe, gguf, hf, prompts
from gptkit.checkpoint import load_checkpoint, save_checkpoint
from gptkit.cli import run_cli
from model import GPT
from tests.helpers import REPO
from tools import gguf as gguf_tool

try:  # llama.cpp itself; CI installs it (requirements-dev.txt), so its absence fails there rather than skipping
    import llama_cpp
except ImportError as err:  # pragma: no cover - the failure is the point
    pytest.fail(f"llama-cpp-python is not importable ({err}); install requirements-dev.txt (make setup-all)",
                pytrace=False)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TIKTOKEN_CACHE_DIR": str(REPO / "data" / "tiktoken")}
# Mixed text for the tokenizers: CJK, emoji (with a skin-tone modifier), runs of spaces, tabs and newlines, digits,
# a contraction, and a literal <|endoftext|> (text, not the special token, in both tokenizers).
MIXED = "Hello  world\t\ttabs\n\n\n  new 你好，世界 🙂👍🏽 日本語 12345 3.14 don't <|endoftext|> café\r\n end   \n"
PROMPT = "the king rides north"
NEW_TOKENS = 40  # greedy continuation compared token for token (the issue asks for at least 32)
# llama.cpp's logits against ours at all 48 positions of MIXED, float32 KV cache, largest |logit| about 16 (measured
# in docs/gguf.md). ggml computes GELU through a float16 table of the tanh approximation: the GELU forms (gpt2,
# gptneox) differ by up to 0.004 in float32 (the llama form, SiLU, by under 1e-4); float16 weights by up to 0.04,
# Q8_0 by up to 0.7. llama.cpp's default float16 KV cache adds up to 0.03.
LOGITS_ATOL = {"f32": 0.01, "f16": 0.06, "q8_0": 1.0}
LLAMA_F32_ATOL = 1e-3


def corpus(n_lines: int = 300, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    phrases = ["the king rides north", "a storm over the sea", "she sings at night", "床前明月光", "疑是地上霜",
               "old ships and older songs", "举头望明月 🙂", "the knight's sword", "ten thousand 10,000 coins",
               "What color is snow?", "Snow is white.", "the sky is blue", "coal is black", "blood is red",
               "grass is green", "milk is white"]
    return "\n".join(" ".join(rng.choice(phrases, size=3)) for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def bpe_spec() -> dict:
    """A bpe:300 learned from mixed text, as train.py's data step records it."""
    return bpe.make_spec("bpe:300", bpe.train_bpe(corpus().splitlines(), 300))


PASSAGE = ("the king rides north with his sword, and the old man speaks of storms and ships. 床前明月光，疑是地上霜。"
           " She sings to the sea at night 🙂: ten thousand 10,000 coins for the knight's song! ")


def train_briefly(model: GPT, text_ids: list[int], steps: int, seed: int = 0) -> GPT:
    """Fit the model to one passage (windows of it, AdamW): its greedy continuation of the passage's start then
    recites the passage, a sequence of distinct tokens each chosen by a clear margin, rather than the one token a
    random model repeats. Every weight moves off its initial value (biases off zero, norm gains off one)."""
    torch.manual_seed(seed)
    ids = torch.tensor(text_ids * 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    context = model.config.block_size
    windows = 2 if model.config.vocab_size > 1000 else 8  # GPT-2's 50,257-way head is the cost of a step
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - context - 1, (windows,))
        x = torch.stack([ids[i:i + context] for i in starts])
        y = torch.stack([ids[i + 1:i + 1 + context] for i in starts])
        loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def save_run(folder: Path, model_config: ModelConfig, tokenizer: dict, seed: int = 0,
             steps: int = 150) -> tuple[GPT, Path]:
    """A checkpoint of a tiny model trained on PASSAGE (steps=0: as initialised), saved through the project's
    checkpoint code."""
    model_config.validate()
    torch.manual_seed(seed)
    model = GPT(model_config)
    if steps:
        train_briefly(model, data.get_tokenizer(tokenizer).encode(PASSAGE), steps, seed)
    ckpt = folder / "best.pt"
    save_checkpoint(ckpt, {"config": Config(model=model_config).to_dict(), "model": model.state_dict(),
                           "tokenizer": tokenizer})
    return model.eval(), ckpt


def llama(path: Path, context: int, kv_f32: bool = False) -> llama_cpp.Llama:
    """llama.cpp's model of a GGUF; its KV cache float16 (its default) or, with kv_f32, float32."""
    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if kv_f32 else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=1, n_batch=context, logits_all=True,
                           verbose=False, seed=0, **cache)


FORMS = {  # (switches, tokenizer): the tiny preset's form, --arch=llama with GQA and biases, GPT-2 itself
    "gptneox": (dict(position="rope", bias=False), "bpe"),
    "llama": (dict(arch="llama", n_kv_head=2, bias=True, rope_theta=500.0), "bpe"),
    "gpt2": (dict(), "gpt2"),
}


@pytest.fixture(scope="module", params=list(FORMS))
def form(request, tmp_path_factory, bpe_spec):
    """(architecture, our model, its tokenizer, the f32 GGUF, llama.cpp's model of it) for each form."""
    switches, tokenizer_name = FORMS[request.param]
    tokenizer = bpe_spec if tokenizer_name == "bpe" else {"name": "gpt2"}
    vocab = 300 if tokenizer_name == "bpe" else 50257
    sizes = dict(n_head=4, n_embd=64) if request.param == "llama" else dict(n_head=2, n_embd=32)  # GQA: 4 q, 2 kv
    config = ModelConfig(vocab_size=vocab, n_layer=2, block_size=64, dropout=0.0, **sizes,
                         **{k: v for k, v in switches.items() if k != "arch"})
    if "arch" in switches:
        config.arch = switches["arch"]
        config.apply_arch(keep=set(switches))
    root = tmp_path_factory.mktemp(request.param)
    model, ckpt = save_run(root / "run", config, tokenizer, seed=3)
    out = root / "model.gguf"
    written = gguf_tool.main([f"--ckpt={ckpt}", f"--out={out}"])
    assert written["architecture"] == request.param
    llm = llama(out, config.block_size)  # as a user runs it: llama.cpp's defaults
    yield request.param, model, data.get_tokenizer(tokenizer), out, llm
    llm.close()


def our_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]  # (T, V)


def their_logits(llm: llama_cpp.Llama, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[:len(ids)])  # (T, V)


def test_llama_cpp_loads_each_form_with_its_architecture_and_sizes(form):
    architecture, model, _, _, llm = form
    assert llm.metadata["general.architecture"] == architecture
    assert llm.n_vocab() == model.config.vocab_size  # (llama.cpp rounds the context it allocates up to 256)
    assert int(llm.metadata[f"{architecture}.context_length"]) == model.config.block_size
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2" and llm.metadata["tokenizer.ggml.model"] == "gpt2"
    assert "tokenizer.chat_template" not in llm.metadata  # a pretrained run has none


def test_llama_cpp_tokenizes_mixed_text_as_ours_does(form):
    _, _, tokenizer, _, llm = form
    ours = tokenizer.encode(MIXED)
    theirs = llm.tokenize(MIXED.encode(), add_bos=False, special=False)
    assert theirs == ours
    assert llm.detokenize(theirs).decode() == MIXED
    eot = tokenizer.eot_token
    assert llm.token_eos() == eot and llm.tokenize(b"<|endoftext|>", add_bos=False, special=True) == [eot]


def test_llama_cpp_logits_match_ours_within_the_stated_tolerance(form):
    architecture, model, tokenizer, out, _ = form
    ids = tokenizer.encode(MIXED)[:48]
    ours = our_logits(model, ids)
    assert ours.abs().max() > 5.0  # a trained model's confident logits, not two near-zero tensors
    llm = llama(out, model.config.block_size, kv_f32=True)
    atol = LLAMA_F32_ATOL if architecture == "llama" else LOGITS_ATOL["f32"]
    torch.testing.assert_close(their_logits(llm, ids), ours, atol=atol, rtol=0)
    llm.close()


def test_llama_cpp_greedy_continuation_equals_generate_py(form):
    _, model, tokenizer, _, llm = form
    prompt = tokenizer.encode(PROMPT)
    ours = generate.generate(model, torch.tensor([prompt]), NEW_TOKENS, generate.Sampling(temperature=0)).tokens
    ours = ours[0].tolist()
    # Every step's choice wins by more than 3x the largest difference measured with llama.cpp's default float16 KV
    # cache (0.03), so the comparison cannot hinge on a near tie; and the tokens are not one token repeated
    top2 = our_logits(model, prompt + ours)[len(prompt) - 1:-1].topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 0.1 and len(set(ours)) > NEW_TOKENS // 3
    llm.reset()
    theirs = list(itertools.islice(llm.generate(prompt, temp=0.0, reset=True), NEW_TOKENS))
    assert theirs == ours


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smaller_dtypes_load_and_stay_close(form, tmp_path, dtype):
    architecture, model, tokenizer, f32_file, _ = form
    ckpt = f32_file.parent / "run" / "best.pt"
    out = tmp_path / f"model-{dtype}.gguf"
    gguf_tool.main([f"--ckpt={ckpt}", f"--out={out}", f"--dtype={dtype}"])
    assert out.stat().st_size < f32_file.stat().st_size
    ids = tokenizer.encode(MIXED)[:48]
    llm = llama(out, model.config.block_size, kv_f32=True)
    torch.testing.assert_close(their_logits(llm, ids), our_logits(model, ids), atol=LOGITS_ATOL[dtype], rtol=0)
    llm.close()


def test_compare_reports_llama_cpps_distance_from_ours(form, tmp_path, capsys):
    architecture, model, tokenizer, out, _ = form
    ckpt = out.parent / "run" / "best.pt"
    found = gguf_tool.main([f"--ckpt={ckpt}", f"--out={tmp_path / 'm.gguf'}", f"--compare={PROMPT}"])["compare"]
    assert found["positions"] == len(tokenizer.encode(PROMPT)) and found["greedy_tokens"] == 64 - found["positions"]
    assert found["max_logit_difference"] < 0.05 and found["largest_logit"] > 5.0  # the default float16 KV cache
    assert found["greedy_agree"] >= NEW_TOKENS
    assert "llama.cpp beside ours: logits differ by at most" in capsys.readouterr().out


def test_the_modelfile_points_at_the_file_and_stops_at_end_of_text(form):
    *_, out, _ = form
    text = out.with_suffix(".Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "PARAMETER num_ctx 64" in text


# ------------------------------------------------------------------------------------------------ make train, then gguf


TINY = ["--preset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=8",
        "--device=cpu", "--eval_iters=2", "--eval_interval=100", "--warmup_iters=5", "--learning_rate=1e-2",
        "--compile=False"]


def run_script(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_a_tiny_preset_run_trained_by_train_py_runs_in_llama_cpp_as_generate_py_runs_it(tmp_path):
    """The fresh-clone path: train.py (the tiny preset's form and bpe tokenizer), make gguf, llama.cpp completes."""
    (tmp_path / "story.txt").write_text(corpus())
    trained = run_script([str(REPO / "train.py"), *TINY, "--dataset=story.txt", "--tokenizer=bpe:300",
                          "--max_iters=60", "--out_dir=checkpoints/tiny"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    made = run_script(["-m", "tools.gguf", f"--run={tmp_path / 'checkpoints' / 'tiny'}",  # make gguf's command
                       f"--out={tmp_path / 'tiny.gguf'}"], REPO)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "wrote" in made.stdout and "gptneox" in made.stdout
    assert "llama-completion -m" in made.stdout  # a plain model continues text; llama-cli would open a chat
    sampled = run_script([str(REPO / "generate.py"), "--run=tiny", f"--prompt={PROMPT}", "--temperature=0",
                          f"--max_new_tokens={NEW_TOKENS}", "--device=cpu"], tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    tokenizer = data.get_tokenizer(load_checkpoint(tmp_path / "checkpoints" / "tiny" / "best.pt")["tokenizer"])
    prompt = tokenizer.encode(PROMPT)
    llm = llama(tmp_path / "tiny.gguf", 64)
    theirs = generate.until_stop(list(itertools.islice(llm.generate(prompt, temp=0.0), NEW_TOKENS)),
                                 tokenizer.eot_token)  # generate.py stops at <|endoftext|>
    assert tokenizer.decode(prompt + theirs) + "\n" == sampled.stdout  # the same tokens, so the same text
    assert len(set(theirs)) > 10  # it said something: the run learned pieces of the corpus
    completion = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert sampled.stdout.startswith(PROMPT + completion[:8])  # llama.cpp's own text completion, from the text


# ------------------------------------------------------------------------------------------------ a chat-tuned run


COLORS = {"snow": "white", "grass": "green", "sky": "blue", "coal": "black", "blood": "red", "milk": "white"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_answer(root: Path, messages: list[dict], max_tokens: int) -> dict:
    """serve.py's greedy answer over its HTTP API (public behaviour only), on a free loopback port."""
    port = free_port()
    with open(root / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--device=cpu", f"--port={port}",
                                   "--run=colors"], cwd=root, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        body = json.dumps({"model": "colors", "messages": messages, "temperature": 0, "max_tokens": max_tokens})
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (root / "serve.log").read_text()[-3000:]
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return json.loads(answer.read())["choices"][0]
            except OSError:
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def colors(tmp_path_factory, bpe_spec):
    """A random bpe:300 model tuned by instruct.py to answer one color question and end its turn."""
    root = tmp_path_factory.mktemp("colors")
    config = ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=32, block_size=128, position="rope")
    save_run(root / "checkpoints" / "base", config, bpe_spec, steps=0)
    talks = [{"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": f"What color is {thing}?"},
                           {"role": "assistant", "content": f"{thing.capitalize()} is {color}."}]}
             for thing, color in COLORS.items()]
    (root / "colors.jsonl").write_text("".join(json.dumps(t) + "\n" for t in talks * 16))
    tuned = run_script([str(REPO / "instruct.py"), "--device=cpu", "--dataset=colors.jsonl",
                        "--init_from=checkpoints/base/best.pt", "--max_iters=200", "--batch_size=16",
                        "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=10", "--eval_interval=1000",
                        "--max_new_tokens=8", "--out_dir=checkpoints/colors"], root, timeout=600)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    out = root / "colors.gguf"
    gguf_tool.main([f"--run={root / 'checkpoints' / 'colors'}", f"--out={out}"])
    return root, out


def test_a_chat_tuned_run_answers_through_llama_cpp_chat_completion_as_through_serve_py(colors):
    root, out = colors
    llm = llama(out, 128)
    template = llm.metadata["tokenizer.chat_template"]
    payload = load_checkpoint(root / "checkpoints" / "colors" / "best.pt")
    recorded = prompts.recorded_template(payload["instruct"], 0)
    assert template == gguf.jinja_template(recorded, "<|endoftext|>")
    answers = []
    for thing in ("snow", "sky", "coal"):
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"What color is {thing}?"}]
        ours = serve_answer(root, messages, max_tokens=16)
        theirs = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=16)["choices"][0]
        assert theirs["message"]["content"] == ours["message"]["content"]
        assert theirs["finish_reason"] == ours["finish_reason"]
        answers.append((ours["message"]["content"], ours["finish_reason"]))
    # the run learned to answer and to end its turn: the end-of-turn token is wired through both
    right = [answer == (f"{thing.capitalize()} is {COLORS[thing]}.", "stop")
             for thing, answer in zip(("snow", "sky", "coal"), answers)]
    assert sum(right) >= 2, answers
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert 'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}System: {{ .Content }}\n' in modelfile
    assert modelfile.rstrip().endswith('PARAMETER stop "<|endoftext|>"')


def test_the_jinja_template_renders_what_chat_py_encodes_for_one_question(colors, bpe_spec):
    """The rendered prompt, tokenized by llama.cpp, is the id sequence serve.py feeds the model."""
    import jinja2

    root, out = colors
    llm = llama(out, 128)
    tokenizer = data.get_tokenizer(bpe_spec)
    template = prompts.chat_template("chat", tokenizer.eot_token)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What color is sky?"}]
    rendered = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        llm.metadata["tokenizer.chat_template"]).render(messages=messages, add_generation_prompt=True)
    ids = prompts.encode_conversation(template, messages, tokenizer.encode, open_reply=True)[0]
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids


@pytest.mark.parametrize("style", ["chat", "alpaca"])
def test_the_jinja_template_renders_a_whole_conversation_as_our_template_spells_it(style, bpe_spec):
    """Every role's frame, several turns, the generation prompt: the text our chat code encodes, piece by piece."""
    import jinja2

    tokenizer = data.get_tokenizer(bpe_spec)
    template = prompts.chat_template(style, tokenizer.eot_token)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi\nthere"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What color is snow?"}]
    jinja = gguf.jinja_template(template, "<|endoftext|>")
    rendered = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(jinja).render(
        messages=messages, add_generation_prompt=True)
    ids = prompts.encode_conversation(template, messages, tokenizer.encode, open_reply=True)[0]
    assert rendered == tokenizer.decode(ids)
    assert rendered.endswith(template.assistant) and "Hello!<|endoftext|>" in rendered


def test_a_vocabulary_padded_past_the_tokenizer_gets_unused_tokens_llama_cpp_loads(tmp_path, bpe_spec):
    model, ckpt = save_run(tmp_path / "run", ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=32,
                                                         block_size=64, position="rope"), bpe_spec, steps=0)
    tokens, types, _ = gguf.vocabulary(bpe_spec, 320)
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)] and set(types[300:]) == {gguf.UNUSED}
    assert types[0] == gguf.CONTROL and tokens[0] == "<|endoftext|>" and set(types[1:300]) == {gguf.NORMAL}
    gguf_tool.main([f"--ckpt={ckpt}", f"--out={tmp_path / 'm.gguf'}"])
    llm = llama(tmp_path / "m.gguf", 64, kv_f32=True)
    assert llm.n_vocab() == 320
    ids = data.get_tokenizer(bpe_spec).encode(PASSAGE)[:40]
    torch.testing.assert_close(their_logits(llm, ids), our_logits(model, ids), atol=LOGITS_ATOL["f32"], rtol=0)
    llm.close()


# ------------------------------------------------------------------------------------------------ bad input


def run_tool(argv: list[str], capsys) -> tuple[int, str]:
    """tools.gguf's main as the command line runs it: (exit code, stderr)."""
    saved = sys.argv
    sys.argv = ["tools/gguf.py", *argv]
    try:
        with pytest.raises(SystemExit) as exit_code:
            run_cli(gguf_tool.main)
    finally:
        sys.argv = saved
    return exit_code.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "char", "unwritable", "q8_0-rows", "arch-mix", "dtype"])
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(tmp_path, capsys, case):
    out = tmp_path / "keep.gguf"
    out.write_bytes(b"an earlier file")
    gpt2_vocab = {"name": "gpt2"}
    if case == "missing":
        argv, message = [f"--ckpt={tmp_path / 'nowhere.pt'}"], "nowhere.pt"
    elif case == "char":
        _, ckpt = save_run(tmp_path / "r", ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=32, block_size=16),
                           {"name": "char", "chars": "".join(chr(65 + i) for i in range(40))}, steps=0)
        argv, message = [f"--ckpt={ckpt}"], "the char tokenizer cannot go into a GGUF: llama.cpp reads byte-level BPE"
    elif case == "q8_0-rows":  # n_embd=48: the embedding rows hold one and a half blocks of 32
        _, ckpt = save_run(tmp_path / "r", ModelConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=48,
                                                       block_size=16), gpt2_vocab, steps=0)
        argv = [f"--ckpt={ckpt}", "--dtype=q8_0"]
        message = "q8_0 needs every matrix row to be a multiple of 32 numbers, but token_embd.weight has rows of 48"
    elif case == "arch-mix":
        _, ckpt = save_run(tmp_path / "r", ModelConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=32,
                                                       block_size=16, position="rope", norm="rmsnorm"), gpt2_vocab,
                           steps=0)
        argv, message = [f"--ckpt={ckpt}"], "no llama.cpp architecture computes this mix of switches"
    else:
        _, ckpt = save_run(tmp_path / "r", ModelConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=32,
                                                       block_size=16), gpt2_vocab, steps=0)
        argv, message = [f"--ckpt={ckpt}", "--dtype=q4"], "--dtype=q4 is not one of f32, f16, q8_0"
        if case == "unwritable":  # a folder that is a file (root writes through any permission bits)
            out = tmp_path / "keep.gguf" / "model.gguf"
            argv, message = [f"--ckpt={ckpt}"], f"could not write {out}"
    code, err = run_tool([*argv, f"--out={out}"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(re.escape(message), err), err
    kept = tmp_path / "keep.gguf"
    assert kept.read_bytes() == b"an earlier file"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["keep.gguf"]  # no temp file, no Modelfile


def test_help_lists_the_options():
    result = run_script(["-m", "tools.gguf", "--help"], REPO)
    assert result.returncode == 0 and all(f"--{o}" in result.stdout for o in ("ckpt", "run", "out", "dtype"))


def test_a_user_error_from_the_library_names_the_switches_for_each_architecture():
    config = ModelConfig(vocab_size=100, n_layer=1, n_head=2, n_embd=32, block_size=16, position="rope",
                         norm="rmsnorm")
    with pytest.raises(UserError, match=r"train with --mlp=swiglu \(llama\) or with --norm=layernorm \(gptneox\) or "
                                        r"with --position=learned --norm=layernorm \(gpt2\) to write a GGUF"):
        gguf.gguf_architecture(config)
    assert hf.export_architecture(ModelConfig(position="rope")) == "GPTNeoXForCausalLM"
