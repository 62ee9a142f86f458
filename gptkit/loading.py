"""Where a model comes from: OpenAI's GPT-2 or a Hugging Face folder (`--init_from=gpt2|PATH`), or one of our
checkpoints (`--ckpt=PATH`, `--run=NAME`, or the latest language-model run). generate.py, train.py --init_from, the
fine-tuning start (gptkit/finetune.py) and the tools load through `load_model`; checkpoint.py only reads and writes
the files.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import lora
from config import Config, ModelConfig, UserError
from gptkit import hf
from gptkit.checkpoint import load_checkpoint, resolve_checkpoint, strip_wrapper_prefixes
from model import GPT


def model_from_checkpoint(payload: dict) -> tuple[GPT, Config]:
    """Rebuild the model a checkpoint was trained with and load its weights; a mismatch is a UserError. Weights
    saved with LoRA adapters (instruct.py --lora_rank) come back merged: a plain GPT."""
    config = Config.from_dict(payload["config"])
    model = GPT(config.model)
    adapters = (payload.get("instruct") or {}).get("lora_rank", 0)
    if adapters:
        lora.add_lora(model, adapters, payload["instruct"]["lora_alpha"])
    state = strip_wrapper_prefixes(payload["model"])
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        detail = (missing and f"missing {missing[:3]}") or (unexpected and f"unexpected {unexpected[:3]}") or \
            f"shape of {wrong_shape[0]} is {tuple(state[wrong_shape[0]].shape)}, expected " \
            f"{tuple(expected[wrong_shape[0]].shape)}"
        raise UserError(f"checkpoint weights do not match its config ({detail}); the file was written by another "
                        "architecture or is damaged")
    model.load_state_dict(state)
    if adapters:
        lora.merge_lora(model).requires_grad_(True)
    return model, config

# Run kinds (manifest.json's "kind") whose checkpoints hold no language model: a classifier's head scores classes.
NOT_LANGUAGE_MODELS = ("classifier",)


@dataclass
class LoadedModel:
    """A model ready to use (on the CPU, float32), where it came from, and what it was trained with."""

    model: GPT
    tokenizer: dict  # {"name": "gpt2"} or {"name": "char", "chars": ...}, as checkpoints store it
    source: str  # the checkpoint's path, or the pretrained name or folder
    saved_config: Config | None = None  # a checkpoint's whole config; None for pretrained weights
    trained_on: str | None = None  # the data set's name at training time, when the checkpoint recorded it
    instruct: dict | None = None  # instruct.py's record (its prompt style), for an instruction-tuned model

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config


def load_model(init_from: str = "scratch", ckpt: str = "", run: str = "", dropout: float = 0.0) -> LoadedModel:
    """The one place that decides where a model comes from: OpenAI's GPT-2 or a Hugging Face folder
    (--init_from=gpt2|PATH), else a checkpoint (--ckpt=PATH, --run=NAME, or the latest run's best)."""
    if init_from != "scratch":
        model, _ = hf.load_pretrained(init_from, dropout=dropout)
        return LoadedModel(model, hf.pretrained_tokenizer(init_from), init_from)
    path = resolve_checkpoint(ckpt=ckpt, run=run, exclude_kinds=NOT_LANGUAGE_MODELS)
    if not ckpt and not run:
        print(f"model: {path}, of the latest language-model run (--ckpt= or --run= for another)", file=sys.stderr)
    payload = load_checkpoint(path)
    if payload.get("classifier"):
        raise UserError(f"{path} is a classifier, not a language model; use it with python classify.py "
                        f"--ckpt={path} --predict=\"...\"")
    for key in ("config", "model"):
        if key not in payload:
            raise UserError(f"{path} has no '{key}' entry; it was not written by train.py or is damaged")
    model, config = model_from_checkpoint(payload)
    tokenizer = payload.get("tokenizer") or {"name": config.data.tokenizer}
    return LoadedModel(model, tokenizer, str(path), config, (payload.get("dataset") or {}).get("name"),
                       payload.get("instruct"))


def check_overrides(pretrained: ModelConfig, requested: ModelConfig, overridden: frozenset[str]) -> None:
    """Refuse command-line model sizes or architecture switches that contradict loaded weights (pretrained or a
    checkpoint); dropout is free."""
    def value(config: ModelConfig, name: str):
        return config.kv_heads if name == "n_kv_head" else getattr(config, name)  # n_kv_head=0 means n_head
    form = ("position", "norm", "mlp", "n_kv_head", "bias")
    if "arch" in overridden and any(value(requested, name) != value(pretrained, name) for name in form):
        weights = "GPT-2's weights are the GPT-2 form" if pretrained.arch == "gpt2" else \
            f"the loaded weights are the {pretrained.arch} form"
        switches = [f"{name}={value(pretrained, name)}" for name in form]
        if pretrained.kv_heads == pretrained.n_head:
            switches[form.index("n_kv_head")] = "n_kv_head=n_head"
        raise UserError(f"--arch={requested.arch} contradicts the weights being loaded: {weights} "
                        f"({', '.join(switches)}); drop --arch, or train that form from scratch")
    for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "bias", "position", "rope_theta", "norm",
                 "mlp", "n_kv_head", "tie_embeddings"):
        if name in overridden and value(requested, name) != value(pretrained, name):
            raise UserError(f"--{name}={getattr(requested, name)} contradicts the loaded model's "
                            f"{name}={value(pretrained, name)}; drop the option (sizes and switches come from the "
                            "weights)")


def check_pretrained_form(requested: ModelConfig, overridden: frozenset[str]) -> None:
    """Before loading --init_from=gpt2|PATH (perhaps a download): those weights are the GPT-2 form, the only one hf.py
    imports, so --arch=llama or a switch that contradicts that form is refused at once."""
    gpt2_form = dataclasses.replace(requested, arch="gpt2", tie_embeddings=True).apply_arch()
    check_overrides(gpt2_form, requested, overridden)
