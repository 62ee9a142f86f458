"""A checkpoint as one GGUF file, the format llama.cpp, Ollama and LM Studio read, written with the `gguf` package
(the one llama.cpp's own converter uses): the weights under llama.cpp's tensor names, the sizes it reads, the
byte-level BPE tokenizer, the chat template of a chat-tuned run, and an Ollama Modelfile beside it.

    python -m tools.gguf --ckpt=checkpoints/RUN/best.pt --out=model.gguf      # or make gguf CKPT=... OUT=...

Which llama.cpp architecture computes which of our forms (facts from its loader, src/models/*.cpp):
    gptneox  GPT-2's block with RoPE (the `tiny` preset): every bias and LayerNorm bias is required (zeros for a
             model without), so is an `output` tensor (no tied fallback: a tied head is written as a copy); the
             residuals run one after the other (use_parallel_residual=false); RoPE pairs channel i with i + hs/2
             ("NEOX" rope), as ours does; the fused qkv is all q, then k, then v, as our c_attn.
    llama    RoPE, RMSNorm, SwiGLU, grouped-query attention: llama.cpp turns consecutive channels (2i, 2i + 1), so q
             and k rows are permuted into that pairing (what its HF converter does); biases are optional.
    gpt2     GPT-2 itself (learned positions): every bias required; a tied head may be left out.
ggml computes GELU through a float16 table of the tanh approximation, so logits agree to a tolerance, not bit for bit
(tests/test_gguf.py states it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from config import Config, ModelConfig, UserError
from gptkit import bpe, hf, prompts, sources
from model import GPT, RMS_NORM_EPS, mlp_hidden_size

# Our form (named by the transformers class hf.py exports it as) -> llama.cpp's architecture.
ARCHITECTURES = {"GPTNeoXForCausalLM": "gptneox", "LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
DTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # Q8_0 stores each run of 32 numbers of a row as 32 bytes and one float16 scale
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
# llama.cpp's name for GPT-2's pre-tokenizer. llama-vocab.cpp maps "gpt-2" to LLAMA_VOCAB_PRE_TYPE_GPT2, whose split
# (unicode.cpp's unicode_regex_split_custom_gpt2) is bpe.GPT2_SPLIT_PATTERN, the trailing \s+ alternative included.
PRE_TOKENIZER = "gpt-2"
NORMAL, CONTROL, UNUSED = 1, 3, 5  # gguf.TokenType: an ordinary token, a special one, a padding id


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture for this form, or a one-line UserError naming the switches to train with instead."""
    return ARCHITECTURES[hf.export_architecture(config, kind="llama.cpp architecture", names=ARCHITECTURES,
                                                 action="write a GGUF")]


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer


def tokenizer_json(tokenizer: dict) -> str:
    """The run's byte-level BPE as a tokenizer.json text (GPT-2's from its ranks); char is refused with the reason."""
    name = str(tokenizer.get("name"))
    if name == "gpt2":
        return bpe.json_from_ranks(sources.gpt2_ranks(), {bpe.EOT: hf.GPT2_EOT})
    if name.startswith("bpe:"):
        return bpe.checked_json(tokenizer)
    raise UserError(f"the {name} tokenizer cannot go into a GGUF: llama.cpp reads byte-level BPE (or SentencePiece) "
                    "vocabularies, and a char vocabulary has no id for a character outside its training text; train "
                    "with --tokenizer=bpe:N (the tiny preset's) or --tokenizer=gpt2")


def vocabulary(tokenizer: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's "gpt2" tokenizer reads them: tokens in GPT-2's byte alphabet
    (bpe.byte_symbols), merges as "left right" in the order they apply. Ids the model has beyond the tokenizer's
    (a vocabulary padded for speed) become unused [PADn] tokens, as llama.cpp's converter writes them."""
    document = json.loads(tokenizer_json(tokenizer))
    ids = dict(document["model"]["vocab"])
    special = {t["content"]: t["id"] for t in document.get("added_tokens", [])}
    ids.update(special)
    if len(ids) > vocab_size:
        raise UserError(f"the {tokenizer.get('name')} tokenizer has {len(ids)} tokens but the model only "
                        f"{vocab_size} token ids; the checkpoint's tokenizer and weights do not belong together")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in ids.items():
        tokens[i], types[i] = text, CONTROL if text in special else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in document["model"]["merges"]]
    return tokens, types, merges


