"""Check this project on a CUDA GPU in one command: the cuda tests, a gpt2 training benchmark, the decode speed.

    make gpu-check                       # or: venv/bin/python gpu_check.py [--out=gpu_check.json]

In order: `pytest -m cuda tests/test_cuda.py` (bf16 against the CPU, fp16, compile, resume across devices, the KV
cache, torchrun, export, evaluation, pinned memory), then bench.bench_gpu_training (gpt2, 124M, context 1024, bf16,
torch.compile: tokens/s and MFU against the measured and the datasheet peak, compile time apart), then decode
tokens/s with and without the KV cache. Results go to gpu_check.json and, readable, gpu_check.txt; about 8 minutes
on one H100, most of it compilation. Without CUDA it runs what a CPU can (the cuda tests, which skip), says in one
line what it skipped and why, writes both files and exits 0. Any failure on a GPU makes the exit code 1.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from config import parse_args, run_cli

ROOT = Path(__file__).resolve().parent
OPTIONS = {"out": "gpu_check.json"}  # the readable report goes beside it, as .txt
TESTS_TIMEOUT_S = 420  # the cuda tests take about 3 minutes on one H100; a hang must not eat the benchmarks' time
DECODE_TOKENS, DECODE_ROUNDS = 512, 2
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


def measure_decode() -> dict:
    """Decode tokens/s with and without the KV cache, small preset, bf16, random weights (generate.py's bench)."""
    from bench import compare_decode_speeds
    speeds = compare_decode_speeds(torch.device("cuda"), torch.bfloat16, DECODE_TOKENS, DECODE_ROUNDS)
    cached, uncached = max(speeds[True]), max(speeds[False])
    return {"model": "small preset (block 512), random weights, bf16, batch 1, 16-token prompt",
            "new_tokens": DECODE_TOKENS, "rounds": DECODE_ROUNDS, "with_cache_tokens_per_s": cached,
            "without_cache_tokens_per_s": uncached, "speedup": cached / uncached,
            "all_rounds": {"with_cache": speeds[True], "without_cache": speeds[False]}}


def describe_decode(decode: dict) -> str:
    return (f"decode: {decode['model']}, {decode['new_tokens']} new tokens, best of {decode['rounds']}: with KV cache "
            f"{decode['with_cache_tokens_per_s']:.0f} tokens/s, without {decode['without_cache_tokens_per_s']:.0f} "
            f"tokens/s ({decode['speedup']:.1f}x)")


def run_part(name: str, measure: Callable[[], dict], describe: Callable[[dict], str], say: Callable[[str], None]
             ) -> dict:
    """One benchmark, timed; an exception (out of memory, a compile error) is recorded and the check goes on."""
    say(f"{name} ...")
    started = time.perf_counter()
    try:
        result = measure()
        result["seconds"] = time.perf_counter() - started
        say(describe(result))
    except Exception as err:  # record it and go on: a failed benchmark must not hide the others' numbers
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:],
                  "seconds": time.perf_counter() - started}
        say(f"{name}: FAILED after {result['seconds']:.0f} s: {result['error'][:500]}")
    return result


def why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"


def main(argv: list[str] | None = None) -> int:
    parsed = parse_args(sys.argv[1:] if argv is None else argv, extra=OPTIONS, preset="tiny")
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
        import bench
        report["gpu_training"] = run_part("GPU training benchmark (gpt2, bf16, torch.compile)",
                                          bench.bench_gpu_training, bench.describe_gpu_training, say)
        report["decode"] = run_part("decode speed", measure_decode, describe_decode, say)
        failed |= any("error" in report[part] for part in ("gpu_training", "decode"))
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
