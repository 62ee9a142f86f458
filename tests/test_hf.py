"""GPT-2 weights in and out of transformers' layout: equal logits both ways, and clear errors on broken folders.

    python -m pytest -q tests/test_hf.py   # no network: models are tiny and built from random weights
"""

import copy
import json
import time

import pytest
import torch
import transformers  # test-only dependency (requirements-dev.txt): the reference implementation of GPT-2
from safetensors.torch import load_file, save_file

import generate
from config import Config, ModelConfig, UserError
from gptkit import fast, hf, loading, sources
from gptkit.checkpoint import save_checkpoint
from model import GPT
from tools import export

VOCAB, CONTEXT = 100, 16


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, biases and LayerNorms included: a swapped or untransposed tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def transformers_model() -> "transformers.GPT2LMHeadModel":
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, seed=0)
    return model


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    """A folder written by transformers' save_pretrained, and the model that wrote it."""
    model = transformers_model()
    folder = tmp_path_factory.mktemp("gpt2-tiny")
    model.save_pretrained(folder)
    return folder, model


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, CONTEXT), generator=torch.Generator().manual_seed(1))


def rewrite(src, dst, change_tensors=None, change_config=None):
    """Copy a pretrained folder to dst, editing its tensors and/or its config.json on the way."""
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if change_config:
        change_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_folder_saved_by_transformers_loads_with_equal_logits(saved_by_transformers):
    folder, theirs = saved_by_transformers
    ours, config = hf.load_pretrained(str(folder))
    assert (config.vocab_size, config.n_layer, config.n_head, config.n_embd, config.block_size) == (VOCAB, 2, 2, 32, 16)
    x = tokens()
    with torch.no_grad():
        expected = theirs(x).logits
        got = ours.eval()(x)
    assert expected.abs().max() > 1.0  # random weights: the comparison below is not between two near-zero tensors
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied after loading


def test_hub_layout_without_prefix_and_with_mask_buffers_loads(saved_by_transformers, tmp_path):
    """OpenAI's files on the Hub name tensors `h.0.attn.c_attn.weight` and carry the causal mask as `h.N.attn.bias`."""
    folder, theirs = saved_by_transformers

    def to_hub_layout(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        for layer in range(2):
            tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, CONTEXT, CONTEXT))
            tensors[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    hub = rewrite(folder, tmp_path / "hub", change_tensors=to_hub_layout)
    assert "h.0.attn.bias" in load_file(str(hub / "model.safetensors"))
    ours, _ = hf.load_pretrained(str(hub), dropout=0.1)
    assert ours.config.dropout == 0.1
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x).logits, atol=1e-4, rtol=1e-4)


def export_tiny(tmp_path, bias: bool = True, tokenizer: dict | None = None, **switches):
    """A checkpoint of a tiny random model; `switches` (e.g. arch="llama", position="rope") as on the command line,
    where --arch sets its switches and the ones given beside it win."""
    model_config = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT, bias=bias,
                               **switches)
    if "arch" in switches:
        model_config.apply_arch(keep=switches)
    model_config.validate()
    config = Config(model=model_config)
    model = GPT(config.model).eval()
    randomize(model, seed=2)
    ckpt = tmp_path / "run" / "best.pt"
    save_checkpoint(ckpt, {"config": config.to_dict(), "model": model.state_dict(),
                           "tokenizer": tokenizer or {"name": "gpt2"}})
    return model, ckpt


