"""A short sweep: train.py once per setting, side by side, and a table of validation loss against step and minutes.

    python sweep.py --vary=learning_rate=1e-3,2e-3,4e-3 -- --preset=tiny --dataset=shakespeare --max_iters=400
    python sweep.py --variant="--optimizer=adamw" --variant="--optimizer=muon" --jobs=2 -- --preset=tiny ...

Everything after `--` goes to every run; each --variant (or each value of --vary) adds its own arguments. Runs go to
--out_dir/<n>/ and the table to --out_dir/sweep.json. With --jobs=2 two runs share the machine (OMP_NUM_THREADS
split between them): the losses after a step do not depend on that, but minutes are only comparable within one
sweep, and `make bench` is the place for timings.

Equal time rather than equal steps, and a tokenizer-independent score (val loss per token is not comparable across
tokenizers): --minutes=M first times a short probe of each setting and gives it the max_iters that fill M minutes
of training (its whole schedule, cooldown included); --evaluate scores each run's best checkpoint with
tools/evaluate.py on its whole validation split and adds its bits per byte to the table. Alone on a quiet machine:

    python -m tools.sweep --minutes=5 --evaluate --vary=tokenizer=gpt2,bpe:2048,bpe:4096 -- --preset=tiny \
        --dataset=shakespeare
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from config import ConfigError, UserError
from gptkit.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent  # the repository: train.py, and tools/ as a package
PROBE_STEPS, PROBE_LOG_INTERVAL = 30, 5  # --minutes: the step time is read between the first and the last log


class SweepArgs(NamedTuple):
    variants: list[list[str]]  # each run's own arguments
    common: list[str]  # every run's arguments
    out_dir: Path
    jobs: int  # runs at a time
    minutes: float = 0.0  # > 0: each run's max_iters fills this many minutes of training
    evaluate: bool = False  # score each run's bits per byte with tools/evaluate.py


def parse(argv: list[str]) -> SweepArgs:
    """The variants' own arguments, the common arguments, the output folder, jobs at a time, minutes, evaluate."""
    own, common = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    variants, out_dir, jobs, minutes, evaluate = [], Path("checkpoints/sweep"), 1, 0.0, False
    for arg in own:
        key, _, value = arg.partition("=")
        if key == "--variant":
            variants.append(value.split())
        elif key == "--vary":
            name, _, values = value.partition("=")
            if not name or not values:
                raise ConfigError(f"{arg}: use --vary=NAME=V1,V2,... e.g. --vary=learning_rate=1e-3,2e-3")
            variants += [[f"--{name}={v}"] for v in values.split(",")]
        elif key == "--out_dir":
            out_dir = Path(value)
        elif key == "--jobs":
            jobs = int(value) if value.isdigit() and int(value) > 0 else 0
            if not jobs:
                raise ConfigError(f"{arg}: --jobs must be a positive integer, e.g. --jobs=2")
        elif key == "--minutes":
            minutes = float(value) if re.fullmatch(r"\d+(\.\d*)?", value) else 0.0
            if minutes <= 0:
                raise ConfigError(f"{arg}: --minutes must be a positive number, e.g. --minutes=5")
        elif arg == "--evaluate":
            evaluate = True
        else:
            raise ConfigError(f"unknown option {arg}; sweep.py takes --vary, --variant, --out_dir, --jobs, --minutes, "
                              "--evaluate, then -- and train.py's arguments")
    if not variants:
        raise ConfigError("nothing to sweep; give --vary=NAME=V1,V2 or --variant=\"--key=value ...\"")
    if any(a.startswith("--out_dir") for a in common):
        raise ConfigError("--out_dir after -- would make every run write to one folder; give sweep.py's --out_dir")
    if minutes and any(a.startswith("--max_iters") for variant in variants for a in [*variant, *common]):
        raise ConfigError("--minutes sets each run's --max_iters; drop --max_iters")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty; give another --out_dir")
    return SweepArgs(variants, common, out_dir, jobs, minutes, evaluate)


def steps_in(minutes: float, train_logs: list[dict]) -> int:
    """The steps that fill `minutes` of training at the pace between a probe's first and last logged step (the
    first steps, slower while caches and compiled code warm up, are left out)."""
    first, last = train_logs[0], train_logs[-1]
    seconds_per_step = (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])
    return max(1, int(minutes * 60 / seconds_per_step))


