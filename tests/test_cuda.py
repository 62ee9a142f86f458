"""The CUDA paths against their references: bf16 autocast against float32 on the CPU, fp16 with a GradScaler,
torch.compile against eager, checkpoints that move between the GPU and the CPU, the KV cache, torchrun, export,
evaluation and pinned-memory batches. Every test is skipped where no CUDA GPU is visible.

    python -m pytest -q -m cuda tests/test_cuda.py     # about 3 minutes on one H100; `make gpu-check` runs it first
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from config import ModelConfig, TrainConfig
from data import Batches
from generate import Sampling, generate
from gptkit import checkpoint, hf, loading
from gptkit.checkpoint import rng_state, set_rng_state
from gptkit.runtime import pick_dtype, setup_runtime
from model import GPT
from tests.helpers import make_text
from train import train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")
MODEL = ModelConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=32, block_size=16)
# The CLI runs: the tiny model of tests/test_train.py on a character corpus; log every step to compare losses.
TINY_ARGS = ["--preset=tiny", "--tokenizer=char", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
             "--batch_size=8", "--eval_iters=4", "--warmup_iters=5", "--learning_rate=3e-3", "--log_interval=1",
             "--dataset=corpus.txt"]
# Measured on the CPU in float32 with these arguments: the train loss falls from 3.16 at step 1 to 2.45 at step 30.
FIRST_STEPS = 30


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """setup_runtime turns on TF32 matmuls for the whole process; the float32 references here need them off."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def random_tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, MODEL.vocab_size, 5000).astype(np.uint16)


def fused_adamw(model: GPT, lr: float = 1e-3) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)  # as train.make_optimizer makes it on CUDA


def parameters(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()}


def run(script: str, *args: str, cwd: Path, cpu_only: bool = False, torchrun: int = 0,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """One of the entry points in a child process; cpu_only hides the GPU, as on a machine without one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    tool = script.startswith("tools/")
    target = ["-m", script.removesuffix(".py").replace("/", ".")] if tool else [str(REPO / script)]
    result = subprocess.run([*launcher, *target, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{script} {' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def train_losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train_loss"] for r in records if r["kind"] == "train"}


def corpus_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(make_text())
    return folder


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory) -> Path:
    """A folder holding a run of FIRST_STEPS steps trained on the GPU (run/), its corpus and token files."""
    workdir = corpus_folder(tmp_path_factory.mktemp("cuda-run"))
    result = run("train.py", *TINY_ARGS, "--device=cuda", "--compile=False", f"--max_iters={FIRST_STEPS}",
                 f"--eval_interval={FIRST_STEPS}", "--out_dir=run", cwd=workdir)
    assert "device cuda" in result.stdout
    return workdir


# --- one training step ----------------------------------------------------------------------------------------------


def one_step(device: str, dtype: str) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of one train_step from seed-0 weights on seed-0 batches, and the gradients AdamW was handed."""
    runtime = setup_runtime(device, dtype)
    torch.manual_seed(0)
    model = GPT(MODEL).to(runtime.device)  # initialised on the CPU either way: the same weights
    train = TrainConfig(batch_size=8, grad_clip=0.0)  # no clipping: the raw gradients reach the optimizer
    optimizer = fused_adamw(model)
    grads = {}
    optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.float().cpu() for n, p in model.named_parameters()}))
    batches = Batches(random_tokens(), train, MODEL.block_size, seed=0)
    loss = train_step(model, optimizer, runtime.grad_scaler(), batches, runtime, train, lr=1e-3)
    assert loss is not None
    return loss.item(), grads


