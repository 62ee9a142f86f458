"""Prompt styles and chat templates: how an instruction entry, or a whole conversation, becomes what a model reads.

instruct.py trains in a style and records it, with the chat template, in the checkpoint; generate.py formats
`--instruction` the same way, and chat.py and serve.py render a conversation with the recorded template. (litgpt
keeps its templates the same way, in `litgpt/prompts.py`.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from config import ConfigError, UserError

PROMPT_STYLES = ("alpaca", "chat")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message, sent by current clients


def format_prompt(style: str, instruction: str, input_text: str = "") -> str:
    """The prompt for one entry, up to where the response begins.

    alpaca: the book's (Stanford Alpaca's) template, with an "### Input:" section only when there is an input.
    chat: a plain two-speaker transcript, closer to what a model pretrained on dialogue text has seen.
    """
    if style == "alpaca":
        text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        if input_text:
            text += f"\n\n### Input:\n{input_text}"
        return text + "\n\n### Response:\n"
    if style == "chat":
        return f"User: {instruction}" + (f"\n{input_text}" if input_text else "") + "\nAssistant: "
    raise ConfigError(f"prompt_style={style!r} is not one of {', '.join(PROMPT_STYLES)}")


def instruction_message(style: str, instruction: str, input_text: str = "") -> str:
    """An entry's instruction and input as one user message: its style's template renders it as format_prompt does."""
    if not input_text:
        return instruction
    return instruction + (f"\n\n### Input:\n{input_text}" if style == "alpaca" else f"\n{input_text}")


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation as text: each message in its role's frame ({content} marks where its text goes), and each
    assistant reply closed by one end-of-turn token, the token the sampler stops on.

    The markers are plain text ("User: "), which any tokenizer can spell; the end of a turn is a special token
    (GPT-2's <|endoftext|>) that text typed by a user cannot forge, because text is encoded as ordinary text. A
    one-message conversation renders exactly as format_prompt(style, message), so a model tuned on instruction
    entries chats in the style it learned.
    """

    style: str
    system: str
    user: str
    assistant: str  # what comes before a reply; a reply is generated from here to the end-of-turn token
    end_of_turn: int  # a token id

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> ChatTemplate:
        return cls(**{key: record[key] for key in ("style", "system", "user", "assistant", "end_of_turn")})


def chat_template(style: str, end_of_turn: int) -> ChatTemplate:
    """The template of a prompt style: alpaca repeats the book's frame for every user turn; chat is a transcript."""
    if style == "alpaca":
        return ChatTemplate(style, "{content}\n\n", format_prompt("alpaca", "{content}"), "", end_of_turn)
    if style == "chat":
        return ChatTemplate(style, "System: {content}\n", "User: {content}\n", "Assistant: ", end_of_turn)
    raise ConfigError(f"prompt_style={style!r} is not one of {', '.join(PROMPT_STYLES)}")


def recorded_template(instruct_record: dict, end_of_turn: int) -> ChatTemplate:
    """The chat template a checkpoint holds; one tuned before templates were recorded gets its style's."""
    if instruct_record.get("chat_template"):
        return ChatTemplate.from_dict(instruct_record["chat_template"])
    return chat_template(instruct_record["prompt_style"], end_of_turn)


def check_messages(messages: object, where: str = "messages") -> list[dict]:
    """[{"role": "system"|"user"|"assistant", "content": str}, ...] as plain dicts, or a UserError naming the place.
    A content given as OpenAI's list of parts ([{"type": "text", "text": ...}]) is joined into one string."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where} must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}[{index}] is not an object; give {{\"role\": \"user\", \"content\": \"...\"}}")
        role, content = message.get("role"), message.get("content")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise UserError(f"{where}[{index}].role={role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                             isinstance(p.get("text"), str) for p in content):
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise UserError(f"{where}[{index}].content must be a string (or a list of text parts), not "
                            f"{type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


def encode_conversation(template: ChatTemplate, messages: list[dict], encode: Callable[[str], list[int]],
                        open_reply: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation, and for each id whether it belongs to an assistant reply (its end token included).

    The text between two replies (system and user turns, the assistant's marker) is encoded as one piece and each
    reply as another, at inference as in training, so a reply's first token is the same either way. open_reply
    ends the ids with the assistant's marker: the prompt from which the next reply is generated.
    """
    ids: list[int] = []
    is_reply: list[bool] = []
    context = ""
    for message in messages:
        if message["role"] != "assistant":
            context += getattr(template, message["role"]).replace("{content}", message["content"])
            continue
        context_ids = encode(context + template.assistant)
        reply_ids = encode(message["content"]) + [template.end_of_turn]
        ids += context_ids + reply_ids
        is_reply += [False] * len(context_ids) + [True] * len(reply_ids)
        context = ""
    if open_reply:
        context += template.assistant
    if context:
        context_ids = encode(context)
        ids += context_ids
        is_reply += [False] * len(context_ids)
    return ids, is_reply


def stop_strings(template: ChatTemplate) -> list[str]:
    """The template's turn headers ("### Instruction:", "User:", ...): a reply that writes one has begun the next
    turn itself (a small model at temperature 0 does, over and over, until its token cap), so it ends there."""
    headers = []
    for frame in (template.system, template.user, template.assistant):
        for line in frame.split("\n"):
            header = line.split("{content}")[0].strip()
            if header and header not in headers:
                headers.append(header)
    return headers


@dataclass
class FittedPrompt:
    """What fit_conversation settled: the prompt's ids, how many messages it left out, and the reply's room."""

    ids: list[int]
    dropped: int  # the oldest messages left out to make room
    reply_tokens: int  # the tokens the reply may take: what was asked, or what the context has left
    asked_tokens: int

    @property
    def shortened(self) -> bool:
        return self.reply_tokens < self.asked_tokens


def fit_conversation(template: ChatTemplate, messages: list[dict], encode: Callable[[str], list[int]],
                     block_size: int, reply_tokens: int) -> FittedPrompt:
    """The one rule chat.py, serve.py, generate.py --instruction and instruct.py's answers fit a conversation into
    a model's context by: keep every system message and the newest message, drop the oldest other messages first
    until the prompt leaves `reply_tokens` of the context for the reply; when even the shortest prompt leaves less,
    the reply gets what is left. Only a prompt that leaves no room at all is refused, with its numbers."""
    if reply_tokens < 1:
        raise UserError(f"a reply of {reply_tokens} tokens was asked for; ask for 1 or more")
    kept = list(messages)
    ids = encode_conversation(template, kept, encode, open_reply=True)[0]
    dropped = 0
    while len(ids) + reply_tokens > block_size:
        oldest = next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)
        if oldest is None:
            break
        del kept[oldest]
        dropped += 1
        # a conversation that now opens with a reply to a question it no longer holds: that reply goes too
        while oldest < len(kept) - 1 and kept[oldest]["role"] == "assistant":
            del kept[oldest]
            dropped += 1
        ids = encode_conversation(template, kept, encode, open_reply=True)[0]
    if len(ids) >= block_size:
        raise UserError(f"the newest message makes a prompt of {len(ids)} tokens (with the system message and the "
                        f"chat template), which leaves no room for a reply in this model's context of {block_size} "
                        f"tokens; shorten it by {len(ids) - block_size + 1} tokens or more")
    return FittedPrompt(ids, dropped, min(reply_tokens, block_size - len(ids)), reply_tokens)
