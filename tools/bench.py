"""Benchmarks: matmul peak; training speed, MFU and peak RSS; decode, attention and tokenisation speed; one run.

    python -m tools.bench                          # the full table (minutes on 2 CPU cores), writes bench.json
    python -m tools.bench --quick                  # eager training only, fewer steps, shorter decode (about a minute)
    python -m tools.bench --nanogpt_dir=~/nanoGPT  # also nanoGPT's train.py at the same configs on the same data
    python -m tools.bench --gpu                    # CUDA only: gpt2 (124M) training in bf16 with torch.compile, MFU

Training runs train.py itself in a child process per configuration, so each peak RSS is that configuration's, and
each figure is the median of the steady iterations (the first ones, which hold compilation, are left out) with the
min and max beside it. Configurations are interleaved when --repeats > 1, so a burst of load elsewhere on a shared
machine slows all of them alike; compare ratios only within one run.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
from config import PRESETS, ModelConfig, UserError
from generate import Sampling, generate
from gptkit.cli import parse_args, run_cli
from gptkit.fast import lay_out_for_decoding, matmul_causal_attention
from gptkit.runinfo import read_metrics
from gptkit.runtime import measure_matmul_peak, setup_runtime
from model import GPT, count_parameters, flops_per_token

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "quick": False,  # eager training only, fewer steps and tokens
    "repeats": 0,  # 0: 3 for the matmul peak and decode, 1 for training (each run's steps are its repeats)
    "steps": 0,  # training steps per run; 0: a default per preset
    "nanogpt_dir": "",  # a nanoGPT checkout: run its train.py at the same configs, side by side
    "baseline_dir": "",  # another checkout of this repository (e.g. before a change): its train.py beside ours
    # (at the defaults: bf16, eager, alternating with ours)
    "out": "bench.json",  # the report, as JSON
    "decode_tokens": 0,  # 0: 512 (128 with --quick)
    "training_only": False,  # only the training rows: no RSS-vs-data, decode, attention or tokenisation lines
    "dtypes": "float32,bfloat16",  # the training rows' dtypes (the plain and baseline rows are bf16 only)
    "rss_data_scale": 20,  # also train TINY on a token file this many times larger, to show RSS is flat in it; 0: skip
    "gpu": False,  # only the GPU training benchmark (bench_gpu_training), written to --out
    "time_to_loss": False,  # only the time-to-loss comparison with --nanogpt_dir (bench_time_to_loss)
    "ttl_presets": "tiny",  # its shapes: tiny, small or tiny,small
    "ttl_ours": "",  # our recipe on top of the shape and schedule; empty: TTL_OURS
}

# The configurations issue 8 compares with nanoGPT (gradient accumulation 1, GPT-2 vocabulary, dropout 0).
SHAPES = {"tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=12),
          "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8)}
# One learning-rate schedule for both programs, so their validation losses after the same steps can be compared.
SCHEDULE = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=5, weight_decay=0.1, grad_clip=1.0)
# Time to loss (issue 17): nanoGPT trains at small-model settings for TTL_STEPS; we then train at the same shape and
# data and time how long we take to reach its final val loss, once with its recipe and once with ours (TTL_OURS).
TTL_STEPS = {"tiny": 400, "small": 200}
TTL_SCHEDULE = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=50, beta2=0.99, weight_decay=0.1, grad_clip=1.0)
# Our recipe per shape (docs/optimizer.md has the sweeps behind it): Muon for the blocks' matrices, a
# higher AdamW rate for the embeddings, a short warmup, and a wsd schedule whose cooldown ends about where nanoGPT's
# loss is reached; at TINY also a smaller batch, which reaches a loss sooner in seconds than batch 12 does, and
# AdamW's beta1 at 0.8 (a shorter memory of the embeddings' gradients, modded-nanogpt's choice).
MUON = ("--optimizer=muon", "--muon_adjust_lr=match_rms_adamw", "--lr_schedule=wsd", "--cooldown_frac=0.3",
        "--warmup_iters=10")
TTL_OURS = {"tiny": (*MUON, "--muon_lr=8e-3", "--learning_rate=8e-3", "--beta1=0.8", "--batch_size=8",
                     "--max_iters=175"),
            "small": (*MUON, "--muon_lr=4e-3", "--learning_rate=2e-3", "--max_iters=80")}
TTL_EVAL_EVERY = 25  # our eval interval while timing: the time to loss is read at the first eval below the target
TTL_EVAL_ITERS = 40
WARMUP_ITERATIONS = 2  # left out of the step time: the first holds compilation, both hold allocator warm-up

# nanoGPT's log lines: its only record of a run. Ours are read from the run's metrics.jsonl (read_our_training).
ITER_LINE = re.compile(r"^iter (\d+): loss ([\d.naninf]+), time ([\d.]+) ?ms", re.M)
NANOGPT_VAL_LINE = re.compile(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", re.M)


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def show(self, scale: float = 1.0, digits: int = 1) -> str:
        return f"{self.median * scale:.{digits}f} [{self.min * scale:.{digits}f}-{self.max * scale:.{digits}f}]"


def run_measured(command: list[str], cwd: Path) -> tuple[int, str, float, float]:
    """Run a child to completion; return its exit code, output, peak RSS in MB and wall seconds."""
    started = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # rusage of this child alone: its own peak RSS
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, output, usage.ru_maxrss / 1024, time.perf_counter() - started


def nanogpt_data_dir(requested: str, workdir: Path, scale: int = 1) -> Path:
    """A folder in nanoGPT's layout (train.bin/val.bin of uint16 GPT-2 ids, nothing else) that both programs read."""
    if requested and not ((Path(requested) / "train.bin").exists() and (Path(requested) / "val.bin").exists()):
        raise UserError(f"--data_dir={requested} has no train.bin/val.bin; prepare one with python data.py")
    if requested and scale == 1 and not (Path(requested) / "meta.json").exists():
        return Path(requested)  # already nanoGPT's layout: used as is
    source = Path(requested) if requested else next(
        (ROOT / "data" / name for name in ("wikitext2", "shakespeare")
         if (ROOT / "data" / name / "train.bin").exists()),
        None)
    if source is None:
        raise UserError("no token files to train on; run make data first (or pass --data_dir=DIR)")
    if (source / "meta.json").exists() and data.read_meta(source)["dtype"] != "uint16":
        raise UserError(f"{source} holds {data.read_meta(source)['dtype']} ids; nanoGPT's layout needs uint16")
    folder = workdir / f"data-x{scale}"
    folder.mkdir(parents=True, exist_ok=True)
    tokens = np.fromfile(source / "train.bin", dtype=np.uint16)
    np.tile(tokens, scale).tofile(folder / "train.bin")
    shutil.copyfile(source / "val.bin", folder / "val.bin")
    return folder