def test_a_bf16_step_on_cuda_equals_the_float32_step_on_the_cpu_within_bf16_rounding():
    """CPU bf16 against CPU float32 here: 0.7% at worst per parameter over 3 seeds, so 3% leaves room for another
    kernel's rounding; dropping either half of the tied weight's gradient (the head's or the embedding's) is 58%."""
    cpu_loss, cpu_grads = one_step("cpu", "float32")
    cuda_loss, cuda_grads = one_step("cuda", "bfloat16")
    assert abs(cuda_loss - cpu_loss) < 5e-3, (cuda_loss, cpu_loss)
    assert cuda_grads.keys() == cpu_grads.keys()
    for name, expected in cpu_grads.items():
        error = ((cuda_grads[name] - expected).norm() / expected.norm()).item()
        assert error < 0.03, f"{name}: the bf16 CUDA gradient is {error:.1%} off the float32 CPU one"


def test_fp16_with_a_grad_scaler_steps_and_skips_a_step_whose_gradient_overflows():
    runtime = setup_runtime("cuda", "float16")
    scaler = runtime.grad_scaler()
    assert scaler.is_enabled()
    torch.manual_seed(0)
    model = GPT(MODEL).to(CUDA)
    train = TrainConfig(batch_size=8, grad_clip=1.0)
    optimizer = fused_adamw(model)
    batches = Batches(random_tokens(), train, MODEL.block_size, seed=0)

    before = parameters(model)
    loss = train_step(model, optimizer, scaler, batches, runtime, train, lr=1e-3)
    assert loss is not None and torch.isfinite(loss)
    after = parameters(model)
    assert all(not torch.equal(before[n], after[n]) for n in before), "the first fp16 step left weights unchanged"
    # GradScaler starts at 2**16; a loss or gradient that overflows float16 at that scale loses the first step
    assert scaler.get_scale() == 2.0**16

    hook = model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    loss = train_step(model, optimizer, scaler, batches, runtime, train, lr=1e-3)
    hook.remove()
    assert loss is not None  # a finite loss with an overflowing gradient: the scaler's business, not a failed step
    skipped = parameters(model)
    assert all(torch.equal(after[n], skipped[n]) for n in after), "a step with an inf gradient changed the weights"
    assert scaler.get_scale() == 2.0**15


def test_torch_compile_on_cuda_trains_and_its_losses_match_eager():
    runtime = setup_runtime("cuda", "bfloat16")  # the CUDA default: bf16 autocast and torch.compile
    tokens = np.array([(i * 7) % MODEL.vocab_size for i in range(5000)], dtype=np.uint16)  # learnable: +7 each
    train = TrainConfig(batch_size=8, grad_clip=1.0)
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(MODEL).to(CUDA)
        optimizer = fused_adamw(model, lr=1e-2)
        batches = Batches(tokens, train, MODEL.block_size, seed=0)
        stepped = torch.compile(model) if compiled else model
        losses[compiled] = [train_step(stepped, optimizer, runtime.grad_scaler(), batches, runtime, train,
                                       lr=1e-2).item() for _ in range(10)]
    # On the CPU in bf16 these 10 steps take the loss from 4.60 to 3.22
    assert losses[True][-1] < losses[True][0] - 0.8, losses[True]
    assert max(abs(a - b) for a, b in zip(losses[True], losses[False])) < 0.05, losses


def test_auto_dtype_is_bf16_on_a_gpu_with_bf16_tensor_cores_and_fp16_with_a_scaler_before_them():
    dtype, reason = pick_dtype("auto", CUDA)
    major, _ = torch.cuda.get_device_capability()
    assert dtype == (torch.bfloat16 if major >= 8 else torch.float16), reason  # Ampere (8.0) brought bf16


# --- checkpoints between devices ------------------------------------------------------------------------------------


def test_a_checkpoint_written_on_cuda_resumes_on_a_machine_without_a_gpu(cuda_run, tmp_path):
    shutil.copytree(cuda_run / "run", cuda_run / "on-cpu", symlinks=True)
    result = run("train.py", "--resume", "--out_dir=on-cpu", "--device=cpu", f"--max_iters={FIRST_STEPS + 10}",
                 cwd=cuda_run, cpu_only=True)
    assert f"resuming on-cpu at step {FIRST_STEPS}" in result.stdout and "device cpu" in result.stdout
    assert_resumed_where_it_stopped(cuda_run / "on-cpu")