def run_env(jobs: int) -> dict[str, str]:
    """The environment of every run: the cores shared among `jobs` runs (a probe gets the same threads as its run,
    as a step's time depends on them)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def fit_to_minutes(variants: list[list[str]], common: list[str], out_dir: Path, minutes: float,
                   jobs: int) -> list[list[str]]:
    """Each variant with the --max_iters that fills `minutes`, from a probe of PROBE_STEPS steps run alone (with the
    threads its run will have)."""
    fitted = []
    for index, args in enumerate(variants):
        probe_dir = out_dir / f"probe-{index}"
        command = [sys.executable, str(ROOT / "train.py"), *common, *args, f"--max_iters={PROBE_STEPS}",
                   f"--log_interval={PROBE_LOG_INTERVAL}", f"--eval_interval={PROBE_STEPS}", "--eval_iters=1",
                   f"--out_dir={probe_dir}"]
        with open(out_dir / f"probe-{index}.log", "w") as log:
            if subprocess.run(command, stdout=log, stderr=log, env=run_env(jobs)).returncode:
                raise UserError(f"the probe of {' '.join(args)} failed; see {out_dir / f'probe-{index}.log'}")
        rows = [json.loads(line) for line in (probe_dir / "metrics.jsonl").read_text().splitlines()]
        steps = steps_in(minutes, [r for r in rows if r["kind"] == "train"])
        print(f"{' '.join(args)}: {steps} steps fill {minutes:g} minutes")
        fitted.append([*args, f"--max_iters={steps}"])
    return fitted


def bits_per_byte(run_dir: Path, log_path: Path) -> float:
    """tools/evaluate.py on the run's best checkpoint, over its whole validation split: bits per byte of text."""
    command = [sys.executable, "-m", "tools.evaluate", f"--ckpt={run_dir}", "--split=val"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    log_path.write_text(result.stdout + result.stderr)
    found = re.search(r"bits per byte ([\d.]+)", result.stdout)
    if result.returncode or not found:
        raise UserError(f"evaluating {run_dir} failed; see {log_path}")
    return float(found.group(1))


def curve(run_dir: Path) -> list[dict]:
    """(step, minutes of training, val loss) of every eval of a finished run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "minutes": r["elapsed_s"] / 60, "val_loss": r["val_loss"]}
            for r in rows if r["kind"] == "eval"]


def run_all(variants: list[list[str]], common: list[str], out_dir: Path, jobs: int) -> list[dict]:
    """Start the runs `jobs` at a time, in order; wait for all; return each one's arguments and eval curve."""
    env = run_env(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending, running, results = list(enumerate(variants)), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            index, args = pending.pop(0)
            run_dir = out_dir / str(index)
            log = open(out_dir / f"{index}.log", "w")
            command = [sys.executable, str(ROOT / "train.py"), *common, *args, f"--out_dir={run_dir}"]
            running.append((index, args, run_dir, log, subprocess.Popen(command, stdout=log, stderr=log, env=env)))
        time.sleep(1)
        for item in [r for r in running if r[4].poll() is not None]:
            index, args, run_dir, log, process = item
            log.close()
            running.remove(item)
            if process.returncode != 0:
                tail = (out_dir / f"{index}.log").read_text().strip().splitlines()[-1:]
                raise UserError(f"run {index} ({' '.join(args)}) failed: {tail[0] if tail else process.returncode}")
            results[index] = {"args": " ".join(args), "curve": curve(run_dir)}
    return [results[i] for i in range(len(variants))]


def table(results: list[dict]) -> str:
    """A Markdown table: one row per run, val loss at every eval step, the minutes the run trained, and its bits per
    byte where it was evaluated (--evaluate)."""
    steps = sorted({point["step"] for r in results for point in r["curve"]})
    scored = any("bits_per_byte" in r for r in results)
    lines = ["| run | " + " | ".join(f"step {s}" for s in steps) + " | minutes |" + (" bits per byte |" * scored),
             "| --- |" + " --- |" * (len(steps) + 1 + scored)]
    for r in results:
        losses = {p["step"]: p["val_loss"] for p in r["curve"]}
        cells = [f"{losses[s]:.4f}" if s in losses else "-" for s in steps]
        score = f" {r['bits_per_byte']:.4f} |" if "bits_per_byte" in r else " - |" * scored
        lines.append(f"| `{r['args']}` | " + " | ".join(cells) + f" | {r['curve'][-1]['minutes']:.2f} |" + score)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    variants, common, out_dir, jobs, minutes, evaluate = parse(sys.argv[1:] if argv is None else argv)
    out_dir.mkdir(parents=True, exist_ok=True)
    if minutes:
        variants = fit_to_minutes(variants, common, out_dir, minutes, jobs)
    results = run_all(variants, common, out_dir, jobs)
    if evaluate:
        for index, result in enumerate(results):
            result["bits_per_byte"] = bits_per_byte(out_dir / str(index), out_dir / f"{index}.evaluate.log")
    (out_dir / "sweep.json").write_text(json.dumps({"common": common, "runs": results}, indent=2) + "\n")
    print(f"python sweep.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(table(results))


if __name__ == "__main__":
    run_cli(main)
