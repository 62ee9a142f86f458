"""Talk to a model you tuned with instruct.py: a multi-turn chat in the terminal, each answer printed as it is made.

    python chat.py --device=cpu                  (or: make chat; RUN=NAME or CKPT=PATH for another run than the latest)

In the chat: /reset starts over, /system TEXT sets a system message, /temperature X changes the sampling, /exit or
Ctrl-D leaves; Ctrl-C stops the answer being written. The conversation is rendered in the chat template the
checkpoint records (gptkit/prompts.py) and sampled by generate.py's code; serve.py offers the same over HTTP.
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import generate
from config import UserError
from gptkit import checkpoint, fast, loading, prompts
from gptkit.cli import parse_args, run_cli
from model import GPT

# The model and its sizes come from the checkpoint: of the config fields chat.py reads only these (others are refused).
CONFIG_FIELDS_USED = {"device", "dtype", "seed", "fast_kernels"}

OPTIONS = {
    "ckpt": "",  # a checkpoint file or run folder of instruct.py; default: the most recent instruct.py run
    "run": "",  # a run name under checkpoints/
    "system": "",  # a system message that opens the conversation; /system TEXT changes it
    "temperature": generate.SAMPLING_DEFAULTS["temperature"],  # 0: greedy; /temperature X changes it
    "top_k": generate.SAMPLING_DEFAULTS["top_k"],  # keep the k most likely tokens; >= vocabulary size keeps all
    "top_p": generate.SAMPLING_DEFAULTS["top_p"],  # nucleus sampling: the fewest tokens whose probability reaches p
    "max_new_tokens": 0,  # the longest answer, in tokens, kept free in the context; 0: a third of the context
}
HOW_TO_MAKE_ONE = ("make one with `make instruct` (python instruct.py --init_from=<pretrained run>; a .jsonl of "
                   "{\"messages\": [...]} trains whole conversations), then `make chat`")
HELP = "/reset starts over, /system TEXT sets the system message, /temperature X, /exit leaves (or Ctrl-D)"


# ----------------------------------------------------------------------------------------------------------------
# The model, and one reply from it


@dataclass
class ChatModel:
    """A chat-tuned model ready to answer: on its device, with its tokenizer and the template it was tuned with."""

    model: GPT
    tokenizer: data.Tokenizer
    template: prompts.ChatTemplate
    name: str  # the run's folder name: what serve.py calls the model
    device: torch.device

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation in the template, ending where the assistant's next reply begins."""
        return prompts.encode_conversation(self.template, messages, self.tokenizer.encode, open_reply=True)[0]


def default_chat_checkpoint() -> str:
    """The most recent instruct.py, dpo.py or rl.py run: each holds an instruction- or chat-tuned model."""
    try:
        return str(checkpoint.latest_run(kinds=("instruct", "dpo", "rl")))
    except UserError:
        raise UserError(f"no instruction- or chat-tuned run under {checkpoint.CHECKPOINTS_ROOT}/; "
                        f"{HOW_TO_MAKE_ONE}") from None


def load_chat_model(ckpt: str = "", run: str = "", device: str = "auto", dtype: str = "auto",
                    dtype_given: bool = False, fast_kernels: bool = True,
                    say: Callable[[str], None] = print) -> ChatModel:
    """--ckpt, --run or the latest instruct.py run, on the device and dtype generate.py would choose; a model that
    was not tuned to answer is refused in one line."""
    loaded = loading.load_model(ckpt=ckpt or ("" if run else default_chat_checkpoint()), run=run)
    if loaded.instruct is None:
        raise UserError(f"{loaded.source} is a pretrained language model, not a chat model; {HOW_TO_MAKE_ONE}")
    tokenizer = data.get_tokenizer(loaded.tokenizer)
    template = prompts.recorded_template(loaded.instruct, tokenizer.eot_token)
    trained_dtype = loaded.saved_config.train.dtype if loaded.saved_config else "auto"
    device, chosen_dtype, reason = generate.choose_device_and_dtype(device, dtype, dtype_given, trained_dtype)
    model = loaded.model.eval().to(device=device, dtype=chosen_dtype)
    if fast_kernels:
        model = fast.lay_out_for_decoding(model)  # as generate.py: the same logits, faster on a CPU
    say(f"{loaded.source}: {template.style} template, context {model.config.block_size} tokens; device {device}, "
        f"dtype {str(chosen_dtype).removeprefix('torch.')}: {reason}")
    # the run's folder, resolved: --ckpt=best.pt in the run's own folder has no folder in its path
    return ChatModel(model, tokenizer, template, Path(loaded.source).resolve().parent.name or "model", device)


StopReply = generate.StopReply  # raised by a token callback to end a reply early


@dataclass
class Reply:
    ids: list[int] = field(default_factory=list)  # the reply's tokens, without the end-of-turn token
    finish_reason: str = "length"  # "stop": it ended itself (or a StopReply did); "length": max_new_tokens ran out


def reply(chat_model: ChatModel, prompt_ids: list[int], sampling: generate.Sampling, max_new_tokens: int,
          generator: torch.Generator, on_token: Callable[[int], None] = lambda token: None) -> Reply:
    """One reply to prompt_ids (at most block_size of them), sampled by generate.py's generate() until the
    end-of-turn token. on_token sees each new token as it is made and may raise StopReply to end the reply there.
    Each call builds its own KV cache, so replies never share one."""
    answer = Reply()
    end = chat_model.template.end_of_turn

    def each_step(ids: list[int]) -> None:
        if ids[0] == end:
            answer.finish_reason = "stop"  # generate() ends after this step
            return
        answer.ids.append(ids[0])
        on_token(ids[0])

    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=chat_model.device)
    try:
        generate.generate(chat_model.model, prompt, max_new_tokens, sampling, generator, stop_token=end,
                          vocab_size=chat_model.tokenizer.vocab_size, on_tokens=each_step)
    except StopReply:
        answer.finish_reason = "stop"
    return answer


