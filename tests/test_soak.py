"""A soak test of serve.py: 16 clients for SOAK_SECONDS (45 s by default) mixing plain and streamed requests,
clients that leave mid-reply, malformed and oversized bodies; afterwards every well-formed request got a whole
answer or a 4xx/429, the server still answers at once (no worker left busy) and its memory grew less than a bound.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_soak.py            (SOAK_SECONDS=60 for a longer run)

The server runs on a free port of 127.0.0.1 and is stopped here.
"""

import http.client
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from tests.test_serve import Server, read_status, save_chat_model

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "45"))
CLIENTS = 16
RSS_GROWTH_BOUND_MB = 150  # measured growth was far below (docs/serving.md); a leak per request would pass it
OVERSIZED = 2 << 20


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def chat_body(rng: random.Random, stream: bool, max_tokens: int) -> dict:
    turns = [{"role": "user", "content": " ".join(rng.choice(["hello", "why", "sky", "snow"]) for _ in range(5))}]
    return {"model": "noise", "messages": turns, "max_tokens": max_tokens, "stream": stream,
            "temperature": rng.choice([0, 0.8, 1.5])}


class Client:
    """One client's loop of requests; what went wrong is kept in `problems`."""

    def __init__(self, port: int, seed: int, until: float):
        self.port, self.rng, self.until = port, random.Random(seed), until
        self.counts: Counter = Counter()
        self.problems: list[str] = []

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def post(self, body: bytes, headers: dict | None = None) -> http.client.HTTPResponse:
        conn = self.connection()
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json", **(headers or {})})
        return conn.getresponse()

    def run(self) -> None:
        actions = [self.plain, self.streamed, self.leave_stream, self.leave_plain, self.malformed, self.oversized]
        while time.monotonic() < self.until:
            action = self.rng.choice(actions)
            try:
                action()
                self.counts[action.__name__] += 1
            except Exception as err:  # a well-formed request that got no answer at all
                self.problems.append(f"{action.__name__}: {type(err).__name__}: {err}")

    def plain(self) -> None:
        answer = self.post(json.dumps(chat_body(self.rng, False, self.rng.randint(1, 24))).encode())
        body = answer.read()
        if answer.status == 429:
            assert int(answer.headers["Retry-After"]) >= 1
            self.counts["429"] += 1
            return
        assert answer.status == 200, (answer.status, body[:200])
        reply = json.loads(body)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in reply
        self.counts["answered"] += 1

    def streamed(self) -> None:
        answer = self.post(json.dumps(chat_body(self.rng, True, self.rng.randint(1, 24))).encode())
        body = answer.read().decode()
        if answer.status == 429:
            self.counts["429"] += 1
            return
        assert answer.status == 200, (answer.status, body[:200])
        events = body.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], body[-200:]  # whole: the stream ran to its end
        finishes = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-2]
                    if json.loads(e[6:]).get("choices")]
        assert finishes[-1] in ("stop", "length"), finishes
        self.counts["answered"] += 1

    def leave_stream(self) -> None:
        answer = self.post(json.dumps(chat_body(self.rng, True, 3000)).encode())
        if answer.status == 200:
            answer.read(self.rng.randint(1, 400))  # a few pieces, then gone
        answer.close()

    def leave_plain(self) -> None:
        body = json.dumps(chat_body(self.rng, False, 3000)).encode()
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(self.rng.uniform(0, 0.3))
        conn.close()

    def malformed(self) -> None:
        bad = self.rng.choice([b"{not json", b"[" * 20000, b'{"model": "noise", "messages": [], "top_p": NaN}',
                               json.dumps({"model": "noise", "messages": "hi"}).encode(),
                               json.dumps({"model": "noise", "messages": [{"role": "user", "content": "hi"}],
                                           "temperature": "hot"}).encode(),
                               bytes(self.rng.getrandbits(8) for _ in range(200))])
        answer = self.post(bad)
        answer.read()
        assert 400 <= answer.status < 500, answer.status

    def oversized(self) -> None:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        if self.rng.random() < 0.5:  # declared: refused unread
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n" % OVERSIZED + b"x" * 4096)
        else:  # chunked: read no further than the limit
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                for _ in range(20):
                    conn.sendall(b"10000\r\n" + b"x" * 65536 + b"\r\n")
            except OSError:
                pass
        status, _ = read_status(conn)
        conn.close()
        assert status == 413, status


def test_sixteen_clients_for_a_minute_leave_the_server_answering_with_bounded_memory(tmp_path):
    save_chat_model(tmp_path / "checkpoints" / "noise", block_size=4096)
    server = Server(tmp_path, "--run=noise", "--max_tokens=4000", "--queue=8", "--deadline_s=20")
    try:
        warm = [server.post("/v1/chat/completions", chat_body(random.Random(i), False, 16)) for i in range(5)]
        assert all(status == 200 for status, _ in warm)
        rss_before = rss_mb(server.process.pid)
        until = time.monotonic() + SOAK_SECONDS
        clients = [Client(server.port, seed, until) for seed in range(CLIENTS)]
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(Client.run, clients))
        problems = [p for c in clients for p in c.problems]
        counts = sum((c.counts for c in clients), Counter())
        assert not problems, problems[:10]
        assert all(counts[name] > 0 for name in ("plain", "streamed", "leave_stream", "leave_plain", "malformed",
                                                  "oversized")), counts
        assert counts["answered"] >= 5 * SOAK_SECONDS, counts  # the queue turned over, not only 429s
        started = time.monotonic()  # no worker left busy: a short request is answered at once
        status, answer = server.post("/v1/chat/completions", chat_body(random.Random(0), False, 3))
        assert status == 200 and answer["usage"]["completion_tokens"] <= 3
        assert time.monotonic() - started < 5
        growth = rss_mb(server.process.pid) - rss_before
        print(f"soak: {SOAK_SECONDS:.0f} s, {CLIENTS} clients, {dict(counts)}; RSS {rss_before:.0f} MB, "
              f"grew {growth:.0f} MB; {threading.active_count()} threads here")
        assert growth < RSS_GROWTH_BOUND_MB, growth
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()
