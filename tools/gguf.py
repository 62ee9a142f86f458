"""Write a checkpoint as a GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it
(gptkit/gguf.py does the work; docs/gguf.md shows how to run the file).

    python -m tools.gguf --ckpt=checkpoints/RUN/best.pt --out=model.gguf [--dtype=f32|f16|q8_0] [--compare=PROMPT]
    make gguf OUT=model.gguf                                   # the latest run; CKPT=... or RUN=... for another
"""

from __future__ import annotations

import sys
from pathlib import Path

import data
from config import UserError
from gptkit import gguf
from gptkit.checkpoint import load_checkpoint, resolve_checkpoint
from gptkit.cli import parse_args, run_cli
from gptkit.loading import NOT_LANGUAGE_MODELS, model_from_checkpoint

OPTIONS = {
    "ckpt": "",  # a checkpoint file or run folder; default: the best checkpoint of the most recent run
    "run": "",  # a run name under checkpoints/
    "out": "",  # the .gguf file to write; default: model-DTYPE.gguf beside the checkpoint
    "dtype": "f32",  # f32, f16 (half the size) or q8_0 (about a quarter; every matrix row a multiple of 32)
    "compare": "",  # a prompt: run the file in llama.cpp (llama-cpp-python) and print how close it is to ours
}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv, extra=OPTIONS, reads=())  # the config is the checkpoint's
    dtype = args.options["dtype"]
    gguf.check_dtype(dtype, {})  # an unknown --dtype is refused before the checkpoint is read
    ckpt = resolve_checkpoint(args.options["ckpt"], args.options["run"], exclude_kinds=NOT_LANGUAGE_MODELS)
    payload = load_checkpoint(ckpt)
    if payload.get("classifier"):
        raise UserError(f"{ckpt} is a classifier, not a language model; llama.cpp runs language models")
    model, config = model_from_checkpoint(payload)
    out = Path(args.options["out"] or ckpt.parent / f"model-{dtype}.gguf")
    written = gguf.write_gguf(payload, model, config, out, dtype, name=ckpt.parent.name)
    size = written["path"].stat().st_size
    chat = "with its chat template" if written["chat_template"] else "no chat template (not a chat-tuned run)"
    print(f"wrote {out} ({written['architecture']}, {dtype}, {size / 1e6:.1f} MB, {chat}) and "
          f"{written['modelfile']}")
    # llama-cli chats; a plain language model continues text with llama-completion (README, docs/gguf.md).
    llama_cpp_line = f"llama-cli -m {out}" if written["chat_template"] else f'llama-completion -m {out} -p "ROMEO:"'
    print(f"run it: {llama_cpp_line}   or   ollama create mymodel -f {written['modelfile']} && ollama run mymodel")
    if args.options["compare"]:
        prompt_ids = data.get_tokenizer(payload.get("tokenizer") or {"name": "gpt2"}).encode(args.options["compare"])
        found = gguf.compare_with_llama_cpp(out, model.eval(), prompt_ids)
        print(f"llama.cpp beside ours: logits differ by at most {found['max_logit_difference']:.4f} over "
              f"{found['positions']} positions (largest |logit| {found['largest_logit']:.1f}); greedy: "
              f"{found['greedy_agree']} of {found['greedy_tokens']} tokens the same before the first difference")
        written["compare"] = found
    return written


if __name__ == "__main__":
    run_cli(main)
