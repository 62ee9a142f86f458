"""Data: text to token files, and token files to batches. The text itself comes from sources.py.

    python data.py --dataset=shakespeare --tokenizer=char   (also --dataset=path/to/text.txt or hf:owner/name:config)
    python data.py --dataset=shakespeare --tokenizer=bpe:4096   # learn a 4,096-token BPE first (make tokenizer)

Read in order: the tokenizers (text <-> ids), byte-pair encoding from scratch, one batch and its x/y shift, the
batches a run draws, the token files that training memory-maps, and tokenisation on all cores.
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import abc
import hashlib
import json
import math
import mmap
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import regex  # re with Unicode classes (\p{L}: any letter), for GPT-2's pre-tokenization pattern
import torch
from tqdm import tqdm

from config import DataConfig, TrainConfig, UserError, bpe_size
from gptkit import atomic, bpe, sources
from gptkit.cli import parse_args, run_cli
from gptkit.perplexity import split_documents
from gptkit.sources import Source, SourceUnavailable

FORMAT = 1  # bump when the layout of the token files changes, so old folders are rebuilt
TOKENIZER_FILE = "tokenizer.json"  # a bpe:N folder's BPE, as HF `tokenizers` writes it: Tokenizer.from_file reads it
SPLITS = ("train", "val", "test")
CHUNK_CHARS = 1 << 19  # ~0.5 MB pieces: enough to keep every core busy, small enough for a smooth progress bar

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
        self.encoding = sources.load_r50k()
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


class BPETokenizer(Tokenizer):
    """A byte-level BPE learned from a data set's train split (--tokenizer=bpe:N), GPT-2's algorithm with a vocabulary
    fitted to the data. Its spec carries the tokenizer.json that HF `tokenizers` wrote and the sha256 of it, so a
    checkpoint holds its tokenizer whole; ids come from tiktoken, which encodes the same ones faster (gptkit/bpe.py)."""

    def __init__(self, spec: dict):
        tokenizer_json = bpe.checked_json(spec)
        self.spec, self.name = dict(spec), spec["name"]
        ranks, specials, _ = bpe.vocabulary(tokenizer_json)
        self.vocab_size, self.eot_token = len(ranks) + len(specials), specials.get(bpe.EOT)
        self.encoding = bpe.tiktoken_encoding(tokenizer_json, self.name)
        self.library = None if self.encoding else bpe.library_tokenizer(tokenizer_json)
        self.token_bytes = {i: token for token, i in ranks.items()}

    def encode_array(self, text: str) -> np.ndarray:
        if self.encoding is not None:
            return np.array(self.encoding.encode_ordinary(text), dtype=np.uint32)
        return np.array(self.library.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids: list[int]) -> str:
        if self.encoding is not None:
            return self.encoding.decode(list(ids))
        return self.library.decode(list(ids), skip_special_tokens=False)

    def to_dict(self) -> dict:
        return dict(self.spec)


def get_tokenizer(spec: dict) -> Tokenizer:
    """Build the tokenizer a meta.json or checkpoint describes: {"name": "gpt2"}, {"name": "char", "chars": ...} or
    {"name": "bpe:N", "json": <tokenizer.json>, "sha256": ...}."""
    name = spec.get("name")
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if "chars" not in spec:
            raise UserError("char tokenizer without its vocabulary ('chars'); rebuild with python data.py "
                            "--tokenizer=char")
        return CharTokenizer(spec["chars"])
    if isinstance(name, str) and name.startswith("bpe:"):
        return BPETokenizer(spec)
    raise UserError(f"tokenizer {name!r} is not known; use gpt2, char or bpe:N")


# ----------------------------------------------------------------------------------------------------------------
# Byte-pair encoding, from scratch: what --tokenizer=bpe:N does (there with HF `tokenizers`), written to be read.
# `python tour.py bpe` runs it on a paragraph and prints the merges.


def learn_bpe(text: str, vocab_size: int) -> dict[tuple[int, int], int]:
    """Learn up to vocab_size - 256 merges from `text`: {(left id, right id): new id}, in the order learned.

    Start from the text's UTF-8 bytes, ids 0-255, so any text at all can be written with them. Then, again and again,
    find the most frequent pair of neighbouring ids and give it a new id. Pairs are counted only inside words, the
    pieces GPT-2's pattern cuts the text into, so a token never spans two words; and each distinct word is handled
    once, weighted by how often it occurs.
    """
    words = Counter(tuple(word.encode("utf-8")) for word in regex.findall(bpe.GPT2_SPLIT_PATTERN, text))
    merges: dict[tuple[int, int], int] = {}
    for new_id in range(256, vocab_size):
        pair_counts: Counter[tuple[int, int]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break  # every word is a single token: nothing is left to merge
        best = max(pair_counts, key=pair_counts.get)  # on a tie, the pair seen first
        merges[best] = new_id
        words = Counter({merge_pair(word, best, new_id): count for word, count in words.items()})
    return merges


def merge_pair(ids: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """`ids` with each occurrence of `pair`, left to right, replaced by new_id."""
    merged, i = [], 0
    while i < len(ids):
        if ids[i:i + 2] == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return tuple(merged)


def bpe_encode(text: str, merges: dict[tuple[int, int], int]) -> list[int]:
    """Cut the text into words as learning did; in each, apply the earliest-learned merge that fits, until none does.
    Merges are replayed in the order they were learned, so a word is cut as training would have cut it."""
    ids: list[int] = []
    for word in regex.findall(bpe.GPT2_SPLIT_PATTERN, text):
        tokens = tuple(word.encode("utf-8"))
        while len(tokens) > 1:
            pair = min(zip(tokens, tokens[1:]), key=lambda p: merges.get(p, math.inf))
            if pair not in merges:
                break
            tokens = merge_pair(tokens, pair, merges[pair])
        ids.extend(tokens)
    return ids


def bpe_vocabulary(merges: dict[tuple[int, int], int]) -> dict[int, bytes]:
    """Every id's bytes: the 256 single bytes, then each merge's two parts joined (known by then: learned earlier)."""
    vocab = {i: bytes([i]) for i in range(256)}
    for (left, right), new_id in merges.items():
        vocab[new_id] = vocab[left] + vocab[right]
    return vocab


def bpe_decode(ids: list[int], vocab: dict[int, bytes]) -> str:
    """Join the ids' bytes and read them as UTF-8 (a character cut in two, in a sample, shows as U+FFFD)."""
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------------
# Batches: windows of the token file, and their targets


