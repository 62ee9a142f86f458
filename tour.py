"""The learning path's demonstrations: each chapter's idea, shown working in seconds on a laptop CPU.

    python tour.py tokens "Hello, world!"     # chapter 2: text -> GPT-2 BPE ids -> text
    python tour.py bpe                        # chapter 2: byte-pair encoding learned from scratch on a paragraph
    python tour.py batch                      # chapter 2: one batch's inputs x and targets y, side by side
    python tour.py attention                  # chapter 3: one head's causal attention weights (runs/tour/attention.png)
    python tour.py model                      # chapter 4: the GPT's layers, parameters, and its first loss
    python tour.py schedule                   # appendix D: the learning rate's warmup, decay (runs/tour/schedule.png)
    python tour.py rope                       # beyond GPT-2: rotary embeddings turn q and k (runs/tour/rope.png)

The first word names the demonstration; the words after it are its text (--text="..." says the same), and
`tour.py attention --ckpt=checkpoints/<run>` picks the model. Each one uses the project's own code (data.py, model.py,
train.py) on a tiny model, so what it prints is what training does. The README's "Learning path" lists them beside
the files and functions to read. Pictures go to runs/tour/, which git ignores.
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import difflib
import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from config import BPE_MIN_SIZE, PRESETS, ModelConfig, UserError, error_summary
from gptkit import bpe, checkpoint, loading
from gptkit.cli import parse_args, run_cli
from model import GPT, apply_rope, count_parameters, rope_angles
from train import learning_rate_at  # the very function the training loop calls

SAMPLE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n")
# Hamlet, III.1 (public domain): enough repeated words for the first merges to mean something.
BPE_PARAGRAPH = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
                 "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
                 "And by opposing end them. To die—to sleep,\nNo more; and by a sleep to say we end\n"
                 "The heart-ache and the thousand natural shocks\nThat flesh is heir to: 'tis a consummation\n"
                 "Devoutly to be wish'd. To die, to sleep;\nTo sleep, perchance to dream—ay, there's the rub:\n")
DEMOS = ("tokens", "bpe", "batch", "attention", "model", "schedule", "rope")
OPTIONS = {
    "text": "",  # tokens: the text to split ("Hello, world!"); attention: the prompt ("To be, or not to be")
    "ckpt": "",  # attention: a checkpoint file or run folder; default: the latest language-model run's best
    "run": "",  # attention: a run name under checkpoints/
}
USAGE = f"python tour.py {'|'.join(DEMOS)} [TEXT] [--key=value ...]"
PICTURES = Path("runs/tour")  # under runs/, which git ignores, so a demonstration leaves the checkout clean


def show_tokens(text: str) -> None:
    """Chapter 2: GPT-2's BPE splits text into sub-word pieces, each an id; decoding the ids gives the text back."""
    tokenizer = data.get_tokenizer({"name": "gpt2"})
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    print(f"text:   {text!r}")
    print(f"ids:    {ids}  ({len(ids)} tokens from {len(text)} characters; vocabulary {tokenizer.vocab_size:,})")
    print(f"pieces: {pieces}")
    if any("\ufffd" in piece for piece in pieces):  # GPT-2's BPE merges bytes, not characters
        print(f"bytes:  {[tokenizer.encoding.decode_single_token_bytes(i) for i in ids]}")
        wide = next(c for c in text if len(c.encode()) > 1)
        print(f"each '\ufffd' piece is part of a character that UTF-8 writes in several bytes ({wide!r} is "
              f"{wide.encode()}): the tokenizer works on bytes, and a token may hold part of a character; "
              "decoding the tokens together gives the characters back")
    print(f"decode: {tokenizer.decode(ids)!r}")


def show_bpe(text: str = BPE_PARAGRAPH, n_merges: int = 24) -> None:
    """Chapter 2: byte-pair encoding from scratch (data.learn_bpe). Start from the text's bytes; again and again give
    the most frequent pair of neighbours a new id. Then the same number of merges by HF `tokenizers`, as
    --tokenizer=bpe:N learns them: the same idea, about as many tokens."""
    merges = data.learn_bpe(text, 256 + n_merges)
    vocab = data.bpe_vocabulary(merges)
    show = lambda i: repr(vocab[i].decode("utf-8", errors="replace"))  # noqa: E731
    print(f"{len(merges)} merges learned from a paragraph of {len(text.encode())} bytes, most frequent pair first:")
    for (left, right), new_id in merges.items():
        print(f"  {new_id}: {show(left):>8} + {show(right):<8} -> {show(new_id)}")
    ids = data.bpe_encode(text, merges)
    print(f"encoded: {len(text.encode())} bytes -> {len(ids)} tokens ({len(text.encode()) / len(ids):.2f} bytes per "
          f"token); decoding gives the text back: {data.bpe_decode(ids, vocab) == text}")
    print("first tokens: " + " ".join(show(i) for i in ids[:24]))
    library = data.BPETokenizer(bpe.make_spec("bpe", bpe.train_bpe([text], BPE_MIN_SIZE + len(merges))))
    print(f"HF tokenizers with the same {len(merges)} merges: {len(library.encode(text))} tokens "
          f"(python data.py --tokenizer=bpe:N learns N - {BPE_MIN_SIZE} merges from a whole data set)")


