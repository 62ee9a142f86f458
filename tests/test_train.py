"""The training loop: end to end through the CLI, the schedule, accumulation, exact resume, signals, NaN, dtypes."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from config import Config, ModelConfig, TrainConfig, UserError
from data import Batches
from gptkit import checkpoint, loading
from gptkit.runtime import Runtime
from model import GPT
from tests.helpers import REPO, TINY_ARGS, make_text, metrics, run_train
from tools import export
from train import learning_rate_at, make_optimizer, train_step, unigram_loss


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


def test_cli_trains_end_to_end_and_loss_falls(tmp_path, corpus):
    result = run_train(tmp_path, *TINY_ARGS, f"--dataset={corpus}", "--max_iters=60", "--eval_interval=20",
                       "--log_interval=10", "--out_dir=run")
    run_dir = tmp_path / "run"
    out = result.stdout
    assert "iter 10: loss" in out and "ms" in out  # plain lines when stdout is not a terminal
    assert "baseline: predicting the unigram distribution" in out
    assert "steps =" in out and "epochs" in out
    assert "fast kernels: on (fast.py" in out  # the CPU fast paths, said in one start-up line
    evals = metrics(run_dir, "eval")
    train = metrics(run_dir, "train")
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert train[-1]["train_loss"] < train[0]["train_loss"] - 0.5
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert evals[-1]["val_loss"] < manifest["unigram_val_loss"]
    assert manifest["config"]["model"]["n_layer"] == 2 and manifest["matmul_peak_flops"] > 0
    assert (run_dir / "loss.png").stat().st_size > 1000
    payload = checkpoint.load_checkpoint(run_dir / "last.pt")
    assert payload["state"]["step"] == 60
    assert payload["tokenizer"]["name"] == "char"
    assert payload["config"]["model"]["vocab_size"] == len(payload["tokenizer"]["chars"])
    model, config = loading.model_from_checkpoint(payload)
    assert config.model.n_embd == 32


def test_fast_kernels_false_trains_on_the_plain_model_to_the_same_losses(tmp_path, corpus):
    args = [*TINY_ARGS, f"--dataset={corpus}", "--max_iters=12", "--eval_interval=12", "--log_interval=4",
            "--dtype=float32"]
    fast_run = run_train(tmp_path, *args, "--out_dir=fast")
    plain_run = run_train(tmp_path, *args, "--out_dir=plain", "--fast_kernels=False")
    assert "fast kernels: on" in fast_run.stdout
    assert "fast kernels: off (--fast_kernels=False): model.py's plain path" in plain_run.stdout
    fast_losses = [r["train_loss"] for r in metrics(tmp_path / "fast", "train")]
    plain_losses = [r["train_loss"] for r in metrics(tmp_path / "plain", "train")]
    assert len(fast_losses) == 3 and fast_losses == pytest.approx(plain_losses, abs=1e-4)


def test_learning_rate_schedule_warms_up_then_decays_to_min_lr():
    lr = lambda step: learning_rate_at(step, base_lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway through the cosine
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


def cpu_runtime(dtype=torch.float32) -> Runtime:
    return Runtime(device=torch.device("cpu"), dtype=dtype, reason="test")


def test_gradient_accumulation_equals_one_larger_batch():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16)
    model = GPT(config)
    tokens = np.random.default_rng(0).integers(0, 50, 5000).astype(np.uint16)
    grads = []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        clone = GPT(config)
        clone.load_state_dict(model.state_dict())
        # the same 8 windows either way: draw the starts once, then feed them in micro-batches
        starts = torch.randint(0, len(tokens) - 17, (8,), generator=torch.Generator().manual_seed(1))
        x = torch.stack([torch.from_numpy(tokens[s:s + 16].astype(np.int64)) for s in starts])
        y = torch.stack([torch.from_numpy(tokens[s + 1:s + 17].astype(np.int64)) for s in starts])
        batches = iter(zip(x.split(batch_size), y.split(batch_size)))
        clone.zero_grad()
        for _ in range(accumulation):
            bx, by = next(batches)
            (clone(bx, by) / accumulation).backward()
        grads.append(torch.cat([p.grad.flatten() for p in clone.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_train_step_with_accumulation_matches_a_single_big_batch_update():
    """train_step itself (not just autograd) accumulates: k micro-batches of b == one batch of k*b after a step."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)
    base = GPT(config)
    tokens = np.random.default_rng(0).integers(0, 50, 4000).astype(np.uint16)
    weights = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = GPT(config)
        model.load_state_dict(base.state_dict())
        train = TrainConfig(batch_size=batch_size, gradient_accumulation_steps=accumulation, grad_clip=1.0)
        optimizer = make_optimizer(model, train, "cpu")
        batches = Batches(tokens, train, config.block_size, seed=3)
        scaler = cpu_runtime().grad_scaler()
        assert train_step(model, optimizer, scaler, batches, cpu_runtime(), train, lr=1e-2) is not None
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # random_batch draws the same 8 starts whether asked for 8 at once or 4 twice from one generator
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_non_finite_loss_skips_the_step_and_leaves_weights_unchanged():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias[0] = float("nan")  # poisons every forward pass
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = TrainConfig(batch_size=2)
    optimizer = make_optimizer(model, train, "cpu")
    batches = Batches(np.arange(1000, dtype=np.uint16) % 50, train, 8, seed=0)
    assert train_step(model, optimizer, cpu_runtime().grad_scaler(), batches, cpu_runtime(), train, lr=1e-2) is None
    after = model.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)
    assert not optimizer.state  # AdamW never stepped: no moments were created
    assert all(p.grad is None for p in model.parameters())


