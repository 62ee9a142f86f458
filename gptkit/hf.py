"""GPT-2 weights in and out of Hugging Face's layout: the name and shape mapping, OpenAI's GPT-2 from the Hub (or a
local folder), and the config.json transformers reads. gptkit/loading.py loads with it (`--init_from=gpt2|PATH`);
`python -m tools.export` writes a checkpoint out with it: the GPT-2 form as GPT2LMHeadModel, the llama form
(position=rope, norm=rmsnorm, mlp=swiglu, any n_kv_head, bias and tie_embeddings) as LlamaForCausalLM, and GPT-2 with
rotary positions (position=rope, the `tiny` preset's form) as GPTNeoXForCausalLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from config import ModelConfig, UserError, error_summary
from gptkit import bpe, sources
from model import GPT, RMS_NORM_EPS, mlp_hidden_size

# OpenAI's four sizes, under the organisation that now hosts them on the Hub.
OFFICIAL_MODELS = {
    "gpt2": "openai-community/gpt2",  # 124M
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer_spec.json"  # our tokenizer as a checkpoint stores it, so a char model survives export
TOKENIZER_JSON = "tokenizer.json"  # the tokenizer as transformers loads it (AutoTokenizer), with ...
TOKENIZER_CONFIG = "tokenizer_config.json"  # ... its class, special tokens and context length
GPT2_TOKENIZER = {"name": "gpt2"}
GPT2_EOT = 50256  # <|endoftext|> in GPT-2's BPE

# GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear's (out, in).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older transformers versions saved: the causal mask and its fill value. Not weights; our attention is causal.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
HUB_PROBE_TIMEOUT_S = 3.0  # huggingface_hub retries an unreachable host for ~25 s; a probe answers in this time


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({str(err)[:200]}); download it again") from None


def _read_config_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a readable JSON config ({err}); it should be a GPT-2 config.json") from None


def model_config_from_hf(hf_config: dict, dropout: float = 0.0) -> ModelConfig:
    """Our ModelConfig from a GPT-2 config.json; anything our model would compute differently is refused."""
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"config.json has model_type={model_type!r}; only GPT-2 checkpoints (model_type gpt2) load")
    for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if not isinstance(hf_config.get(key), int):
            raise UserError(f"config.json lacks an integer {key!r}; it is not a GPT-2 config")
    n_embd = hf_config["n_embd"]
    # Each entry: (key, GPT-2's default, the values our model computes identically).
    same_math = [
        ("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),  # our MLP: GELU, tanh approximation
        ("n_inner", None, (None, 4 * n_embd)),
        ("layer_norm_epsilon", 1e-5, (1e-5,)),
        ("scale_attn_weights", True, (True,)),
        ("scale_attn_by_inverse_layer_idx", False, (False,)),
        ("tie_word_embeddings", True, (True,)),
        ("add_cross_attention", False, (False,)),
    ]
    for key, default, accepted in same_math:
        value = hf_config.get(key, default)
        if value not in accepted:
            raise UserError(f"config.json has {key}={value!r}; this project's GPT-2 supports only "
                            f"{' or '.join(map(repr, accepted))}")
    block_size = hf_config.get("n_positions", hf_config.get("n_ctx"))
    if not isinstance(block_size, int):
        raise UserError("config.json lacks an integer 'n_positions' (the context length); it is not a GPT-2 config")
    config = ModelConfig(vocab_size=hf_config["vocab_size"], n_layer=hf_config["n_layer"], n_head=hf_config["n_head"],
                         n_embd=n_embd, block_size=block_size, dropout=dropout, bias=True)
    config.validate()
    return config


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' GPT2LMHeadModel names, Conv1D weights transposed, the tied LM head left out.

    Every tensor is a fresh contiguous copy: safetensors refuses tensors that share memory. A model without
    biases gets zero biases, which computes the same thing in GPT-2's always-biased layers.
    """
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # tied to transformer.wte.weight; transformers re-ties it on load (tie_word_embeddings)
        tensor = tensor.detach().to("cpu", torch.float32)
        tensors[name] = (tensor.t() if name.endswith(TRANSPOSED) else tensor).contiguous().clone()
    if not model.config.bias:
        for name in list(tensors):
            if name.endswith(".weight") and not name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
                out_features = tensors[name].shape[-1] if name.endswith(TRANSPOSED) else tensors[name].shape[0]
                tensors[name[: -len("weight")] + "bias"] = torch.zeros(out_features)
    return tensors