# ----------------------------------------------------------------------------------------------------------------
# The chat template, in the two template languages that read a GGUF: Jinja (llama.cpp, as Hugging Face writes
# templates) and Go's text/template (Ollama's Modelfile)


def _frame(template: prompts.ChatTemplate, role: str) -> tuple[str, str]:
    """The text before and after a message of this role ({content} marks the message)."""
    before, _, after = getattr(template, role).partition("{content}")
    return before, after


def jinja_template(template: prompts.ChatTemplate, end_text: str) -> str:
    """The chat template as Jinja over `messages` and `add_generation_prompt`, rendering what prompts.py's
    encode_conversation encodes. Every literal is a quoted string inside {{ }}, so that no engine's whitespace
    trimming (trim_blocks, lstrip_blocks) can eat a newline of the frame."""
    def text(value: str) -> str:
        return json.dumps(value)  # a double-quoted string with \n escapes: valid in Jinja too

    parts = ["{%- for message in messages -%}"]
    for keyword, role in (("if", "system"), ("elif", "user")):
        before, after = _frame(template, role)
        parts.append(f"{{%- {keyword} message['role'] == '{role}' -%}}"
                     f"{{{{ {text(before)} + message['content'] + {text(after)} }}}}")
    parts.append("{%- else -%}"
                 f"{{{{ {text(template.assistant)} + message['content'] + {text(end_text)} }}}}"
                 "{%- endif -%}{%- endfor -%}")
    parts.append(f"{{%- if add_generation_prompt -%}}{{{{ {text(template.assistant)} }}}}{{%- endif -%}}")
    return "".join(parts)


def go_template(template: prompts.ChatTemplate, end_text: str) -> str:
    """The chat template in Go's text/template over Ollama's .Messages; the reply is generated from the assistant's
    marker at the end. Written without {{- -}} trimming, which would eat a frame's own newlines."""
    system, user = _frame(template, "system"), _frame(template, "user")
    return ("{{ range .Messages }}"
            f'{{{{ if eq .Role "system" }}}}{system[0]}{{{{ .Content }}}}{system[1]}'
            f'{{{{ else if eq .Role "user" }}}}{user[0]}{{{{ .Content }}}}{user[1]}'
            f'{{{{ else if eq .Role "assistant" }}}}{template.assistant}{{{{ .Content }}}}{end_text}'
            "{{ end }}{{ end }}" + template.assistant)