def test_unigram_baseline_is_the_cross_entropy_of_train_frequencies():
    train = np.array([0, 0, 0, 1], dtype=np.uint16)
    val = np.array([0, 1], dtype=np.uint16)
    # add-one smoothing over a vocabulary of 3: p(0) = 4/7, p(1) = 2/7
    expected = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert unigram_loss(train, val, 3) == pytest.approx(expected)


def test_unigram_baseline_reads_a_memmap_with_an_offset_the_same_as_an_array(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50, 10_000).astype(np.uint16)
    (tmp_path / "t.bin").write_bytes(b"\0\0" + tokens.tobytes())
    mapped = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r", offset=2)
    assert unigram_loss(mapped, mapped[:500], 50) == pytest.approx(unigram_loss(tokens, tokens[:500], 50))


def test_resume_refuses_a_model_override_that_contradicts_the_run(tmp_path, corpus):
    run_train(tmp_path, *TINY_ARGS, f"--dataset={corpus}", "--max_iters=4", "--eval_interval=4", "--out_dir=run")
    result = run_train(tmp_path, "--resume", "--out_dir=run", "--n_layer=3", check=False)
    assert result.returncode == 2
    assert "--n_layer=3 contradicts the run being resumed (n_layer=2)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_new_run_never_overwrites_an_existing_one(tmp_path, corpus):
    run_train(tmp_path, *TINY_ARGS, f"--dataset={corpus}", "--max_iters=4", "--eval_interval=4", "--out_dir=run")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    result = run_train(tmp_path, *TINY_ARGS, f"--dataset={corpus}", "--max_iters=4", "--out_dir=run", check=False)
    assert result.returncode == 2 and "already holds a run; continue it with --resume" in result.stderr
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, corpus):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY_ARGS, f"--dataset={corpus}",
                             "--max_iters=100000", "--log_interval=1", "--eval_interval=100000", "--out_dir=run"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("iter 5:") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "--resume" in out
    payload = checkpoint.load_checkpoint(tmp_path / "run" / "last.pt")  # verifies its sha256 too
    stopped_at = payload["state"]["step"]
    assert stopped_at >= 5
    run_train(tmp_path, "--resume", "--out_dir=run", f"--max_iters={stopped_at + 3}", "--log_interval=1")
    steps = [r["step"] for r in metrics(tmp_path / "run", "train")]
    assert steps[-3:] == [stopped_at + 1, stopped_at + 2, stopped_at + 3]