def test_a_checkpoint_written_on_the_cpu_resumes_on_cuda(tmp_path):
    workdir = corpus_folder(tmp_path)
    run("train.py", *TINY_ARGS, "--device=cpu", f"--max_iters={FIRST_STEPS}", f"--eval_interval={FIRST_STEPS}",
        "--out_dir=run", cwd=workdir, cpu_only=True)
    result = run("train.py", "--resume", "--out_dir=run", "--device=cuda", "--compile=False",
                 f"--max_iters={FIRST_STEPS + 10}", cwd=workdir)
    assert f"resuming run at step {FIRST_STEPS}" in result.stdout and "device cuda" in result.stdout
    assert_resumed_where_it_stopped(workdir / "run")


def assert_resumed_where_it_stopped(run_dir: Path) -> None:
    """The second session starts from the trained weights (a fresh model would be back at the first loss), and its
    checkpoint counts every step and token of both."""
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, FIRST_STEPS + 11))
    resumed = losses[FIRST_STEPS + 1]
    assert resumed < losses[1] - 0.4, f"step {FIRST_STEPS + 1} loss {resumed:.3f}: back near the start {losses[1]:.3f}"
    assert abs(resumed - losses[FIRST_STEPS]) < 0.25, (resumed, losses[FIRST_STEPS])
    payload = checkpoint.load_checkpoint(run_dir / "last.pt")
    assert payload["state"]["step"] == FIRST_STEPS + 10
    assert payload["state"]["tokens_seen"] == (FIRST_STEPS + 10) * 8 * 32


def test_cuda_rng_saved_on_a_machine_with_more_gpus_restores_the_gpus_of_this_one():
    state = rng_state()
    expected = torch.rand(4, device=CUDA)
    state["cuda"] = [*state["cuda"], state["cuda"][0].clone()]  # one GPU more than this machine has
    set_rng_state(state)  # torch alone would fail on the missing device's index
    assert torch.equal(torch.rand(4, device=CUDA), expected)


# --- generation, torchrun, export and evaluation --------------------------------------------------------------------


def test_kv_cached_generation_on_cuda_equals_the_uncached_model_and_the_cpu_greedy():
    torch.manual_seed(0)
    model = GPT(MODEL).eval()
    with torch.no_grad():  # sharper logits than GPT-2's 0.02 init: greedy choices 5e-4 or more apart on the CPU,
        for param in model.parameters():  # against float32 differences between kernels of about 1e-6
            param.normal_(0.0, 0.2)
    prompt = torch.randint(MODEL.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    greedy = Sampling(temperature=0.0)
    new_tokens = 40  # past block_size (16): the window slides and the cache is rebuilt on CUDA too
    on_cpu = generate(model, prompt, new_tokens, greedy, use_cache=False).tokens
    model.to(CUDA)
    cached = generate(model, prompt.to(CUDA), new_tokens, greedy, use_cache=True).tokens
    uncached = generate(model, prompt.to(CUDA), new_tokens, greedy, use_cache=False).tokens
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, on_cpu)
    assert len(set(cached.flatten().tolist())) >= 6  # 8 on the CPU; one token repeated would hide a broken cache