def show_batch(batch_size: int = 2, block_size: int = 12) -> None:
    """Chapter 2: a batch is windows of the token stream; the targets y are the inputs x shifted by one."""
    tokenizer = data.CharTokenizer("".join(sorted(set(SAMPLE_TEXT))))
    tokens = tokenizer.encode_array(SAMPLE_TEXT)
    x, y = data.random_batch(tokens, batch_size, block_size, torch.Generator().manual_seed(0))
    print(f"{len(tokens)} character tokens (vocabulary {tokenizer.vocab_size}); batch x and y: {tuple(x.shape)}")
    for row in range(batch_size):
        print(f"x[{row}] = {tokenizer.decode(x[row].tolist())!r}")
        print(f"y[{row}] = {tokenizer.decode(y[row].tolist())!r}   (each target is the next character)")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=8, block_size=block_size)
    model = GPT(config)
    tokens_in = model.transformer.wte(x)  # (B, T, C)
    positions_in = model.transformer.wpe(torch.arange(block_size))  # (T, C)
    print(f"embeddings: token {tuple(tokens_in.shape)} + position {tuple(positions_in.shape)} -> "
          f"{tuple((tokens_in + positions_in).shape)}, the input of the first block")


def attention_model(prompt: str, ckpt: str = "", run: str = "") -> tuple[GPT, data.Tokenizer, list[int], str]:
    """The model whose attention to show, its tokenizer, the prompt's ids and where the model came from.

    --ckpt or --run when given; else the latest language-model run's best checkpoint (a classifier's run is passed
    over: it has no next-token head), as `make train` leaves one. Failing that, a tiny random model, whose weights
    are nearly uniform over the visible positions, and a line saying why.
    """
    if ckpt or run:
        loaded = loading.load_model(ckpt=ckpt, run=run)  # the user's choice: a problem with it is an error
    else:
        try:
            loaded = loading.load_model(ckpt=str(checkpoint.latest_run(exclude_kinds=loading.NOT_LANGUAGE_MODELS)))
        except UserError as err:
            return random_attention_model(prompt, f"no language-model run to load ({error_summary(err)})")
    model, tokenizer = loaded.model.eval(), data.get_tokenizer(loaded.tokenizer)
    try:
        ids = tokenizer.encode(prompt)[-model.config.block_size:]
    except UserError as err:
        if ckpt or run:
            raise
        return random_attention_model(prompt, f"{loaded.source} cannot encode the prompt ({error_summary(err)})")
    return model, tokenizer, ids, loaded.source


def random_attention_model(prompt: str, why: str) -> tuple[GPT, data.Tokenizer, list[int], str]:
    print(f"using a tiny model with random weights: {why}")
    torch.manual_seed(0)
    tokenizer = data.CharTokenizer("".join(sorted(set(prompt))))
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=len(prompt))
    return GPT(config).eval(), tokenizer, tokenizer.encode(prompt), "a tiny model with random weights"


