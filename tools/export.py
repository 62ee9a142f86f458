"""Write a checkpoint as a transformers folder: config.json, model.safetensors, tokenizer_spec.json, and the model's
own tokenizer as tokenizer.json + tokenizer_config.json (AutoTokenizer.from_pretrained(folder), offline). The GPT-2
form loads as GPT2LMHeadModel, the llama form (--arch=llama) as LlamaForCausalLM, GPT-2 with RoPE (the `tiny`
preset's form) as GPTNeoXForCausalLM; a mix no transformers class computes is refused.

    python -m tools.export --ckpt=checkpoints/RUN/best.pt --out=DIR      # or make export CKPT=... OUT=...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from config import UserError
from gptkit.checkpoint import load_checkpoint, resolve_checkpoint
from gptkit.cli import parse_args, run_cli
from gptkit.hf import (
    CONFIG_FILE,
    GPT2_TOKENIZER,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    export_architecture,
    hf_config_dict,
    hf_state_dict,
    llama_config_dict,
    llama_state_dict,
    neox_config_dict,
    neox_state_dict,
    pretrained_tokenizer,
    write_tokenizer_files,
)
from gptkit.loading import NOT_LANGUAGE_MODELS, model_from_checkpoint

OPTIONS = {
    "ckpt": "",  # a checkpoint file or run folder; default: the best checkpoint of the most recent run
    "run": "",  # a run name under checkpoints/
    "out": "",  # the folder to write; default: hf/ beside the checkpoint
}

# Each transformers class export_architecture can name: our weights under its names, and its config.json.
EXPORTERS = {
    "GPT2LMHeadModel": (hf_state_dict, hf_config_dict),
    "LlamaForCausalLM": (llama_state_dict, llama_config_dict),
    "GPTNeoXForCausalLM": (neox_state_dict, neox_config_dict),
}


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint as a transformers folder (GPT2LMHeadModel, LlamaForCausalLM or GPTNeoXForCausalLM):
    config.json, model.safetensors, tokenizer_spec.json and the tokenizer's own files."""
    from safetensors.torch import save_file
    payload = load_checkpoint(Path(ckpt_path))
    model, config = model_from_checkpoint(payload)
    tokenizer = payload.get("tokenizer") or dict(GPT2_TOKENIZER)
    state_dict_for, config_dict_for = EXPORTERS[export_architecture(config.model)]  # refuses a mix no class computes
    tensors, hf_config = state_dict_for(model), config_dict_for(config.model, tokenizer)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer) + "\n")
        print(f"tokenizer: {write_tokenizer_files(out, tokenizer, config.model)}")
    except OSError as err:
        raise UserError(f"could not write the export to {out}: {err.strerror or err}") from None
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv, extra=OPTIONS, reads=())  # the config is the checkpoint's
    ckpt = resolve_checkpoint(args.options["ckpt"], args.options["run"], exclude_kinds=NOT_LANGUAGE_MODELS)
    out = Path(args.options["out"] or ckpt.parent / "hf")
    export_checkpoint(ckpt, out)
    tokenizer = pretrained_tokenizer(str(out))
    architecture = json.loads((out / CONFIG_FILE).read_text())["architectures"][0]
    usage = f"{architecture}.from_pretrained(folder) and AutoTokenizer.from_pretrained(folder)"
    print(f"exported {ckpt} ({tokenizer['name']} tokenizer) to {out}/; load with {usage}")


if __name__ == "__main__":
    run_cli(main)
