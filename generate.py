"""Sample text from a trained checkpoint with a KV cache: each new token costs one position's work.

    python generate.py --prompt="Once upon a time" --max_new_tokens=100 --device=cpu   (or: make generate PROMPT=...)
    python generate.py --ckpt=checkpoints/<instruct-run> --instruction="Name a color"   (an instruct.py model)
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import data
from config import UserError
from gptkit import fast, loading, prompts
from gptkit.cli import parse_args, parse_bool, run_cli
from gptkit.runtime import pick_device, pick_dtype, synchronize
from model import GPT, KVCache

# Config fields generate.py reads; the model's own config comes from the checkpoint (or the pretrained weights), so
# parse_args refuses the others (--n_layer has no effect here).
CONFIG_FIELDS_USED = ("device", "dtype", "seed", "init_from", "fast_kernels")

OPTIONS = {
    "prompt": None,  # None: read the prompt from stdin when stdin is not a terminal
    "prompt_file": "",  # a text file holding the prompt; "-" reads stdin
    "instruction": "",  # for an instruction-tuned model (instruct.py): formatted in the model's prompt style
    "input": "",  # the instruction's optional input
    "max_new_tokens": 200,  # tokens generated after the prompt
    "temperature": 0.8,  # 0 means greedy: always the most likely token (SAMPLING_DEFAULTS)
    "top_k": 200,  # keep the k most likely tokens; k >= vocabulary size keeps them all
    "top_p": 1.0,  # nucleus sampling: keep the smallest set of tokens whose probability reaches p
    "repetition_penalty": 1.0,  # > 1 makes tokens already in the context less likely (CTRL, Keskar et al. 2019)
    "num_samples": 1,  # samples decoded together as one batch
    "stop_at_eot": True,  # stop a sample at <|endoftext|> (tokenizers that have one)
    "stream": "auto",  # print tokens as they are produced; auto: when stdout is a terminal
    "interactive": False,  # read prompts from stdin in a loop
    "ckpt": "",  # a checkpoint file or run folder; default: the best checkpoint of the most recent run
    "run": "",  # a run name under checkpoints/
}

# The sampling generate.py, chat.py and serve.py (a request that leaves a field out) use unless told otherwise:
# nanoGPT's sample.py settings, a little cooler than the model's own distribution, with a long tail cut off.
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 200, "top_p": 1.0}
STOP_CHECK_INTERVAL = 8  # without streaming, look for <|endoftext|> every few tokens: each look is a host sync


@dataclass
class Sampling:
    """How the next token is chosen from the logits; checked by validate() before any model is loaded."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def validate(self) -> Sampling:
        if not self.temperature >= 0:
            raise UserError(f"temperature={self.temperature} is negative; use 0 for greedy or e.g. --temperature=0.8")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k={self.top_k} must be 1 or more; a value >= the vocabulary size keeps every token")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} is outside (0, 1]; use e.g. --top_p=0.9, or 1 to turn it off")
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty={self.repetition_penalty} must be positive; 1 turns it off, "
                            "e.g. --repetition_penalty=1.2")
        return self


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token in previous_ids (B, T): positive logits divided by it, negative multiplied."""
    seen = logits.gather(1, previous_ids)  # (B, T)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, previous_ids, seen)


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                     top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) -> probabilities (B, V) after temperature (> 0), top-k and then top-p, renormalised."""
    # A tiny temperature (1e-300) must not make NaNs, from which no token can be drawn: it would round to 0 in the
    # logits' dtype (0 / 0), or send logits to +-inf (inf - inf). So the largest logit is taken off first, leaving
    # the best token at 0, and the temperature is kept at least the dtype's smallest normal number: still greedy.
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
        # a token is dropped when the tokens before it already reach p: what remains is the smallest such set
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                      repetition_penalty: float = 1.0, previous_ids: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits of the last position (B, V) -> next token ids (B,). Pure: randomness only from `generator`."""
    logits = logits.float()  # sampling in bf16 would round small probabilities to zero
    if repetition_penalty != 1.0 and previous_ids is not None:
        logits = apply_repetition_penalty(logits, previous_ids, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return sample_from(probs, generator)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs (B, V) by inverting the cumulative distribution: ids (B,).

    torch.multinomial draws an exponential variate per vocabulary entry, tens of times slower than a cumsum and a
    binary search at GPT-2's vocabulary: a sizeable share of a cached decode step.
    """
    cumulative = probs.cumsum(dim=-1)  # (B, V)
    total = cumulative[:, -1:]  # (B, 1): 1 up to rounding
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total, so never past the last token
    # right=True: the first id whose cumulative mass exceeds u, which is never a zero-probability (filtered) token
    ids = torch.searchsorted(cumulative, u, right=True).squeeze(1)
    return ids.clamp_(max=probs.size(-1) - 1)  # probabilities that summed to NaN must still give a real token id