def modelfile(gguf_name: str, template: prompts.ChatTemplate | None, end_text: str | None, context: int) -> str:
    """An Ollama Modelfile: FROM the file beside it, the chat template (a plain model gets the prompt as it is), the
    end-of-turn token as a stop, and the model's context length."""
    body = go_template(template, end_text) if template is not None else "{{ .Prompt }}"
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{body}"""', f"PARAMETER num_ctx {context}"]
    if end_text is not None:
        lines.append(f'PARAMETER stop "{end_text}"')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The weights


def _permute_for_rope_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows (heads * hs, ...) from our pairing (channel i with i + hs/2) into llama.cpp's llama pairing
    (channel 2i with 2i + 1): per head, [a0..a(h/2-1), b0..b(h/2-1)] -> [a0, b0, a1, b1, ...]. The same permutation
    of q and k leaves every dot product q.k, and so attention, unchanged."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gguf_tensors(model: GPT, architecture: str) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names (blk.N.attn_qkv, ...), float32, in nn.Linear's (out, in) layout;
    the gguf package writes them with dimensions reversed, as ggml counts them."""
    config = model.config
    ours = {name: t.detach().to("cpu", torch.float32) for name, t in model.state_dict().items()}
    needs_biases = architecture != "llama"  # gpt2 and gptneox load every bias; llama takes them when present

    def put(tensors: dict, theirs: str, mine: str, has_bias: bool = True) -> None:
        tensors[theirs + ".weight"] = ours[mine + ".weight"]
        if mine + ".bias" in ours:
            tensors[theirs + ".bias"] = ours[mine + ".bias"]
        elif needs_biases and has_bias:  # a model trained without biases computes the same with zero biases
            tensors[theirs + ".bias"] = torch.zeros(ours[mine + ".weight"].shape[0])

    tensors = {"token_embd.weight": ours["transformer.wte.weight"]}
    if config.position == "learned":
        tensors["position_embd.weight"] = ours["transformer.wpe.weight"]
    put(tensors, "output_norm", "transformer.ln_f")
    if architecture == "gptneox" or not config.tie_embeddings:  # gptneox has no tied fallback: a copy
        tensors["output.weight"] = ours["lm_head.weight"]
    heads, kv_heads, C = config.n_head, config.kv_heads, config.n_embd
    kv_size, hidden = kv_heads * (C // heads), mlp_hidden_size(config)
    for layer in range(config.n_layer):
        h, blk = f"transformer.h.{layer}.", f"blk.{layer}."
        put(tensors, blk + "attn_norm", h + "ln_1")
        put(tensors, blk + "ffn_norm", h + "ln_2")
        put(tensors, blk + "attn_output", h + "attn.c_proj")
        put(tensors, blk + "ffn_down", h + "mlp.c_proj")
        if architecture != "llama":
            put(tensors, blk + "attn_qkv", h + "attn.c_attn")  # all q, then k, then v: llama.cpp's fused layout
            put(tensors, blk + "ffn_up", h + "mlp.c_fc")
            continue
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = ours[h + "attn.c_attn." + kind].split((C, kv_size, kv_size))
            gate, up = ours[h + "mlp.c_fc." + kind].split((hidden, hidden))  # model.py's MLP chunks gate first
            tensors.update({f"{blk}attn_q.{kind}": _permute_for_rope_pairs(q, heads),
                            f"{blk}attn_k.{kind}": _permute_for_rope_pairs(k, kv_heads),
                            f"{blk}attn_v.{kind}": v, f"{blk}ffn_gate.{kind}": gate, f"{blk}ffn_up.{kind}": up})
    return {name: t.contiguous() for name, t in tensors.items()}


def check_dtype(dtype: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse an unknown --dtype, or q8_0 when a matrix's rows are not whole blocks of 32 (naming the first)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype} is not one of {', '.join(DTYPES)}")
    if dtype == "q8_0":
        for name, tensor in tensors.items():
            if tensor.dim() == 2 and tensor.shape[1] % Q8_BLOCK:
                raise UserError(f"--dtype=q8_0 needs every matrix row to be a multiple of {Q8_BLOCK} numbers, but "
                                f"{name} has rows of {tensor.shape[1]}; use --dtype=f16 (or train with n_embd and "
                                f"the MLP width multiples of {Q8_BLOCK})")


def _encoded(tensor: torch.Tensor, dtype: str):
    """(numpy data, ggml type) of one tensor: vectors (norms, biases) stay float32, as llama.cpp's converter keeps
    them; matrices become the chosen type."""
    import gguf

    array = tensor.numpy()
    if tensor.dim() < 2 or dtype == "f32":
        return array, gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


# ----------------------------------------------------------------------------------------------------------------
# The file


def write_gguf(payload: dict, model: GPT, config: Config, out: Path, dtype: str = "f32", name: str = "") -> dict:
    """Write the checkpoint (its payload, and the model and config built from it) as a GGUF at `out`, and the
    Modelfile beside it. Everything is checked before a byte is written; the file appears whole or not at all (a
    temp file renamed into place), so a refused or failed run leaves an existing `out` as it was. Returns what it
    wrote: the architecture, the paths, the end-of-turn text and whether a chat template went in."""
    import gguf

    architecture = gguf_architecture(config.model)
    tokenizer = payload.get("tokenizer") or dict(hf.GPT2_TOKENIZER)
    tokens, types, merges = vocabulary(tokenizer, config.model.vocab_size)
    tensors = gguf_tensors(model, architecture)
    check_dtype(dtype, tensors)
    eot = hf.eot_token_id(tokenizer, config.model.vocab_size)
    template = prompts.recorded_template(payload["instruct"], eot) if payload.get("instruct") else None
    end_id = template.end_of_turn if template is not None else eot
    end_text = tokens[end_id] if end_id is not None else None
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out={out} is a folder; give the file to write, e.g. --out={out / 'model.gguf'}")

    writer = gguf.GGUFWriter(None, architecture)
    _add_hyperparameters(writer, config.model, architecture, dtype, name or out.stem)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE with merges
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if eot is not None:  # as GPT-2's: <|endoftext|> begins and ends a text; neither is added to a prompt
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(end_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if template is not None:
        writer.add_eot_token_id(end_id)
        writer.add_chat_template(jinja_template(template, end_text))
    for tensor_name, tensor in tensors.items():
        data, ggml_type = _encoded(tensor, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=ggml_type)

    side = out.with_suffix(".Modelfile")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
        side.write_text(modelfile(out.name, template, end_text, config.model.block_size))
    except OSError as err:
        writer.close()
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # its folder could not be made: there is no temp file
            pass
        raise UserError(f"could not write {out}: {err.strerror or err}; choose a folder you can write to "
                        "(--out=PATH)") from None
    return {"architecture": architecture, "path": out, "modelfile": side, "end_text": end_text,
            "chat_template": template is not None, "dtype": dtype}


def _add_hyperparameters(writer, config: ModelConfig, architecture: str, dtype: str, name: str) -> None:
    """The sizes llama.cpp's loader reads for this architecture (llama_model_*::load_arch_hparams)."""
    import gguf

    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(mlp_hidden_size(config))
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_vocab_size(config.vocab_size)
    if config.position == "rope":
        writer.add_rope_dimension_count(config.n_embd // config.n_head)  # every channel of a head turns
        writer.add_rope_freq_base(config.rope_theta)
    if architecture == "llama":
        writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    else:
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
    if architecture == "gptneox":
        writer.add_parallel_residual(False)  # GPT-2's order: attention's residual, then the MLP's


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp's answer beside ours (--compare): needs llama-cpp-python (requirements-dev.txt)


def greedy_tokens(model: GPT, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """The most likely next token, again and again (the whole context each step: short runs only)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids[-model.config.block_size:]]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


def compare_with_llama_cpp(path: Path, model: GPT, prompt_ids: list[int], new_tokens: int = 64) -> dict:
    """Run the GGUF in llama.cpp (its default float16 KV cache) on the same ids: the largest logit difference over
    every prompt position, our largest |logit| for scale, and how many greedy tokens agree before the first that
    differs."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("--compare runs the file in llama.cpp through llama-cpp-python; install it with "
                        "venv/bin/python -m pip install llama-cpp-python (requirements-dev.txt)") from None
    context = model.config.block_size
    prompt_ids = prompt_ids[:context // 2]
    new_tokens = min(new_tokens, context - len(prompt_ids))  # the prompt and the continuation fit the context
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, verbose=False)
    try:
        llm.eval(prompt_ids)
        theirs = torch.tensor(llm.scores[:len(prompt_ids)])
        with torch.no_grad():
            ours = model(torch.tensor([prompt_ids]))[0]
        their_tokens = [t for _, t in zip(range(new_tokens), llm.generate(prompt_ids, temp=0.0, reset=True))]
    finally:
        llm.close()
    our_tokens = greedy_tokens(model, prompt_ids, new_tokens)
    agree = next((i for i, (a, b) in enumerate(zip(our_tokens, their_tokens)) if a != b), new_tokens)
    return {"max_logit_difference": float((theirs - ours).abs().max()), "largest_logit": float(ours.abs().max()),
            "positions": len(prompt_ids), "greedy_agree": agree, "greedy_tokens": new_tokens}
