"""Prompt styles: how one instruction entry becomes the text a model reads, up to where its response begins.

instruct.py trains in a style and records its name in the checkpoint; generate.py reads that record and formats
`--instruction` the same way. (litgpt keeps its templates the same way, in `litgpt/prompts.py`.)
"""

from __future__ import annotations

from config import ConfigError

PROMPT_STYLES = ("alpaca", "chat")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")


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
