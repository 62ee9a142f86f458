"""A short sweep: train.py once per setting, side by side, and a table of validation loss against step and minutes.

    python sweep.py --vary=learning_rate=1e-3,2e-3,4e-3 -- --preset=tiny --dataset=shakespeare --max_iters=400
    python sweep.py --variant="--optimizer=adamw" --variant="--optimizer=muon" --jobs=2 -- --preset=tiny ...

Everything after `--` goes to every run; each --variant (or each value of --vary) adds its own arguments. Runs go to
--out_dir/<n>/ and the table to --out_dir/sweep.json. With --jobs=2 two runs share the machine (OMP_NUM_THREADS
split between them): the losses after a step do not depend on that, but minutes are only comparable within one
sweep, and `make bench` is the place for timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from config import ConfigError, UserError
from gptkit.cli import run_cli

ROOT = Path(__file__).resolve().parent


def parse(argv: list[str]) -> tuple[list[list[str]], list[str], Path, int]:
    """(the variants' own arguments, the common arguments, the output folder, jobs at a time)."""
    own, common = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    variants, out_dir, jobs = [], Path("checkpoints/sweep"), 1
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
        else:
            raise ConfigError(f"unknown option {arg}; sweep.py takes --vary, --variant, --out_dir, --jobs, then -- "
                              "and train.py's arguments")
    if not variants:
        raise ConfigError("nothing to sweep; give --vary=NAME=V1,V2 or --variant=\"--key=value ...\"")
    if any(a.startswith("--out_dir") for a in common):
        raise ConfigError("--out_dir after -- would make every run write to one folder; give sweep.py's --out_dir")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty; give another --out_dir")
    return variants, common, out_dir, jobs


def curve(run_dir: Path) -> list[dict]:
    """(step, minutes of training, val loss) of every eval of a finished run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "minutes": r["elapsed_s"] / 60, "val_loss": r["val_loss"]}
            for r in rows if r["kind"] == "eval"]


def run_all(variants: list[list[str]], common: list[str], out_dir: Path, jobs: int) -> list[dict]:
    """Start the runs `jobs` at a time, in order; wait for all; return each one's arguments and eval curve."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
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
    """A Markdown table: one row per run, val loss at every eval step, then the minutes the run trained."""
    steps = [point["step"] for point in results[0]["curve"]]
    lines = ["| run | " + " | ".join(f"step {s}" for s in steps) + " | minutes |",
             "| --- |" + " --- |" * (len(steps) + 1)]
    for r in results:
        losses = {p["step"]: p["val_loss"] for p in r["curve"]}
        cells = [f"{losses[s]:.4f}" if s in losses else "-" for s in steps]
        lines.append(f"| `{r['args']}` | " + " | ".join(cells) + f" | {r['curve'][-1]['minutes']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    variants, common, out_dir, jobs = parse(sys.argv[1:] if argv is None else argv)
    results = run_all(variants, common, out_dir, jobs)
    (out_dir / "sweep.json").write_text(json.dumps({"common": common, "runs": results}, indent=2) + "\n")
    print(f"python sweep.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(table(results))


if __name__ == "__main__":
    run_cli(main)
