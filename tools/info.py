"""What a config costs, and what this machine has: `make info` and `make check-deps`.

    python -m tools.info --preset=gpt2 --batch_size=8      # parameters, FLOPs per token, training memory estimate
    python -m tools.info --check_deps                      # package versions; GPT-2 tokenizer and WikiText-2 here?
"""

from __future__ import annotations

import sys

from config import Config
from gptkit import runinfo, sources
from gptkit.cli import parse_args, run_cli
from model import count_parameters, flops_per_token

PACKAGES = (*runinfo.PACKAGES, "pytest", "ruff")
OPTIONS = {"check_deps": False}  # print the dependencies' versions and what is available offline, not the config


def training_memory_bytes(config: Config) -> dict[str, float]:
    """A rough estimate of one training process's memory, in bytes, by what holds it.

    Weights, gradients and AdamW's two moments are float32: 16 bytes per parameter. Activations follow
    Korthikanti et al. 2022 (34*C + 5*heads*T bytes per token per layer in 16-bit), doubled for float32.
    The logits and their gradient are batch x context x vocabulary floats each, often the largest single item.
    """
    m, t = config.model, config.train
    tokens = t.batch_size * m.block_size
    half = t.dtype in ("auto", "bfloat16", "float16")
    bytes_per_act = 1 if half else 2
    params = count_parameters(m)
    return {
        "weights, gradients, AdamW state": 16.0 * params,
        "activations": bytes_per_act * tokens * m.n_layer * (34 * m.n_embd + 5 * m.n_head * m.block_size),
        "logits and their gradient": 2 * 4.0 * tokens * m.vocab_size,
    }


def describe_config(config: Config) -> str:
    m, t = config.model, config.train
    params = count_parameters(m)
    memory = training_memory_bytes(config)
    lines = [
        f"preset {config.preset}: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, "
        f"vocabulary {m.vocab_size}",
        f"parameters: {params:,} ({params / 1e6:.1f}M; {m.block_size * m.n_embd:,} in position embeddings)",
        f"training FLOPs per token: {flops_per_token(m) / 1e6:,.1f} M "
        f"({flops_per_token(m) * t.batch_size * m.block_size * t.gradient_accumulation_steps / 1e12:.3f} TFLOP "
        "per optimizer step)",
        f"training memory estimate (batch {t.batch_size} x {m.block_size}, dtype {t.dtype}): "
        f"{sum(memory.values()) / 2**30:.2f} GiB",
    ]
    lines += [f"  {name}: {size / 2**30:.2f} GiB" for name, size in memory.items()]
    return "\n".join(lines)


def check_deps() -> str:
    lines = []
    for name, installed in runinfo.package_versions(PACKAGES).items():
        if name != "python":
            fix = " (run make setup-all)" if installed == runinfo.NOT_INSTALLED else ""
            lines.append(f"{name:>12}: {installed}{fix}")
    try:
        import torch
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
        lines.append(f"{'cuda':>12}: {gpu}")
    except ImportError:
        pass
    lines.append(f"{'gpt2 BPE':>12}: {sources.gpt2_tokenizer_status()}")
    lines.append(f"{'WikiText-2':>12}: {sources.wikitext2_status()}")
    return "\n".join(lines)


def main() -> None:
    parsed = parse_args(sys.argv[1:], extra=OPTIONS,
                        reads=("preset", "model", "batch_size", "gradient_accumulation_steps", "dtype"))
    print(check_deps() if parsed.options["check_deps"] else describe_config(parsed.config))


if __name__ == "__main__":
    run_cli(main)