def our_command(preset: str, dtype: str, compile_mode: str, steps: int, data_dir: Path, out_dir: Path,
                eval_iters: int, root: Path = ROOT, extra: tuple[str, ...] = ()) -> list[str]:
    shape = SHAPES[preset]
    args = [f"--{k}={v}" for k, v in {**shape, **SCHEDULE}.items()]
    args += [f"--preset={preset}", "--dropout=0.0", "--gradient_accumulation_steps=1", f"--max_iters={steps}",
             f"--lr_decay_iters={steps}", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--log_interval=1",
             f"--eval_interval={steps}", f"--eval_iters={eval_iters}", "--device=cpu", f"--dtype={dtype}"]
    if root == ROOT:  # AdamW like nanoGPT, whatever the preset's own optimizer (older checkouts lack these options)
        args += ["--optimizer=adamw", "--lr_schedule=cosine"]
    if compile_mode != "default":
        args.append(f"--compile={compile_mode}")
    return [sys.executable, str(root / "train.py"), *args, *extra]


def nanogpt_command(nanogpt_dir: Path, preset: str, compile_mode: bool, steps: int, data_dir: Path, out_dir: Path,
                    eval_iters: int, schedule: dict | None = None) -> list[str]:
    """nanoGPT's train.py at the same shapes and schedule; float32 (its autocast is off on the CPU), bias like GPT-2."""
    args = {**SHAPES[preset], **(schedule or SCHEDULE), "max_iters": steps, "lr_decay_iters": steps,
            "eval_interval": steps,
            "eval_iters": eval_iters, "log_interval": 1, "dataset": str(data_dir.resolve()), "out_dir": str(out_dir),
            "device": "cpu", "dtype": "float32", "compile": compile_mode, "bias": True, "dropout": 0.0,
            "gradient_accumulation_steps": 1, "wandb_log": False, "always_save_checkpoint": False}
    return [sys.executable, str(nanogpt_dir / "train.py"), *[f"--{k}={v}" for k, v in args.items()]]


def parse_nanogpt_training(output: str, steps: int) -> dict:
    """Step times (ms) of nanoGPT's steady iterations, and its validation loss after the last step, from its log."""
    times = [float(t) for n, _, t in ITER_LINE.findall(output)][:steps]  # its last iteration also holds an eval
    vals = NANOGPT_VAL_LINE.findall(output)
    return {"first_ms": times[0] if times else float("nan"), "steady_ms": times[WARMUP_ITERATIONS:],
            "val_loss": float(vals[-1]) if vals else float("nan")}


def read_our_training(out_dir: Path) -> dict:
    """The same figures for a run of ours (this checkout's or --baseline_dir's), from what the run wrote: every
    step's time from metrics.jsonl's train records (logged each step: tokens per step / tokens per second, both
    recorded), the last eval's val loss. No parsing of printed lines, which may be reworded."""
    tokens_per_step = json.loads((out_dir / "manifest.json").read_text())["tokens_per_step"]
    records = read_metrics(out_dir)
    times = [tokens_per_step / r["tokens_per_s"] * 1e3 for r in records if r.get("kind") == "train"]
    vals = [r["val_loss"] for r in records if r.get("kind") == "eval"]
    return {"first_ms": times[0] if times else float("nan"), "steady_ms": times[WARMUP_ITERATIONS:],
            "val_loss": vals[-1] if vals else float("nan")}


