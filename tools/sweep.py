"""A short sweep: train.py once per setting, side by side, and a table of validation loss against step and minutes.

    python -m tools.sweep --vary=learning_rate=1e-3,2e-3,4e-3 -- --preset=tiny --dataset=shakespeare --max_iters=400
    python -m tools.sweep --variant="--optimizer=adamw" --variant="--optimizer=muon" --jobs=2 -- --preset=tiny ...
    python -m tools.sweep --minutes=8 --bits_per_byte --vary=arch=gpt2,llama -- --preset=tiny --dataset=shakespeare

Everything after `--` goes to every run: the one place where the command line passes arguments through rather than
reading them. Each value of --vary, then each --variant, is one run with its own arguments added. Runs go to
--out_dir/<n>/ and the table to --out_dir/sweep.json. With --jobs=2 two runs share the machine (OMP_NUM_THREADS
split between them): the losses after a step do not depend on that, but minutes are only comparable within one
sweep, and `make bench` is the place for timings.

--minutes=M compares settings at equal training time instead of equal steps: a short calibration run of each setting
measures its time per step, its run gets the steps that fit in M minutes (so its schedule ends there), and
--max_minutes=M stops it should it be slower than measured. --bits_per_byte scores each run's best.pt over its whole
validation split with tools.evaluate (run as a child process), a figure that compares across tokenizers.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from config import ConfigError, UserError
from gptkit.cli import FIELD_SECTIONS, parse_args, run_cli

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "vary": [],  # NAME=V1,V2,...: one run per value of a train.py option, e.g. learning_rate=1e-3,2e-3
    "variant": [],  # one run with these train.py arguments, e.g. "--optimizer=muon --muon_lr=0.02"
    "out_dir": "checkpoints/sweep",  # run n goes to OUT_DIR/n/, the table to OUT_DIR/sweep.json; must be empty
    "jobs": 1,  # runs at a time, sharing the machine's cores
    "minutes": 0.0,  # > 0: every run trains this many minutes, its steps calibrated to fit (0: train.py's max_iters)
    "bits_per_byte": False,  # score each run's best.pt on the val split with tools.evaluate (tokenizer-independent)
}
USAGE = 'python -m tools.sweep --vary=NAME=V1,V2 | --variant="--key=value ..." [...] -- [train.py\'s --key=value ...]'
CALIBRATION_STEPS = 30  # --minutes: steps of each setting timed before its run; the first 10 (warm-up) are not counted
CALIBRATION_ROUNDS = 2  # timings of each setting, in alternating order; the fastest counts
MINUTES_CAP = 3  # a timed run stops at this many times --minutes even if its steps are not done


@dataclass
class Sweep:
    variants: list[list[str]]  # each run's own arguments
    common: list[str]  # every run's arguments (after --)
    out_dir: Path
    jobs: int = 1  # runs at a time
    minutes: float = 0.0  # > 0: every run trains this many minutes, its steps calibrated to fit
    bits_per_byte: bool = False  # score each run's best.pt with tools.evaluate


def parse(argv: list[str]) -> Sweep:
    own, common = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    for arg in own:
        key = arg.removeprefix("--").partition("=")[0]
        if key in FIELD_SECTIONS and key not in OPTIONS:
            raise ConfigError(f"unknown option {arg}: train.py's options go after --, e.g. -- {arg}")
    options = parse_args(own, extra=OPTIONS, reads=(), usage=USAGE).options  # train.py reads the config, after --
    variants = []
    for vary in options["vary"]:
        name, _, values = vary.partition("=")
        if not name or not values:
            raise ConfigError(f"--vary={vary}: use --vary=NAME=V1,V2,... e.g. --vary=learning_rate=1e-3,2e-3")
        variants += [[f"--{name}={v}"] for v in values.split(",")]
    variants += [variant.split() for variant in options["variant"]]
    out_dir, jobs = Path(options["out_dir"]), options["jobs"]
    if jobs < 1:
        raise ConfigError(f"--jobs={jobs}: --jobs must be a positive integer, e.g. --jobs=2")
    minutes, bits_per_byte = options["minutes"], options["bits_per_byte"]
    if minutes < 0:
        raise ConfigError(f"--minutes={minutes}: --minutes must be a positive number, e.g. --minutes=8")
    if not variants:
        raise ConfigError("nothing to sweep; give --vary=NAME=V1,V2 or --variant=\"--key=value ...\"")
    if any(a.startswith("--out_dir") for a in common):
        raise ConfigError("--out_dir after -- would make every run write to one folder; give sweep.py's --out_dir")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty; give another --out_dir")
    return Sweep(variants, common, out_dir, jobs, minutes, bits_per_byte)


def curve(run_dir: Path) -> list[dict]:
    """(step, minutes of training, val loss) of every eval of a finished run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "minutes": r["elapsed_s"] / 60, "val_loss": r["val_loss"]}
            for r in rows if r["kind"] == "eval"]


