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
    "temperature": 0.7,  # 0 means greedy: always the most likely token; /temperature X changes it
    "top_k": 200,  # keep the k most likely tokens; k >= vocabulary size keeps them all
    "top_p": 1.0,  # nucleus sampling: keep the smallest set of tokens whose probability reaches p
    "max_new_tokens": 200,  # the longest answer, in tokens
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
    """The most recent instruct.py run: instruction- and chat-tuned runs alike."""
    try:
        return str(checkpoint.latest_run(kinds=("instruct",)))
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
    return ChatModel(model, tokenizer, template, Path(loaded.source).parent.name, device)


class StopReply(Exception):
    """Raised by a token callback to end a reply early: a stop string was written, or nobody is listening."""


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


def fit_to_context(chat_model: ChatModel, conversation: Conversation, room: int) -> tuple[list[int], int]:
    """The prompt for the conversation's next reply, leaving `room` tokens of the context for it: the oldest turns
    (a question and its answer) are dropped from the conversation until it fits. Returns the ids and how many
    messages were dropped; a last message that alone does not fit is a UserError."""
    limit = chat_model.block_size - room
    alone = chat_model.prompt_ids(Conversation(conversation.system, conversation.turns[-1:]).messages())
    if len(alone) > limit:  # refused before any old turn is dropped for it
        conversation.turns.pop()
        raise UserError(f"that message makes a prompt of {len(alone)} tokens (with the system message and the "
                        f"template), more than the {limit} this model's context of {chat_model.block_size} leaves "
                        "for it; say it in fewer words")
    dropped = 0
    ids = chat_model.prompt_ids(conversation.messages())
    while len(ids) > limit:
        del conversation.turns[:2]  # the oldest question and its answer
        dropped += 2
        ids = chat_model.prompt_ids(conversation.messages())
    return ids, dropped


def answer(chat_model: ChatModel, conversation: Conversation, text: str, sampling: generate.Sampling,
           max_new_tokens: int, generator: torch.Generator) -> None:
    """Add the user's message, stream the reply to stdout and keep it; Ctrl-C stops the reply, which keeps what was
    written so far."""
    conversation.turns.append({"role": "user", "content": text})
    room = min(max_new_tokens, chat_model.block_size // 2)
    ids, dropped = fit_to_context(chat_model, conversation, room)
    if dropped and not conversation.trimmed_said:
        conversation.trimmed_said = True
        print(f"(the conversation no longer fits the model's context of {chat_model.block_size} tokens: the oldest "
              "turns are left out from now on; /reset starts over)", file=sys.stderr)
    stream = generate.TextStream(chat_model.tokenizer, stop_token=None)
    said: list[int] = []

    def show(token: int) -> None:
        said.append(token)
        stream([token])

    stopped = False
    try:
        reply(chat_model, ids, sampling, max_new_tokens, generator, show)
    except KeyboardInterrupt:
        stopped = True
    stream.flush()
    if stopped:
        print("(stopped)", file=sys.stderr)
    conversation.turns.append({"role": "assistant", "content": chat_model.tokenizer.decode(said)})


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
    if options["max_new_tokens"] < 1:
        raise UserError(f"max_new_tokens={options['max_new_tokens']} must be 1 or more")
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
