"""gpu_check.py on a machine without CUDA, and the CUDA decisions a CPU can check (torch.cuda stood in for where a GPU
would answer).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_gpu_check.py     # about 10 seconds
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptkit.checkpoint import rng_state, set_rng_state
from gptkit.fast import lm_head_cross_entropy
from gptkit.runtime import pick_dtype
from tools.bench import datasheet_bf16_peak
from train import restore_scaler

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without CUDA; with a GPU, run make gpu-check")
def test_gpu_check_without_cuda_says_what_it_skipped_writes_its_results_and_exits_zero(tmp_path):
    out = tmp_path / "results" / "gpu_check.json"
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check", f"--out={out}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    skipped_lines = [line for line in done.stdout.splitlines() if line.startswith("skipped:")]
    assert len(skipped_lines) == 1
    assert "GPU training benchmark" in skipped_lines[0] and "decode speed" in skipped_lines[0]
    assert "CPU-only build" in skipped_lines[0] or "sees no CUDA GPU" in skipped_lines[0]
    report = json.loads(out.read_text())
    tests = report["cuda_tests"]
    assert tests["exit_code"] == 0 and tests["counts"]["skipped"] >= 10 and "passed" not in tests["counts"]
    assert report["cuda_available"] is False and report["passed"] is True
    assert "gpu_training" not in report and report["skipped"]["reason"] in skipped_lines[0]
    assert out.with_suffix(".txt").read_text().splitlines()[-1] == skipped_lines[0]


def test_datasheet_peak_tells_the_h100_sxm_from_its_slower_pcie_part():
    assert datasheet_bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12  # the SXM part's name
    assert datasheet_bf16_peak("NVIDIA H200") == 989.4e12
    assert datasheet_bf16_peak("NVIDIA A100-SXM4-80GB") == datasheet_bf16_peak("NVIDIA A100-PCIE-40GB") == 312e12
    assert datasheet_bf16_peak("NVIDIA H100 PCIe") is None and datasheet_bf16_peak("Tesla T4") is None


# --- CUDA decisions, with torch.cuda answering as a GPU would -------------------------------------------------------


def test_auto_dtype_on_a_gpu_whose_bf16_is_only_emulated_is_fp16_with_a_grad_scaler(monkeypatch):
    # torch.cuda.is_bf16_supported() says yes on a V100 or T4 (bf16 emulated, slow) unless emulation is excluded
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    dtype, reason = pick_dtype("auto", torch.device("cuda"))
    assert dtype == torch.float16 and "GradScaler" in reason
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert pick_dtype("auto", torch.device("cuda"))[0] == torch.bfloat16


def test_fp16_lm_head_gradient_stays_finite_at_the_grad_scalers_first_scale():
    """Without a tied partner the LM-head loss hands back the weight's gradient itself; in fp16 its
    scaling by 2**16, one past float16's largest value, overflowed and lost the first step of every fp16 run."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, dtype=torch.float16, requires_grad=True)
    weight = (torch.randn(100, 32) * 0.02).half().requires_grad_()
    targets = torch.randint(0, 100, (64,))
    (lm_head_cross_entropy(x, weight, targets) * 2.0**16).backward()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(x.grad).all()
    weight_float = weight.detach().float().requires_grad_()  # the same loss in float32, unscaled
    torch.nn.functional.cross_entropy(x.detach().float() @ weight_float.t(), targets).backward()
    error = (weight.grad.float() / 2.0**16 - weight_float.grad).norm() / weight_float.grad.norm()
    assert error < 1e-2


def test_an_fp16_resume_of_a_run_saved_without_loss_scaling_starts_from_a_fresh_scale():
    unscaled = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # {}: a bf16 or float32 run's
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    restore_scaler(scaler, unscaled)  # torch's load_state_dict raises here
    assert scaler.get_scale() == 2.0**16
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0).state_dict()
    restore_scaler(scaler, saved)
    assert scaler.get_scale() == 1024.0
    restore_scaler(torch.amp.GradScaler("cpu", enabled=False), saved)  # an fp16 run resumed in bf16: ignored


def test_a_checkpoints_cuda_rng_restores_only_the_gpus_this_machine_has(monkeypatch):
    state = rng_state()
    one, two = torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)
    state["cuda"] = [one, two]  # saved on a machine with two GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    set_rng_state(state)
    assert len(restored) == 1 and restored[0] is one
