"""The learning path's demonstrations: each chapter's idea, shown working in seconds on a laptop CPU.

    python tour.py tokens "Hello, world!"     # chapter 2: text -> GPT-2 BPE ids -> text
    python tour.py bpe                        # chapter 2: byte-pair encoding learned from scratch on a paragraph
    python tour.py batch                      # chapter 2: one batch's inputs x and targets y, side by side
    python tour.py attention                  # chapter 3: one head's causal attention weights (attention.png)
    python tour.py model                      # chapter 4: the GPT's layers, parameters, and its first loss
    python tour.py schedule                   # appendix D: warmup + cosine decay of the learning rate (schedule.png)

Each one uses the project's own code (data.py, model.py, train.py) on a tiny model, so what it prints is what
training does. The README's "Learning path" lists them beside the files and functions to read.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

import data
from config import BPE_MIN_SIZE, PRESETS, ModelConfig, UserError
from gptkit import bpe, loading
from gptkit.cli import run_cli
from model import GPT
from train import learning_rate_at  # the very function the training loop calls

SAMPLE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n")
# Hamlet, III.1 (public domain): enough repeated words for the first merges to mean something.
BPE_PARAGRAPH = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
                 "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
                 "And by opposing end them. To die—to sleep,\nNo more; and by a sleep to say we end\n"
                 "The heart-ache and the thousand natural shocks\nThat flesh is heir to: 'tis a consummation\n"
                 "Devoutly to be wish'd. To die, to sleep;\nTo sleep, perchance to dream—ay, there's the rub:\n")
DEMOS = ("tokens", "bpe", "batch", "attention", "model", "schedule")


def show_tokens(text: str) -> None:
    """Chapter 2: GPT-2's BPE splits text into sub-word pieces, each an id; decoding the ids gives the text back."""
    tokenizer = data.get_tokenizer({"name": "gpt2"})
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    print(f"text:   {text!r}")
    print(f"ids:    {ids}  ({len(ids)} tokens from {len(text)} characters; vocabulary {tokenizer.vocab_size:,})")
    print(f"pieces: {pieces}")
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


def show_attention(prompt: str = "To be, or not to be", png: str = "attention.png") -> None:
    """Chapter 3: softmax(q k^T / sqrt(hs) + causal mask) for head 0 of the first layer, for each prompt position.

    The model is the latest run's best checkpoint when there is one (`make train` first shows learned patterns),
    else a tiny random one, whose weights are nearly uniform over the visible positions.
    """
    try:
        loaded = loading.load_model()
        model, tokenizer, where = loaded.model.eval(), data.get_tokenizer(loaded.tokenizer), loaded.source
        ids = tokenizer.encode(prompt)[-model.config.block_size:]
    except UserError:  # no run yet, or its tokenizer cannot encode the prompt
        torch.manual_seed(0)
        tokenizer = data.CharTokenizer("".join(sorted(set(prompt))))
        config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=len(prompt))
        model, where, ids = GPT(config).eval(), "a tiny model with random weights", tokenizer.encode(prompt)
    labels = [tokenizer.decode([i]) for i in ids]
    idx = torch.tensor([ids])  # (1, T)
    block, n_embd = model.transformer.h[0], model.config.n_embd
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))  # (1, T, C)
        q, k, _ = block.attn.c_attn(block.ln_1(x)).split(n_embd, dim=2)  # each (1, T, C)
        head_size = n_embd // model.config.n_head
        q, k = q[0, :, :head_size], k[0, :, :head_size]  # head 0: (T, hs)
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
    figure.savefig(png, dpi=100, bbox_inches="tight")
    print(f"saved {png}")


def show_model() -> None:
    """Chapter 4: the tiny preset's GPT, its parameter count, and a first loss near ln(V): it knows nothing yet."""
    config = PRESETS["tiny"]().model
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


def show_schedule(png: str = "schedule.png") -> None:
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
    figure.savefig(png, dpi=100, bbox_inches="tight")
    print(f"saved {png}")


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in DEMOS:
        raise UserError(f"say which demonstration: python tour.py {'|'.join(DEMOS)} (see the README's Learning path)")
    demo, rest = args[0], args[1:]
    if demo == "tokens":
        show_tokens(" ".join(rest) or "Hello, world!")
    elif demo == "bpe":
        show_bpe()
    elif demo == "batch":
        show_batch()
    elif demo == "attention":
        show_attention(" ".join(rest) or "To be, or not to be")
    elif demo == "model":
        show_model()
    else:
        show_schedule()


if __name__ == "__main__":
    run_cli(main)