def bench_time_to_loss(nanogpt_dir: Path, preset: str, data_dir: Path, workdir: Path,
                       ours: tuple[str, ...] | None = None) -> dict:
    """Seconds of training for nanoGPT (compiled float32, its fastest CPU setting) to finish TTL_STEPS[preset] steps,
    and for us to first reach its final val loss, with its recipe and with ours; each run alone, one after another.

    Training seconds, not wall: nanoGPT's are the mean of its step times after the first WARMUP_ITERATIONS (which
    hold compilation and an eval) times the steps; ours are train.py's elapsed_s at that eval, the sum of all its
    step times (evals left out, the first steps kept).
    """
    steps = TTL_STEPS[preset]
    print(f"time to loss: nanoGPT {preset}, {steps} steps ...", file=sys.stderr)
    command = nanogpt_command(nanogpt_dir, preset, True, steps, data_dir, workdir / f"ttl-nanogpt-{preset}",
                              TTL_EVAL_ITERS, schedule=TTL_SCHEDULE)
    code, output, _, _ = run_measured(command, nanogpt_dir)
    if code != 0:
        raise UserError(f"{' '.join(command)} failed with exit code {code}:\n{output[-2000:]}")
    times = [float(t) for _, _, t in ITER_LINE.findall(output)][WARMUP_ITERATIONS:steps]
    target = float(NANOGPT_VAL_LINE.findall(output)[-1])
    result = {"preset": preset, "steps": steps, "target_val_loss": target,
              "nanogpt_s": statistics.mean(times) * steps / 1e3, "ours": {}}
    for label, extra in (("nanoGPT's recipe", ()), ("our recipe", TTL_OURS[preset] if ours is None else ours)):
        print(f"time to loss: ours {preset}, {label} ({' '.join(extra) or 'same settings'}) ...", file=sys.stderr)
        out_dir = workdir / f"ttl-ours-{preset}-{len(result['ours'])}"
        args = time_to_loss_args(preset, data_dir, out_dir, extra)
        code, output, _, _ = run_measured([sys.executable, str(ROOT / "train.py"), *args], ROOT)
        if code != 0:
            raise UserError(f"train.py {' '.join(args)} failed with exit code {code}:\n{output[-2000:]}")
        evals = read_metrics(out_dir)
        result["ours"][label] = {"args": " ".join(extra), **time_to_target(evals, target, result["nanogpt_s"])}
    return result