@pytest.mark.parametrize("bias", [True, False])
def test_exported_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, bias):
    ours, ckpt = export_tiny(tmp_path, bias=bias)
    out = export.export_checkpoint(ckpt, tmp_path / "export")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    # transformers re-tied the head it was not given, rather than initialising a fresh one
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    saved = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in saved
    # GPT-2 always has biases: a model trained without them is written with zero biases, so the folder is complete
    assert torch.equal(saved["transformer.h.1.ln_2.bias"], torch.zeros(32)) or bias
    reloaded, _ = hf.load_pretrained(str(out))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x), ours(x), atol=1e-5, rtol=1e-5)
    assert saved["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D layout: (in, out)


@pytest.mark.parametrize("switches, architecture", [
    (dict(arch="llama"), "LlamaForCausalLM"),
    (dict(arch="llama", n_kv_head=2, bias=True, tie_embeddings=False, rope_theta=500.0), "LlamaForCausalLM"),
    (dict(position="rope"), "GPTNeoXForCausalLM"),
    (dict(position="rope", bias=False, tie_embeddings=False, rope_theta=500.0), "GPTNeoXForCausalLM"),
], ids=["llama-gqa", "llama-biases-untied", "gpt2-rope", "gpt2-rope-no-biases-untied"])
def test_rope_forms_export_to_their_transformers_class_with_equal_logits_and_greedy_tokens(tmp_path, switches,
                                                                                           architecture):
    ours, ckpt = export_tiny(tmp_path, **switches)
    out = export.export_checkpoint(ckpt, tmp_path / "export")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # offline: a local folder
    assert type(theirs).__name__ == architecture
    assert getattr(theirs.config, "num_key_value_heads", ours.config.n_head) == ours.config.kv_heads
    x = tokens()
    with torch.no_grad():
        want = theirs(x).logits
        assert want.abs().max() > 1.0  # random weights: not two near-zero tensors
        # fp32, all 16 positions of 2 rows; equal to the last bit here, 1e-5 allows another summation order
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
    prompt = x[:, :4]
    their_tokens = theirs.generate(prompt, max_new_tokens=CONTEXT - 4, do_sample=False)[:, 4:]
    decoder = fast.lay_out_for_decoding(copy.deepcopy(ours))  # generate.py's CPU decoding layout, KV cache on
    our_tokens = generate.generate(decoder, prompt, CONTEXT - 4, generate.Sampling(temperature=0)).tokens
    assert torch.equal(our_tokens, their_tokens)


def test_gpt2_form_with_its_own_lm_head_exports_untied(tmp_path):
    ours, ckpt = export_tiny(tmp_path, tie_embeddings=False)
    out = export.export_checkpoint(ckpt, tmp_path / "export")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert theirs.lm_head.weight.data_ptr() != theirs.transformer.wte.weight.data_ptr()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("switches, message", [
    (dict(position="rope", norm="rmsnorm"), r"train with --mlp=swiglu \(LlamaForCausalLM\) or with "
                                            r"--norm=layernorm \(GPTNeoXForCausalLM\) or with --position=learned "
                                            r"--norm=layernorm \(GPT2LMHeadModel\) to export it"),
    (dict(arch="llama", mlp="gelu"), r"\(position=rope, norm=rmsnorm, mlp=gelu, n_kv_head=1\); train with "
                                     r"--mlp=swiglu \(LlamaForCausalLM\)"),
    (dict(n_kv_head=1), r"train with --n_kv_head=2 \(GPT2LMHeadModel\)"),
], ids=["rope-rmsnorm-gelu", "llama-with-gelu", "gpt2-with-gqa"])
def test_a_mix_no_transformers_class_computes_is_refused_in_one_line_naming_the_switch(tmp_path, switches, message):
    _, ckpt = export_tiny(tmp_path, **switches)
    with pytest.raises(UserError, match=message) as err:
        export.export_checkpoint(ckpt, tmp_path / "export")
    assert "\n" not in str(err.value) and not (tmp_path / "export").exists()


def test_export_round_trips_through_load_pretrained_with_its_tokenizer(tmp_path):
    char_tokenizer = {"name": "char", "chars": "".join(chr(32 + i) for i in range(VOCAB))}
    ours, ckpt = export_tiny(tmp_path, tokenizer=char_tokenizer)
    out = export.export_checkpoint(ckpt, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] is None  # no GPT-2 BPE, no <|endoftext|>
    loaded, _ = hf.load_pretrained(str(out))
    assert hf.pretrained_tokenizer(str(out)) == char_tokenizer
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), ours(x))


