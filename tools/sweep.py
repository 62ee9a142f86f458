"""A short sweep: train.py once per setting, side by side, and a table of validation loss against step and minutes.

    python -m tools.sweep --vary=learning_rate=1e-3,2e-3,4e-3 -- --preset=tiny --dataset=shakespeare --max_iters=400
    python -m tools.sweep --variant="--optimizer=adamw" --variant="--optimizer=muon" --jobs=2 -- --preset=tiny ...

Everything after `--` goes to every run: the one place where the command line passes arguments through rather than
reading them. Each value of --vary, then each --variant, is one run with its own arguments added. Runs go to
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
from gptkit.cli import FIELD_SECTIONS, parse_args, run_cli

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "vary": [],  # NAME=V1,V2,...: one run per value of a train.py option, e.g. learning_rate=1e-3,2e-3
    "variant": [],  # one run with these train.py arguments, e.g. "--optimizer=muon --muon_lr=0.02"
    "out_dir": "checkpoints/sweep",  # run n goes to OUT_DIR/n/, the table to OUT_DIR/sweep.json; must be empty
    "jobs": 1,  # runs at a time, sharing the machine's cores
}
USAGE = 'python -m tools.sweep --vary=NAME=V1,V2 | --variant="--key=value ..." [...] -- [train.py\'s --key=value ...]'


def parse(argv: list[str]) -> tuple[list[list[str]], list[str], Path, int]:
    """(the variants' own arguments, the common arguments, the output folder, jobs at a time)."""
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
    print(f"python -m tools.sweep {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(table(results))


if __name__ == "__main__":
    run_cli(main)
