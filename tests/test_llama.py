"""The llama form (--arch=llama) through the machinery: training with the fast paths, exact resume, DDP, generate.py,
the export CLI, LoRA, classification and instruction fine-tuning; and its bad input, one line and exit code 2.
model.py's switches one by one are tests/test_model.py's; the export's logits and tokens are tests/test_hf.py's.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_llama.py     # about two minutes on 2 cores
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora
import tour
from config import Config, ModelConfig
from data import get_tokenizer
from generate import Sampling, generate
from gptkit import checkpoint, loading
from model import GPT
from tests.helpers import REPO, TINY_ARGS, WORDS, make_text, metrics, run_train
from tests.test_classify import run as run_classify
from tests.test_ddp import DDP_ARGS, torchrun
from tests.test_instruct import closed_port_url
from tests.test_instruct import run as run_instruct
from tools import export

# float32: the exact-resume and generate comparisons below are about the switches, not bf16 rounding
LLAMA_ARGS = [*TINY_ARGS, "--arch=llama", "--dtype=float32", "--lr_decay_iters=16", "--log_interval=4",
              "--eval_interval=8"]


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory) -> Path:
    """One llama-form run of 16 steps ("straight"), and one of 8 steps resumed to 16 ("resumed")."""
    workdir = tmp_path_factory.mktemp("llama")
    (workdir / "corpus.txt").write_text(make_text())
    straight = run_train(workdir, *LLAMA_ARGS, "--dataset=corpus.txt", "--max_iters=16", "--out_dir=straight")
    assert "fast kernels: on (fast.py" in straight.stdout
    run_train(workdir, *LLAMA_ARGS, "--dataset=corpus.txt", "--max_iters=8", "--out_dir=resumed")
    run_train(workdir, "--resume", "--out_dir=resumed", "--max_iters=16")
    return workdir


def test_llama_run_learns_records_its_switches_and_resumes_bitwise(llama_runs):
    train = metrics(llama_runs / "straight", "train")
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    payload = checkpoint.load_checkpoint(llama_runs / "straight" / "last.pt")
    model_config = payload["config"]["model"]
    assert {k: model_config[k] for k in ("arch", "position", "norm", "mlp", "n_kv_head", "bias")} == \
        dict(arch="llama", position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False)
    assert "transformer.wpe.weight" not in payload["model"]
    resumed = checkpoint.load_checkpoint(llama_runs / "resumed" / "last.pt")["model"]
    assert all(torch.equal(resumed[name], payload["model"][name]) for name in payload["model"])


def test_generate_cli_samples_the_llama_run_as_the_library_does_with_and_without_the_fast_layout(llama_runs):
    loaded = loading.load_model(ckpt=str(llama_runs / "straight" / "best.pt"))
    model, chars = loaded.model.eval(), get_tokenizer(loaded.tokenizer)
    prompt = torch.tensor([chars.encode("the king")])
    uncached = generate(model, prompt, 20, Sampling(temperature=0), use_cache=False).tokens  # the cache's reference
    expected = "the king" + chars.decode(uncached[0].tolist()) + "\n"
    for extra in ([], ["--fast_kernels=False"]):
        done = subprocess.run([sys.executable, str(REPO / "generate.py"), "--ckpt=straight/best.pt", "--device=cpu",
                               "--prompt=the king", "--max_new_tokens=20", "--temperature=0", "--stream=False",
                               *extra], cwd=llama_runs, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout == expected, extra


def test_export_cli_writes_the_llama_run_as_a_llama_folder(llama_runs, capsys):
    export.main(["--ckpt=" + str(llama_runs / "straight" / "best.pt"), "--out=" + str(llama_runs / "hf")])
    assert "LlamaForCausalLM.from_pretrained" in capsys.readouterr().out
    assert (llama_runs / "hf" / "model.safetensors").is_file()


def test_llama_form_under_ddp_logs_the_losses_of_one_process_with_the_global_batch(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_text())
    args = [*DDP_ARGS, "--arch=llama", "--dataset=corpus.txt", "--max_iters=3"]
    ddp = torchrun(tmp_path, REPO / "train.py", *args, "--out_dir=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_train(tmp_path, *args, "--out_dir=single")  # one process: batch 8 x 2 accumulation = DDP's 2 x 8
    losses = [[r["train_loss"] for r in metrics(tmp_path / name, "train")] for name in ("ddp", "single")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-4)  # as tests/test_ddp.py's
    a, b = (checkpoint.load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("ddp", "single"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_lora_adapts_the_fused_gqa_and_swiglu_matrices_and_merges_exactly():
    config = ModelConfig(vocab_size=100, n_layer=2, n_head=4, n_embd=32, block_size=16, arch="llama").apply_arch()
    torch.manual_seed(0)
    model = GPT(config).eval()
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        before = model(x)
        lora.add_lora(model, rank=2, alpha=4)
        assert torch.equal(model(x), before)  # B starts at zero: the adapted model is the base model
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.normal_()
        adapted = model(x)
        attention = model.transformer.h[0].attn.c_attn
        assert attention.lora_b.shape == (32 + 2 * 2 * 8, 2)  # q plus 2 key/value heads of 8
        assert model.transformer.h[0].mlp.c_fc.lora_b.shape[0] == 2 * 96  # the gate and the value
        merged = lora.merge_lora(model)
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)


def save_llama_base(folder: Path, vocab_size: int, chars: str | None = None) -> Path:
    """A 'pretrained' llama-form run of this repository: random weights, a char or the GPT-2 tokenizer."""
    torch.manual_seed(0)
    model_config = ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=64, arch="llama")
    config = Config(model=model_config.apply_arch())
    tokenizer = {"name": "char", "chars": chars} if chars else {"name": "gpt2"}
    payload = {"config": config.to_dict(), "model": GPT(config.model).state_dict(), "tokenizer": tokenizer,
               "state": {"step": 1}}
    return checkpoint.save_checkpoint(folder / "best.pt", payload)


def test_classify_fine_tunes_a_llama_base_with_lora(tmp_path):
    chars = "".join(sorted(set(" ".join(WORDS) + "\n")))
    base = save_llama_base(tmp_path / "base", len(chars), chars)
    calm, storm = "sea ships sings night".split(), "king knight sword castle".split()
    rows = [f"{' '.join(words[(i + j) % 4] for j in range(4))},{label}"
            for i in range(60) for words, label in ((calm, "calm"), (storm, "storm"))]
    (tmp_path / "texts.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    done = run_classify(f"--init_from={base}", "--dataset=texts.csv", "--lora_rank=2", "--max_iters=6",
                        "--merge", "--out_dir=classified", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = run_classify("--ckpt=classified/merged.pt", "--predict=the king", cwd=tmp_path)
    assert predicted.returncode == 0 and predicted.stdout.split("\t")[0] in ("calm", "storm"), predicted.stderr


def test_instruct_tunes_a_llama_base_with_lora_and_generate_answers(tmp_path):
    save_llama_base(tmp_path / "checkpoints" / "llama-base", 50257)
    done = run_instruct("--lora_rank=2", "--max_iters=2", "--eval_interval=100", "--max_new_tokens=2", "--batch_size=4",
                        f"--judge_url={closed_port_url()}", "--out_dir=tuned", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "llama-base" in done.stdout and "(LoRA rank 2" in done.stdout
    asked = run_instruct("--ckpt=tuned", "--instruction=hi", "--max_new_tokens=3", cwd=tmp_path, script="generate.py")
    assert asked.returncode == 0, asked.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--arch=foo"], "arch='foo' is not one of gpt2, llama"),
    (["--arch=llama", "--n_kv_head=3"], r"n_kv_head=3 does not divide n_head=2; pick n_kv_head from [1, 2]"),
    (["--arch=llama", "--n_embd=30"], "position=rope turns pairs of channels, but the head size n_embd/n_head = "
                                      "30/2 = 15 is odd"),
    (["--arch=llama", "--init_from=gpt2"], "--arch=llama contradicts the weights being loaded: GPT-2's weights are "
                                           "the GPT-2 form (position=learned"),
    (["--resume", "--out_dir=straight", "--arch=gpt2"], "--arch=gpt2 contradicts the run being resumed (arch=llama)"),
    (["--resume", "--out_dir=straight", "--norm=layernorm"], "--norm=layernorm contradicts the run being resumed "
                                                             "(norm=rmsnorm)"),
], ids=["arch-foo", "kv-heads", "odd-head-size", "llama-from-gpt2", "resume-arch", "resume-switch"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(llama_runs, args, message):
    before = sorted(p.name for p in llama_runs.iterdir())
    done = run_train(llama_runs, *TINY_ARGS, "--dataset=corpus.txt", "--out_dir=new", *args, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in llama_runs.iterdir()) == before


def test_tour_rope_shows_that_scores_depend_on_the_distance_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    png = tmp_path / "runs" / "tour" / "rope.png"
    tour.show_rope()
    out = capsys.readouterr().out
    scores = [line.rsplit("score ", 1)[1] for line in out.splitlines() if "(distance 3)" in line]
    assert len(scores) == 3 and len(set(scores)) == 1  # positions 3/0, 10/7 and 900/897: one score
    assert "a full turn every 6 positions" in out and png.stat().st_size > 10_000