class Decoder:
    """The context window of a batch of sequences and, with use_cache, its KV cache; returns next-token logits.

    Sliding window: when a new token would make the context longer than block_size, the context becomes its last
    block_size // 2 tokens and the cache is recomputed for them. Every predicted token thus sees at least half a
    block of context, and the recompute (one batched forward) happens once per block_size // 2 tokens.
    Without the cache the same window is re-run whole at every step, so both give the same logits.
    Call under torch.inference_mode().
    """

    def __init__(self, model: GPT, batch_size: int, use_cache: bool = True):
        if model.training:
            raise ValueError("call model.eval() first: dropout would make the samples random beyond the seed")
        self.model = model
        self.block_size = model.config.block_size
        self.keep_on_slide = max(1, self.block_size // 2)
        weight = model.lm_head.weight
        self.cache = KVCache(model.config, batch_size, self.block_size, weight.device, weight.dtype) \
            if use_cache else None
        self.context = torch.empty(batch_size, 0, dtype=torch.long, device=weight.device)  # (B, T) token ids
        self.slides = 0  # how many times the window has slid

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Start from a prompt (B, T <= block_size); returns the logits for the token after it (B, V)."""
        self.context = prompt_ids
        return self._run_whole_context()

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (B,); returns the logits for the token after it (B, V)."""
        self.context = torch.cat([self.context, next_ids[:, None]], dim=1)  # (B, T + 1)
        if self.context.size(1) > self.block_size:
            self.context = self.context[:, -self.keep_on_slide:]
            self.slides += 1
            return self._run_whole_context()
        if self.cache is None:
            return self._run_whole_context()
        return self.model(next_ids[:, None], kv_cache=self.cache, last_only=True)[:, -1]  # one position's work

    def _run_whole_context(self) -> torch.Tensor:
        if self.cache is not None:
            self.cache.reset()
        return self.model(self.context, kv_cache=self.cache, last_only=True)[:, -1]


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) new token ids on the CPU; a row that stopped early holds its stop token
    prompt_tokens: int  # prompt tokens processed (all rows)
    prompt_seconds: float
    decoded_tokens: int  # new tokens produced (all rows)
    decode_seconds: float


