"""Fault injection: kills during a save, a full disk, corrupt and malicious files, resume with teeth, a soak run."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import UserError
from gptkit import checkpoint
from tests.helpers import REPO, TINY_ARGS, metrics, run_train


def small_payload(step: int) -> dict:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "state": {"step": step}}


def make_run(run_dir: Path, keep_last: int = 2) -> None:
    checkpoint.save_run_checkpoint(run_dir, small_payload(1), step=1, val_loss=2.0, is_best=True, keep_last=keep_last)


# Every call that can be interrupted during a save; the child kills itself with SIGKILL at call number N.
KILL_POINTS = [("gptkit.checkpoint", "_HashingWriter", "write"), ("os", "", "fsync"), ("os", "", "replace"),
               ("os", "", "symlink"), ("pathlib", "Path", "unlink")]


def save_with_kill_at(run_dir: Path, kill_at: int) -> bool:
    """Fork; the child saves step 2 and SIGKILLs itself at the kill_at-th interruptible call. True if it was killed."""
    pid = os.fork()
    if pid == 0:  # child
        calls = [0]
        import importlib
        for owner_name, cls, attr in KILL_POINTS:
            owner = importlib.import_module(owner_name)
            target = getattr(owner, cls) if cls else owner
            original = getattr(target, attr)

            def wrapped(*args, _original=original, **kwargs):
                calls[0] += 1
                if calls[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return _original(*args, **kwargs)

            setattr(target, attr, wrapped)
        try:
            checkpoint.save_run_checkpoint(run_dir, small_payload(2), step=2, val_loss=1.0, is_best=True, keep_last=1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_kill_at_any_point_of_a_save_leaves_a_checkpoint_that_verifies(tmp_path):
    kill_points = 0
    for kill_at in range(1, 200):
        run_dir = tmp_path / f"run{kill_at}"
        make_run(run_dir)
        killed = save_with_kill_at(run_dir, kill_at)
        newest = checkpoint.newest_valid_checkpoint(run_dir, say=lambda m: None)
        payload = checkpoint.load_checkpoint(newest)
        assert payload["state"]["step"] in (1, 2)
        # last.pt and best.pt always point at a complete checkpoint
        for link in ("last.pt", "best.pt"):
            assert checkpoint.load_checkpoint(run_dir / link)["state"]["step"] in (1, 2)
        # nothing under a final name is half written: a ckpt file either verifies or has no manifest yet
        for path in checkpoint.step_checkpoints(run_dir):
            if checkpoint.manifest_path(path).exists():
                checkpoint.verify_checkpoint(path)
        if not killed:
            assert payload["state"]["step"] == 2  # the save ran to the end
            break
        kill_points += 1
    assert kill_points >= 20, f"only {kill_points} kill points exercised"
    print(f"{kill_points} kill points survived")


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    make_run(run_dir)

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint._HashingWriter, "write", disk_full)
    with pytest.raises(UserError, match=r"could not save .*ckpt-0000002.pt: No space left on device; the previous "
                                         r"checkpoint is untouched"):
        checkpoint.save_run_checkpoint(run_dir, small_payload(2), step=2, val_loss=1.0, is_best=True, keep_last=2)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(run_dir / "last.pt")["state"]["step"] == 1
    assert not list(run_dir.glob(".*.tmp"))


def test_truncation_and_a_flipped_bit_are_reported_as_corrupt_naming_the_file(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "a.pt", small_payload(1))
    data = bytearray(path.read_bytes())
    # torch.load alone would accept this flipped bit in the middle of a weight tensor without complaint
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["format"] == checkpoint.FORMAT
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"a.pt is corrupt: .* its manifest says"):
        checkpoint.load_checkpoint(path)
    path2 = checkpoint.save_checkpoint(tmp_path / "b.pt", small_payload(1))
    path2.write_bytes(path2.read_bytes()[:500])
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"b.pt is corrupt: 500 bytes"):
        checkpoint.load_checkpoint(path2)


def test_a_file_without_manifest_is_not_trusted(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"other.pt has no manifest other.json"):
        checkpoint.load_checkpoint(tmp_path / "other.pt")


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    run_dir = tmp_path / "run"
    for step in (1, 2, 3):
        checkpoint.save_run_checkpoint(run_dir, small_payload(step), step=step, val_loss=1.0, is_best=False,
                                       keep_last=5)
    (run_dir / "ckpt-0000003.pt").write_bytes(b"garbage")
    skipped = []
    newest = checkpoint.newest_valid_checkpoint(run_dir, say=skipped.append)
    assert newest.name == "ckpt-0000002.pt"
    assert len(skipped) == 1 and "skipping ckpt-0000003.pt" in skipped[0] and "corrupt" in skipped[0]


def test_keep_last_keeps_the_newest_and_the_best_and_cleans_stale_temp_files(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / ".ckpt-0000009.pt.tmp").write_bytes(b"left by a killed save")
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.2}
    best = float("inf")
    for step, loss in losses.items():
        checkpoint.save_run_checkpoint(run_dir, small_payload(step), step=step, val_loss=loss, is_best=loss < best,
                                       keep_last=2)
        best = min(best, loss)
    assert sorted(p.name for p in checkpoint.step_checkpoints(run_dir)) == \
        ["ckpt-0000002.pt", "ckpt-0000004.pt", "ckpt-0000005.pt"]
    assert os.readlink(run_dir / "best.pt") == "ckpt-0000002.pt"
    assert os.readlink(run_dir / "last.pt") == "ckpt-0000005.pt"
    assert not list(run_dir.glob(".*.tmp"))
    assert not (run_dir / "ckpt-0000001.json").exists()


MARKER_PAYLOAD = """
import os, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"format": "gpt-checkpoint-1", "model": Evil()}}, "{path}")
"""


def test_a_malicious_pickle_never_runs_even_with_a_matching_manifest(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    subprocess.run([sys.executable, "-c", MARKER_PAYLOAD.format(marker=marker, path=path)], check=True)
    import hashlib
    data = path.read_bytes()  # a manifest that vouches for the file: only the safe loader stands in the way
    checkpoint.manifest_path(path).write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                                                          "bytes": len(data)}))
    with pytest.raises(UserError, match="evil.pt is not a readable checkpoint"):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()
    result = subprocess.run([sys.executable, str(REPO / "generate.py"), f"--ckpt={path}", "--prompt=a"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not marker.exists()


def test_no_unsafe_deserialisation_anywhere_in_the_code():
    offenders = []
    for path in [*REPO.glob("*.py"), *REPO.glob("gptkit/*.py"), *REPO.glob("tools/*.py")]:
        text = path.read_text()
        if re.search(r"pickle\.loads?\(|weights_only\s*=\s*False|torch\.load\((?![^)]*weights_only=True)", text):
            offenders.append(path.name)
    assert offenders == []


# The mutations that must break an exact resume, per optimizer: the RNG, and the optimizer's own state (AdamW's
# moments; for Muon its momentum buffers, AdamW's moments for the rest and the warmed-up momentum).
RESUME_MUTATIONS = {
    "adamw": {"no_rng": "checkpoint.set_rng_state = lambda state: None",
              "no_optimizer": "torch.optim.AdamW.load_state_dict = lambda self, s: None"},
    "muon": {"no_muon_state": "torch.optim.Muon.load_state_dict = lambda self, s: None"},
}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bitwise_exact_and_the_check_has_teeth(tmp_path, optimizer):
    """The exact-resume comparison must fail when resume skips the RNG or the optimizer state (mutation check)."""
    corpus = tmp_path / "corpus.txt"
    from tests.helpers import make_text
    corpus.write_text(make_text(4000))
    common = [*TINY_ARGS, f"--dataset={corpus}", "--dtype=float32", "--dropout=0.1", "--gradient_accumulation_steps=2",
              "--lr_decay_iters=16", "--log_interval=4", "--eval_interval=8", f"--optimizer={optimizer}"]
    if optimizer == "muon":
        common += ["--muon_momentum_warmup=12", "--lr_schedule=wsd", "--cooldown_frac=0.5"]
    run_train(tmp_path, *common, "--max_iters=16", "--out_dir=straight")
    straight = checkpoint.load_checkpoint(tmp_path / "straight" / "last.pt")["model"]

    def resumed_weights(name: str, mutation: str) -> dict:
        run_train(tmp_path, *common, "--max_iters=8", f"--out_dir={name}")
        code = (f"import sys, torch, train; from gptkit import checkpoint; from gptkit.cli import run_cli; {mutation}; "
                f"sys.argv = ['train.py', '--resume', '--out_dir={name}', '--max_iters=16']; run_cli(train.main)")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        return checkpoint.load_checkpoint(tmp_path / name / "last.pt")["model"]

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(resumed_weights("exact", "pass"), straight)
    # and the losses logged after the resume are those of the run that never stopped
    losses = {name: {r["step"]: r["train_loss"] for r in metrics(tmp_path / name, "train")} for name in ("straight",
                                                                                                      "exact")}
    assert sorted(losses["exact"]) == [4, 8, 12, 16] and losses["exact"] == losses["straight"]
    for name, mutation in RESUME_MUTATIONS[optimizer].items():
        assert not same(resumed_weights(name, mutation), straight), name


def test_soak_400_steps_learns_without_leaking_and_keeps_keep_last_checkpoints(tmp_path):
    corpus = tmp_path / "corpus.txt"
    from tests.helpers import make_text
    corpus.write_text(make_text(20000))
    run_train(tmp_path, *TINY_ARGS, f"--dataset={corpus}", "--max_iters=400", "--eval_interval=40",
              "--log_interval=20", "--keep_last=3", "--out_dir=soak", timeout=600)
    run_dir = tmp_path / "soak"
    evals = metrics(run_dir, "eval")
    train = metrics(run_dir, "train")
    assert len(evals) == 10  # 10 save cycles
    assert all(r["val_loss"] == r["val_loss"] for r in evals)  # no NaN
    assert all(r["train_loss"] == r["train_loss"] for r in train)
    first = run_train(tmp_path, *TINY_ARGS, f"--dataset={corpus}", "--max_iters=1", "--eval_iters=4",
                      "--out_dir=start").stdout
    start_loss = float(re.search(r"eval step 1: val loss ([\d.]+)", first).group(1))
    assert evals[-1]["val_loss"] < 0.8 * start_loss
    rss = [r["rss_mb"] for r in train]
    warm = rss[len(rss) // 4]  # after warm-up: allocator pools and caches are full
    assert max(rss[len(rss) // 4:]) < 1.10 * warm, rss
    steps = sorted(p.name for p in checkpoint.step_checkpoints(run_dir))
    best = os.readlink(run_dir / "best.pt")
    assert len([s for s in steps if s != best]) in (2, 3) and len(steps) <= 4
    assert steps[-3:] == ["ckpt-0000320.pt", "ckpt-0000360.pt", "ckpt-0000400.pt"]
    for path in checkpoint.step_checkpoints(run_dir):
        checkpoint.verify_checkpoint(path)


NAN_AT_STEP = """
import sys, torch, train
from gptkit import fast
from gptkit.cli import run_cli
calls = [0]
original = fast.FastGPT.forward  # the training forward on the CPU (fast.py's; the plain GPT's with fast kernels off)
def forward(self, idx, targets=None, **kwargs):
    out = original(self, idx, targets, **kwargs)
    if targets is not None and self.training:
        calls[0] += 1
        if calls[0] == {k}:  # the k-th training forward: step {k} - 1 with no accumulation
            return out * float("nan")
    return out
