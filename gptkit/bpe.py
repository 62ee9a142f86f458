"""Byte-level BPE the fast way, for data.py's BPETokenizer and hf.py's export: train one with HF `tokenizers`, keep it
as the tokenizer.json that library reads (inside a sha256-checked spec), and encode its ids with tiktoken.

    python -c "from gptkit import bpe; print(bpe.train_bpe(['hello hello world'] * 3, 260)[:80])"

data.py's learn_bpe is the same algorithm written out to be read; this module is what the data goes through.
Why tiktoken encodes: on this 2-core machine, Shakespeare's validation text (0.52 MB) with a bpe:4096 from its train
plays, one thread each, encodes at 6.2 MB/s with tiktoken against 0.7 MB/s with `tokenizers` (encode, and
encode_batch over lines, alike); both give the same ids (every Shakespeare play and Tang poem checked; a test holds
it). tiktoken's rule (merge the adjacent pair whose joined bytes rank lowest) equals the library's (apply the merge
listed first) when merge i made token 257 + i, which tiktoken_encoding checks, using the library otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import lru_cache

from config import BPE_MIN_SIZE, BPE_SPECIAL_TOKENS, UserError

EOT = BPE_SPECIAL_TOKENS[0]
# GPT-2's pre-tokenization: text is cut into words, numbers, punctuation runs and spaces before any merge, so a token
# never spans two words. The `tokenizers` ByteLevel pre-tokenizer (use_regex=True) applies this very pattern.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (its `bytes_to_unicode`): tokenizer.json files store tokens in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def token_bytes(symbols: str) -> bytes:
    """A tokenizer.json token (in byte_symbols' alphabet) as the bytes it stands for."""
    to_byte = {s: b for b, s in byte_symbols().items()}
    return bytes(to_byte[s] for s in symbols)


def new_tokenizer(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None):
    """A `tokenizers` byte-level BPE with GPT-2's pre-tokenization (empty, for training, when vocab is None)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE(vocab, merges) if vocab is not None else models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, description: str = "the text") -> str:
    """A tokenizer.json of `vocab_size` tokens learned from `texts`: <|endoftext|> (id 0), the 256 bytes, then one
    token per merge, most frequent pair first. A UserError says how many merges the text allowed when too few."""
    from tokenizers import pre_tokenizers, trainers

    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        merges = tokenizer.get_vocab_size() - BPE_MIN_SIZE
        raise UserError(f"{description} allows only {merges} merges (every word is then one token), not the "
                        f"{vocab_size - BPE_MIN_SIZE} of bpe:{vocab_size}; use --tokenizer=bpe:"
                        f"{tokenizer.get_vocab_size()} or less, or more text")
    return tokenizer.to_str()


def make_spec(name: str, tokenizer_json: str) -> dict:
    """The tokenizer spec that meta.json and checkpoints hold: the tokenizer.json text and its sha256."""
    return {"name": name, "json": tokenizer_json, "sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest()}


def checked_json(spec: dict) -> str:
    """The spec's tokenizer.json text, after checking that it is there and unaltered (a UserError otherwise)."""
    name = spec.get("name")
    if not isinstance(spec.get("json"), str) or not spec.get("sha256"):
        raise UserError(f"the {name} tokenizer has no tokenizer data (its tokenizer.json or sha256 is missing); the "
                        "checkpoint or data folder is damaged: rebuild the data with python data.py "
                        f"--tokenizer={name}, or use an intact checkpoint")
    actual = hashlib.sha256(spec["json"].encode()).hexdigest()
    if actual != spec["sha256"]:
        raise UserError(f"the {name} tokenizer's data was altered: sha256 {actual[:12]}..., recorded "
                        f"{spec['sha256'][:12]}...; its ids would not be the ones the model learned (restore the "
                        "checkpoint, or rebuild the data)")
    return spec["json"]


def vocabulary(tokenizer_json: str) -> tuple[dict[bytes, int], dict[str, int], list[list[str]]]:
    """(token bytes -> id for every ordinary token, special token -> id, the merges in order) of a tokenizer.json."""
    try:
        document = json.loads(tokenizer_json)
        model = document["model"]
        specials = {t["content"]: t["id"] for t in document.get("added_tokens", [])}
        ranks = {token_bytes(symbols): i for symbols, i in model["vocab"].items() if symbols not in specials}
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"the BPE tokenizer data is not a byte-level tokenizer.json ({err}); rebuild the data") \
            from None
    return ranks, specials, merges


def tiktoken_encoding(tokenizer_json: str, name: str):
    """A tiktoken Encoding giving the same ids as the tokenizer.json, or None when that is not guaranteed."""
    import tiktoken

    ranks, specials, merges = vocabulary(tokenizer_json)
    to_id = {symbols: i for symbols, i in json.loads(tokenizer_json)["model"]["vocab"].items()}
    first = len(ranks) + len(specials) - len(merges)
    if any(to_id.get(a + b) != first + i for i, (a, b) in enumerate(merges)):
        return None  # a token made by two merges: the two rules could disagree, so let the library encode
    return tiktoken.Encoding(name, pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def library_tokenizer(tokenizer_json: str):
    """The `tokenizers` Tokenizer of a tokenizer.json, reading a literal <|endoftext|> in text as text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True  # as tiktoken's encode_ordinary: user text cannot forge a boundary
    return tokenizer


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list behind tiktoken ranks (GPT-2's), in rank order: each token of two or more bytes is the pair
    that BPE with only the lower-ranked tokens leaves it as."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            best, i = min((r, i) for r, i in pairs if r is not None and r < rank)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def json_from_ranks(ranks: dict[bytes, int], specials: dict[str, int]) -> str:
    """A tokenizer.json equal to tiktoken ranks with GPT-2's pre-tokenization (how GPT-2's own is written)."""
    from tokenizers import AddedToken

    symbols = byte_symbols()
    spell = lambda token: "".join(symbols[b] for b in token)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    tokenizer = new_tokenizer(vocab, [(spell(a), spell(b)) for a, b in merges_from_ranks(ranks)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if any(tokenizer.token_to_id(t) != i for t, i in specials.items()):
        raise RuntimeError(f"special tokens {specials} do not follow the ranks' ids; json_from_ranks needs them last")
    return tokenizer.to_str()