@torch.inference_mode()
def generate(model: GPT, prompt_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling,
             generator: torch.Generator | None = None, use_cache: bool = True, stop_token: int | None = None,
             vocab_size: int | None = None, on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
    """Continue each row of prompt_ids (B, T <= block_size) by up to max_new_tokens tokens.

    Stops early once every row has produced stop_token. `vocab_size` limits sampling to the tokenizer's ids when
    the model's embedding is padded beyond them; `on_tokens` receives each step's new ids (one per row) as they
    are produced, for streaming.
    """
    decoder = Decoder(model, prompt_ids.size(0), use_cache)
    started = time.perf_counter()
    logits = decoder.prefill(prompt_ids)
    synchronize(prompt_ids.device)
    prefilled = time.perf_counter()
    finished = torch.zeros(prompt_ids.size(0), dtype=torch.bool, device=prompt_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        next_ids = sample_next_token(logits[:, :vocab_size], sampling.temperature, sampling.top_k, sampling.top_p,
                                     sampling.repetition_penalty, decoder.context, generator)
        new_tokens.append(next_ids)
        if on_tokens is not None:
            on_tokens(next_ids.tolist())
        if stop_token is not None:
            finished |= next_ids == stop_token
            if (on_tokens is not None or step % STOP_CHECK_INTERVAL == STOP_CHECK_INTERVAL - 1) and finished.all():
                break
        if step + 1 < max_new_tokens:
            logits = decoder.step(next_ids)
    tokens = torch.stack(new_tokens, dim=1).cpu() if new_tokens else torch.empty(prompt_ids.size(0), 0)
    synchronize(prompt_ids.device)
    done = time.perf_counter()
    return Generation(tokens.long(), prompt_ids.numel(), prefilled - started, tokens.numel(), done - prefilled)


def load_model_and_tokenizer(options: dict) -> tuple[GPT, data.Tokenizer, str, dict | None]:
    """The model (on the CPU, float32, in eval mode), its tokenizer, its training dtype ("auto", "float32", ...) and
    what instruct.py recorded about it (None for a model that was not instruction-tuned)."""
    loaded = loading.load_model(options.get("init_from", "scratch"), ckpt=options["ckpt"], run=options["run"])
    trained_dtype = loaded.saved_config.train.dtype if loaded.saved_config else "auto"
    return loaded.model.eval(), data.get_tokenizer(loaded.tokenizer), trained_dtype, loaded.instruct


def choose_device_and_dtype(device: str, dtype: str, dtype_given: bool,
                            trained_dtype: str = "float32") -> tuple[torch.device, torch.dtype, str]:
    """--dtype when given, else the checkpoint's training dtype where this device runs it fast; and why."""
    chosen_device = pick_device(device)
    if dtype_given:
        if dtype == "float16" and chosen_device.type == "cpu":
            raise UserError("dtype=float16 has no fast CPU kernels; use --dtype=float32 or bfloat16 on the CPU")
        return chosen_device, *pick_dtype(dtype, chosen_device)
    if chosen_device.type == "cpu":
        # Decoding on a CPU is bound by reading the weights, not by arithmetic: bf16 gained too little over float32
        # (docs/performance.md) to be worth inexact logits.
        return chosen_device, torch.float32, "float32 on a CPU: exact logits, and within 20% of bf16's decode speed"
    chosen_dtype, reason = pick_dtype(trained_dtype, chosen_device)
    return chosen_device, chosen_dtype, f"{reason} (the checkpoint's training dtype is {trained_dtype})"


@dataclass
class Instruction:
    """--instruction as the model's prompt: fitted to its context by the chat rule, and how its reply ends."""

    ids: list[int]
    max_new_tokens: int
    stop_token: int
    stop: list[str]


def instruction_prompt(options: dict, instruct_record: dict | None, source: str, tokenizer: data.Tokenizer,
                       block_size: int) -> Instruction:
    """--instruction (and --input) in the chat template the model was tuned with (its prompt style's, as one user
    message), fitted as chat.py and serve.py fit a conversation (prompts.fit_conversation)."""
    if instruct_record is None:
        raise UserError(f"{source} was not instruction-tuned, so it has no prompt style for --instruction; tune it "
                        "with `make instruct`, or sample it plainly with --prompt=\"...\"")
    template = prompts.recorded_template(instruct_record, tokenizer.eot_token)
    content = prompts.instruction_message(template.style, options["instruction"], options["input"])
    fitted = prompts.fit_conversation(template, [{"role": "user", "content": content}], tokenizer.encode,
                                      block_size, options["max_new_tokens"])
    if fitted.shortened:
        print(f"note: the prompt has {len(fitted.ids)} tokens, which leaves {fitted.reply_tokens} of the context of "
              f"{block_size} for the answer (--max_new_tokens={fitted.asked_tokens})", file=sys.stderr)
    return Instruction(fitted.ids, fitted.reply_tokens, template.end_of_turn, prompts.stop_strings(template))


def read_prompt(options: dict) -> str:
    """--prompt_file, else --prompt, else stdin when it is not a terminal, else the empty prompt."""
    if options["prompt_file"]:
        if options["prompt_file"] == "-":
            return sys.stdin.read()
        path = Path(options["prompt_file"])
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"--prompt_file={path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--prompt_file={path} could not be read as UTF-8 text ({err})") from None
    if options["prompt"] is not None:
        return options["prompt"]
    return "" if sys.stdin.isatty() else sys.stdin.read()


def encode_prompt(text: str, tokenizer: data.Tokenizer, block_size: int) -> list[int]:
    """Prompt text -> ids; an empty prompt starts from <|endoftext|>, as GPT-2 does; a long one keeps its end."""
    ids = tokenizer.encode(text)
    if not ids:
        if tokenizer.eot_token is None:
            raise UserError(f"the prompt is empty and the {tokenizer.name} tokenizer has no start token; "
                            "give one with --prompt=... (make generate PROMPT=...)")
        ids = [tokenizer.eot_token]
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens; keeping its last {block_size} (block_size)", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


class StopReply(Exception):
    """Raised by a token callback to end a generation early: a stop string was written, or nobody is listening."""


class TextStream:
    """A reply's tokens -> the text to show as it grows: never half a character, never any part of a stop string.
    Text that may be the start of a stop string waits until the next tokens tell. generate.py, chat.py and serve.py
    stream through it; each token's bytes are decoded once (a long reply costs no more per token than a short one).
    """

    def __init__(self, tokenizer: data.Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.longest_stop = max(map(len, self.stop), default=0)
        self.pending: list[int] = []  # tokens whose bytes do not make whole characters yet
        self.text = ""  # the reply so far, cut before a stop string once one appears
        self.sent = 0  # characters of text already given out
        self.stopped = False  # a stop string was written

    def add(self, token: int) -> str:
        """One more token; returns the text that may be shown now (often "")."""
        if self.stopped:
            return ""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        self.pending = []
        return self._grow(piece, final=False)

    def finish(self) -> str:
        """What is left to show once the reply has ended, a character cut off at its end included."""
        if self.pending and not self.stopped:
            piece, self.pending = self.tokenizer.decode(self.pending), []
            return self._grow(piece, final=True)
        return self._send(len(self.text))

    def _grow(self, piece: str, final: bool) -> str:
        search_from = max(0, len(self.text) - self.longest_stop + 1)  # a stop wholly in old text was found before
        self.text += piece
        found = [at for s in self.stop if (at := self.text.find(s, search_from)) >= 0]
        if found:
            self.stopped, self.text = True, self.text[:min(found)]
            return self._send(len(self.text))
        held = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                                   default=0)
        return self._send(len(self.text) - held)

    def _send(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


def text_until_stop(tokenizer: data.Tokenizer, ids: list[int], stop: list[str]) -> str:
    """The whole text of ids, cut before the first stop string."""
    stream = TextStream(tokenizer, stop)
    for token in ids:
        stream.add(token)
    stream.finish()
    return stream.text


def print_stream(tokenizer: data.Tokenizer, stop_token: int | None,
                 stop: list[str] = ()) -> tuple[Callable[[list[int]], None], Callable[[], None]]:
    """generate()'s on_tokens for one sequence printing to stdout, and the call that ends the line."""
    stream = TextStream(tokenizer, stop)

    def show(ids: list[int]) -> None:
        if ids[0] == stop_token:
            return
        sys.stdout.write(stream.add(ids[0]))
        sys.stdout.flush()
        if stream.stopped:
            raise StopReply

    def end() -> None:
        sys.stdout.write(stream.finish() + "\n")
        sys.stdout.flush()

    return show, end


def until_stop(ids: list[int], stop_token: int | None) -> list[int]:
    return ids[:ids.index(stop_token)] if stop_token is not None and stop_token in ids else ids


def complete(ids: list[int], model: GPT, tokenizer: data.Tokenizer, sampling: Sampling, options: dict,
             generator: torch.Generator, stream: bool, echo_prompt: bool, max_new_tokens: int,
             stop_token: int | None, stop: list[str] = ()) -> None:
    """Generate num_samples continuations of one prompt, print them to stdout and the speed to stderr."""
    device = model.lm_head.weight.device
    prompt = torch.tensor([ids] * options["num_samples"], dtype=torch.long, device=device)  # (B, T)
    shown_prompt = tokenizer.decode(ids) if echo_prompt and ids != [tokenizer.eot_token] else ""
    show, end = print_stream(tokenizer, stop_token, stop) if stream else (None, None)
    if stream:
        sys.stdout.write(shown_prompt)
        sys.stdout.flush()
    try:
        result = generate(model, prompt, max_new_tokens, sampling, generator, stop_token=stop_token,
                          vocab_size=tokenizer.vocab_size, on_tokens=show)
    except StopReply:  # a stop string was printed: the line ends there
        result = None
    if stream:
        end()
    else:
        for row, new_ids in enumerate(result.tokens.tolist()):
            if row:
                print("-" * 40)
            print(shown_prompt + text_until_stop(tokenizer, until_stop(new_ids, stop_token), stop))
    if result is not None:
        prompt_rate = result.prompt_tokens / max(result.prompt_seconds, 1e-9)
        decode_rate = result.decoded_tokens / max(result.decode_seconds, 1e-9)
        print(f"prompt: {result.prompt_tokens} tokens, {prompt_rate:.0f} tokens/s; "
              f"decode: {result.decoded_tokens} tokens, {decode_rate:.1f} tokens/s", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parsed = parse_args(sys.argv[1:] if argv is None else argv, extra=OPTIONS, reads=CONFIG_FIELDS_USED)
    options, train = parsed.options, parsed.config.train
    sampling = Sampling(options["temperature"], options["top_k"], options["top_p"],
                        options["repetition_penalty"]).validate()
    if options["max_new_tokens"] < 1:
        raise UserError(f"max_new_tokens={options['max_new_tokens']} must be 1 or more")
    if options["num_samples"] < 1:
        raise UserError(f"num_samples={options['num_samples']} must be 1 or more")
    stream = None if str(options["stream"]).lower() == "auto" else parse_bool("stream", options["stream"])
    if stream and options["num_samples"] > 1:
        raise UserError("--stream prints one sample as it grows; drop it to print --num_samples samples when done")
    if stream is None:
        stream = sys.stdout.isatty() and options["num_samples"] == 1

    if options["input"] and not options["instruction"]:
        raise UserError("--input goes with --instruction; give the task as --instruction=\"...\" too")
    if options["instruction"] and (options["prompt"] is not None or options["prompt_file"] or options["interactive"]):
        raise UserError("--instruction replaces --prompt, --prompt_file and --interactive; give only one of them")
    model, tokenizer, trained_dtype, instruct_record = load_model_and_tokenizer(
        {**options, "init_from": train.init_from})
    instruction = instruction_prompt(options, instruct_record, options["ckpt"] or options["run"] or "the model",
                                     tokenizer, model.config.block_size) if options["instruction"] else None
    device, dtype, reason = choose_device_and_dtype(train.device, train.dtype, "dtype" in parsed.overridden,
                                                    trained_dtype)
    model = model.to(device=device, dtype=dtype)
    if train.fast_kernels:
        model = fast.lay_out_for_decoding(model)  # faster decoding on the CPU; --fast_kernels=False skips it
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}: {reason}", file=sys.stderr)
    generator = torch.Generator(device).manual_seed(train.seed)

    if instruction is not None:  # print the response alone: what follows the formatted prompt, whatever its style
        complete(instruction.ids, model, tokenizer, sampling, options, generator, stream, False,
                 instruction.max_new_tokens, instruction.stop_token, instruction.stop)
        return
    stop_token = tokenizer.eot_token if options["stop_at_eot"] else None

    def continue_text(text: str, echo_prompt: bool) -> None:
        complete(encode_prompt(text, tokenizer, model.config.block_size), model, tokenizer, sampling, options,
                 generator, stream, echo_prompt, options["max_new_tokens"], stop_token)

    if not options["interactive"]:
        continue_text(read_prompt(options), echo_prompt=True)
        return
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            return
        try:
            continue_text(line.rstrip("\n"), echo_prompt=False)
        except UserError as err:  # one bad prompt should not end the session
            print(f"error: {err}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