fast.FastGPT.forward = forward
sys.argv = ["train.py"] + sys.argv[1:]
run_cli(train.main)
"""


def test_a_nan_loss_at_step_k_is_skipped_with_a_message_and_the_run_finishes(tmp_path):
    corpus = tmp_path / "corpus.txt"
    from tests.helpers import make_text
    corpus.write_text(make_text(4000))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", NAN_AT_STEP.format(k=6), *TINY_ARGS, f"--dataset={corpus}",
                             "--max_iters=10", "--eval_interval=5", "--log_interval=1", "--out_dir=run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    message = "non-finite loss or gradient at step 5 (rank 0); step skipped on every rank, weights unchanged"
    assert message in result.stderr
    train = metrics(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, 11))  # the skipped step was retried, 10 steps done
    assert all(r["train_loss"] == r["train_loss"] for r in train)


@pytest.mark.parametrize("temperature, top_k, top_p, repetition_penalty", [
    (0.0, None, 1.0, 1.0), (0.8, 200, 1.0, 1.0), (1.0, None, 0.9, 1.0), (1.2, 10, 0.95, 1.3)])
def test_generation_soak_is_deterministic_per_seed(temperature, top_k, top_p, repetition_penalty):
    from config import ModelConfig
    from generate import Sampling, generate
    from model import GPT
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty).validate()
    prompt = torch.randint(0, 64, (2, 5))

    def sample(seed: int) -> torch.Tensor:
        out = generate(model, prompt, 300, sampling, torch.Generator().manual_seed(seed))  # slides ~18 times
        assert out.tokens.shape == (2, 300) and int(out.tokens.max()) < 64 and int(out.tokens.min()) >= 0
        return out.tokens

    first = sample(1)
    assert torch.equal(first, sample(1))
    if temperature > 0:
        assert not torch.equal(first, sample(2))