def test_atomic_save_survives_a_kill_between_write_and_rename(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"state": {"step": 1}})

    def killed(*args):
        raise KeyboardInterrupt  # the process dies right after writing the temp file, before the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"state": {"step": 2}})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["state"]["step"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the half-written save is left aside


def test_checkpoint_whose_weights_do_not_match_its_config_is_refused():
    config = ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)
    from config import Config
    payload = {"config": Config(model=config).to_dict(), "model": GPT(config).state_dict()}
    payload["config"]["model"]["n_embd"] = 32
    with pytest.raises(UserError, match="checkpoint weights do not match its config"):
        loading.model_from_checkpoint(payload)


def test_bf16_autocast_learns_the_same_as_float32_within_tolerance():
    """Measured here over 3 seeds: after 40 steps the losses (~1.3 from ln 50 = 3.9) differ by at most 0.002 nats."""
    config = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16)
    tokens = np.array([(i * 7) % 50 for i in range(5000)], dtype=np.uint16)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = GPT(config)
        train = TrainConfig(batch_size=8)
        optimizer = make_optimizer(model, train, "cpu")
        batches = Batches(tokens, train, config.block_size, seed=0)
        runtime = cpu_runtime(dtype)
        for _ in range(40):
            loss = train_step(model, optimizer, runtime.grad_scaler(), batches, runtime, train, lr=3e-3)
        losses[dtype] = loss.item()
    assert losses[torch.float32] < 2.0  # it learned something
    assert abs(losses[torch.float32] - losses[torch.bfloat16]) < 0.02


