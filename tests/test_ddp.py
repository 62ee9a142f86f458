"""DDP on the CPU (gloo, 2 processes): torchrun end to end, DDP == one process with the global batch, checkpoints
that move between world sizes, and ranks that die or hang. About a minute and a half on 2 cores: each torchrun
launch costs 5-10 s, so the CLI checks share a few launches.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from config import ConfigError, ModelConfig, TrainConfig
from data import Batches
from gptkit import checkpoint, loading
from gptkit.runtime import Runtime, setup_runtime
from model import GPT
from tests.helpers import REPO, TINY_ARGS, make_text, metrics, run_train
from train import make_optimizer, resolve_global_batch, train_step

# float32 everywhere: on a CPU with AVX512-BF16 `auto` picks bf16 autocast, whose rounding would hide a real mismatch.
# AdamW, not the tiny preset's Muon: Muon orthogonalises in bf16, which turns the all-reduce's 1e-8 differences into
# bf16 rounding; DDP with Muon has its own test below (test_two_processes_with_batch_b_step_like_one_process...).
DDP_ARGS = [*TINY_ARGS, "--dtype=float32", "--optimizer=adamw", "--lr_schedule=cosine", "--global_batch_size=16",
            "--lr_decay_iters=12", "--log_interval=1", "--eval_interval=3", "--ddp_timeout_s=20"]


def torchrun(workdir: Path, script: Path, *args: str, timeout: float = 120,
             cores: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pin = ["taskset", "-c", cores] if cores else []
    command = [*pin, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-process run of 6 steps (batch 8 per process, global batch 16), shared by the tests below."""
    workdir = tmp_path_factory.mktemp("ddp")
    (workdir / "corpus.txt").write_text(make_text())
    result = torchrun(workdir, REPO / "train.py", *DDP_ARGS, "--dataset=corpus.txt", "--max_iters=6", "--out_dir=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_torchrun_run_reports_once_and_writes_one_set_of_files_from_rank_0(ddp_run):
    workdir, result = ddp_run
    out = result.stdout
    assert out.count("tokens per step") == 1
    assert "8 x 32 tokens x 1 accumulation x 2 processes = 512 tokens per step (global batch 16 sequences)" in out
    assert out.count("iter 1: loss") == 1 and out.count("eval step 6:") == 1  # rank 1 prints no metrics
    run_dir = workdir / "ddp"
    assert [r["step"] for r in metrics(run_dir, "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in metrics(run_dir, "eval")] == [3, 6]
    assert (run_dir / "loss.png").is_file() and (run_dir / "manifest.json").is_file()
    payload = checkpoint.load_checkpoint(run_dir / "last.pt")
    assert payload["state"]["step"] == 6 and payload["world_size"] == 2
    assert not [k for k in payload["model"] if k.startswith(("module.", "_orig_mod."))]
    assert len(payload["rng_per_rank"]) == 2 and len(payload["batches"]) == 1
    model, _ = loading.model_from_checkpoint(payload)  # what generate.py does
    assert sum(p.numel() for p in model.parameters()) > 0


def test_ddp_checkpoint_resumes_in_one_process_and_back_like_one_uninterrupted_run(ddp_run):
    """2 processes for steps 1-6, one process for 7-9, 2 again for 10-12 == one process for 1-12 (same samples)."""
    workdir, _ = ddp_run
    run_train(workdir, "--resume", "--out_dir=ddp", "--max_iters=9")
    resumed = torchrun(workdir, REPO / "train.py", "--resume", "--out_dir=ddp", "--max_iters=12")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "saved by 1 process(es) and continues on 2" in resumed.stdout
    run_train(workdir, *DDP_ARGS, "--dataset=corpus.txt", "--max_iters=12", "--out_dir=straight")
    chained = {r["step"]: r["train_loss"] for r in metrics(workdir / "ddp", "train")}
    straight = {r["step"]: r["train_loss"] for r in metrics(workdir / "straight", "train")}
    assert sorted(chained) == sorted(straight) == list(range(1, 13))
    assert max(abs(chained[s] - straight[s]) for s in straight) < 1e-4
    chained_val = [r["val_loss"] for r in metrics(workdir / "ddp", "eval")]
    straight_val = [r["val_loss"] for r in metrics(workdir / "straight", "eval")]
    assert np.allclose(chained_val, straight_val, atol=1e-4)  # eval split across ranks == eval in one process
    a = checkpoint.load_checkpoint(workdir / "ddp" / "last.pt")["model"]
    b = checkpoint.load_checkpoint(workdir / "straight" / "last.pt")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# --- DDP == one process with the global batch, gradients and weights after one step --------------------------------

MODEL = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16)
PER_RANK_BATCH = 4
CASES = {  # name: (gradient_accumulation_steps, skip gradient sync on every micro-step, optimizer)
    "plain": (1, False, "adamw"),
    "accumulation": (3, False, "adamw"),
    "muon": (2, False, "muon"),  # Muon orthogonalises the all-reduced gradient, not each rank's own
    "no sync (mutation)": (2, True, "adamw"),
}


def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, MODEL.vocab_size, 5000).astype(np.uint16)


def one_step(runtime: Runtime, batch_size: int, accumulation: int, skip_sync: bool = False,
             optimizer_name: str = "adamw") -> dict:
    """One train_step from seed-0 weights; returns the gradients the optimizer saw and the weights after its step."""
    torch.manual_seed(0)
    model = GPT(MODEL)
    train = TrainConfig(batch_size=batch_size, gradient_accumulation_steps=accumulation, grad_clip=1.0,
                        optimizer=optimizer_name, learning_rate=1e-2, muon_lr=0.02)
    optimizer = make_optimizer(model, train, "cpu")
    grads = {}
    first = optimizer.muon if optimizer_name == "muon" else optimizer  # Muon steps first, AdamW after it
    first.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    wrapped = DistributedDataParallel(model) if runtime.distributed else model
    batches = Batches(tokens(), train, MODEL.block_size, seed=3, rank=runtime.rank, world_size=runtime.world_size)
    # The mutation: no gradient all-reduce at all, so each rank steps on its own half of the batch
    with wrapped.no_sync() if skip_sync else contextlib.nullcontext():
        assert train_step(wrapped, optimizer, runtime.grad_scaler(), batches, runtime, train, lr=1e-2) is not None
    return {"grads": grads, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def equivalence_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runtime = setup_runtime("cpu", "float32", ddp_timeout_s=60)
    results = {name: one_step(runtime, PER_RANK_BATCH, acc, skip, opt) for name, (acc, skip, opt) in CASES.items()}
    torch.save(results, f"{out}.rank{rank}")
    dist.destroy_process_group()


def max_difference(a: dict, b: dict, where: dict | None = None) -> float:
    return max(((a[k] - b[k]).abs() * (where[k] if where else 1)).max().item() for k in a)


def well_conditioned(grads: dict) -> dict:
    """Where AdamW's first step, lr * g / (|g| + eps), barely moves with g: |g| well above eps = 1e-8.

    Near |g| ~ eps the step's slope is lr / (4 eps), so a 1e-8 rounding difference in g moves the weight by up to
    ~lr / 4: the weights are compared only where |g| > 1e-6, and there the slope is below lr * eps / g**2 = 1e2.
    """
    return {k: (g.abs() > 1e-6).float() for k, g in grads.items()}


def test_two_processes_with_batch_b_step_like_one_process_with_batch_2b(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(equivalence_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    single = Runtime(device=torch.device("cpu"), dtype=torch.float32, reason="test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: another thread count sums in another order (~1e-6 apart)
    try:
        references = {name: one_step(single, 2 * PER_RANK_BATCH, acc, False, opt)
                      for name, (acc, _, opt) in CASES.items()}
    finally:
        torch.set_num_threads(threads)
    for name, (accumulation, skip_sync, _) in CASES.items():
        reference = references[name]
        ranks = [torch.load(tmp_path / f"ddp.rank{r}", weights_only=True)[name] for r in range(2)]
        grad_diff = max(max_difference(reference["grads"], r["grads"]) for r in ranks)
        weight_diff = max(max_difference(reference["weights"], r["weights"], well_conditioned(reference["grads"]))
                          for r in ranks)
        print(f"{name}: max |grad DDP - grad single| {grad_diff:.2e}, max |weight difference| {weight_diff:.2e}")
        if skip_sync:  # the check has teeth: without the all-reduce it fails by orders of magnitude
            assert grad_diff > 1e-3 and weight_diff > 1e-4
        elif name == "muon":
            # Muon saw the same all-reduced gradient (~1e-8). Its Newton-Schulz iteration runs in bf16, so a 1e-8
            # difference can round one entry to the next bf16 number: 2^-8 of a step of muon_lr x sqrt(4) = 0.04
            # (measured 9.8e-5). Weights within 1% of one Muon step.
            assert grad_diff < 1e-6 and weight_diff < 1e-2 * 0.04
        else:
            # Gradients agree to ~1e-8. AdamW's first step moves each weight by lr * g / (|g| + eps), which turns
            # a 1e-10 rounding difference in a 3e-8 gradient into ~5e-6: so weights within 0.1% of one step (lr).
            assert grad_diff < 1e-6 and weight_diff < 1e-3 * 1e-2


# --- bad input and failing ranks ---------------------------------------------------------------------------------

def test_global_batch_that_does_not_divide_is_a_config_error_naming_the_fix():
    train = TrainConfig(batch_size=8, global_batch_size=48)
    resolve_global_batch(train, world_size=2, overridden=frozenset())
    assert train.gradient_accumulation_steps == 3
    expected = (r"global_batch_size=48 is not a multiple of batch_size=8 x 4 processes = 32; "
                r"use --global_batch_size=32, or a number of processes from \[1, 2, 3, 6\]")
    with pytest.raises(ConfigError, match=expected):
        resolve_global_batch(TrainConfig(batch_size=8, global_batch_size=48), world_size=4, overridden=frozenset())
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 contradicts global_batch_size=48"):
        resolve_global_batch(TrainConfig(batch_size=8, global_batch_size=48, gradient_accumulation_steps=2),
                             world_size=2, overridden=frozenset({"gradient_accumulation_steps"}))
    with pytest.raises(ConfigError, match="global_batch_size=20 is not a multiple of batch_size=8"):
        TrainConfig(batch_size=8, global_batch_size=20).validate()


FAULTY = '''
import os, sys, time
sys.path.insert(0, {repo!r})
from gptkit import fast
import train
from gptkit.cli import run_cli
from gptkit.runtime import explain_lost_ranks

calls = 0
original = train.train_step
poison = False
gpt_forward = fast.FastGPT.forward  # the training forward on the CPU

def poisoned_forward(self, *args, **kwargs):
    out = gpt_forward(self, *args, **kwargs)
    return out * float("nan") if poison and self.training else out

fast.FastGPT.forward = poisoned_forward

def faulty_train_step(*args, **kwargs):
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == 5:
        if {mode!r} == "raise":
            raise RuntimeError("injected failure on rank 1 at step 5")
        if {mode!r} == "nan":  # a NaN loss on rank 1 only, at its 5th step (step index 4)
            global poison
            poison = True
            try:
                return original(*args, **kwargs)
            finally:
                poison = False
        time.sleep({hang_s})  # stops joining collectives for longer than --ddp_timeout_s, then carries on
    return original(*args, **kwargs)

train.train_step = faulty_train_step
run_cli(explain_lost_ranks(train.main))
'''


def launch_faulty(workdir: Path, mode: str, *args: str, hang_s: float = 0, cores: str = "") -> tuple:
    script = workdir / f"faulty_{mode}.py"
    script.write_text(FAULTY.format(repo=str(REPO), mode=mode, hang_s=hang_s))
    started = time.perf_counter()
    result = torchrun(workdir, script, *DDP_ARGS, "--dataset=corpus.txt", "--max_iters=6", *args, timeout=90,
                      cores=cores)
    return result, time.perf_counter() - started


def test_a_rank_that_raises_ends_the_run_quickly_and_a_relaunch_resumes_it(ddp_run):
    workdir, _ = ddp_run
    # pinned to one core: 2 processes on 1 core is allowed, with a warning
    result, seconds = launch_faulty(workdir, "raise", "--out_dir=raise", cores="0")
    print(f"a rank that raised at step 5: torchrun exited {result.returncode} after {seconds:.1f} s")
    assert result.returncode != 0 and seconds < 60
    assert "warning: 2 processes on 1 CPU cores" in result.stderr
    assert "RuntimeError: injected failure on rank 1 at step 5" in result.stderr
    assert "rank 0: lost contact with the other processes" in result.stderr  # one line, no gloo traceback
    assert checkpoint.load_checkpoint(workdir / "raise" / "last.pt")["state"]["step"] == 3
    relaunch = torchrun(workdir, REPO / "train.py", "--resume", "--out_dir=raise")
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert checkpoint.load_checkpoint(workdir / "raise" / "last.pt")["state"]["step"] == 6


def test_a_rank_that_stops_joining_collectives_times_out_and_both_exit(ddp_run):
    workdir, _ = ddp_run
    result, seconds = launch_faulty(workdir, "hang", "--out_dir=hang", "--ddp_timeout_s=8", hang_s=16)
    print(f"a rank that hung at step 5: torchrun exited {result.returncode} after {seconds:.1f} s")
    assert result.returncode != 0 and seconds < 60
    assert "rank 0: lost contact with the other processes" in result.stderr
    assert "Timed out waiting 8000ms" in result.stderr  # rank 0 gave up after --ddp_timeout_s
    assert "rank 1: lost contact with the other processes" in result.stderr  # and rank 1 did not hang on


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step_and_saves(ddp_run):
    workdir, _ = ddp_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "train.py"), *DDP_ARGS, "--dataset=corpus.txt", "--max_iters=100000",
                             "--eval_interval=100000", "--out_dir=sigterm"],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150  # generous: start-up of two ranks is slow when the machine is busy
    while not (workdir / "sigterm" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (workdir / "sigterm" / "metrics.jsonl").exists(), "the run logged no step in 150 s"
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert (workdir / "sigterm" / "last.pt").exists(), out[-2000:] + err[-3000:]
    saved = checkpoint.load_checkpoint(workdir / "sigterm" / "last.pt")["state"]["step"]
    assert saved >= 1 and f"saved sigterm/last.pt at step {saved}" in out, err[-3000:]
    assert metrics(workdir / "sigterm", "train")[-1]["step"] == saved  # rank 0 logged every step up to it
    assert "lost contact" not in err  # the ranks agreed on the step: no collective was left waiting


def test_a_signal_that_lands_after_the_stop_all_reduce_waits_for_the_next_step(monkeypatch):
    """The race CI once hit: rank 0's signal arrived between its all_reduce (which said nobody wants to stop) and the
    return. Stopping on its own flag, rank 0 entered save()'s all_gather while rank 1 entered the next step: a hang."""
    from gptkit import runtime as runtime_module
    stop = runtime_module.StopRequest()
    other_rank_wants_to_stop, signal_lands_now = False, True

    def all_reduce_then_the_signal(tensor, op):
        tensor.fill_(max(tensor.item(), float(other_rank_wants_to_stop)))
        if signal_lands_now:
            stop.requested = True  # this rank's handler runs just after the collective
    monkeypatch.setattr(runtime_module.dist, "all_reduce", all_reduce_then_the_signal)
    two_ranks = Runtime(device=torch.device("cpu"), dtype=torch.float32, reason="", rank=0, world_size=2)
    assert runtime_module.stop_agreed(stop, two_ranks) is False and not stop.agreed  # the other rank steps on too
    assert runtime_module.stop_agreed(stop, two_ranks) is True and stop.agreed  # both see it now

    stop = runtime_module.StopRequest()
    other_rank_wants_to_stop, signal_lands_now = True, False  # a signal to the other rank only
    assert runtime_module.stop_agreed(stop, two_ranks) is True
    assert stop.agreed and stop.requested and stop.signal_name == "a signal to another rank"


def test_a_nan_on_one_rank_makes_every_rank_skip_the_step_and_names_that_rank(ddp_run):
    workdir, _ = ddp_run
    result, _ = launch_faulty(workdir, "nan", "--out_dir=nan", "--log_interval=1")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert out.count("non-finite loss or gradient at step 4 (rank 1); step skipped on every rank") == 1
    steps = [json.loads(line)["step"] for line in (workdir / "nan" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # both ranks skipped together and the run finished its 6 steps


RESUME_WITH_MUTATION = '''
import sys
sys.path.insert(0, {repo!r})
from gptkit import checkpoint
import train
from gptkit.cli import run_cli
from gptkit.runtime import explain_lost_ranks
{mutation}
run_cli(explain_lost_ranks(train.main))
'''


def test_ddp_resume_is_bitwise_exact_and_the_check_has_teeth(ddp_run):
    """2 ranks, dropout on: stopped at step 6, resumed to 12 == 12 steps straight; without the RNG restore, not."""
    workdir, _ = ddp_run
    args = [*DDP_ARGS, "--dataset=corpus.txt", "--dropout=0.1"]
    straight = torchrun(workdir, REPO / "train.py", *args, "--max_iters=12", "--out_dir=straight_dropout")
    assert straight.returncode == 0, straight.stderr[-2000:]
    first_half = torchrun(workdir, REPO / "train.py", *args, "--max_iters=6", "--out_dir=split_dropout")
    assert first_half.returncode == 0, first_half.stderr[-2000:]
    weights = {}
    for name, mutation in (("exact", ""), ("no_rng", "checkpoint.set_rng_state = lambda state: None")):
        run_dir = workdir / f"split_{name}"

        shutil.copytree(workdir / "split_dropout", run_dir, symlinks=True)
        script = workdir / f"resume_{name}.py"
        script.write_text(RESUME_WITH_MUTATION.format(repo=str(REPO), mutation=mutation))
        resumed = torchrun(workdir, script, "--resume", f"--out_dir={run_dir.name}", "--max_iters=12")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        weights[name] = checkpoint.load_checkpoint(run_dir / "last.pt")["model"]
    reference = checkpoint.load_checkpoint(workdir / "straight_dropout" / "last.pt")["model"]
    assert all(torch.equal(reference[k], weights["exact"][k]) for k in reference)
    assert not all(torch.equal(reference[k], weights["no_rng"][k]) for k in reference)