def test_torchrun_on_one_gpu_trains_and_generate_samples_from_its_checkpoint(tmp_path):
    workdir = corpus_folder(tmp_path)
    # compile left at its CUDA default (on): the path `make train-ddp` takes on a GPU, evaluation included
    result = run("train.py", *TINY_ARGS, "--max_iters=40", "--eval_interval=20", "--out_dir=run", cwd=workdir,
                 torchrun=1, timeout=400)
    assert "device cuda" in result.stdout and "compile: True" in result.stdout
    manifest = json.loads((workdir / "run" / "manifest.json").read_text())
    payload = checkpoint.load_checkpoint(workdir / "run" / "last.pt")
    assert payload["state"]["step"] == 40 and not [k for k in payload["model"] if k.startswith("_orig_mod.")]
    assert payload["state"]["best_val_loss"] < manifest["unigram_val_loss"]  # it learned on the GPU

    sample = run("generate.py", f"--ckpt={workdir / 'run' / 'last.pt'}", "--prompt=the king", "--temperature=0",
                 "--max_new_tokens=40", cwd=workdir)
    assert "device cuda" in sample.stderr and "decode: 40 tokens" in sample.stderr
    assert sample.stdout.startswith("the king") and len(sample.stdout.strip()) >= len("the king") + 30


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_torchrun_on_two_gpus_trains_with_nccl_and_saves_one_checkpoint(tmp_path):
    workdir = corpus_folder(tmp_path)
    result = run("train.py", *TINY_ARGS, "--compile=False", "--max_iters=10", "--eval_interval=10", "--out_dir=run",
                 cwd=workdir, torchrun=2)
    assert "rank 0 of 2" in result.stdout
    payload = checkpoint.load_checkpoint(workdir / "run" / "last.pt")
    assert payload["world_size"] == 2 and payload["state"]["step"] == 10 and len(payload["rng_per_rank"]) == 2


def evaluated_loss(result: subprocess.CompletedProcess) -> float:
    return float(re.search(r"^loss ([\d.]+) \|", result.stdout, re.M).group(1))


def test_a_cuda_trained_checkpoint_exports_and_evaluates_on_cuda_as_on_the_cpu(cuda_run, tmp_path):
    ckpt = cuda_run / "run" / "last.pt"
    run("tools/export.py", f"--ckpt={ckpt}", f"--out={tmp_path / 'hf'}", cwd=cuda_run)
    exported, _ = hf.load_pretrained(str(tmp_path / "hf"))
    trained, _ = loading.model_from_checkpoint(checkpoint.load_checkpoint(ckpt))
    assert all(torch.equal(p, exported.state_dict()[n]) for n, p in trained.state_dict().items())

    on_gpu = evaluated_loss(run("tools/evaluate.py", f"--ckpt={ckpt}", "--device=cuda", cwd=cuda_run))
    from_export = evaluated_loss(run("tools/evaluate.py", f"--init_from={tmp_path / 'hf'}", "--dataset=corpus.txt",
                                     "--tokenizer=char", "--device=cuda", cwd=cuda_run))
    on_cpu = evaluated_loss(run("tools/evaluate.py", f"--ckpt={ckpt}", "--device=cpu", cwd=cuda_run, cpu_only=True))
    manifest = json.loads((cuda_run / "run" / "manifest.json").read_text())
    assert on_gpu < manifest["unigram_val_loss"]
    assert from_export == pytest.approx(on_gpu, abs=2e-4)
    # evaluate.py scores in float32, but setup_runtime allows TF32 matmuls on CUDA: a few 1e-4 here
    assert on_gpu == pytest.approx(on_cpu, abs=5e-3)


# --- batches --------------------------------------------------------------------------------------------------------


def test_pinned_non_blocking_batches_equal_a_plain_copy():
    runtime = setup_runtime("cuda", "float32")
    train = TrainConfig(batch_size=32)
    batches = Batches(random_tokens(), train, 256, seed=0)
    host = [batches.next() for _ in range(40)]
    moved = [(runtime.to_device(x), runtime.to_device(y)) for x, y in host]  # queued back to back, no waiting
    torch.cuda.synchronize()
    for (x, y), (device_x, device_y) in zip(host, moved):
        assert device_x.device.type == "cuda" and device_x.dtype == torch.long
        assert torch.equal(device_x, x.to(runtime.device)) and torch.equal(device_y, y.to(runtime.device))