def test_fine_tuning_starts_from_the_pretrained_weights(tmp_path, corpus):
    # --arch=gpt2: --init_from reads GPT-2's form (tiny's RoPE exports as GPT-NeoX, which it does not import)
    run_train(tmp_path, *TINY_ARGS, "--arch=gpt2", f"--dataset={corpus}", "--max_iters=4", "--eval_interval=4",
              "--out_dir=base")
    export.export_checkpoint(tmp_path / "base" / "last.pt", tmp_path / "exported")
    # one step at a negligible learning rate: the fine-tuned weights must still be the exported ones
    run_train(tmp_path, "--preset=tiny", f"--init_from={tmp_path / 'exported'}", f"--dataset={corpus}",
              "--tokenizer=char", "--device=cpu", "--max_iters=1", "--learning_rate=1e-12", "--warmup_iters=0",
              "--eval_iters=2", "--out_dir=tuned")
    base = checkpoint.load_checkpoint(tmp_path / "base" / "last.pt")
    tuned = checkpoint.load_checkpoint(tmp_path / "tuned" / "last.pt")
    assert tuned["config"]["model"]["n_embd"] == 32 and tuned["config"]["train"]["init_from"].endswith("exported")
    for key, value in base["model"].items():
        assert torch.allclose(value, tuned["model"][key], atol=1e-6), key
    # generate.py samples the same text from the exported folder as from the checkpoint it came from
    texts = []
    for source in (f"--init_from={tmp_path / 'exported'}", f"--ckpt={tmp_path / 'base' / 'last.pt'}"):
        out = subprocess.run([sys.executable, str(REPO / "generate.py"), source, "--prompt=the king", "--temperature=0",
                              "--max_new_tokens=20", "--device=cpu"], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
        assert out.returncode == 0, out.stderr
        texts.append(out.stdout)
    assert texts[0] == texts[1] and texts[0].startswith("the king") and len(texts[0]) > len("the king") + 10
    result = run_train(tmp_path, "--preset=tiny", f"--init_from={tmp_path / 'exported'}", f"--dataset={corpus}",
                       "--tokenizer=char", "--n_layer=5", "--out_dir=bad", check=False)
    assert result.returncode == 2 and "--n_layer=5 contradicts the loaded model's n_layer=2" in result.stderr


MALLINFO_PROBE = """
import ctypes, sys, torch
from gptkit import runtime
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "setup":
    runtime.setup_runtime("cpu", "float32")
heap_before = libc.mallinfo2().arena
block = torch.ones(24 << 20, dtype=torch.uint8)  # 24 MB, the size of a big activation or logits chunk
mapped_while_alive = libc.mallinfo2().hblkhd
del block
print(mapped_while_alive, libc.mallinfo2().arena - heap_before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"),
                    reason="glibc's allocator only")
def test_the_runtime_keeps_freed_memory_for_the_next_step_instead_of_returning_it_to_the_os():
    def probe(mode: str) -> tuple[int, int]:
        result = subprocess.run([sys.executable, "-c", MALLINFO_PROBE, mode], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent, check=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        mapped, heap_growth = map(int, result.stdout.split())
        return mapped, heap_growth
    mb = 1 << 20
    default_mapped, _ = probe("default")
    assert default_mapped >= 24 * mb  # glibc's default: a block this big gets pages of its own, returned on free
    mapped, heap_growth = probe("setup")
    assert mapped < 24 * mb  # after setup_runtime: from the heap...
    assert heap_growth >= 20 * mb  # ...which keeps it after the free, for the next step to reuse without page faults


class _StopBeforeTheData(Exception):
    pass


@pytest.mark.parametrize("args, says_default", [([], True), (["--preset=small"], False)])
def test_the_start_line_calls_the_preset_the_default_only_when_none_was_chosen(monkeypatch, capsys, args,
                                                                             says_default):
    import train

    def stop(*args, **kwargs):
        raise _StopBeforeTheData

    monkeypatch.setattr(train, "prepare_data", stop)  # everything up to the start-up line, no data, no training
    with pytest.raises(_StopBeforeTheData):
        train.main([*args, "--device=cpu"])
    assert ("the default on this" in capsys.readouterr().out) == says_default


def save_run_folder(run_dir: Path, kind: str | None, mtime: float) -> None:
    """A run folder holding one small checkpoint, its manifest.json naming `kind` (no manifest when None)."""
    config = Config(model=ModelConfig(vocab_size=100, n_layer=1, n_head=1, n_embd=8, block_size=8))
    payload = {"config": config.to_dict(), "model": GPT(config.model).state_dict(), "state": {"step": 1},
               "tokenizer": {"name": "gpt2"}}
    if kind == "classifier":
        payload["classifier"] = {"label_names": ["a", "b"], "lora_rank": 0}
    path = checkpoint.save_checkpoint(run_dir / "best.pt", payload)
    if kind is not None:
        (run_dir / "manifest.json").write_text(json.dumps({"kind": kind}))
    os.utime(path, (mtime, mtime))


def test_resume_without_a_folder_continues_the_latest_pretraining_run_not_a_newer_fine_tuned_one(tmp_path,
                                                                                                monkeypatch):
    import train
    now = time.time()
    save_run_folder(tmp_path / "checkpoints" / "older-pretraining", "pretrain", now - 300)
    save_run_folder(tmp_path / "checkpoints" / "tiny-pretrained", None, now - 200)  # written before runs had a kind
    save_run_folder(tmp_path / "checkpoints" / "classify-run", "classifier", now - 100)
    save_run_folder(tmp_path / "checkpoints" / "instruct-run", "instruct", now)
    monkeypatch.chdir(tmp_path)
    assert train.resolve_run(["--resume"]).run_dir.name == "tiny-pretrained"


def test_sampling_without_a_checkpoint_takes_the_latest_language_model_not_a_newer_classifier(tmp_path, monkeypatch,
                                                                                           capsys):
    now = time.time()
    save_run_folder(tmp_path / "checkpoints" / "tiny-pretrained", None, now - 200)
    save_run_folder(tmp_path / "checkpoints" / "classify-run", "classifier", now - 100)
    monkeypatch.chdir(tmp_path)
    loaded = loading.load_model()  # what make generate and make eval do without CKPT= or RUN=
    assert Path(loaded.source).parent.name == "tiny-pretrained"
    assert "tiny-pretrained" in capsys.readouterr().err  # and it says which run it took
