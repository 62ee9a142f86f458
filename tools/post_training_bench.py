"""The post-training benchmark of docs/post-training.md: from one SFT start on the built-in addition task, the
held-out (test) exact-match accuracy of SFT alone, more SFT, DPO (with and without the NLL term) and GRPO, each run
for a fixed number of steps whose time is noted. Each variant is its script in a child process, as a learner runs it.

    OMP_NUM_THREADS=1 python -m tools.post_training_bench                       # makes the SFT start, then all
    OMP_NUM_THREADS=1 python -m tools.post_training_bench --start=checkpoints/<instruct run> --only=rl,dpo

On a shared machine the seconds vary with the load; the step counts do not. The table goes to stdout and, with
the raw numbers, to checkpoints/post-training-bench/results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gptkit.cli import parse_args, run_cli

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {
    "start": "",  # an instruct run on --dataset=addition to start from; empty: make one (SFT from scratch)
    "out": "checkpoints/post-training-bench",  # where the runs and results.json go
    "sft_steps": 1200,  # the SFT start's steps (batch 64, learning rate 1.5e-3), when it is made here (make addition's)
    "only": "",  # comma-separated subset of VARIANTS' names, e.g. rl,dpo (empty: all)
}
# Each variant: the script, and its arguments beyond --init_from and --out_dir. more_sft's steps take about the time
# of rl's 200 (the seconds measured are in the table); DPO's steps are cheaper, its pairs cost the sampling.
VARIANTS = {
    "more_sft": ("instruct.py", ["--dataset=addition", "--max_iters=500", "--batch_size=64",
                                 "--learning_rate=1.5e-3", "--eval_interval=250"]),
    "dpo": ("dpo.py", ["--max_iters=500", "--eval_interval=100"]),  # its defaults: lr 2e-6, sigmoid_norm, beta 0.1
    "dpo_lr1e-5_100": ("dpo.py", ["--max_iters=100", "--eval_interval=50", "--learning_rate=1e-5"]),
    "dpo_lr1e-5": ("dpo.py", ["--max_iters=500", "--eval_interval=100", "--learning_rate=1e-5"]),
    "dpo_sum_lr1e-5": ("dpo.py", ["--max_iters=500", "--eval_interval=100", "--learning_rate=1e-5",
                                  "--loss_type=sigmoid"]),
    "dpo_nll": ("dpo.py", ["--max_iters=500", "--eval_interval=100", "--nll_weight=1", "--learning_rate=3e-5"]),
    "rl": ("rl.py", ["--max_iters=200", "--eval_interval=50"]),  # its defaults: lr 1e-4, 8 x 8 samples at 0.5
    "rl_lr5e-5": ("rl.py", ["--max_iters=200", "--eval_interval=50", "--learning_rate=5e-5", "--min_lr=5e-5"]),
}


def run_script(script: str, args: list[str]) -> float:
    """A script in a child process on one thread; its wall seconds. Its output streams through."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    print(f"$ python {script} {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, str(REPO / script), *args], env=env)
    if result.returncode:
        raise SystemExit(f"{script} failed with exit code {result.returncode}")
    return time.perf_counter() - started


def accuracy(run_dir: Path) -> tuple[float | None, float]:
    """(before, after) test exact match of a finished run, from its results.json."""
    results = json.loads((run_dir / "results.json").read_text())
    if "test_reward" in results:
        return results["test_reward"]["before"], results["test_reward"]["after"]
    if isinstance(results.get("test_exact_match"), dict):
        return results["test_exact_match"]["before"], results["test_exact_match"]["after"]
    return None, results["test_exact_match"]


def main() -> None:
    options = parse_args(sys.argv[1:], extra=OPTIONS, reads=()).options
    out = Path(options["out"])
    rows, seconds = {}, {}
    start = options["start"]
    if not start:
        start = str(out / "sft")
        seconds["sft"] = run_script("train.py", ["--preset=tiny", "--dataset=addition", "--tokenizer=bpe:257",
                                                 "--max_iters=300", "--eval_interval=300", f"--out_dir={out / 'base'}"])
        seconds["sft"] += run_script("instruct.py", [f"--init_from={out / 'base'}", "--dataset=addition",
                                                     f"--max_iters={options['sft_steps']}", "--batch_size=64",
                                                     "--learning_rate=1.5e-3", f"--out_dir={start}"])
    rows["sft"] = accuracy(Path(start))[1]
    chosen = [v for v in options["only"].split(",") if v] or list(VARIANTS)
    for name in chosen:
        script, args = VARIANTS[name]
        run_dir = out / name
        seconds[name] = run_script(script, [f"--init_from={start}", f"--out_dir={run_dir}", *args])
        rows[name] = accuracy(run_dir)[1]
    print("\n| variant | command's extra arguments | wall seconds | test exact match |")
    print("| --- | --- | --- | --- |")
    print(f"| SFT start | {start} | {seconds.get('sft', float('nan')):.0f} | {rows['sft']:.1%} |")
    for name in chosen:
        script, args = VARIANTS[name]
        print(f"| {name} | `{script} {' '.join(args)}` | {seconds[name]:.0f} | {rows[name]:.1%} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"accuracy": rows, "seconds": seconds, "start": start}, indent=2))


if __name__ == "__main__":
    run_cli(main)