# ----------------------------------------------------------------------------------------------------------------
# The conversation


@dataclass
class Conversation:
    """What has been said: the system message and the turns since the last /reset, oldest first."""

    system: str = ""
    turns: list[dict] = field(default_factory=list)  # {"role": "user" | "assistant", "content": ...}
    trimmed_said: bool = False  # the note about dropping old turns is printed once per conversation

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns


def reply_room(chat_model: ChatModel, max_new_tokens: int) -> int:
    """The tokens an answer may take: --max_new_tokens, or a third of the context when it is 0. A third holds 9 in
    10 answers of `make instruct`'s data at the tiny preset's context of 128 (docs/fine-tuning.md) and leaves the
    rest to the conversation."""
    return max_new_tokens or max(1, chat_model.block_size // 3)


def answer(chat_model: ChatModel, conversation: Conversation, text: str, sampling: generate.Sampling,
           max_new_tokens: int, generator: torch.Generator) -> None:
    """Add the user's message, stream the reply to stdout and keep it; Ctrl-C stops the reply, which keeps what was
    written so far. The conversation is fitted to the context by the one rule (prompts.fit_conversation): the
    oldest turns go first; the reply ends at the template's next header or its end-of-turn token."""
    asked = reply_room(chat_model, max_new_tokens)
    try:
        fitted = prompts.fit_conversation(chat_model.template, conversation.messages() + [
            {"role": "user", "content": text}], chat_model.tokenizer.encode, chat_model.block_size, asked)
    except UserError as err:
        raise UserError(f"{err} (the message was not added to the conversation)") from None
    conversation.turns.append({"role": "user", "content": text})
    if fitted.dropped:
        del conversation.turns[:fitted.dropped]  # the system message is not among the turns, so it stays
        if not conversation.trimmed_said:
            conversation.trimmed_said = True
            print(f"(the conversation no longer fits the model's context of {chat_model.block_size} tokens with "
                  f"{asked} left for the answer: the oldest turns are left out from now on; /reset starts over)",
                  file=sys.stderr)
    if fitted.shortened:
        print(f"(this answer has room for {fitted.reply_tokens} tokens of the {asked} asked: the prompt takes "
              f"{len(fitted.ids)} of the context's {chat_model.block_size})", file=sys.stderr)
    stream = generate.TextStream(chat_model.tokenizer, prompts.stop_strings(chat_model.template))

    def show(token: int) -> None:
        sys.stdout.write(stream.add(token))
        sys.stdout.flush()
        if stream.stopped:
            raise StopReply

    stopped = False
    try:
        reply(chat_model, fitted.ids, sampling, fitted.reply_tokens, generator, show)
    except KeyboardInterrupt:
        stopped = True
    sys.stdout.write(stream.finish() + "\n")
    sys.stdout.flush()
    if stopped:
        print("(stopped)", file=sys.stderr)
    conversation.turns.append({"role": "assistant", "content": stream.text})


def command(line: str, conversation: Conversation, sampling: generate.Sampling) -> bool:
    """Carry out a /command; False when it asks to leave."""
    name, _, argument = line.strip().partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        conversation.turns.clear()
        conversation.trimmed_said = False
        print("(a new conversation)")
    elif name == "/system":
        conversation.system = argument.strip()
        print(f"(system message: {conversation.system!r})" if conversation.system else "(no system message)")
    elif name == "/temperature":
        try:
            value = float(argument)
        except ValueError:
            print(f"error: /temperature {argument!r} is not a number; e.g. /temperature 0.7 (0: greedy)")
            return True
        try:
            generate.Sampling(value, sampling.top_k, sampling.top_p).validate()
        except UserError as err:
            print(f"error: {err}")
            return True
        sampling.temperature = value
        print(f"(temperature {value:g})")
    else:
        print(HELP)
    return True


def chat_loop(chat_model: ChatModel, conversation: Conversation, sampling: generate.Sampling, max_new_tokens: int,
              generator: torch.Generator) -> None:
    print(f"chatting with {chat_model.name}; {HELP}")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops an answer; /exit or Ctrl-D leaves)")
            continue
        if line.startswith("/"):
            if not command(line, conversation, sampling):
                return
        elif line.strip():
            try:
                answer(chat_model, conversation, line, sampling, max_new_tokens, generator)
            except UserError as err:  # one message too long should not end the chat
                print(f"error: {err}")


def main(argv: list[str] | None = None) -> None:
    parsed = parse_args(sys.argv[1:] if argv is None else argv, extra=OPTIONS, reads=CONFIG_FIELDS_USED)
    options, train = parsed.options, parsed.config.train
    sampling = generate.Sampling(options["temperature"], options["top_k"], options["top_p"]).validate()
    if options["max_new_tokens"] < 0:
        raise UserError(f"max_new_tokens={options['max_new_tokens']} must be 1 or more (0: a third of the context)")
    chat_model = load_chat_model(options["ckpt"], options["run"], train.device, train.dtype,
                                 "dtype" in parsed.overridden, train.fast_kernels,
                                 say=lambda line: print(line, file=sys.stderr))
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    # Ctrl-C must stop an answer even when whatever started us ignored SIGINT (`nohup`, a script's `cmd &`): an
    # ignored SIGINT is inherited, and Python then never turns it into KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    generator = torch.Generator(chat_model.device).manual_seed(train.seed)
    chat_loop(chat_model, Conversation(system=options["system"]), sampling, options["max_new_tokens"], generator)


if __name__ == "__main__":
    run_cli(main)