def state_dict_from_hf(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Map a GPT-2 safetensors file onto our parameter names, checking every name and shape against `config`."""
    renamed = {}
    for name, tensor in tensors.items():
        # The Hub's original files name tensors `h.0...`; transformers' save_pretrained writes `transformer.h.0...`.
        short = name.removeprefix("transformer.")
        if short.endswith(IGNORED_SUFFIXES):
            continue
        renamed[short] = tensor

    lm_head = renamed.pop("lm_head.weight", None)
    expected = {name.removeprefix("transformer."): tuple(t.shape)
                for name, t in GPT(config).state_dict().items() if name != "lm_head.weight"}
    wte = renamed.get("wte.weight")
    if wte is not None and wte.dim() == 2 and wte.shape[0] != config.vocab_size:
        raise UserError(f"vocabulary mismatch in {source}: config.json says vocab_size={config.vocab_size} but "
                        f"wte.weight holds {wte.shape[0]} token embeddings; the folder's files do not belong together")
    state = {}
    for short, shape in expected.items():
        if short not in renamed:
            raise UserError(f"{source} has no tensor {short} (expected shape {shape}); the file is incomplete or "
                            "not a GPT-2 model with this config.json")
        tensor = renamed.pop(short)
        hf_shape = shape[::-1] if short.endswith(TRANSPOSED) else shape
        if tuple(tensor.shape) != hf_shape:
            raise UserError(f"tensor {short} in {source} has shape {tuple(tensor.shape)}, but config.json implies "
                            f"{hf_shape}; the weights and config.json do not belong together")
        tensor = tensor.to(torch.float32)
        state["transformer." + short] = tensor.t().contiguous() if short.endswith(TRANSPOSED) else tensor
    if renamed:
        extra = sorted(renamed)
        raise UserError(f"{source} holds tensors this GPT-2 config has no place for: {', '.join(extra[:3])}"
                        f"{' ...' if len(extra) > 3 else ''}; check n_layer in config.json")
    if lm_head is not None and not torch.equal(lm_head.to(torch.float32), state["transformer.wte.weight"]):
        raise UserError(f"{source} has an lm_head.weight that differs from wte.weight; this project's GPT ties them")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def download_official(name: str) -> Path:
    """The folder holding config.json and model.safetensors of an official GPT-2, from the local cache or the Hub."""
    from huggingface_hub import constants, hf_hub_download
    repo = OFFICIAL_MODELS[name]
    files = (CONFIG_FILE, WEIGHTS_FILE)
    try:  # both files already in the local cache: no network at all
        return [Path(hf_hub_download(repo, f, local_files_only=True)) for f in files][1].parent
    except Exception:  # huggingface_hub raises several types for "not in the cache"
        pass
    hint = (f"pass a local folder holding {' and '.join(files)} instead: --init_from=PATH (on a machine with a "
            f"network: hf download {repo} {' '.join(files)} --local-dir PATH)")
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = sources.unreachable_reason(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S)
    if reason:
        raise UserError(f"cannot download {name} from the Hugging Face Hub ({reason}); {hint}")
    try:
        paths = [Path(hf_hub_download(repo, f, etag_timeout=HUB_PROBE_TIMEOUT_S)) for f in files]
    except Exception as err:  # network, HTTP and disk errors all end the same way for the user
        raise UserError(f"downloading {name} from the Hugging Face Hub failed ({error_summary(err)}); {hint}") \
            from None
    return paths[1].parent


def pretrained_folder(name_or_path: str) -> Path:
    """An official name resolved through the Hub (or its cache), else a local folder with the GPT-2 layout."""
    if name_or_path in OFFICIAL_MODELS:
        return download_official(name_or_path)
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise UserError(f"--init_from={name_or_path} is neither {', '.join(OFFICIAL_MODELS)} nor a folder; "
                        f"give a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{folder} has no {name}; a pretrained folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                            "(transformers' save_pretrained or `make export` write both)")
    return folder


def load_pretrained(name_or_path: str, dropout: float = 0.0, vocab_size: int | None = None) -> tuple[GPT, ModelConfig]:
    """GPT-2 weights from the Hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local folder, as our GPT.

    Sizes and context come from config.json; only dropout is ours to choose. `vocab_size`, when given, is the
    data's tokenizer size: a model with another vocabulary is refused rather than fed ids it never learned.
    """
    folder = pretrained_folder(name_or_path)
    config = model_config_from_hf(_read_config_json(folder / CONFIG_FILE), dropout)
    if vocab_size is not None and vocab_size != config.vocab_size:
        tokenizer = pretrained_tokenizer(name_or_path)["name"]
        raise UserError(f"vocabulary mismatch: {name_or_path} has vocab_size={config.vocab_size} but the data's "
                        f"tokenizer has {vocab_size} tokens; use --tokenizer={tokenizer} for this model")
    state = state_dict_from_hf(_load_safetensors(folder / WEIGHTS_FILE), config, str(folder / WEIGHTS_FILE))
    model = GPT(config)
    model.load_state_dict(state)
    return model, config


def pretrained_tokenizer(name_or_path: str) -> dict:
    """The tokenizer spec (as checkpoints store it) for a pretrained model: GPT-2's BPE unless our export says else."""
    spec_file = Path(name_or_path) / TOKENIZER_FILE
    if name_or_path not in OFFICIAL_MODELS and spec_file.is_file():
        return _read_config_json(spec_file)
    return dict(GPT2_TOKENIZER)


def _common_config_entries(config: ModelConfig, tokenizer: dict) -> dict:
    """The config.json entries every exported form shares: tied embeddings, the end-of-text token, the tokenizer."""
    is_gpt2_bpe = tokenizer.get("name") == "gpt2" and config.vocab_size > GPT2_EOT  # a GPT-2 BPE vocabulary
    eot = eot_token_id(tokenizer, config.vocab_size)
    return {
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tokenizer_class": "GPT2TokenizerFast" if is_gpt2_bpe else None,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def hf_config_dict(config: ModelConfig, tokenizer: dict) -> dict:
    """A config.json that transformers reads as GPT2LMHeadModel with the same sizes and math as ours."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation, as in our MLP
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        **_common_config_entries(config, tokenizer),
    }


# The forms a transformers class computes exactly: the switches each needs (n_kv_head: the key/value heads).
EXPORT_FORMS = {
    "GPT2LMHeadModel": lambda config: dict(position="learned", norm="layernorm", mlp="gelu", n_kv_head=config.n_head),
    "LlamaForCausalLM": lambda config: dict(position="rope", norm="rmsnorm", mlp="swiglu"),
    "GPTNeoXForCausalLM": lambda config: dict(position="rope", norm="layernorm", mlp="gelu", n_kv_head=config.n_head),
}


def export_architecture(config: ModelConfig, kind: str = "transformers class", names: dict[str, str] | None = None,
                        action: str = "export it") -> str:
    """The transformers class that computes what this model computes; for a mix none computes (e.g. RoPE with
    RMSNorm and GELU), a one-line UserError naming the switches to train with instead. Biases and tying fit all.
    gguf.py asks the same question of llama.cpp: `kind`, `names` (class -> its name there) and `action` word it."""
    switches = dict(position=config.position, norm=config.norm, mlp=config.mlp, n_kv_head=config.kv_heads)
    changes = {name: [f"--{key}={value}" for key, value in form(config).items() if switches[key] != value]
               for name, form in EXPORT_FORMS.items()}
    for name, needed in changes.items():
        if not needed:
            return name
    options = sorted(changes.items(), key=lambda item: len(item[1]))
    have = ", ".join(f"{key}={value}" for key, value in switches.items())
    label = names or {}
    raise UserError(f"no {kind} computes this mix of switches ({have}); train with "
                    + " or with ".join(f"{' '.join(needed)} ({label.get(name, name)})" for name, needed in options)
                    + f" to {action}")


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' LlamaForCausalLM names: c_attn split into q_proj, k_proj, v_proj, the SwiGLU
    c_fc into gate_proj and up_proj (in that order, as model.py's MLP chunks it), the tied LM head left out.

    Both use the same RoPE (channel i paired with i + hs/2, "rotate_half"), so no weight needs permuting.
    """
    config = model.config
    C, kv_size, hidden = config.n_embd, config.kv_heads * (config.n_embd // config.n_head), mlp_hidden_size(config)
    ours = {name: t.detach().to("cpu", torch.float32) for name, t in model.state_dict().items()}
    tensors = {"model.embed_tokens.weight": ours["transformer.wte.weight"],
               "model.norm.weight": ours["transformer.ln_f.weight"]}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = ours["lm_head.weight"]
    for layer in range(config.n_layer):
        h, out = f"transformer.h.{layer}.", f"model.layers.{layer}."
        tensors[out + "input_layernorm.weight"] = ours[h + "ln_1.weight"]
        tensors[out + "post_attention_layernorm.weight"] = ours[h + "ln_2.weight"]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = ours[h + "attn.c_attn." + kind].split((C, kv_size, kv_size))
            gate, up = ours[h + "mlp.c_fc." + kind].split((hidden, hidden))
            tensors.update({out + "self_attn.q_proj." + kind: q, out + "self_attn.k_proj." + kind: k,
                            out + "self_attn.v_proj." + kind: v,
                            out + "self_attn.o_proj." + kind: ours[h + "attn.c_proj." + kind],
                            out + "mlp.gate_proj." + kind: gate, out + "mlp.up_proj." + kind: up,
                            out + "mlp.down_proj." + kind: ours[h + "mlp.c_proj." + kind]})
    return {name: t.contiguous().clone() for name, t in tensors.items()}  # safetensors refuses shared memory


def llama_config_dict(config: ModelConfig, tokenizer: dict) -> dict:
    """A config.json that transformers reads as LlamaForCausalLM with the same sizes and math as ours."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": mlp_hidden_size(config),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.n_embd // config.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "initializer_range": 0.02,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": config.rope_theta,  # older transformers read this key, 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,  # Llama has no residual dropout; equal in eval mode either way
        **_common_config_entries(config, tokenizer),
    }


def neox_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' GPTNeoXForCausalLM names: GPT-2's blocks with rotary positions. GPT-NeoX fuses
    q, k and v per head ([q, k, v] of head 0, then of head 1, ...) where c_attn holds all of q, then k, then v; its
    MLP and LayerNorms always have biases (zeros for a model without). Same RoPE as ours ("rotate_half")."""
    config = model.config
    C, heads, head_size = config.n_embd, config.n_head, config.n_embd // config.n_head
    ours = {name: t.detach().to("cpu", torch.float32) for name, t in model.state_dict().items()}

    def with_bias(h: str, out: str, theirs: str) -> dict[str, torch.Tensor]:
        weight = ours[h + ".weight"]
        bias = ours.get(h + ".bias", torch.zeros(weight.shape[0]))
        return {f"{out}{theirs}.weight": weight, f"{out}{theirs}.bias": bias}

    tensors = {"gpt_neox.embed_in.weight": ours["transformer.wte.weight"],
               **with_bias("transformer.ln_f", "gpt_neox.", "final_layer_norm")}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = ours["lm_head.weight"]
    for layer in range(config.n_layer):
        h, out = f"transformer.h.{layer}.", f"gpt_neox.layers.{layer}."
        tensors.update(with_bias(h + "ln_1", out, "input_layernorm"))
        tensors.update(with_bias(h + "ln_2", out, "post_attention_layernorm"))
        tensors.update(with_bias(h + "mlp.c_fc", out, "mlp.dense_h_to_4h"))
        tensors.update(with_bias(h + "mlp.c_proj", out, "mlp.dense_4h_to_h"))
        tensors.update(with_bias(h + "attn.c_proj", out, "attention.dense"))
        qkv = with_bias(h + "attn.c_attn", out, "attention.query_key_value")
        for name, tensor in qkv.items():  # (3, heads, hs, ...) -> (heads, 3, hs, ...): each head's q, k, v together
            tensors[name] = tensor.reshape(3, heads, head_size, -1).transpose(0, 1).reshape(3 * C, -1).squeeze(-1)
    return {name: t.contiguous().clone() for name, t in tensors.items()}  # safetensors refuses shared memory


def neox_config_dict(config: ModelConfig, tokenizer: dict) -> dict:
    """A config.json that transformers reads as GPTNeoXForCausalLM with the same sizes and math as ours: one residual
    after the other (GPT-2's order, not NeoX's parallel one), rotary on every channel of a head."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": mlp_hidden_size(config),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "hidden_act": "gelu_new",  # the tanh approximation, as in our MLP
        "max_position_embeddings": config.block_size,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": False,
        "rotary_pct": 1.0,  # older transformers read these two keys, 5.x reads rope_parameters
        "rotary_emb_base": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 1.0},
        "attention_bias": config.bias,
        "attention_dropout": config.dropout,
        "hidden_dropout": config.dropout,
        **_common_config_entries(config, tokenizer),
    }


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer of an exported folder, for AutoTokenizer.from_pretrained(folder) without the Hub


def eot_token_id(tokenizer: dict, vocab_size: int) -> int | None:
    """<|endoftext|>'s id in the model's tokenizer (None for char, or a GPT-2 vocabulary the model does not hold)."""
    name = str(tokenizer.get("name"))
    if name == "gpt2":
        return GPT2_EOT if vocab_size > GPT2_EOT else None
    if name.startswith("bpe:"):
        return bpe.vocabulary(bpe.checked_json(tokenizer))[1].get(bpe.EOT)
    return None


def char_tokenizer_json(chars: str) -> str:
    """The char tokenizer in `tokenizers`' terms: a BPE with one token per character and no merges, whose decoder
    joins tokens without spaces. A character outside the vocabulary is dropped there (our CharTokenizer refuses it)."""
    from tokenizers import Tokenizer, decoders, models

    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, []))
    tokenizer.decoder = decoders.Fuse()
    return tokenizer.to_str()


def write_tokenizer_files(folder: Path, tokenizer: dict, config: ModelConfig) -> str:
    """tokenizer.json and tokenizer_config.json for the model's own tokenizer (gpt2, bpe:N or char), so that
    AutoTokenizer.from_pretrained(folder) and pipeline("text-generation", model=folder) work offline. GPT-2's comes
    from the ranks tiktoken uses (sources.py fetches them offline). Returns what it wrote, or why nothing."""
    name = str(tokenizer.get("name"))
    if name == "gpt2" and config.vocab_size <= GPT2_EOT:
        return (f"no {TOKENIZER_JSON}: the model's {config.vocab_size} token ids cannot hold GPT-2's vocabulary of "
                f"{GPT2_EOT + 1}")
    if name == "gpt2":
        tokenizer_json = bpe.json_from_ranks(sources.gpt2_ranks(), {bpe.EOT: GPT2_EOT})
    elif name == "char":
        tokenizer_json = char_tokenizer_json(tokenizer["chars"])
    else:
        tokenizer_json = bpe.checked_json(tokenizer)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
                "add_prefix_space": False, "clean_up_tokenization_spaces": False}  # decode gives the text back
    if eot_token_id(tokenizer, config.vocab_size) is not None:  # as GPT-2's: <|endoftext|> starts, ends and pads
        settings.update(bos_token=bpe.EOT, eos_token=bpe.EOT, unk_token=bpe.EOT)
    (Path(folder) / TOKENIZER_JSON).write_text(tokenizer_json, encoding="utf-8")
    (Path(folder) / TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return f"{TOKENIZER_JSON} and {TOKENIZER_CONFIG} ({name}): AutoTokenizer.from_pretrained(folder) loads them offline"