def show_attention(prompt: str = "To be, or not to be", ckpt: str = "", run: str = "") -> None:
    """Chapter 3: softmax(q k^T / sqrt(hs) + causal mask) for head 0 of the first layer, for each prompt position."""
    model, tokenizer, ids, where = attention_model(prompt, ckpt, run)
    labels = [tokenizer.decode([i]) for i in ids]
    idx = torch.tensor([ids])  # (1, T)
    block, n_embd = model.transformer.h[0], model.config.n_embd
    with torch.no_grad():
        x = model.transformer.wte(idx)  # (1, T, C)
        if model.transformer.wpe is not None:  # a position=rope model turns q and k instead (tour.py rope)
            x = x + model.transformer.wpe(torch.arange(idx.size(1)))
        head_size = n_embd // model.config.n_head
        kv_size = block.attn.n_kv_head * head_size  # grouped-query attention: fewer key/value heads
        q, k, _ = block.attn.c_attn(block.ln_1(x)).split((n_embd, kv_size, kv_size), dim=2)
        q, k = q[:, :, :head_size], k[:, :, :head_size]  # head 0 and the key head it reads: (1, T, hs)
        if model.config.position == "rope":
            q, k = (apply_rope(t, *rope_angles(model.config, torch.arange(idx.size(1)))) for t in (q, k))
        q, k = q[0], k[0]  # (T, hs)
        scores = q @ k.T / math.sqrt(head_size)  # (T, T)
        future = torch.ones_like(scores, dtype=torch.bool).triu(1)  # position t may not see t + 1, t + 2, ...
        weights = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # each row sums to 1
    prompt = "".join(labels)
    print(f"{where}, head 0 of layer 0, prompt {prompt!r}: row t is how much position t attends to positions 0..t")
    for t, char in enumerate(labels):
        print(f"{char!r:>5} " + " ".join(f"{w:.2f}" if s <= t else "  . " for s, w in enumerate(weights[t].tolist())))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 5))
    image = axes.imshow(weights.numpy(), cmap="viridis", vmin=0)
    axes.set_xticks(range(len(labels)), labels)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("attends to (key)")
    axes.set_ylabel("position (query)")
    axes.set_title(f"causal attention, head 0 of layer 0\n{where}")
    figure.colorbar(image)
    save_picture(figure, "attention.png")


def show_model() -> None:
    """Chapter 4: a GPT of the tiny preset's shape in the book's GPT-2 form (learned positions), its parameter count,
    and a first loss near ln(V): it knows nothing yet."""
    config = PRESETS["tiny"]().model.apply_arch()  # arch=gpt2: back to GPT-2's switches (the preset uses RoPE)
    config.vocab_size = 65  # a character vocabulary
    torch.manual_seed(0)
    model = GPT(config)
    print(model)
    n_params = sum(p.numel() for p in model.parameters())
    x, y = torch.randint(0, config.vocab_size, (2, 32)), torch.randint(0, config.vocab_size, (2, 32))
    with torch.no_grad():
        logits, loss = model(x), model(x, y).item()
    print(f"{n_params:,} parameters; logits {tuple(logits.shape)} for input {tuple(x.shape)}")
    print(f"loss before training {loss:.3f}; guessing uniformly gives ln({config.vocab_size}) = "
          f"{math.log(config.vocab_size):.3f}")
    # One shape, three counts a learner meets: the token embedding (vocabulary x n_embd) is what changes
    preset = PRESETS["tiny"]()
    learned = preset.data.tokenizer.startswith("bpe:")
    preset.model.vocab_size = int(preset.data.tokenizer.partition(":")[2]) if learned else 50257  # bpe:2048
    config.vocab_size = 50257
    print(f"the token embedding is vocabulary x {config.n_embd}, so the count follows the tokenizer: the tiny preset "
          f"(make train, tokenizer {preset.data.tokenizer}) has {count_parameters(preset.model):,} parameters, the "
          f"same blocks with GPT-2's {config.vocab_size:,} tokens (the chapter-5 row) {count_parameters(config):,}")


