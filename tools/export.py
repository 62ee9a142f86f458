"""Write a checkpoint as a transformers GPT-2 folder: config.json, model.safetensors and tokenizer_spec.json.

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
    hf_config_dict,
    hf_state_dict,
    pretrained_tokenizer,
)
from gptkit.loading import NOT_LANGUAGE_MODELS, model_from_checkpoint


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint as a transformers GPT-2 folder: config.json, model.safetensors, tokenizer_spec.json."""
    from safetensors.torch import save_file
    payload = load_checkpoint(Path(ckpt_path))
    model, config = model_from_checkpoint(payload)
    tokenizer = payload.get("tokenizer") or dict(GPT2_TOKENIZER)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(hf_state_dict(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        (out / CONFIG_FILE).write_text(json.dumps(hf_config_dict(config.model, tokenizer), indent=2) + "\n")
        (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer) + "\n")
    except OSError as err:
        raise UserError(f"could not write the export to {out}: {err.strerror or err}") from None
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv, extra={"ckpt": "", "run": "", "out": ""})
    if args.overridden:
        raise UserError(f"export takes --ckpt, --run and --out only, not --{sorted(args.overridden)[0]}")
    ckpt = resolve_checkpoint(args.options["ckpt"], args.options["run"], exclude_kinds=NOT_LANGUAGE_MODELS)
    out = Path(args.options["out"] or ckpt.parent / "hf")
    export_checkpoint(ckpt, out)
    tokenizer = pretrained_tokenizer(str(out))
    usage = "GPT2LMHeadModel.from_pretrained(folder)"
    if tokenizer["name"] == "gpt2":
        usage += ", tokenizer AutoTokenizer.from_pretrained('gpt2')"
    print(f"exported {ckpt} to {out}/ ({CONFIG_FILE}, {WEIGHTS_FILE}, {TOKENIZER_FILE}); load with {usage}")


if __name__ == "__main__":
    run_cli(main)
