"""Check this project on a CUDA GPU in one command: the cuda tests, a gpt2 training benchmark, the decode speed.

    make gpu-check                       # or: venv/bin/python -m tools.gpu_check [--out=gpu_check.json]

In order: `pytest -m cuda tests/test_cuda.py` (bf16 against the CPU, fp16, compile, resume across devices, the KV
cache, torchrun, export, evaluation, pinned memory), then `python -m tools.bench --gpu`: gpt2 training (124M, context
1024, bf16, torch.compile: tokens/s and MFU against the measured and the datasheet peak, compile time apart) and
decode tokens/s with and without the KV cache. Results go to gpu_check.json and, readable, gpu_check.txt; about 8
minutes on one H100, most of it compilation. Without CUDA it runs what a CPU can (the cuda tests, which skip), says in
one line what it skipped and why, writes both files and exits 0. Any failure on a GPU makes the exit code 1.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptkit.cli import parse_args, run_cli

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"out": "gpu_check.json"}  # the report, as JSON; the readable one goes beside it, as .txt
BENCH_TIMEOUT_S = 900  # compiling gpt2 and timing it takes about 3 minutes on one H100
TESTS_TIMEOUT_S = 420  # the cuda tests take about 3 minutes on one H100; a hang must not eat the benchmarks' time
SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def run_cuda_tests() -> dict:
    """pytest -m cuda tests/test_cuda.py in a child process: its exit code, counts and summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_cuda.py")]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
        exit_code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        exit_code = None
        output = (err.stdout or b"").decode(errors="replace") + f"\ntimed out after {TESTS_TIMEOUT_S} s"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
              for n, kind in SUMMARY_COUNT.findall(summary)}
    return {"command": " ".join(command[1:]), "exit_code": exit_code, "summary": summary, "counts": counts,
            "seconds": time.perf_counter() - started, "output_tail": output[-6000:]}


def describe_tests(tests: dict) -> str:
    verdict = "ok" if tests["exit_code"] == 0 else f"FAILED (exit code {tests['exit_code']})"
    text = f"cuda tests: {tests['summary']}: {verdict}"
    if tests["exit_code"] != 0:
        text += "\n" + tests["output_tail"][-3000:]
    return text


def run_gpu_benchmarks(out: Path, say: Callable[[str], None]) -> dict:
    """`python -m tools.bench --gpu` in a child process (a tool runs another tool, never imports it): its JSON, or an
    error entry for each part when it died before writing one."""
    command = [sys.executable, "-m", "tools.bench", "--gpu", f"--out={out}"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
        output, exit_code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, exit_code = (err.stdout or b"").decode(errors="replace"), None
    for line in output.strip().splitlines()[-6:]:
        say(f"  {line}")
    if exit_code == 0 and out.is_file():
        return json.loads(out.read_text())
    error = {"error": f"{' '.join(command[1:])} exited with {exit_code}", "output_tail": output[-4000:],
             "seconds": time.perf_counter() - started}
    return {"gpu_training": error, "decode": error}


def why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"


def main(argv: list[str] | None = None) -> int:
    parsed = parse_args(sys.argv[1:] if argv is None else argv, extra=OPTIONS, reads=())
    json_path = Path(parsed.options["out"])
    txt_path = json_path.with_suffix(".txt")
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    has_cuda = torch.cuda.is_available()
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "torch_cuda": torch.version.cuda,
               "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if has_cuda else []}
    say(f"gpu check: torch {torch.__version__}, " + (f"GPUs: {', '.join(machine['gpus'])}" if has_cuda
                                                      else "no CUDA GPU"))
    report = {"machine": machine, "cuda_available": has_cuda}

    say("cuda tests ...")
    report["cuda_tests"] = run_cuda_tests()
    say(describe_tests(report["cuda_tests"]))
    failed = report["cuda_tests"]["exit_code"] != 0

    if has_cuda:
        say("GPU training benchmark (gpt2, bf16, torch.compile) and decode speed: python -m tools.bench --gpu ...")
        benchmarks = run_gpu_benchmarks(json_path.with_name(json_path.stem + "_bench.json"), say)
        report.update(benchmarks)
        failed |= any("error" in report.get(part, {"error": "missing"}) for part in ("gpu_training", "decode"))
    else:
        reason = why_no_cuda()
        report["skipped"] = {"parts": ["cuda tests (ran, every one skipped)", "GPU training benchmark",
                                       "decode speed on the GPU"], "reason": reason}
        say(f"skipped: the cuda tests (collected, each skipped), the GPU training benchmark and the GPU decode speed: "
            f"{reason}")

    report["passed"] = not failed
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    txt_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path} and {txt_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