def show_schedule() -> None:
    """Appendix D: the tiny preset's learning rate, step by step: linear warmup, then its decay to min_lr (wsd: flat,
    then a 1 - sqrt cooldown), drawn beside the cosine decay of the same warmup and end."""
    train = PRESETS["tiny"]().train
    steps = range(train.max_iters)
    curves = {}
    for schedule in dict.fromkeys((train.lr_schedule, "cosine")):
        curves[schedule] = [learning_rate_at(s, train.learning_rate, train.min_lr, train.warmup_iters, train.max_iters,
                                             schedule, train.cooldown_frac) for s in steps]
    rates = curves[train.lr_schedule]
    print(f"tiny preset: {train.lr_schedule} schedule, warmup {train.warmup_iters} steps, {train.max_iters} steps")
    for step in (0, train.warmup_iters // 2, train.warmup_iters, train.max_iters // 2, train.max_iters - 1):
        print(f"step {step:>5}: learning rate {rates[step]:.2e}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 3.5))
    for schedule, values in curves.items():
        axes.plot(list(steps), values, label=schedule + (" (the preset's)" if schedule == train.lr_schedule else ""),
                  linestyle="-" if schedule == train.lr_schedule else "--")
    axes.axvline(train.warmup_iters, color="gray", linestyle=":", label=f"end of warmup ({train.warmup_iters})")
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    axes.set_title(f"tiny preset: warmup, then {train.lr_schedule} decay to min_lr")
    axes.legend()
    save_picture(figure, "schedule.png")


def show_rope() -> None:
    """Beyond GPT-2: rotary position embeddings (model.py's rope_angles and apply_rope, --position=rope) turn each
    pair of q's and k's channels by an angle proportional to the position, so that the attention score of a query and
    a key depends only on how far apart they are. GPT-2 instead adds a learned vector per position to the input."""
    config = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=1024, position="rope")
    cos, sin = rope_angles(config, torch.arange(config.block_size))  # (T, hs): one angle per position and pair
    turns = torch.atan2(sin[1], cos[1])[:4]  # position 1's angles: radians per position of pairs 0..3
    print(f"head size 8: 4 channel pairs, pair i turning by rope_theta ** (-2i/8) radians per position "
          f"(rope_theta={config.rope_theta:g})")
    for i, step in enumerate(turns.tolist()):
        print(f"  pair {i} (channels {i} and {i + 4}): {step:.4f} rad per position, a full turn every "
              f"{2 * math.pi / step:,.0f} positions")
    torch.manual_seed(0)
    q, k = torch.randn(1, 8), torch.randn(1, 8)  # one query and one key vector, as c_attn would make them

    def turned(x: torch.Tensor, position: int) -> torch.Tensor:
        return apply_rope(x, cos[position:position + 1], sin[position:position + 1])

    def score(query_position: int, key_position: int) -> float:
        return (turned(q, query_position) * turned(k, key_position)).sum().item()
    print("the same q and k at positions m and n: the score q.k depends on the distance m - n alone")
    for m, n in ((3, 0), (10, 7), (900, 897), (4, 0)):
        print(f"  q at {m:>3}, k at {n:>3} (distance {m - n}): score {score(m, n):+.4f}")
    print(f"a turn keeps lengths: |q| = {q.norm():.4f} at position 0 and {turned(q, 500).norm():.4f} at 500; "
          "v is never turned, so what a head reads out is content alone")
    print("GPT-2's wpe is a table of block_size x C learned numbers, with no row past block_size; RoPE learns "
          "nothing and relative positions mean the same at any offset")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    positions = range(0, 64)
    for i in range(4):
        left.plot(positions, [math.remainder(turns[i].item() * t, 2 * math.pi) for t in positions], label=f"pair {i}")
    left.set_xlabel("position")
    left.set_ylabel("angle (radians, wrapped)")
    left.set_title("each channel pair turns at its own speed")
    left.legend()
    wide = ModelConfig(n_layer=1, n_head=1, n_embd=64, block_size=1024, position="rope")  # GPT-2's head size
    ones = torch.ones(wide.block_size, 64)  # a query and a key that agree, the key at distance 0, 1, 2, ...
    scores = (apply_rope(ones, *rope_angles(wide, torch.arange(wide.block_size))) * ones).sum(dim=-1)  # (T,)
    right.plot(range(wide.block_size), scores.tolist())
    right.set_xlabel("distance between query and key (positions)")
    right.set_ylabel("score q.k")
    right.set_title("head size 64, q = k = ones: far apart scores lower")
    save_picture(figure, "rope.png")


def save_picture(figure, name: str) -> None:
    PICTURES.mkdir(parents=True, exist_ok=True)
    figure.savefig(PICTURES / name, dpi=100, bbox_inches="tight")
    print(f"saved {PICTURES / name}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    demo = argv[0] if argv and not argv[0].startswith("-") else ""
    rest = argv[1:] if demo else argv
    words = list(itertools.takewhile(lambda arg: not arg.startswith("-"), rest))  # tour.py tokens Hello, world!
    options = parse_args(rest[len(words):], extra=OPTIONS, reads=(), usage=USAGE).options
    if demo not in DEMOS:
        close = difflib.get_close_matches(demo, DEMOS, n=1) if demo else []
        hint = f"did you mean `python tour.py {close[0]}`? " if close else ""
        raise UserError(f"{f'no demonstration {demo!r}; ' if demo else ''}{hint}say which demonstration: {USAGE} "
                        "(see the README's Learning path)")
    text = " ".join(words) or options["text"]
    if text and demo not in ("tokens", "attention"):
        raise UserError(f"tour.py {demo} takes no text; only tokens and attention do")
    if (options["ckpt"] or options["run"]) and demo != "attention":
        raise UserError(f"tour.py {demo} loads no model; --ckpt and --run go with tour.py attention")
    if demo == "tokens":
        show_tokens(text or "Hello, world!")
    elif demo == "bpe":
        show_bpe()
    elif demo == "batch":
        show_batch()
    elif demo == "attention":
        show_attention(text or "To be, or not to be", options["ckpt"], options["run"])
    elif demo == "model":
        show_model()
    elif demo == "rope":
        show_rope()
    else:
        show_schedule()


if __name__ == "__main__":
    run_cli(main)