def read_tokens(tokens: np.ndarray, start: int, count: int) -> np.ndarray:
    """tokens[start:start + count]; from a token file opened by open_split, with a plain file read.

    Every page a memory map touches stays in this process's resident memory, and the kernel maps the pages around
    each one with it, so resident memory would grow with the data set (docs/performance.md has the figures).
    Read this way, memory stays flat whatever the size of the data set.
    """
    if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap):  # the whole file, not a view of it
        return np.fromfile(tokens.filename, dtype=tokens.dtype, count=min(count, len(tokens) - start),
                           offset=tokens.offset + start * tokens.dtype.itemsize)
    return np.asarray(tokens[start:start + count])


def batch_from_starts(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of block_size + 1 tokens at `starts`: x is each window but its last token, y the window shifted by one.

    That shift is the whole of language modelling's supervision: at every position t of x the target is the token
    that comes next in the text, y[t] = x[t + 1], so one window teaches block_size predictions at once, each from
    the tokens up to it (the causal mask in model.py keeps the model from seeing the answer).
    """
    windows = np.stack([read_tokens(tokens, int(s), block_size + 1).astype(np.int64) for s in np.asarray(starts)])
    windows = torch.from_numpy(windows)  # (B, T + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T), (B, T)


def check_enough_tokens(n_tokens: int, block_size: int) -> None:
    """One window needs block_size + 1 tokens (the inputs and, shifted by one, the targets)."""
    if n_tokens < block_size + 1:
        raise UserError(f"{n_tokens} tokens are fewer than block_size+1={block_size + 1}; lower --block_size")


def random_starts(n_tokens: int, block_size: int, count: int, generator: torch.Generator) -> np.ndarray:
    """`count` window starts drawn uniformly from `generator`, so a saved generator state resumes exactly."""
    check_enough_tokens(n_tokens, block_size)
    return torch.randint(n_tokens - block_size, (count,), generator=generator).numpy()


def random_batch(tokens: np.ndarray, batch_size: int, block_size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of windows at uniformly random offsets."""
    return batch_from_starts(tokens, random_starts(len(tokens), block_size, batch_size, generator), block_size)


class Batches:
    """Training batches from the token file: random windows, or each window once per epoch (--sampling=epoch).

    Under DDP every rank draws the same batch_size x world_size window starts from one shared stream and keeps its
    own slice: ranks never see the same window, an epoch still covers each window once, a 2-process run with batch
    b takes exactly the samples of a 1-process run with batch 2b, and the sampler state is identical on every rank,
    so a checkpoint holds one and resumes on any number of processes.
    """

    def __init__(self, tokens: np.ndarray, train: TrainConfig, block_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        check_enough_tokens(len(tokens), block_size)
        self.tokens, self.batch_size, self.block_size = tokens, train.batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epochs = EpochSampler(len(tokens), block_size, seed) if train.sampling == "epoch" else None
        self.tokens_served = 0  # by this process, since it started: the loop's tokens_seen adds up the difference

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        global_batch = self.batch_size * self.world_size
        if self.epochs is None:  # the same draw as random_batch, so one process behaves as it does
            starts = random_starts(len(self.tokens), self.block_size, global_batch, self.generator)
        else:
            starts = self.epochs.next_starts(global_batch)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.tokens_served += len(mine) * self.block_size
        return batch_from_starts(self.tokens, mine, self.block_size)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epochs": self.epochs.state_dict() if self.epochs else None}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.epochs is not None and state.get("epochs"):
            self.epochs.load_state_dict(state["epochs"])


class EpochSampler:
    """--sampling=epoch: every window (starts 0, T, 2T, ...) exactly once per epoch, in a fresh order each epoch.
    The order is a pure function of (seed, epoch), so the state is three ints."""

    def __init__(self, num_tokens: int, block_size: int, seed: int):
        self.num_tokens, self.block_size, self.seed = num_tokens, block_size, seed
        check_enough_tokens(num_tokens, block_size)
        self.windows_per_epoch = (num_tokens - 1) // block_size
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
# Token files


def prepare(data: DataConfig, block_size: int, explicit_dataset: bool = True, tokenizer: dict | None = None) -> Path:
    """Make sure the token files for `data` exist and are current; return their folder. See the module docstring.

    A bpe:N data set gets its own folder, data/<name>-bpe<N>, and its BPE is learned there once. `tokenizer`, a BPE
    spec (a checkpoint's), encodes the text with that very BPE instead: resuming, evaluating or fine-tuning a model
    feeds it the ids it learned, in that folder when its BPE is the same, else in data/<name>-bpe<N>-<sha256[:8]>.
    """
    if data.data_dir and _is_nanogpt_layout(Path(data.data_dir)):
        folder = Path(data.data_dir)
        _check_block_size(folder, read_meta(folder), block_size)
        print(f"data: using {folder} as is (nanoGPT layout: uint16 ids, no meta.json)")
        return folder
    source = sources.resolve_source(data)
    given = tokenizer if bpe_size(data.tokenizer) and tokenizer and tokenizer.get("name") == data.tokenizer else None
    folder = Path(data.data_dir) if data.data_dir else sources.DATA_ROOT / _folder_name(source.name, data.tokenizer)
    if given and not data.data_dir and not _is_current(folder, source, data.tokenizer, given):
        folder = folder.with_name(f"{folder.name}-{given['sha256'][:8]}")
    elif tokenizer is not None and data.data_dir and (folder / "meta.json").exists() and \
            not _is_current(folder, source, data.tokenizer, given):
        # A folder the user named, holding tokens of another tokenizer (or another BPE): a checkpoint's tokenizer
        # never overwrites it; its tokens go beside it, as the default folder's do.
        suffix = given["sha256"][:8] if given else data.tokenizer.replace(":", "")
        print(f"data: {folder} holds other tokens than {data.tokenizer} of this model; leaving it as it is and "
              f"using {folder.name}-{suffix}")
        folder = folder.with_name(f"{folder.name}-{suffix}")
    if _is_current(folder, source, data.tokenizer, given):
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
        return prepare(fallback, block_size, explicit_dataset=True, tokenizer=tokenizer)
    return _build(folder, source, documents, data.tokenizer, block_size, given)


def _folder_name(dataset: str, tokenizer_name: str) -> str:
    """data/<dataset>/ for gpt2 and char (switching between them rebuilds it); data/<dataset>-bpe<N>/ for each N."""
    size = bpe_size(tokenizer_name)
    return f"{dataset}-bpe{size}" if size else dataset


def _build(folder: Path, source: Source, documents: dict[str, list[str]], tokenizer_name: str,
           block_size: int, given: dict | None = None) -> Path:
    started = time.perf_counter()
    learned_s = None
    if tokenizer_name == "char":
        # All splits' characters, so that validation text never hits an unknown character.
        tokenizer: Tokenizer = CharTokenizer("".join(sorted(set("\n".join(d for ds in documents.values() for d in ds))
                                                           | {"\n"})))
    elif bpe_size(tokenizer_name) and given is None:
        # The train split only: a vocabulary fitted to the validation text would flatter its loss and bits per byte.
        tokenizer = BPETokenizer(bpe.make_spec(tokenizer_name, bpe.train_bpe(
            documents["train"], bpe_size(tokenizer_name), f"the train split of {source.description}")))
        learned_s = time.perf_counter() - started
    else:
        tokenizer = get_tokenizer(given or {"name": tokenizer_name})
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
        splits[split] = {"tokens": int(len(ids)), "documents": len(documents[split]),
                         "bytes": sum(len(d.encode("utf-8", "surrogatepass")) for d in documents[split])}
    # Only now, with everything checked, touch the folder: meta.json goes first and comes back last, so a killed
    # run leaves a folder that the next run rebuilds rather than trusts.
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    for split in SPLITS:
        if split in tokens:
            _write_atomic(folder / f"{split}.bin", tokens[split].tobytes())
        else:
            (folder / f"{split}.bin").unlink(missing_ok=True)
    spec = tokenizer.to_dict()
    if isinstance(tokenizer, BPETokenizer):  # meta.json names the file; read_meta puts its text back in the spec
        _write_atomic(folder / TOKENIZER_FILE, spec["json"].encode())
        spec = {"name": spec["name"], "file": TOKENIZER_FILE, "sha256": spec["sha256"]}
    else:
        (folder / TOKENIZER_FILE).unlink(missing_ok=True)
    meta = {"format": FORMAT, "dataset": source.name, "tokenizer": spec,
            "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "splits": splits,
            "source": source.description, "source_fingerprint": source.fingerprint, "options": source.options,
            "text_sha256": text_hash.hexdigest(), "tokenizer_learned_s": learned_s}
    _write_atomic(folder / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    counts = ", ".join(f"{s} {v['tokens']:,}" for s, v in splits.items())
    print(f"data: wrote {folder} ({tokenizer.name}, vocab {tokenizer.vocab_size:,}, tokens: {counts}) "
          f"in {time.perf_counter() - started:.1f} s")
    return folder


def _write_atomic(path: Path, payload: bytes) -> None:
    """atomic.write_bytes, with a full disk or a permission problem said as one line naming the file."""
    try:
        atomic.write_bytes(path, payload)
    except OSError as err:
        raise UserError(f"could not write {path}: {err.strerror or err}; free some disk space or fix permissions") \
            from None


def _is_current(folder: Path, source: Source, tokenizer_name: str, given: dict | None = None) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        current = (meta["format"] == FORMAT and meta["source"] == source.description
                   and meta["source_fingerprint"] == source.fingerprint and meta["options"] == source.options
                   and meta["tokenizer"]["name"] == tokenizer_name)
        if current and "file" in meta["tokenizer"]:  # a BPE: its tokenizer.json must be there and unaltered
            spec = read_meta(folder)["tokenizer"]
            bpe.checked_json(spec)
            current = given is None or spec == given
        itemsize = np.dtype(meta["dtype"]).itemsize
        return current and all((folder / f"{s}.bin").stat().st_size == v["tokens"] * itemsize
                               for s, v in meta["splits"].items())
    except (OSError, ValueError, KeyError, TypeError, UserError):
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
            meta = json.loads((data_dir / "meta.json").read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{data_dir}/meta.json is unreadable ({err}); delete {data_dir} and run python "
                            "data.py again") from None
        spec = meta.get("tokenizer") or {}
        if "file" in spec:  # a BPE's tokenizer.json, beside the token files: back into the spec, checked when used
            try:
                tokenizer_json = (data_dir / spec["file"]).read_text(encoding="utf-8")
            except OSError as err:
                raise UserError(f"{data_dir / spec['file']} is unreadable ({err.strerror or err}); rebuild the data "
                                f"with python data.py --tokenizer={spec.get('name')}") from None
            meta["tokenizer"] = {"name": spec["name"], "json": tokenizer_json, "sha256": spec["sha256"]}
        return meta
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


# ----------------------------------------------------------------------------------------------------------------
# Command line


def describe_bpe(folder: Path) -> str:
    """For `make tokenizer`: a BPE's size, its bytes per token on the validation split against GPT-2's BPE, the
    longest tokens it learned, and how long learning took."""
    meta = read_meta(folder)
    tokenizer = get_tokenizer(meta["tokenizer"])
    val = np.asarray(open_split(folder, "val"))
    documents = [tokenizer.decode(ids.tolist()) for ids in split_documents(val, tokenizer.eot_token)]
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    ours = f"{n_bytes / (len(val) - len(documents)):.2f}"
    try:
        gpt2 = GPT2Tokenizer()
        theirs = f"{n_bytes / sum(len(gpt2.encode_array(d)) for d in documents):.2f}"
    except UserError as err:
        theirs = f"not measured: {err}"
    longest = sorted(tokenizer.token_bytes.values(), key=len, reverse=True)[:10]
    learned = meta.get("tokenizer_learned_s")
    return "\n".join([
        f"tokenizer: {tokenizer.name}, {tokenizer.vocab_size:,} tokens (256 bytes, <|endoftext|>, "
        f"{tokenizer.vocab_size - 257:,} merges), in {folder / TOKENIZER_FILE}",
        f"learned from the train split ({meta['splits']['train'].get('bytes', 0) / 1e6:.2f} MB) in "
        + (f"{learned:.1f} s" if learned is not None else "another run (a checkpoint's BPE)"),
        f"bytes per token on the val split ({n_bytes / 1e6:.2f} MB): {ours}; GPT-2's BPE (50,257 tokens): {theirs}",
        "longest tokens: " + " ".join(repr(t.decode("utf-8", errors="replace")) for t in longest)])


def main() -> None:
    args = parse_args(sys.argv[1:], reads=("preset", "block_size", "data"))
    folder = prepare(args.config.data, args.config.model.block_size, explicit_dataset="dataset" in args.overridden)
    if bpe_size(args.config.data.tokenizer):
        print(describe_bpe(folder))


if __name__ == "__main__":
    run_cli(main)