def time_to_loss_args(preset: str, data_dir: Path, out_dir: Path, extra: tuple[str, ...]) -> list[str]:
    """train.py's arguments for a time-to-loss run: nanoGPT's shape and recipe (AdamW, cosine: named, so a preset
    whose defaults are another recipe does not leak into it), then `extra`, our recipe's changes on top."""
    args = [f"--{k}={v}" for k, v in {**SHAPES[preset], **TTL_SCHEDULE}.items()]
    # Evaluate on as many windows as nanoGPT's eval (TTL_EVAL_ITERS of its batch), whatever batch our recipe trains
    # at: train.py evaluates at its batch size, and fewer windows would make an early lucky eval likelier.
    batch = int(next((a.split("=")[1] for a in reversed(extra) if a.startswith("--batch_size=")),
                     SHAPES[preset]["batch_size"]))
    eval_iters = -(-TTL_EVAL_ITERS * SHAPES[preset]["batch_size"] // batch)  # rounded up
    args += [f"--preset={preset}", "--optimizer=adamw", "--lr_schedule=cosine", "--dropout=0.0",
             f"--max_iters={TTL_STEPS[preset]}", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
             f"--eval_interval={TTL_EVAL_EVERY}", f"--eval_iters={eval_iters}", "--log_interval=25",
             "--device=cpu"]
    return args + list(extra)


def time_to_target(metrics: list[dict], target: float, nanogpt_s: float) -> dict:
    """From a run's metrics.jsonl records: its last eval, and its first eval at or below `target` with the seconds of
    training to it (elapsed_s) and their ratio to nanoGPT's; None for those when the run never got there."""
    evals = [m for m in metrics if m["kind"] == "eval"]
    reached = next((e for e in evals if e["val_loss"] <= target), None)
    return {"final_val_loss": evals[-1]["val_loss"], "final_step": evals[-1]["step"],
            "reached_at_step": reached["step"] if reached else None,
            "seconds": reached["elapsed_s"] if reached else None,
            "ratio": reached["elapsed_s"] / nanogpt_s if reached else None}


def describe_time_to_loss(result: dict) -> str:
    lines = [f"time to loss, {result['preset']}: nanoGPT (compiled float32) ends {result['steps']} steps at val loss "
             f"{result['target_val_loss']:.3f} after {result['nanogpt_s']:.0f} s of training"]
    for label, row in result["ours"].items():
        if row["seconds"] is None:
            lines.append(f"  ours, {label}: not reached in {row['final_step']} steps "
                         f"(val loss {row['final_val_loss']:.3f})")
        else:
            lines.append(f"  ours, {label}: reached it at step {row['reached_at_step']} after {row['seconds']:.0f} s, "
                         f"{row['ratio']:.2f}x nanoGPT's time (val loss {row['final_val_loss']:.3f} at step "
                         f"{row['final_step']})")
    return "\n".join(lines)


def bench_matmul(repeats: int) -> dict[str, list[float]]:
    """FLOP/s of a large matmul per dtype, `repeats` samples each."""
    peaks = {"float32": [], "bfloat16": []}
    for _ in range(repeats):
        for name in peaks:
            peaks[name].append(measure_matmul_peak(torch.device("cpu"), getattr(torch, name)))
    return peaks


def decode_speed(model: GPT, use_cache: bool, new_tokens: int, batch_size: int = 1, prompt_tokens: int = 16,
                 seed: int = 1337) -> float:
    """Decode tokens/s (all rows, prompt excluded) sampling at temperature 1 from a random prompt.

    The prompt and the sampling settings depend only on the arguments, so a run with and one without the cache
    do the same work but for the cache. A short warm-up run first keeps one-time costs out of the number.
    """
    device = model.lm_head.weight.device
    prompt_generator = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(model.config.vocab_size, (batch_size, prompt_tokens), generator=prompt_generator)
    prompt = prompt.to(device)
    sampling = Sampling(temperature=1.0)
    generate(model, prompt, min(new_tokens, 8), sampling, torch.Generator(device).manual_seed(seed), use_cache)
    result = generate(model, prompt, new_tokens, sampling, torch.Generator(device).manual_seed(seed), use_cache)
    return result.decoded_tokens / result.decode_seconds


def compare_decode_speeds(device: torch.device, dtype: torch.dtype, new_tokens: int, rounds: int,
                          say=lambda use_cache, speed: None) -> dict[bool, list[float]]:
    """Decode tokens/s with (True) and without (False) the cache for the small preset's model, random weights, laid
    out as generate.py decodes, same prompt and settings; `say` hears each measurement as it comes.

    The two paths alternate: on a CPU shared with other work, a burst of load then slows both alike instead of
    whichever happened to run during it.
    """
    torch.manual_seed(0)
    model = lay_out_for_decoding(GPT(PRESETS["small"]().model).to(device=device, dtype=dtype).eval())
    speeds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for use_cache in (True, False):
            speeds[use_cache].append(decode_speed(model, use_cache=use_cache, new_tokens=new_tokens))
            say(use_cache, speeds[use_cache][-1])
    return speeds


def bench_decode(repeats: int, new_tokens: int) -> dict:
    """KV-cached vs whole-context decoding, SMALL preset (block 512), float32, random weights, interleaved."""
    speeds = compare_decode_speeds(torch.device("cpu"), torch.float32, new_tokens, repeats)
    return {"with_cache": Spread.of(speeds[True]), "without_cache": Spread.of(speeds[False]),
            "new_tokens": new_tokens, "block_size": PRESETS["small"]().model.block_size}


GPU_DECODE_TOKENS, GPU_DECODE_ROUNDS = 512, 2


def measure_gpu_decode() -> dict:
    """Decode tokens/s with and without the KV cache, small preset, bf16, random weights ."""
    speeds = compare_decode_speeds(torch.device("cuda"), torch.bfloat16, GPU_DECODE_TOKENS, GPU_DECODE_ROUNDS)
    cached, uncached = max(speeds[True]), max(speeds[False])
    return {"model": "small preset (block 512), random weights, bf16, batch 1, 16-token prompt",
            "new_tokens": GPU_DECODE_TOKENS, "rounds": GPU_DECODE_ROUNDS, "with_cache_tokens_per_s": cached,
            "without_cache_tokens_per_s": uncached, "speedup": cached / uncached,
            "all_rounds": {"with_cache": speeds[True], "without_cache": speeds[False]}}


def describe_gpu_decode(decode: dict) -> str:
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


# One layer's causal attention (batch, heads, context, head size, dtype), either side of the rule by which
# fast.MatmulCausalSelfAttention runs it as matmuls on the CPU (bf16, context up to 512) or with the fused kernel.
ATTENTION_SHAPES = {"small bf16": (8, 6, 256, 64, torch.bfloat16), "tiny bf16": (12, 4, 128, 32, torch.bfloat16),
                    "context 512 bf16": (4, 6, 512, 64, torch.bfloat16),
                    "context 1024 bf16": (2, 12, 1024, 64, torch.bfloat16),
                    "small float32": (8, 6, 256, 64, torch.float32)}


def bench_attention(repeats: int, calls: int = 5) -> dict:
    """Forward + backward ms of one layer's causal attention as matmuls and as the fused kernel, interleaved."""
    results = {}
    for label, (batch, heads, context, head_size, dtype) in ATTENTION_SHAPES.items():
        q, k, v = (torch.randn(batch, heads, context, head_size, dtype=dtype, requires_grad=True) for _ in range(3))
        grad_out = torch.randn_like(q)
        ways = {"matmuls": lambda: matmul_causal_attention(q, k, v, dropout=0.0),
                "fused": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        times = {way: [] for way in ways}
        for repeat in range(repeats + 1):  # round 0 warms up
            for way, attend in ways.items():
                start = time.perf_counter()
                for _ in range(calls):
                    torch.autograd.grad(attend(), (q, k, v), grad_out)
                if repeat:
                    times[way].append((time.perf_counter() - start) * 1e3 / calls)
        results[label] = {way: vars(Spread.of(values)) for way, values in times.items()}
    return results


def tokenization_rates(text: str) -> dict:
    """GPT-2 tokenisation speed on the same text: one thread, all cores, and a plain per-line encode_ordinary loop."""
    tokenizer = data.GPT2Tokenizer()
    megabytes = len(text.encode()) / 1e6
    cores = os.cpu_count() or 1

    def timed(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return megabytes / (time.perf_counter() - start)

    per_line = timed(lambda: [tokenizer.encoding.encode_ordinary(line) for line in text.splitlines(keepends=True)])
    single = timed(lambda: data.tokenize_documents(tokenizer, [text], workers=1, desc="1 thread"))
    parallel = timed(lambda: data.tokenize_documents(tokenizer, [text], workers=cores, desc=f"{cores} threads"))
    return {"megabytes": megabytes, "cores": cores, "per_line_loop_mb_s": per_line, "single_thread_mb_s": single,
            "all_cores_mb_s": parallel, "speedup_vs_single": parallel / single}


def bench_tokenization(data_dir: Path, megabytes: float) -> dict | None:
    """GPT-2 tokenisation MB/s (tokenization_rates) on text decoded back from the training tokens."""
    try:
        tokenizer = data.GPT2Tokenizer()
    except UserError as err:
        print(f"tokenisation: skipped ({err})", file=sys.stderr)
        return None
    tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16)[:int(megabytes * 250_000)]  # ~4 bytes a token
    return tokenization_rates(tokenizer.decode(tokens.tolist()))


def main(argv: list[str] | None = None) -> None:
    parsed = parse_args(sys.argv[1:] if argv is None else argv, extra=OPTIONS, reads=("data_dir",))
    options, quick = parsed.options, parsed.options["quick"]
    if options["gpu"]:
        report = {"command": " ".join(["python -m tools.bench", *sys.argv[1:]]), "torch": torch.__version__,
                  "gpu_training": run_part("GPU training benchmark (gpt2, bf16, torch.compile)", bench_gpu_training,
                                           describe_gpu_training, print),
                  "decode": run_part("decode speed", measure_gpu_decode, describe_gpu_decode, print)}
        Path(options["out"]).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {options['out']}")
        if any("error" in report[part] for part in ("gpu_training", "decode")):
            sys.exit(1)
        return
    repeats = options["repeats"] or 3
    train_repeats = options["repeats"] or 1
    nanogpt_dir = Path(options["nanogpt_dir"]).expanduser().resolve() if options["nanogpt_dir"] else None
    if nanogpt_dir is not None and not (nanogpt_dir / "train.py").exists():
        raise UserError(f"--nanogpt_dir={nanogpt_dir} has no train.py; point it at a nanoGPT checkout")
    if options["time_to_loss"]:
        time_to_loss(options, nanogpt_dir, parsed.config.data.data_dir)
        return
    dtypes = [d for d in options["dtypes"].split(",") if d]
    if not dtypes or set(dtypes) - {"float32", "bfloat16"}:
        raise UserError(f"--dtypes={options['dtypes']} is not a list of float32 and bfloat16; e.g. --dtypes=bfloat16")
    baseline_dir = Path(options["baseline_dir"]).expanduser().resolve() if options["baseline_dir"] else None
    if baseline_dir is not None and not (baseline_dir / "train.py").exists():
        raise UserError(f"--baseline_dir={baseline_dir} has no train.py; point it at a checkout of this repository")
    eval_iters = 5 if quick else 20
    decode_tokens = options["decode_tokens"] or (128 if quick else 512)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version()},
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        data_dir = nanogpt_data_dir(parsed.config.data.data_dir, workdir)
        report["data_dir"] = str(parsed.config.data.data_dir or "a nanoGPT-layout copy of " + str(data_dir))

        print("matmul peak ...", file=sys.stderr)
        peak_samples = bench_matmul(repeats)

        runs = []  # (preset, dtype, compile, program)
        for preset in SHAPES:
            for dtype in dtypes:
                for compile_mode in (("False",) if quick else ("False", "True")):
                    runs.append((preset, dtype, compile_mode, "ours"))
            runs.append((preset, "bfloat16", "False", "plain"))  # --fast_kernels=False: what fast.py is worth
            runs.append((preset, "bfloat16", "False", "muon"))  # what Muon's Newton-Schulz iterations cost a step
            if baseline_dir is not None:
                runs.append((preset, "bfloat16", "False", "baseline"))
            if nanogpt_dir is not None:
                for compile_mode in ((False,) if quick else (False, True)):
                    runs.append((preset, "float32", compile_mode, "nanoGPT"))
        results: dict[tuple, dict] = {}
        for repeat in range(train_repeats):
            # every other round in reverse: no program always runs first (or right after the same neighbour)
            for preset, dtype, compile_mode, who in (runs if repeat % 2 == 0 else runs[::-1]):
                is_nanogpt = who == "nanoGPT"
                steps = options["steps"] or {"tiny": 8 if quick else 20, "small": 5 if quick else 10}[preset]
                out_dir = workdir / f"run-{len(results)}-{repeat}"
                if is_nanogpt:
                    command = nanogpt_command(nanogpt_dir, preset, compile_mode, steps, data_dir, out_dir, eval_iters)
                else:
                    command = our_command(preset, dtype, compile_mode, steps, data_dir, out_dir, eval_iters,
                                          root=baseline_dir if who == "baseline" else ROOT,
                                          extra={"plain": ("--fast_kernels=False",),
                                                 "muon": ("--optimizer=muon",)}.get(who, ()))
                print(f"train {who} {preset} {dtype} compile={compile_mode} ({steps} steps) ...", file=sys.stderr)
                code, output, rss_mb, wall = run_measured(command, {"nanoGPT": nanogpt_dir,
                                                                     "baseline": baseline_dir}.get(who, ROOT))
                if code != 0:
                    print(output[-3000:], file=sys.stderr)
                    raise UserError(f"{' '.join(command)} failed with exit code {code}")
                parsed_run = parse_nanogpt_training(output, steps) if is_nanogpt else read_our_training(out_dir)
                shutil.rmtree(out_dir, ignore_errors=True)
                entry = results.setdefault((who, preset, dtype, str(compile_mode)),
                                           {"steady_ms": [], "first_ms": [], "rss_mb": [], "val_loss": []})
                entry["steady_ms"] += parsed_run["steady_ms"]
                entry["first_ms"].append(parsed_run["first_ms"])
                entry["rss_mb"].append(rss_mb)
                entry["val_loss"].append(parsed_run["val_loss"])

        # The peak again after the training runs; MFU is against the highest sample of both rounds, so that a peak
        # taken during a burst of load elsewhere cannot flatter it (one such run printed an MFU over 100%).
        print("matmul peak again ...", file=sys.stderr)
        for name, values in bench_matmul(repeats).items():
            peak_samples[name] += values
        peaks = {name: Spread.of(values) for name, values in peak_samples.items()}
        report["matmul_peak_gflops"] = {k: vars(Spread(v.median / 1e9, v.min / 1e9, v.max / 1e9))
                                        for k, v in peaks.items()}

        training = []
        for (who, preset, dtype, compile_mode), entry in results.items():
            model_config = ModelConfig(**{k: v for k, v in SHAPES[preset].items() if k != "batch_size"})
            tokens_per_step = SHAPES[preset]["batch_size"] * model_config.block_size
            step = Spread.of(entry["steady_ms"])
            peak = peaks[dtype].max
            row = {"program": who, "preset": preset, "dtype": dtype, "compile": compile_mode,
                   "step_ms": vars(step),
                   "tokens_per_s": vars(Spread(tokens_per_step / step.median * 1e3, tokens_per_step / step.max * 1e3,
                                               tokens_per_step / step.min * 1e3)),
                   "mfu": flops_per_token(model_config) * tokens_per_step / (step.median / 1e3) / peak,
                   "compile_s": max(0.0, (statistics.median(entry["first_ms"]) - step.median) / 1e3)
                   if compile_mode == "True" else None,
                   "peak_rss_mb": max(entry["rss_mb"]), "val_loss": statistics.median(entry["val_loss"]),
                   "steady_steps": len(entry["steady_ms"])}
            training.append(row)
        report["training"] = training

        if options["training_only"]:
            pass
        elif options["rss_data_scale"] and not quick:
            scale = options["rss_data_scale"]
            big = nanogpt_data_dir(str(data_dir), workdir, scale)
            rss = {}
            for label, folder in (("x1", data_dir), (f"x{scale}", big)):
                print(f"train ours tiny on the {label} token file (peak RSS) ...", file=sys.stderr)
                command = our_command("tiny", "bfloat16", "default", 5, folder, workdir / f"rss-{label}", 2)
                code, output, rss_mb, _ = run_measured(command, ROOT)
                if code != 0:
                    raise UserError(f"{' '.join(command)} failed with exit code {code}:\n{output[-2000:]}")
                rss[label] = {"train_tokens": int((folder / "train.bin").stat().st_size // 2), "peak_rss_mb": rss_mb}
            report["rss_vs_data_size"] = rss

        if not options["training_only"]:
            print("decode ...", file=sys.stderr)
            decode = bench_decode(repeats if not quick else 1, decode_tokens)
            report["decode_tokens_per_s"] = {k: vars(v) if isinstance(v, Spread) else v for k, v in decode.items()}

            print("attention ...", file=sys.stderr)
            report["attention_ms"] = bench_attention(repeats)

            print("tokenisation ...", file=sys.stderr)
            report["tokenization"] = bench_tokenization(data_dir, 0.5 if quick else 2.0)

    Path(options["out"]).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {options['out']}")


def time_to_loss(options: dict, nanogpt_dir: Path | None, data_dir: str) -> None:
    """--time_to_loss: bench_time_to_loss for each of --ttl_presets, printed and written to --out."""
    if nanogpt_dir is None:
        raise UserError("--time_to_loss compares with nanoGPT: give --nanogpt_dir=DIR (a nanoGPT checkout)")
    presets = [p for p in options["ttl_presets"].split(",") if p]
    if not presets or set(presets) - set(TTL_STEPS):
        raise UserError(f"--ttl_presets={options['ttl_presets']} is not a list of {', '.join(TTL_STEPS)}")
    ours = tuple(options["ttl_ours"].split()) if options["ttl_ours"] else None  # None: TTL_OURS[preset]
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "torch": torch.__version__,
              "time_to_loss": []}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        folder = nanogpt_data_dir(data_dir, Path(tmp))
        for preset in presets:
            report["time_to_loss"].append(bench_time_to_loss(nanogpt_dir, preset, folder, Path(tmp), ours))
            print(describe_time_to_loss(report["time_to_loss"][-1]), flush=True)
    Path(options["out"]).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {options['out']}")


def print_table(report: dict) -> None:
    machine = report["machine"]
    print(f"machine: {machine['processor']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
          f"({machine['torch_threads']} threads); median [min-max]")
    for dtype, peak in report["matmul_peak_gflops"].items():
        print(f"matmul peak {dtype:<9} {Spread(**peak).show()} GFLOP/s (before and after training; MFU: the max)")
    print(f"\n{'program':<8}{'preset':<7}{'dtype':<10}{'compile':<8}{'ms/step':>24}{'tokens/s':>24}{'MFU':>7}"
          f"{'compile s':>10}{'peak RSS MB':>12}{'val loss':>9}")
    for row in report["training"]:
        compile_s = f"{row['compile_s']:.0f}" if row["compile_s"] is not None else "-"
        print(f"{row['program']:<8}{row['preset']:<7}{row['dtype']:<10}{row['compile']:<8}"
              f"{Spread(**row['step_ms']).show():>24}{Spread(**row['tokens_per_s']).show(digits=0):>24}"
              f"{row['mfu']:>7.1%}{compile_s:>10}{row['peak_rss_mb']:>12.0f}{row['val_loss']:>9.3f}")
    fastest = {}
    for row in report["training"]:
        key = (row["program"], row["preset"])
        if key not in fastest or row["step_ms"]["median"] < fastest[key]["step_ms"]["median"]:
            fastest[key] = row
    for preset in SHAPES:
        ours, theirs = fastest.get(("ours", preset)), fastest.get(("nanoGPT", preset))
        defaults = [r for r in report["training"] if r["program"] == "ours" and r["preset"] == preset
                    and r["dtype"] == "bfloat16" and r["compile"] == "False"]
        if ours and theirs:
            default = defaults[0] if defaults else ours
            print(f"{preset}: time/step vs nanoGPT's fastest ({theirs['dtype']}, compile={theirs['compile']}): "
                  f"ours fastest {ours['step_ms']['median'] / theirs['step_ms']['median']:.2f}x, "
                  f"ours at defaults {default['step_ms']['median'] / theirs['step_ms']['median']:.2f}x; "
                  f"peak RSS {default['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x")
    for preset in SHAPES:
        rows = {r["program"]: r for r in report["training"] if r["preset"] == preset and r["dtype"] == "bfloat16"
                and r["compile"] == "False"}
        for other, meaning in (("plain", "model.py's plain path (--fast_kernels=False)"),
                               ("baseline", "the --baseline_dir checkout"), ("muon", "--optimizer=muon")):
            if "ours" in rows and other in rows:
                print(f"{preset}: time/step at the defaults vs {meaning}: "
                      f"{rows['ours']['step_ms']['median'] / rows[other]['step_ms']['median']:.2f}x")
    if "rss_vs_data_size" in report:
        print("peak RSS vs token file size: " + ", ".join(
            f"{label} ({v['train_tokens']:,} tokens) {v['peak_rss_mb']:.0f} MB"
            for label, v in report["rss_vs_data_size"].items()))
    if "decode_tokens_per_s" not in report:  # --training_only
        return
    decode = report["decode_tokens_per_s"]
    cached, uncached = Spread(**decode["with_cache"]), Spread(**decode["without_cache"])
    print(f"decode SMALL (block {decode['block_size']}), {decode['new_tokens']} new tokens, float32: with KV cache "
          f"{cached.show()} tokens/s, without {uncached.show()} tokens/s, {cached.median / uncached.median:.1f}x")
    attention = report["attention_ms"]
    print("attention forward + backward, one layer, ms: " + "; ".join(
        f"{label} matmuls {Spread(**ways['matmuls']).show()} fused {Spread(**ways['fused']).show()} "
        f"({ways['matmuls']['median'] / ways['fused']['median']:.2f}x)" for label, ways in attention.items()))
    tokens = report.get("tokenization")
    if tokens:
        print(f"tokenisation ({tokens['megabytes']:.1f} MB): per-line loop {tokens['per_line_loop_mb_s']:.1f} MB/s, "
              f"1 thread {tokens['single_thread_mb_s']:.1f} MB/s, {tokens['cores']} threads "
              f"{tokens['all_cores_mb_s']:.1f} MB/s")



# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched in this order against
# torch.cuda.get_device_name(). H100 PCIe and NVL have lower clocks than the SXM part; their names say so.
DATASHEET_BF16_PEAK_FLOPS = (("H200", 989.4e12), ("H100 PCIe", None), ("H100 NVL", None), ("H100", 989.4e12),
                             ("A100", 312e12))


def datasheet_bf16_peak(device_name: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of a GPU by its name, or None where this table does not know it."""
    return next((peak for key, peak in DATASHEET_BF16_PEAK_FLOPS if key in device_name), None)


ATTENTION_MARKERS = ("scaled_dot_product", "flash", "efficient_attention", "fmha")


def attention_kernels(profile) -> list[str]:
    """The attention ops and kernels of a profiled step: which of SDPA's flash, memory-efficient or math paths ran."""
    names = {event.key[:100] for event in profile.key_averages()
             if any(marker in event.key.lower() for marker in ATTENTION_MARKERS)}
    return sorted(names)


def bench_gpu_training(steps: int = 20, warmup_steps: int = 3, batch_size: int = 16, peak_size: int = 8192) -> dict:
    """Train the gpt2 preset (124M parameters, context 1024) on random tokens on the GPU: bf16 autocast, torch.compile,
    fused AdamW, gradient clipping, no accumulation; SDPA picks its flash kernel for these shapes in bf16.

    The first step holds compilation, reported apart as compile_s; step times are of the `steps` after the
    `warmup_steps`. MFU is against the bf16 matmul peak measured here at size `peak_size` and against the datasheet.
    """
    if not torch.cuda.is_available():
        raise UserError("bench.py --gpu needs a CUDA GPU, and torch.cuda.is_available() is False here")
    runtime = setup_runtime("cuda", "bfloat16")
    device_name = torch.cuda.get_device_name(runtime.device)
    measured_peak = measure_matmul_peak(runtime.device, torch.bfloat16, size=peak_size)
    config = PRESETS["gpt2"]().model
    torch.manual_seed(0)
    model = GPT(config).to(runtime.device)
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    generator = torch.Generator(runtime.device).manual_seed(0)
    tokens_per_step = batch_size * config.block_size

    def one_step() -> torch.Tensor:
        # random tokens made on the GPU: this measures the model's step, not a data pipeline
        x, y = (torch.randint(config.vocab_size, (batch_size, config.block_size), device=runtime.device,
                              generator=generator) for _ in range(2))
        with runtime.autocast():
            loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats(runtime.device)
    times, losses = [], []
    for _ in range(warmup_steps + steps):
        started = time.perf_counter()
        losses.append(one_step().item())  # .item() waits for the step's kernels
        times.append(time.perf_counter() - started)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiled:
        one_step()
        torch.cuda.synchronize(runtime.device)
    step = Spread.of(times[warmup_steps:])  # seconds
    datasheet_peak = datasheet_bf16_peak(device_name)
    achieved = flops_per_token(config) * tokens_per_step / step.median
    return {"device": device_name, "preset": "gpt2", "parameters": count_parameters(config),
            "batch": f"{batch_size} x {config.block_size} tokens, no accumulation", "tokens_per_step": tokens_per_step,
            "dtype": "bfloat16", "compile": True, "attention_ops": attention_kernels(profiled),
            "warmup_steps": warmup_steps, "steady_steps": steps, "first_step_s": times[0],
            "compile_s": max(0.0, times[0] - step.median),
            "step_ms": vars(Spread(step.median * 1e3, step.min * 1e3, step.max * 1e3)),
            "tokens_per_s": tokens_per_step / step.median, "achieved_tflops": achieved / 1e12,
            "measured_bf16_peak_tflops": measured_peak / 1e12,
            "datasheet_bf16_peak_tflops": datasheet_peak / 1e12 if datasheet_peak else "unknown",
            "mfu_vs_measured_peak": achieved / measured_peak,
            "mfu_vs_datasheet_peak": achieved / datasheet_peak if datasheet_peak else "unknown",
            "peak_memory_gb": torch.cuda.max_memory_allocated(runtime.device) / 1e9,
            "loss_first_last": [losses[0], losses[-1]]}


def describe_gpu_training(result: dict) -> str:
    """bench_gpu_training's result as a few readable lines."""
    datasheet = result["datasheet_bf16_peak_tflops"]
    mfu_datasheet = result["mfu_vs_datasheet_peak"]
    return "\n".join([
        f"GPU training: {result['device']}, {result['preset']} ({result['parameters'] / 1e6:.0f}M parameters), "
        f"{result['batch']}, {result['dtype']}, torch.compile; attention ops: "
        f"{', '.join(result['attention_ops']) or 'none seen in the profile'}",
        f"  step {Spread(**result['step_ms']).show()} ms over {result['steady_steps']} steps after "
        f"{result['warmup_steps']} warm-up; first step {result['first_step_s']:.1f} s, of which compile "
        f"{result['compile_s']:.1f} s; peak memory {result['peak_memory_gb']:.1f} GB",
        f"  {result['tokens_per_s']:,.0f} tokens/s, {result['achieved_tflops']:.0f} TFLOP/s: MFU "
        f"{result['mfu_vs_measured_peak']:.1%} of the measured bf16 matmul peak "
        f"({result['measured_bf16_peak_tflops']:.0f} TFLOP/s), "
        + (f"{mfu_datasheet:.1%} of the datasheet's {datasheet:.0f} TFLOP/s" if datasheet != "unknown"
           else "datasheet peak unknown for this GPU"),
        f"  loss {result['loss_first_last'][0]:.3f} at the first step, {result['loss_first_last'][1]:.3f} at the last",
    ])


if __name__ == "__main__":
    run_cli(main)