def test_export_cli_writes_next_to_the_checkpoint_and_refuses_model_options(tmp_path, capsys):
    _, ckpt = export_tiny(tmp_path)
    export.main([f"--ckpt={ckpt}"])
    assert sorted(p.name for p in (ckpt.parent / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer_spec.json"]
    assert "GPT2LMHeadModel.from_pretrained" in capsys.readouterr().out
    with pytest.raises(UserError, match="--n_layer"):
        export.main([f"--ckpt={ckpt}", "--n_layer=4"])


@pytest.mark.parametrize("change_tensors, change_config, message", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), None, r"no tensor h\.1\.mlp\.c_fc\.bias"),
    (lambda t: t.update({"transformer.h.0.attn.c_proj.weight": torch.zeros(32, 31)}), None,
     r"h\.0\.attn\.c_proj\.weight .* shape \(32, 31\).*\(32, 32\)"),
    (None, lambda c: c.update(vocab_size=120), r"vocab_size=120 but wte\.weight holds 100"),
    (None, lambda c: c.update(n_layer=1), r"no place for: h\.1\."),
    (lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB, 32)}), None, "lm_head.weight that differs"),
    (None, lambda c: c.update(activation_function="relu"), "activation_function='relu'"),
    (None, lambda c: c.update(model_type="llama"), "model_type='llama'"),
], ids=["missing-tensor", "wrong-shape", "vocab-mismatch", "extra-layer", "untied-head", "activation", "not-gpt2"])
def test_broken_folder_is_a_user_error_naming_the_problem(saved_by_transformers, tmp_path, change_tensors,
                                                          change_config, message):
    folder, _ = saved_by_transformers
    broken = rewrite(folder, tmp_path / "broken", change_tensors, change_config)
    with pytest.raises(UserError, match=message):
        hf.load_pretrained(str(broken))


def test_tokenizer_with_another_vocabulary_is_refused(saved_by_transformers):
    folder, _ = saved_by_transformers
    hf.load_pretrained(str(folder), vocab_size=VOCAB)  # the same size loads
    with pytest.raises(UserError, match=r"vocab_size=100 but the data's tokenizer has 50257 tokens"):
        hf.load_pretrained(str(folder), vocab_size=50257)


def test_missing_folder_or_file_is_a_user_error(saved_by_transformers, tmp_path):
    with pytest.raises(UserError, match="neither gpt2, gpt2-medium"):
        hf.load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((saved_by_transformers[0] / "config.json").read_text())
    with pytest.raises(UserError, match="has no model.safetensors"):
        hf.load_pretrained(str(tmp_path / "half"))


def test_unreachable_hub_fails_fast_with_one_line_pointing_to_a_local_folder(monkeypatch):
    import huggingface_hub

    def not_cached(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        hf.load_pretrained("gpt2")
    assert time.perf_counter() - start < 2 * hf.HUB_PROBE_TIMEOUT_S
    message = str(err.value)
    assert "cannot download gpt2" in message and "--init_from=PATH" in message and "\n" not in message
    assert "openai-community/gpt2 config.json model.safetensors" in message


def test_model_options_that_contradict_the_weights_are_refused():
    pretrained = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT)
    requested = ModelConfig(n_layer=4, dropout=0.2)
    loading.check_overrides(pretrained, requested, frozenset({"dropout"}))  # dropout is free; unset sizes are ignored
    with pytest.raises(UserError, match="--n_layer=4 contradicts the loaded model's n_layer=2"):
        loading.check_overrides(pretrained, requested, frozenset({"n_layer", "dropout"}))


def test_official_name_loads_from_the_local_cache_without_touching_the_network(saved_by_transformers, monkeypatch):
    import huggingface_hub
    folder, theirs = saved_by_transformers
    asked = []

    def cached(repo, filename, local_files_only=False, **kwargs):
        assert local_files_only, "went to the network although the files are cached"
        asked.append((repo, filename))
        return str(folder / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cached)
    monkeypatch.setattr(sources, "unreachable_reason", lambda *a: pytest.fail("probed the Hub for cached files"))
    ours, _ = hf.load_pretrained("gpt2-medium")
    assert asked == [("openai-community/gpt2-medium", "config.json"), ("openai-community/gpt2-medium",
                                                                        "model.safetensors")]
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x).logits, atol=1e-4, rtol=1e-4)


def test_failed_download_after_a_successful_probe_is_one_line(monkeypatch):
    import huggingface_hub

    def failing(repo, filename, local_files_only=False, **kwargs):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        raise OSError("HTTP 503 Service Unavailable\nretry later")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "unreachable_reason", lambda *a: None)
    with pytest.raises(UserError, match=r"downloading gpt2-xl from the Hugging Face Hub failed \(HTTP 503 Service "
                                        r"Unavailable\); pass a local folder") as err:
        hf.load_pretrained("gpt2-xl")
    assert "\n" not in str(err.value)
