"""serve.py, the OpenAI-compatible server: driven by the real `openai` client (plain and streamed chat, completions,
errors, 16 concurrent requests, a client that leaves), its greedy answers against generate.py's, a tiny model that
learns a two-question task through instruct.py and answers it over the API, and the chat page in Debian's headless
Chromium. Each server runs on a free loopback port, started and stopped here."""

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

import data
import generate
import serve
from config import Config, ModelConfig, UserError
from gptkit import checkpoint, prompts
from model import GPT

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TIKTOKEN_CACHE_DIR": str(REPO / "data" / "tiktoken")}
END = 50256  # GPT-2's <|endoftext|>
SCREENSHOT = REPO / "docs" / "chat-page.png"


def save_chat_model(run_dir: Path, style: str = "chat", block_size: int = 64) -> Path:
    """An untrained GPT-2-vocabulary model with an instruct.py record: what serve.py and chat.py accept, in a
    second. Its answers are noise, so they run to max_tokens (an end-of-turn token is a 1-in-50,000 draw)."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=16, block_size=block_size))
    config.train.dtype = "float32"
    record = {"prompt_style": style, "mask_prompt": True, "lora_rank": 0, "lora_alpha": 16.0, "base": "random",
              "dataset": "none", "chat_template": prompts.chat_template(style, END).to_dict()}
    payload = {"config": config.to_dict(), "model": GPT(config.model).state_dict(), "tokenizer": {"name": "gpt2"},
               "state": {"step": 1}, "instruct": record}
    checkpoint.save_checkpoint(run_dir / "best.pt", payload)
    (run_dir / "manifest.json").write_text(json.dumps({"kind": "instruct"}))
    return run_dir


def save_pretrained_model(run_dir: Path, n_layer: int = 1, n_embd: int = 16) -> Path:
    """An untrained GPT-2-vocabulary checkpoint without instruct.py's record: a plain pretrained language model."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(vocab_size=50257, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=64))
    return checkpoint.save_checkpoint(run_dir / "best.pt", {"config": config.to_dict(), "tokenizer": {"name": "gpt2"},
                                                            "model": GPT(config.model).state_dict()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """python serve.py on a free loopback port, ready once GET /v1/models answers; stop() ends it."""

    def __init__(self, cwd: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"serve-{self.port}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--device=cpu",
                                             f"--port={self.port}", *args], cwd=cwd, env=ENV, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve.py exited {self.process.returncode}: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as answer:
                    self.model = json.loads(answer.read())["data"][0]["id"]
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve.py did not answer in 120 s: {self.log.read_text()[-3000:]}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none needed", max_retries=0, timeout=60)

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict | str]:
        """A raw POST (what the openai client would never send); the status and the decoded body."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=raw, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                status, text = answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """A server of the untrained chat model, whose cap on max_tokens is high enough to keep it busy for minutes."""
    root = tmp_path_factory.mktemp("serve")
    save_chat_model(root / "checkpoints" / "noise")
    server = Server(root, "--run=noise", "--max_tokens=100000")
    yield server
    server.stop()


class Bytes:
    """A tokenizer whose ids are UTF-8 bytes: characters split across tokens, as GPT-2's byte-level BPE splits them."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def sent(pieces: generate.TextStream, text: bytes) -> list[str]:
    return [pieces.add(byte) for byte in text] + [pieces.finish()]


def test_streamed_text_never_holds_half_a_character_or_any_part_of_a_stop_string():
    assert sent(generate.TextStream(Bytes(), []), "né!".encode()) == ["n", "", "é", "!", ""]
    # "EN" could start the stop string "END" until the next character says otherwise
    assert sent(generate.TextStream(Bytes(), ["END"]), b"AENx") == ["A", "", "", "ENx", ""]
    stopped = generate.TextStream(Bytes(), ["END", "!"])
    assert sent(stopped, b"okEND more") == ["o", "k", "", "", "", "", "", "", "", "", ""] and stopped.stopped
    assert stopped.text == "ok"
    cut_off = generate.TextStream(Bytes(), [])
    assert "".join(sent(cut_off, "aé".encode()[:-1])) == "a\ufffd"  # a reply that ends mid-character, as decode()


# ------------------------------------------------------------------------------------------------ the openai client


def test_the_openai_client_gets_plain_and_streamed_chat_and_completions_with_usage(noise):
    client = noise.client()
    assert [m.id for m in client.models.list().data] == ["noise"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    plain = client.chat.completions.create(model="noise", messages=messages, max_tokens=12, temperature=0.8,
                                           seed=7)
    answer = plain.choices[0]
    assert answer.message.role == "assistant" and answer.finish_reason == "length" and answer.message.content
    prompt_tokens = len(prompts.encode_conversation(prompts.chat_template("chat", END), messages,
                                                    data.get_tokenizer({"name": "gpt2"}).encode,
                                                    open_reply=True)[0])
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (prompt_tokens, 12)
    assert plain.usage.total_tokens == prompt_tokens + 12

    chunks = list(client.chat.completions.create(model="noise", messages=messages, max_tokens=12, temperature=0.8,
                                                 seed=7, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == answer.message.content  # the same seed, the same text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices

    text = client.completions.create(model="noise", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5
    streamed = client.completions.create(model="noise", prompt="Once upon a time", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def test_a_stream_is_server_sent_events_ending_in_done_and_stop_strings_cut_the_text(noise):
    request = urllib.request.Request(noise.url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "noise", "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 6, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        events = answer.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])

    client = noise.client()
    whole = client.completions.create(model="noise", prompt="a", max_tokens=20, temperature=0).choices[0].text
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]  # two characters from the middle of the greedy answer
    cut = client.completions.create(model="noise", prompt="a", max_tokens=20, temperature=0, stop=[stop, "@@"])
    assert cut.choices[0].text == whole[:whole.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="noise", prompt="a", max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text  # nothing of the stop string leaks


def test_greedy_answers_equal_generate_py_for_the_same_checkpoint_and_prompt(noise, monkeypatch, capsys):
    client = noise.client()
    monkeypatch.chdir(noise.log.parent)

    def generate_py(*args: str) -> str:
        generate.main(["--device=cpu", "--run=noise", "--temperature=0", "--max_new_tokens=16", "--stream=False",
                       *args])
        return capsys.readouterr().out

    completion = client.completions.create(model="noise", prompt="The capital of France is", max_tokens=16,
                                           temperature=0)
    assert generate_py("--prompt=The capital of France is") == \
        "The capital of France is" + completion.choices[0].text + "\n"
    chat = client.chat.completions.create(model="noise", messages=[{"role": "user", "content": "Name a color."}],
                                          max_tokens=16, temperature=0)
    assert generate_py("--instruction=Name a color.") == chat.choices[0].message.content + "\n"


def test_bad_requests_get_openai_style_4xx_errors_and_the_server_keeps_serving(noise):
    client = noise.client()
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="noise", messages=user, temperature=-0.5)
    assert err.value.status_code == 400 and err.value.param == "temperature" and "out of range" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=user)
    assert err.value.code == "model_not_found" and "'noise'" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="noise", messages=[{"role": "user", "content": "word " * 200}])
    assert err.value.code == "context_length_exceeded" and "maximum context length is 64 tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="noise", messages=user, max_tokens=100001)
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="noise", messages=user, n=2)
    assert err.value.param == "n" and "not supported" in err.value.message

    cases = [(b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "must be a JSON object"),
             ({"model": "noise", "messages": user, "temperature": "hot"}, 400, "temperature='hot' is not a number"),
             ({"model": "noise", "messages": user, "max_tokens": 2.5}, 400, "max_tokens=2.5 is not an integer"),
             ({"model": "noise", "messages": user, "top_p": 0}, 400, "top_p=0 keeps no token"),
             ({"model": "noise", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role='wizard' is not one"),
             ({"model": "noise", "messages": []}, 400, "messages must be a non-empty list"),
             ({"model": "noise", "messages": user, "stop": [1]}, 400, "must be a non-empty string"),
             ({"model": "noise", "messages": user, "stream": "yes"}, 400, "stream='yes' is not true or false"),
             ({"model": "noise", "messages": user, "temprature": 1}, 400, "Unrecognized request argument"),
             ({"messages": user}, 400, "has no 'model'"), (b"x" * (2 << 20), 413, "over 1048576 bytes")]
    for body, status, message in cases:
        got, answer = noise.post("/v1/chat/completions", body)
        assert got == status and message in answer["error"]["message"], (body if len(body) < 99 else "", answer)
        assert answer["error"]["type"] == "invalid_request_error"
    got, answer = noise.post("/v1/completions", {"model": "noise", "prompt": {"text": "hi"}})
    assert got == 400 and answer["error"]["param"] == "prompt"
    got, answer = noise.post("/v1/nowhere", {})
    assert got == 404 and "error" in answer
    assert client.completions.create(model="noise", prompt="still here?", max_tokens=2).usage.completion_tokens == 2


def test_sixteen_concurrent_requests_each_get_the_answer_they_get_alone(noise):
    client = noise.client()

    def ask(seed: int) -> str:
        return client.chat.completions.create(model="noise", messages=[{"role": "user", "content": f"Q{seed % 4}"}],
                                              max_tokens=10, temperature=1.0, seed=seed).choices[0].message.content

    alone = [ask(seed) for seed in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone  # queued, never sharing a KV cache or a random generator
    assert len(set(alone)) > 8


def test_a_client_that_leaves_stops_its_generation(noise):
    client = noise.client()
    stream = client.chat.completions.create(model="noise", messages=[{"role": "user", "content": "go on"}],
                                            max_tokens=100000, temperature=0, stream=True)  # minutes of work
    for _, _ in zip(range(5), stream):
        pass
    stream.close()
    started = time.monotonic()
    answer = client.completions.create(model="noise", prompt="next", max_tokens=3)
    assert answer.usage.completion_tokens == 3 and time.monotonic() - started < 20  # the worker was freed


def test_serve_refuses_a_pretrained_model_a_taken_port_and_bad_options_in_one_line(tmp_path, noise, monkeypatch):
    save_pretrained_model(tmp_path / "plain")
    done = subprocess.run([sys.executable, str(REPO / "serve.py"), "--device=cpu", "--ckpt=plain",
                           f"--port={free_port()}"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "plain/best.pt is a pretrained language model, not a chat model; make one with `make instruct`" in \
        done.stderr
    monkeypatch.chdir(tmp_path)
    for args, message in [([f"--port={noise.port}"], f"cannot listen on 127.0.0.1:{noise.port}"),
                          (["--port=70000"], "port=70000 is not a TCP port"),
                          (["--max_tokens=0"], "max_tokens=0 must be 1 or more"),
                          ([f"--port={free_port()}"], "no instruction- or chat-tuned run under checkpoints/"),
                          (["--n_layer=3"], "--n_layer has no effect here")]:
        with pytest.raises(UserError, match=re.escape(message)):
            serve.main(["--device=cpu", *args])


# ------------------------------------------------------------------------------------------------ a model that learned


COLORS = {"snow": "white", "grass": "green", "sky": "blue", "coal": "black", "blood": "red"}


def color_talk(first: str, second: str) -> list[dict]:
    return [{"role": "user", "content": f"What color is {first}?"},
            {"role": "assistant", "content": f"{first.capitalize()} is {COLORS[first]}."},
            {"role": "user", "content": f"What color is {second}?"},
            {"role": "assistant", "content": f"{second.capitalize()} is {COLORS[second]}."}]


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    """A tiny model pretrained on nothing, tuned by instruct.py on two-question conversations (~30 s), served."""
    root = tmp_path_factory.mktemp("colors")
    save_pretrained_model(root / "checkpoints" / "base", n_layer=2, n_embd=32)
    talks = [{"messages": color_talk(a, b)} for a in COLORS for b in COLORS if a != b]
    (root / "colors.jsonl").write_text("".join(json.dumps(t) + "\n" for t in talks * 8))
    tuned = subprocess.run([sys.executable, str(REPO / "instruct.py"), "--device=cpu", "--dataset=colors.jsonl",
                            "--max_iters=120", "--batch_size=16", "--learning_rate=1e-2", "--min_lr=1e-3",
                            "--warmup_iters=10", "--eval_interval=1000", "--max_new_tokens=8",
                            "--out_dir=checkpoints/colors"], cwd=root, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    server = Server(root)  # the latest instruct.py run, as `make serve` finds it
    yield server, tuned.stdout
    server.stop()


def test_a_tiny_model_learns_to_answer_the_second_of_two_questions_and_answers_it_through_the_api(colors):
    server, log = colors
    assert "data: colors.jsonl: train" in log and "prompt style chat, loss on the response only" in log
    assert server.model == "colors"
    saved = checkpoint.load_checkpoint(Path(server.log.parent) / "checkpoints" / "colors" / "best.pt")["instruct"]
    assert saved["chat_template"] == prompts.chat_template("chat", END).to_dict()
    client = server.client()
    right = []
    for first in COLORS:
        for second in COLORS:
            if first != second:
                asked = color_talk(first, second)[:3]
                answer = client.chat.completions.create(model="colors", messages=asked, temperature=0, max_tokens=8)
                right.append(answer.choices[0].message.content == f"{second.capitalize()} is {COLORS[second]}.")
                assert answer.choices[0].finish_reason == "stop"  # it learned to end its turn
    # Of 20 pairs, 20 right when this was written; a model answering the first question would get none. The
    # misses of a shorter run were pairs opening with a question held out to val/test (never seen first).
    assert sum(right) >= 16, right


# ------------------------------------------------------------------------------------------------ the chat page


def chromium_or_skip() -> None:
    """Debian's chromium and chromium-driver; in CI their absence is a failure (.ci/run installs them)."""
    missing = [path for path in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not Path(path).exists()]
    if missing:
        reason = f"{' and '.join(missing)} missing: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason} (.ci/run installs them before make test)")
        pytest.skip(reason)


def test_the_chat_page_streams_answers_in_headless_chromium(colors, tmp_path, monkeypatch):
    chromium_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for a browser or driver to download
    server, _ = colors
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=820,560", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "colors")
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        for number, (thing, said) in enumerate([("sky", "Sky is blue."), ("snow", "Snow is white.")], start=1):
            driver.find_element(By.ID, "message").send_keys(f"What color is {thing}?", Keys.ENTER)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done=true]")) == number)
            answer = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
            assert answer.text.startswith(said), answer.text
            assert int(answer.get_attribute("data-pieces")) >= 3  # it arrived as a stream of pieces, not at once
        assert "error" not in driver.find_element(By.ID, "log").get_attribute("innerHTML")
        driver.execute_script("document.activeElement.blur()")  # no blinking caret: the same picture every run
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000
    SCREENSHOT.parent.mkdir(exist_ok=True)
    if not SCREENSHOT.exists() or SCREENSHOT.read_bytes() != png:
        SCREENSHOT.write_bytes(png)
