"""Sliding-window perplexity: every token scored once, with the context the window allows, and the reported figures.

    python -m pytest -q tests/test_evaluate.py   # tiny random models, no network
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from config import Config, ConfigError, DataConfig, ModelConfig, UserError
from gptkit import perplexity
from gptkit.checkpoint import save_checkpoint
from model import GPT
from tools import evaluate, export

TINY = ModelConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(TINY).eval()


def text(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def nll_of_last(model, context: torch.Tensor, target: int) -> float:
    """-log p(target | context), from a forward pass over exactly `context`."""
    with torch.no_grad():
        logits = model(context[None])[0, -1]
    return -F.log_softmax(logits, dim=-1)[target].item()


def test_one_window_over_the_whole_text_equals_the_plain_mean_loss(model):
    tokens = text(17)  # 16 inputs predicting 16 targets: exactly one block
    total, scored = perplexity.sliding_window_loss(model, tokens, window=16, stride=8, device="cpu")
    with torch.no_grad():
        mean_loss = model(tokens[None, :-1], tokens[None, 1:]).item()
    assert scored == 16
    assert total / scored == pytest.approx(mean_loss, rel=1e-5)


def test_stride_below_window_matches_a_direct_per_token_computation(model):
    # 12 tokens, window 6, stride 3: windows end after inputs 6, 9 and 11. Targets 1-6 see everything before them;
    # targets 7-9 come from the window starting at token 3, targets 10-11 from the window starting at token 5.
    tokens = text(12)
    context_start = {t: 0 for t in range(1, 7)} | {t: 3 for t in range(7, 10)} | {10: 5, 11: 5}
    expected = sum(nll_of_last(model, tokens[context_start[t]:t], tokens[t].item()) for t in range(1, 12))
    assert perplexity.window_spans(12, 6, 3) == [(0, 6, 0), (3, 9, 6), (5, 11, 9)]
    total, scored = perplexity.sliding_window_loss(model, tokens, window=6, stride=3, device="cpu")
    assert scored == 11
    assert total == pytest.approx(expected, rel=1e-5)


def test_stride_one_gives_every_token_a_full_window_of_context(model):
    tokens = text(30, seed=2)
    window = 8
    expected = sum(nll_of_last(model, tokens[max(0, t - window):t], tokens[t].item()) for t in range(1, 30))
    total, scored = perplexity.sliding_window_loss(model, tokens, window=window, stride=1, device="cpu")
    assert scored == 29
    assert total == pytest.approx(expected, rel=1e-5)


def test_batching_windows_does_not_change_the_loss(model):
    tokens = text(200, seed=3)
    one, _ = perplexity.sliding_window_loss(model, tokens, window=16, stride=5, device="cpu", batch_size=1)
    seen = []
    many, scored = perplexity.sliding_window_loss(model, tokens, window=16, stride=5, device="cpu", batch_size=7,
                                                progress=seen.append)
    assert many == pytest.approx(one, rel=1e-5)
    assert sum(seen) == scored == 199 and len(seen) < 10  # progress reported per batch, not per window


@pytest.mark.parametrize("n_tokens", [2, 5, 16, 17, 40, 101])
@pytest.mark.parametrize("window, stride", [(16, 16), (16, 8), (16, 5), (7, 1), (1, 1)])
def test_windows_score_each_token_exactly_once_with_at_least_window_minus_stride_context(n_tokens, window, stride):
    spans = perplexity.window_spans(n_tokens, window, stride)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(n_tokens - 1))
    for begin, end, first in spans:
        assert end - begin <= window
        if first > 0:  # after the first window each scored position sees at least window - stride earlier inputs
            assert first - begin >= min(window - stride, first)


def test_bad_stride_and_oversized_window_are_refused(model):
    with pytest.raises(ConfigError, match="stride=0"):
        perplexity.window_spans(100, 16, 0)
    with pytest.raises(ConfigError, match="stride=17"):
        perplexity.window_spans(100, 16, 17)
    with pytest.raises(ConfigError, match="exceeds the model's block_size=16"):
        perplexity.sliding_window_loss(model, text(40), window=32, stride=16, device="cpu")


def test_documents_are_split_at_the_separator_token_which_is_not_counted():
    eot = 99
    ids = np.array([eot, 1, 2, eot, eot, 3, eot, 4, 5, 6])
    pieces = perplexity.split_documents(ids, eot)
    assert [p.tolist() for p in pieces] == [[1, 2], [3], [4, 5, 6]]
    assert [p.tolist() for p in perplexity.split_documents(ids, None)] == [ids.tolist()]


def test_words_and_bytes_count_each_document_on_its_own():
    # "end" and "Next" are two words although nothing but the separator stood between them; é is two UTF-8 bytes
    words, n_bytes = perplexity.text_statistics(["Le café est ici. The end", "Next doc"])
    assert words == 8
    assert n_bytes == len("Le café est ici. The end") + 1 + len("Next doc")


def test_reported_figures_derive_from_the_total_loss():
    result = perplexity.Perplexity(total_nll=1000.0, tokens_scored=500, words=250, bytes=2000, seconds=2.0)
    assert result.loss == 2.0
    assert result.token_perplexity == pytest.approx(math.exp(2.0))
    assert result.word_perplexity == pytest.approx(math.exp(4.0))  # same loss over half as many units
    assert result.bits_per_byte == pytest.approx(1000.0 / math.log(2) / 2000)
    assert "250 tokens/s" in result.report()


def test_cli_evaluates_a_checkpoint_on_its_own_validation_split(tmp_path, capsys):
    corpus = tmp_path / "story.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60)))
    data_config = DataConfig(dataset=str(corpus), tokenizer="char", data_dir=str(tmp_path / "data"))
    data_dir = data.prepare(data_config, block_size=16)
    meta = data.read_meta(data_dir)
    config = Config(model=ModelConfig(vocab_size=meta["vocab_size"], n_layer=2, n_head=2, n_embd=32, block_size=16),
                    data=data_config)
    torch.manual_seed(0)
    model = GPT(config.model).eval()
    ckpt = tmp_path / "run" / "best.pt"
    save_checkpoint(ckpt, {"config": config.to_dict(), "model": model.state_dict(), "tokenizer": meta["tokenizer"],
                           "dataset": {"name": meta["dataset"]}})

    result = evaluate.main([f"--ckpt={ckpt}", "--split=val", "--stride=4", "--device=cpu"])

    val = torch.from_numpy(np.asarray(data.open_split(data_dir, "val"), dtype=np.int64))
    total, scored = perplexity.sliding_window_loss(model, val, window=16, stride=4, device="cpu")
    val_text = data.get_tokenizer(meta["tokenizer"]).decode(val.tolist())
    assert result.tokens_scored == scored == len(val) - 1
    assert result.total_nll == pytest.approx(total, rel=1e-5)
    assert (result.words, result.bytes) == (len(val_text.split()), len(val_text.encode()))
    out = capsys.readouterr().out
    assert "window 16, stride 4" in out and f"{scored:,} tokens scored" in out and "note:" not in out

    # The same model exported to transformers' layout and evaluated through --init_from scores the same
    exported = export.export_checkpoint(ckpt, tmp_path / "export")
    pretrained = evaluate.main([f"--init_from={exported}", f"--dataset={corpus}", "--tokenizer=char",
                                f"--data_dir={data_dir}", "--split=val", "--stride=4", "--device=cpu"])
    assert pretrained.total_nll == pytest.approx(total, rel=1e-5)
    with pytest.raises(UserError, match="--n_layer=3 contradicts the loaded model's n_layer=2"):
        evaluate.main([f"--ckpt={ckpt}", "--n_layer=3"])