def run_logged(command: list[str], log: Path, what: str, jobs: int) -> str:
    """Run a child process with its output in `log` (OMP_NUM_THREADS split between the jobs); its stdout, or a
    UserError quoting its last line."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log.write_text(result.stdout)
    if result.returncode != 0:
        tail = result.stdout.strip().splitlines()[-1:]
        raise UserError(f"{what} failed: {tail[0] if tail else result.returncode}")
    return result.stdout


def seconds_per_step(run_dir: Path) -> float:
    """A calibration run's time per step, from its metrics.jsonl, leaving out the first 10 steps (warm-up)."""
    rows = {r["step"]: r["elapsed_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}
    return (rows[CALIBRATION_STEPS] - rows[10]) / (CALIBRATION_STEPS - 10)


def calibrate(sweep: Sweep) -> list[float]:
    """--minutes: each setting's seconds per step, timed in CALIBRATION_ROUNDS rounds that alternate the settings'
    order, and the fastest of its rounds kept: a setting timed while something else loaded the machine would
    otherwise be given fewer steps than its rivals. Every setting then trains the steps that fit in the minutes."""
    fastest = [math.inf] * len(sweep.variants)
    for round_number in range(CALIBRATION_ROUNDS):
        order = list(enumerate(sweep.variants))
        for index, args in order if round_number % 2 == 0 else order[::-1]:
            calibration = sweep.out_dir / f"{index}-calibration-{round_number}"
            command = [sys.executable, str(ROOT / "train.py"), *sweep.common, *args, f"--max_iters={CALIBRATION_STEPS}",
                       "--log_interval=5", "--eval_iters=1", f"--eval_interval={CALIBRATION_STEPS}",
                       f"--out_dir={calibration}"]
            run_logged(command, sweep.out_dir / f"{calibration.name}.log",
                       f"the calibration of run {index} ({' '.join(args)})", 1)
            fastest[index] = min(fastest[index], seconds_per_step(calibration))
    return fastest


def run_one(sweep: Sweep, index: int, args: list[str], step_seconds: float | None = None) -> dict:
    """One setting: its run (with --minutes, the steps that fit at `step_seconds` each), then (with
    --bits_per_byte) its score; its row's data."""
    train = [sys.executable, str(ROOT / "train.py"), *sweep.common, *args]
    run_dir, name = sweep.out_dir / str(index), f"run {index} ({' '.join(args)})"
    if sweep.minutes:
        steps = max(1, int(sweep.minutes * 60 / step_seconds))
        # the cap only stops a run that something else slowed far down; the steps are what make the runs equal
        train += [f"--max_iters={steps}", f"--max_minutes={sweep.minutes * MINUTES_CAP}"]
    run_logged([*train, f"--out_dir={run_dir}"], sweep.out_dir / f"{index}.log", name, sweep.jobs)
    result = {"args": " ".join(args), "curve": curve(run_dir)}
    if sweep.minutes:
        result["seconds_per_step"] = step_seconds
    if sweep.bits_per_byte:
        report = run_logged([sys.executable, "-m", "tools.evaluate", f"--ckpt={run_dir / 'best.pt'}", "--split=val"],
                            sweep.out_dir / f"{index}-evaluate.log", f"evaluating {name}", sweep.jobs)
        result["bits_per_byte"] = float(re.findall(r"bits per byte (\d+\.\d+)", report)[-1])
    return result


def run_all(sweep: Sweep) -> list[dict]:
    """Run the settings `jobs` at a time, in order; return each one's arguments, eval curve and score."""
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    step_seconds = calibrate(sweep) if sweep.minutes else [None] * len(sweep.variants)
    with ThreadPoolExecutor(max_workers=sweep.jobs) as pool:
        futures = [pool.submit(run_one, sweep, index, args, step_seconds[index])
                   for index, args in enumerate(sweep.variants)]
        return [future.result() for future in futures]


def table(results: list[dict], timed: bool = False) -> str:
    """A Markdown table: one row per run, val loss at every eval step, then the minutes the run trained. Timed runs
    (--minutes) each end at their own step: their last step and val loss get columns of their own. Then bits per
    byte, where scored."""
    steps = [point["step"] for point in results[0]["curve"]]
    if timed:
        steps = sorted({point["step"] for r in results for point in r["curve"][:-1]})
    scored = any("bits_per_byte" in r for r in results)
    header = ["run", *(f"step {s}" for s in steps), "minutes"] + ["steps", "val loss"] * timed + \
        ["bits per byte"] * scored
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in results:
        losses = {p["step"]: p["val_loss"] for p in r["curve"]}
        last = r["curve"][-1]
        cells = [f"`{r['args']}`", *(f"{losses[s]:.4f}" if s in losses else "-" for s in steps),
                 f"{last['minutes']:.2f}"]
        if timed:
            cells += [str(last["step"]), f"{last['val_loss']:.4f}"]
        if scored:
            cells.append(f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sweep = parse(argv)
    results = run_all(sweep)
    (sweep.out_dir / "sweep.json").write_text(json.dumps({"common": sweep.common, "minutes": sweep.minutes,
                                                          "runs": results}, indent=2) + "\n")
    print(f"python -m tools.sweep {' '.join(argv)}")
    print(table(results, timed=bool(sweep.minutes)))


if __name__ == "__main__":
    run_cli(main)
